"""The service itself: `python aggregator.py` with no command, until SIGTERM or SIGINT.

It wires the parts and handles signals; each part lives in its own module (docs/design.md has the
picture):
- consumer.py: the pika connection on the main thread (receive, validate, ack, reject);
- pipeline.py: the buffer, the ack sequencer and the flush workers that write batches;
- db.py: everything that speaks SQL;
- health.py, metrics.py, summary.py, systemd.py: what the service says about itself.

aggregator.py imports it only to serve: the one-shot commands start without pika's consumer, the
metrics server and the pipeline.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import db
import heads
import httpauth
from config import Config, version
from consumer import Consumer
from deadletter_publisher import DeadLetterPublisher
from exits import CONFIG as EXIT_CONFIG
from exits import FAILURE as EXIT_FAILURE
from exits import OK as EXIT_OK
from health import Health, ReplicationWatch
from metrics import Metrics
from pipeline import Pipeline
from summary import Summary
from systemd import Notifier

# Under the entry point's name, as the log has always said it ("__main__: stopped (exit code 0)").
logger = logging.getLogger("__main__")


def serve(config: Config) -> int:
    """Run the service until SIGTERM or SIGINT. Returns the exit code."""
    stop = threading.Event()
    running: list[Consumer] = []  # the consumer once there is one, for the signal handler
    _handle_signals(stop, running)
    notifier = Notifier(os.environ)
    metrics = Metrics(max_laws=config.metrics_max_laws, version=version(), embargo=config.results_embargo)
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
