"""The vote aggregation service's entry point: `python aggregator.py [--check | --init-db | results | verify]`.

It parses the command line, reads the configuration and runs the command, or the service itself
(service.py, which wires the parts; docs/design.md has the picture). Each command imports the
modules it runs and no others: `results` starts without pika, the metrics server or the signing keys.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import ssl
import sys
from collections.abc import Sequence

# config.py, exits.py and logsetup.py need only the standard library: --help and --version answer on
# a fresh clone, before requirements.txt is installed. Everything else waits for main() to say what is missing.
import logsetup
from config import HELP, SECRET_FILES_HELP, Config, ConfigError, load_config, load_env_file, variables, version
from exits import CONFIG as EXIT_CONFIG
from exits import FAILURE as EXIT_FAILURE
from exits import OK as EXIT_OK

# The modules each command runs (the service's: service.py's).
_MODULES = {
    "check": ("commands",),
    "init-db": ("initdb",),
    "results": ("results",),
    "verify": ("verify",),
    "seal": ("seal",),
    "dead-letters": ("deadletters", "amqp"),
    "serve": ("service",),
}

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
    missing = _import_modules(args)
    if missing is not None:
        print(
            f"error: Python module {missing.name} is not installed: run `make run`, or "
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
        from commands import check

        problems = check(config)
        for problem in problems:
            print(f"problem: {problem.text}", file=sys.stderr)
        if any(problem.certain for problem in problems):
            return EXIT_CONFIG
        return EXIT_FAILURE if problems else EXIT_OK
    if args.command == "dead-letters":
        return _dead_letters(config, args)
    if args.command is None and not args.init_db:
        from service import serve

        return serve(config)
    return _one_shot(config, args)


def _command_name(args: argparse.Namespace) -> str:
    if args.check:
        return "check"
    if args.init_db:
        return "init-db"
    return str(args.command or "serve")


def _import_modules(args: argparse.Namespace) -> ModuleNotFoundError | None:
    """Import the modules the command runs (_MODULES), or say which one is not installed."""
    try:
        for module in _MODULES[_command_name(args)]:
            importlib.import_module(module)
    except ModuleNotFoundError as exc:
        return exc
    return None


def _one_shot(config: Config, args: argparse.Namespace) -> int:
    """--init-db, `results`, `verify` and `seal`: a database error is one line, exit 2 when retrying cannot fix it."""
    import db

    try:
        if args.init_db:
            from initdb import init_db

            return init_db(config)
        if args.command == "results":
            import results

            if _withheld(config, args):
                print(
                    "error: RESULTS_EMBARGO is true: per-law results are withheld while the polls are open; "
                    "once they have closed, pass --polls-closed (its use is logged) or set RESULTS_EMBARGO=false",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            return results.print_results(config, law_id=args.law, fmt=args.format)
        if args.command == "verify":
            import verify

            return verify.print_verify(
                config,
                heads=args.head,
                heads_files=args.heads,
                keys=args.keys,
                embargo=_withheld(config, args),
            )
        import seal

        return seal.run(
            config,
            out_path=args.out,
            skip_queue_check=args.skip_queue_check,
            heads_files=args.heads,
            keys=args.keys,
        )
    except (db.DatabaseMissing, db.DatabaseConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except db.DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


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
    import pika.exceptions

    import deadletters
    from amqp import amqp_parameters, describe_error, refused_by_broker

    try:
        return deadletters.run(config, args, parameters=amqp_parameters(config, name="vote-aggregator dead-letters"))
    except (pika.exceptions.AMQPError, OSError) as exc:
        print(f"error: RabbitMQ {config.rabbitmq_url_for_logs()}: {describe_error(exc)}", file=sys.stderr)
        certain = refused_by_broker(exc) or isinstance(exc, ssl.SSLCertVerificationError)
        return EXIT_CONFIG if certain else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
