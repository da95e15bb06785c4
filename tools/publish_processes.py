"""The publishing processes: one connection each, its share of the messages, and what they add up to.

The parent starts one process per connection (fork), reads their confirmed counts from a shared
array while they run, and sums their reports into a Summary once they end. Ctrl-C in the parent
sets an event; each process then stops publishing and settles what is in flight.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import queue as queue_module
import signal
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pika

from amqp import amqp_parameters
from config import Config
from tools.progress import Progress
from tools.publisher import ConfirmedPublisher, Counts
from tools.vote_messages import MessageFactory

PROG = "publish_votes"
MP = multiprocessing.get_context("fork")

# Slots of one connection's counters in the shared array.
_PUBLISHED, _ACKED, _NACKED, _RETURNED = range(4)
_SLOTS = 4


@dataclass(frozen=True)
class Settings:
    count: int
    laws: int
    rate: float
    duplicates: float
    replays: float
    invalid: float
    connections: int
    queue: str
    host: str
    port: int
    user: str
    vhost: str = "/"
    # RABBITMQ_PASSWORD and the RABBITMQ_TLS_* settings, read from the environment as the service
    # reads them (a password on the command line would show in `ps`).
    broker: Config = field(default_factory=Config, repr=False)
    declare: bool = False
    window: int = 1000
    reuse_after: int = 1000
    seed: int = 0
    run_id: str = "demo"
    json_output: bool = False
    progress: str = "auto"

    def amqp(self, name: str) -> pika.ConnectionParameters:
        """The service's own connection parameters (TLS included), with this tool's host, port, user and vhost."""
        broker = replace(
            self.broker,
            rabbitmq_host=self.host,
            rabbitmq_port=self.port,
            rabbitmq_user=self.user,
            rabbitmq_vhost=self.vhost,
        )
        return amqp_parameters(broker, name=name)


def share(total: int, parts: int, index: int) -> int:
    """Part `index` of `total` split as evenly as possible into `parts`."""
    return total // parts + (1 if index < total % parts else 0)


def _connection_main(s: Settings, index: int, counters: Any, stop: Any, results: Any) -> None:
    """One publishing process: its share of the messages on its own connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    factory = MessageFactory(
        count=share(s.count, s.connections, index),
        laws=s.laws,
        duplicates=s.duplicates,
        replays=s.replays,
        invalid=s.invalid,
        reuse_after=s.reuse_after,
        seed=s.seed,
        run_id=s.run_id,
        connection=index,
        connections=s.connections,
    )
    base = index * _SLOTS

    def progress(counts: Counts) -> None:
        counters[base + _PUBLISHED] = counts.published
        counters[base + _ACKED] = counts.acked
        counters[base + _NACKED] = counts.nacked
        counters[base + _RETURNED] = counts.returned

    error: str | None
    try:
        error = ConfirmedPublisher(
            s.amqp(f"{PROG}-{s.run_id}-{index + 1}"),
            s.queue,
            factory.next,
            len(factory),
            rate=s.rate / s.connections,
            window=s.window,
            should_stop=stop.is_set,
            on_progress=progress,
        ).run()
    except Exception as exc:  # reported to the parent, which prints it and exits 1
        error = f"{type(exc).__name__}: {exc}"
    results.put({"connection": index, "error": error, **factory.report()})


@dataclass
class Summary:
    queue: str
    connections: int
    published: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    unconfirmed: int = 0
    votes: int = 0
    duplicates: int = 0
    replays: int = 0
    invalid: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    rate: float = 0.0
    run_id: str = ""
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not (self.nacked or self.returned or self.unconfirmed or self.errors or self.interrupted)

    def line(self) -> str:
        return (
            f"published={self.published} confirmed={self.confirmed} nacked={self.nacked} returned={self.returned} "
            f"unconfirmed={self.unconfirmed} votes={self.votes} duplicates={self.duplicates} replays={self.replays} "
            f"invalid={self.invalid} laws={len(self.totals)} connections={self.connections} "
            f"elapsed={self.elapsed_s:.2f}s rate={self.rate:.0f}/s"
        )

    def as_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items()}
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=True)


def summarize(s: Settings, counters: Any, reports: dict[int, dict[str, Any]], elapsed: float) -> Summary:
    summary = Summary(queue=s.queue, connections=s.connections, run_id=s.run_id, elapsed_s=elapsed)
    invalid: Counter[str] = Counter()
    totals: dict[str, list[int]] = {}
    for i in range(s.connections):
        published, acked, nacked, returned = (counters[i * _SLOTS + k] for k in range(_SLOTS))
        summary.published += published
        summary.confirmed += acked
        summary.nacked += nacked
        summary.returned += returned
        summary.unconfirmed += published - acked - nacked
        report = reports.get(i)
        if report is None:
            summary.errors.append(f"connection {i + 1}: the publishing process died without reporting")
            continue
        if report["error"]:
            summary.errors.append(f"connection {i + 1}: {report['error']}")
        summary.votes += report["votes"]
        summary.duplicates += report["duplicates"]
        summary.replays += report["replays"]
        invalid.update(report["invalid"])
        for law, (oui, non) in report["totals"].items():
            t = totals.setdefault(law, [0, 0])
            t[0] += oui
            t[1] += non
    summary.invalid = sum(invalid.values())
    summary.invalid_by_reason = dict(sorted(invalid.items()))
    summary.totals = {law: {"oui": oui, "non": non} for law, (oui, non) in sorted(totals.items())}
    summary.rate = summary.published / elapsed if elapsed > 0 else 0.0
    return summary


def publish(s: Settings, progress: Progress) -> Summary:
    counters = MP.Array("q", s.connections * _SLOTS, lock=False)
    stop = MP.Event()
    results = MP.Queue()
    procs = [
        MP.Process(target=_connection_main, args=(s, i, counters, stop, results), name=f"{PROG}-{i + 1}", daemon=True)
        for i in range(s.connections)
    ]
    reports: dict[int, dict[str, Any]] = {}
    gone_since: dict[int, float] = {}
    interrupted = False
    deadline = math.inf
    started = time.monotonic()
    for proc in procs:
        proc.start()

    def totals() -> tuple[int, int]:
        published = sum(counters[i * _SLOTS + _PUBLISHED] for i in range(s.connections))
        confirmed = sum(counters[i * _SLOTS + k] for i in range(s.connections) for k in (_ACKED, _NACKED))
        return published, confirmed

    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            try:
                report = results.get(timeout=0.1)
                reports[report["connection"]] = report
            except queue_module.Empty:
                pass
            progress.update(*totals())
            now = time.monotonic()
            for i, proc in enumerate(procs):
                # A process that died without reporting (killed, out of memory): give
                # its report a moment to arrive through the pipe, then stop waiting.
                if i not in reports and not proc.is_alive() and now - gone_since.setdefault(i, now) > 2.0:
                    reports[i] = {"connection": i, "error": f"exited with status {proc.exitcode} without reporting"}
                    reports[i].update(votes=0, duplicates=0, replays=0, invalid={}, totals={})
        except KeyboardInterrupt:
            if interrupted:
                break  # a second Ctrl-C: stop waiting for confirms
            interrupted = True
            stop.set()
            deadline = time.monotonic() + 10.0
    elapsed = time.monotonic() - started
    for proc in procs:
        proc.join(1.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
    progress.finish(*totals())
    summary = summarize(s, counters, reports, elapsed)
    summary.interrupted = interrupted
    return summary
