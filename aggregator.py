"""The vote aggregation service's entry point: `python aggregator.py [--check | --init-db | results | verify]`.

It parses the command line, reads the configuration, wires the parts and
handles signals; each part lives in its own module (docs/design.md has the
picture):
- consumer.py: the pika connection on the main thread (receive, validate, ack, reject);
- pipeline.py: the buffer, the ack sequencer and the flush workers that write batches;
- db.py: everything that speaks SQL;
- health.py, metrics.py, summary.py, systemd.py: what the service says about itself.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from types import FrameType

# config.py and exits.py need only the standard library: --help and --version answer on a fresh
# clone, before requirements.txt is installed. Everything else waits for main() to say what is missing.
from config import HELP, SECRET_FILES_HELP, Config, ConfigError, load_config, load_env_file, variables, version
from exits import CONFIG as EXIT_CONFIG
from exits import FAILURE as EXIT_FAILURE
from exits import OK as EXIT_OK

try:
    import pika.exceptions

    import db
    import deadletters
    import heads
    import httpauth
    import logsetup
    import results
    import seal
    import verify
    from amqp import amqp_parameters, describe_error, refused_by_broker
    from commands import check, init_db
    from consumer import Consumer
    from deadletter_publisher import DeadLetterPublisher
    from health import Health, ReplicationWatch
    from metrics import Metrics
    from pipeline import Pipeline
    from summary import Summary
    from systemd import Notifier
except ModuleNotFoundError as exc:
    _MISSING: ModuleNotFoundError | None = exc
else:
    _MISSING = None

logger = logging.getLogger(__name__)

VERSION = version()


_POLLS_CLOSED_HELP = "the polls are closed: print per-law figures although RESULTS_EMBARGO is true (the use is logged)"


def _parser() -> argparse.ArgumentParser:
    defaults = variables()

    def shown(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if value != "" else "unset"

    lines = [f"  {name} (default {shown(defaults[name])}): {HELP[name]}" for name in defaults]
    lines += [f"  {name} (default unset): {text}" for name, text in SECRET_FILES_HELP.items()]
    parser = argparse.ArgumentParser(
        prog="aggregator.py",
        description="Vote aggregation service: counts validated votes from RabbitMQ into PostgreSQL. "
        "With no arguments it runs until SIGTERM or SIGINT.",
        epilog="environment variables (also read from a .env file; set ones win):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, connect to RabbitMQ and PostgreSQL, verify the schema; "
        f"exit {EXIT_OK} when all is well, {EXIT_FAILURE} on a problem that may pass, "
        f"{EXIT_CONFIG} on one that retrying cannot fix (a configuration error)",
    )
    mode.add_argument(
        "--init-db",
        action="store_true",
        help="create the database if missing, apply the migrations above its schema version in order, then "
        "init_db.sql, and exit (docs/operations.md#upgrading)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    results_parser = commands.add_parser("results", help="print the counts stored in PostgreSQL and exit")
    results_parser.add_argument("--law", metavar="ID", help="only this law")
    results_parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    results_parser.add_argument("--polls-closed", action="store_true", help=_POLLS_CLOSED_HELP)
    verify_parser = commands.add_parser(
        "verify",
        help="recount vote_audit against vote_results and check the hash chains; "
        f"exit {EXIT_OK} when all agree, {EXIT_FAILURE} if not, {EXIT_CONFIG} on a configuration error",
    )
    verify_parser.add_argument(
        "--head",
        action="append",
        default=[],
        metavar="CHAIN:SEQ:DIGEST",
        help="a chain head as the service logged it; fails unless the chain still leads to it (repeatable)",
    )
    verify_parser.add_argument("--polls-closed", action="store_true", help=_POLLS_CLOSED_HELP)
    verify_parser.add_argument(
        "--heads",
        action="append",
        default=[],
        metavar="FILE",
        help="signed chain heads (each instance's CHAIN_HEADS_FILE, an observer's copy) or a seal: fails unless "
        "the database holds exactly the chains the FILEs vouch for (repeatable)",
    )
    verify_parser.add_argument(
        "--keys",
        metavar="PUBLIC_KEYS",
        help="PEM file of the instances' Ed25519 public keys the heads must be signed with",
    )
    seal_parser = commands.add_parser(
        "seal",
        help="once the queue is drained and every instance stopped: verify, then print one signed record of the "
        "totals and every chain's final head (the polls are closed)",
    )
    seal_parser.add_argument("--out", metavar="FILE", help="also append the record to FILE")
    seal_parser.add_argument(
        "--skip-queue-check", action="store_true", help="do not ask RabbitMQ whether RABBITMQ_QUEUE is drained"
    )
    seal_parser.add_argument(
        "--heads",
        action="append",
        default=[],
        metavar="FILE",
        help="the instances' signed chain heads: refuses to seal unless the database holds exactly the chains "
        "they vouch for, every link vouched for (repeatable)",
    )
    seal_parser.add_argument(
        "--keys",
        metavar="PUBLIC_KEYS",
        help="PEM file of the instances' Ed25519 public keys the heads must be signed with",
    )
    _add_dead_letters(commands)
    return parser


def _add_dead_letters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dead = commands.add_parser(
        "dead-letters", help="list, show or replay the messages in the dead-letter queue (RABBITMQ_DEAD_LETTER_QUEUE)"
    )
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="count by reason, then every message oldest first")
    show = actions.add_parser("show", help="one message, headers and body")
    show.add_argument("index", type=int, help="its number in `list`")
    for sub in (listing, show):
        sub.add_argument("--show-citizens", action="store_true", help="print citizen ids (hidden by default)")
        sub.add_argument("--limit", type=int, default=10_000, help="read at most this many messages (10000)")
    replay = actions.add_parser(
        "replay", help="move messages to RABBITMQ_QUEUE, each confirmed there before it leaves the dead-letter queue"
    )
    replay.add_argument("--all", action="store_true", help="every message")
    replay.add_argument("--reason", action="append", metavar="R", help="messages refused for this reason (repeatable)")
    replay.add_argument("--vote-hash", action="append", metavar="H", help="the message of this vote (repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if _MISSING is not None:
        print(
            f"error: Python module {_MISSING.name} is not installed: run `make run`, or "
            f"`{sys.executable} -m pip install -r requirements.txt` (README.md#quick-start-local)",
            file=sys.stderr,
        )
        return EXIT_CONFIG

    load_env_file()
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        # --check reports every problem as a "problem:" line; the code is the same everywhere.
        print(f"problem: configuration: {exc}" if args.check else f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logsetup.configure(level=config.log_level, fmt=config.log_format)

    if args.check:
        problems = check(config)
        for problem in problems:
            print(f"problem: {problem.text}", file=sys.stderr)
        if any(problem.certain for problem in problems):
            return EXIT_CONFIG
        return EXIT_FAILURE if problems else EXIT_OK
    try:
        if args.init_db:
            return init_db(config)
        if args.command == "results":
            if _withheld(config, args):
                print(
                    "error: RESULTS_EMBARGO is true: per-law results are withheld while the polls are open; "
                    "once they have closed, pass --polls-closed (its use is logged) or set RESULTS_EMBARGO=false",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            return results.print_results(config, law_id=args.law, fmt=args.format)
        if args.command == "verify":
            return verify.print_verify(
                config,
                heads=args.head,
                heads_files=args.heads,
                keys=args.keys,
                embargo=_withheld(config, args),
            )
        if args.command == "seal":
            return seal.run(
                config,
                out_path=args.out,
                skip_queue_check=args.skip_queue_check,
                heads_files=args.heads,
                keys=args.keys,
            )
        if args.command == "dead-letters":
            return _dead_letters(config, args)
    except (db.DatabaseMissing, db.DatabaseConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except db.DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return serve(config)


def _withheld(config: Config, args: argparse.Namespace) -> bool:
    """The embargo holds for `results` and `verify` too (docs/security.md#the-results-embargo): lifting
    it for one command takes --polls-closed, and that is said in the log, with who asked."""
    if not config.results_embargo:
        return False
    if not args.polls_closed:
        return True
    logger.warning(
        "%s: per-law figures printed under RESULTS_EMBARGO because --polls-closed was given (by %s)",
        args.command,
        _who(),
    )
    return False


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _dead_letters(config: Config, args: argparse.Namespace) -> int:
    try:
        return deadletters.run(config, args, parameters=amqp_parameters(config, name="vote-aggregator dead-letters"))
    except (pika.exceptions.AMQPError, OSError) as exc:
        print(f"error: RabbitMQ {config.rabbitmq_url_for_logs()}: {describe_error(exc)}", file=sys.stderr)
        certain = refused_by_broker(exc) or isinstance(exc, ssl.SSLCertVerificationError)
        return EXIT_CONFIG if certain else EXIT_FAILURE


def serve(config: Config) -> int:
    """Run the service until SIGTERM or SIGINT. Returns the exit code."""
    stop = threading.Event()
    running: list[Consumer] = []  # the consumer once there is one, for the signal handler
    _handle_signals(stop, running)
    notifier = Notifier(os.environ)
    metrics = Metrics(max_laws=config.metrics_max_laws, version=VERSION, embargo=config.results_embargo)
    health = Health(stall_timeout_s=config.stall_timeout_s, notifier=notifier)
    if not _serve_http(config, metrics, health):
        return EXIT_CONFIG
    try:
        heads.check_heads_file(config.chain_heads_file)
        signing_key = heads.load_signing_key(config.chain_signing_key_file, heads_file=config.chain_heads_file)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    notifier.notify("STATUS=connecting to PostgreSQL")
    try:
        database = _open_database(config, stop)
    except (db.DatabaseMissing, db.DatabaseConfigError) as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    if database is None:
        return EXIT_OK
    replication = _replication_watch(config, database, metrics)
    try:
        recorder = heads.HeadRecorder(
            config=config,
            chains=database.chains,
            instance=database.instance_id,
            key=signing_key,
            before_final=database.settle_pending_links,
        )
        code = _count_votes(config, database, metrics, health, notifier, replication, stop, running, recorder)
    finally:
        replication.stop()
        database.close()
    logger.info("stopped (exit code %d)", code)
    return code


def _handle_signals(stop: threading.Event, running: list[Consumer]) -> None:
    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # A handler only sets flags; the connection thread runs the shutdown.
        if stop.is_set():
            # Second signal: leave now. Unacked votes are redelivered and absorbed.
            os._exit(EXIT_FAILURE)
        stop.set()
        for consumer in running:
            consumer.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _count_votes(
    config: Config,
    database: db.Database,
    metrics: Metrics,
    health: Health,
    notifier: Notifier,
    replication: ReplicationWatch,
    stop: threading.Event,
    running: list[Consumer],
    recorder: heads.HeadRecorder,
) -> int:
    """Wire the consumer and the pipeline, and consume until stopped. Returns the exit code."""
    _read_totals(database, metrics)
    replication.start()  # said once before consuming, then on its own thread
    summary = Summary(interval_s=config.log_summary_interval_s)
    consumer = Consumer(
        config=config,
        metrics=metrics,
        summary=summary,
        notifier=notifier,
        on_turn=health.turned,
        hold=replication.hold_reason,
    )
    running.append(consumer)
    # A connection of its own: a broker alarm blocks it, never the consuming one (acks go on).
    dead_letters = DeadLetterPublisher(config=config, metrics=metrics)
    pipeline = Pipeline(
        config=config,
        database=database,
        metrics=metrics,
        summary=summary,
        settle=consumer.settle,
        on_fatal=lambda _reason: consumer.request_stop(),
        dead_letters=dead_letters,
    )
    health.watch(
        consumer=consumer, pipeline=pipeline, hold=replication.hold_reason, blocked=lambda: dead_letters.blocked
    )
    if stop.is_set():
        consumer.request_stop()
    dead_letters.start()
    pipeline.start()
    recorder.start()
    try:
        code = _exit_code(consumer.run(pipeline), pipeline)
    finally:
        # Only now: the flush workers, done, no longer wait for a dead-letter copy.
        dead_letters.stop()
        # The final heads, signed, once no batch is being written: they anchor every committed batch.
        try:
            recorder.stop()
        except Exception:
            logger.exception("could not record the final chain heads")
            code = EXIT_FAILURE
        # Until here the shutdown guard bounds it all: publishing the final heads may wait on a
        # broker that does not answer, or blocks publishers during an alarm.
        consumer.shutdown_done()
    # The last heads in the log too, so that a log kept elsewhere anchors them as well.
    summary.log_heads()
    return code


def _replication_watch(config: Config, database: db.Database, metrics: Metrics) -> ReplicationWatch:
    return ReplicationWatch(
        read=database.replication_state,
        metrics=metrics,
        interval_s=config.postgres_replication_check_interval_s,
        require_sync=config.postgres_require_sync_standby,
        user=config.postgres_user,
    )


def _serve_http(config: Config, metrics: Metrics, health: Health) -> bool:
    """/metrics, /healthz and /readyz; False (logged) when the port cannot be had or its lock cannot be read."""
    try:
        lock = httpauth.load(config)
    except ValueError as exc:
        logger.error("%s", exc)
        return False
    try:
        metrics.serve(
            port=config.prometheus_port,
            addr=config.prometheus_bind_address,
            readiness=health.readiness,
            liveness=health.liveness,
            tls=lock.tls,
            auth=lock.auth,
        )
    except OSError as exc:
        logger.error(
            "cannot serve metrics on %s:%d (PROMETHEUS_BIND_ADDRESS, PROMETHEUS_PORT): %s",
            config.prometheus_bind_address,
            config.prometheus_port,
            exc,
        )
        return False
    return True


def _open_database(config: Config, stop: threading.Event) -> db.Database | None:
    """Connect and make sure the schema exists, waiting for PostgreSQL if it is down."""
    database = db.Database(config=config)
    delay = 1.0
    while not stop.is_set():
        try:
            database.open()
            database.ensure_schema()
            logger.info("connected to PostgreSQL at %s", config.postgres_target_for_logs())
            _warn_about_privileges(database)
            return database
        except db.RetryableError as exc:
            database.close()
            logger.warning("PostgreSQL not available (%s); retrying in %.1fs", exc, delay)
        stop.wait(delay)
        delay = min(delay * 2, config.retry_max_delay_s)
    return None


def _warn_about_privileges(database: db.Database) -> None:
    """Least privilege (docs/security.md): say so when the service's role could rewrite the audit trail."""
    try:
        warnings = database.privilege_warnings()
    except db.DatabaseError as exc:
        logger.warning("could not check the PostgreSQL role's rights (%s)", exc)
        return
    for warning in warnings:
        logger.warning("%s", warning)


def _read_totals(database: db.Database, metrics: Metrics) -> None:
    try:
        metrics.set_totals(database.read_totals())
    except db.DatabaseError as exc:
        logger.warning("could not read current totals (%s); gauges fill in as batches commit", exc)
    metrics.database_up.set(1)


def _exit_code(code: int, pipeline: Pipeline) -> int:
    """A run that left a batch unsettled, or hit a fatal error, did not end cleanly."""
    unsettled = pipeline.unsettled
    if unsettled:
        logger.error("%d batches were not settled: RabbitMQ redelivers their votes", unsettled)
    if (unsettled or pipeline.fatal is not None) and code == EXIT_OK:
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
