"""The benchmark's figures: each phase's result, the table printed, the JSON written."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_db import Check
from bench_settings import Settings
from procstat import CpuUse

# Targets are printed next to the figures; missing one does not fail the run.
TARGET_LIMIT_RATIO = 0.85
TARGET_NAIVE_RATIO = 10.0
TARGET_P99_MS = 300.0
TARGET_RSS_MB = 80.0
# Per vote, median of the rounds' ratios (issue 21): the service's own CPU against the bare
# consumer's, and the whole machine's busy CPU during the service's run against the bare run's.
TARGET_CPU_RATIO = 1.4
TARGET_MACHINE_RATIO = 1.6
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass
class Throughput:
    votes: int
    seconds: float | None
    publish_rate: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # CPU over `cpu_votes` votes: own (every instance summed), the machine's busy CPU, the broker's
    # (beam.smp and its children) and the PostgreSQL cluster's (see CpuSources).
    cpu_s: float | None = None
    busy_core_s: float | None = None
    cpu_votes: int = 0
    rabbitmq_cpu_s: float | None = None
    postgres_cpu_s: float | None = None
    backends_cpu_s: float | None = None

    @classmethod
    def measured(
        cls,
        votes: int,
        seconds: float | None,
        publish_rate: float | None,
        use: CpuUse | None,
        cpu_votes: int,
        details: dict[str, Any] | None = None,
    ) -> Throughput:
        if use is None or not cpu_votes:
            return cls(votes, seconds, publish_rate, details or {})
        return cls(
            votes,
            seconds,
            publish_rate,
            details or {},
            cpu_s=use.own_s,
            busy_core_s=use.busy_core_s,
            cpu_votes=cpu_votes,
            rabbitmq_cpu_s=use.rabbitmq_s,
            postgres_cpu_s=use.postgres_s,
            backends_cpu_s=use.backends_s,
        )

    @property
    def rate(self) -> float | None:
        return self.votes / self.seconds if self.seconds else None

    def _per_vote(self, seconds: float | None) -> float | None:
        return 1e6 * seconds / self.cpu_votes if seconds is not None and self.cpu_votes else None

    @property
    def cpu_us_per_vote(self) -> float | None:
        return self._per_vote(self.cpu_s)

    @property
    def machine_us_per_vote(self) -> float | None:
        """Busy CPU of the whole machine (RabbitMQ, PostgreSQL, the bench, anything else) per vote."""
        return self._per_vote(self.busy_core_s) if self.busy_core_s else None

    @property
    def votes_per_busy_core_s(self) -> float | None:
        return self.cpu_votes / self.busy_core_s if self.busy_core_s else None

    def figures(self) -> Figures:
        own, machine = self.cpu_us_per_vote, self.machine_us_per_vote
        rabbitmq, postgres = self._per_vote(self.rabbitmq_cpu_s), self._per_vote(self.postgres_cpu_s)
        pipeline = None if own is None or rabbitmq is None or postgres is None else own + rabbitmq + postgres
        return Figures(
            votes=self.votes,
            seconds=self.seconds,
            votes_per_s=self.rate,
            cpu_us_per_vote=self.cpu_us_per_vote,
            machine_us_per_vote=self.machine_us_per_vote,
            rabbitmq_us_per_vote=rabbitmq,
            postgres_us_per_vote=postgres,
            backends_us_per_vote=self._per_vote(self.backends_cpu_s),
            pipeline_us_per_vote=pipeline,
            rest_us_per_vote=None if machine is None or pipeline is None else machine - pipeline,
            votes_per_busy_core_s=self.votes_per_busy_core_s,
        )


@dataclass(frozen=True)
class Figures:
    """One row of the table: one run's figures, or the median of the rounds' figures column by column."""

    votes: int
    seconds: float | None
    votes_per_s: float | None
    cpu_us_per_vote: float | None
    machine_us_per_vote: float | None
    rabbitmq_us_per_vote: float | None
    postgres_us_per_vote: float | None
    backends_us_per_vote: float | None  # the consumer's own PostgreSQL backends, part of postgres_us_per_vote
    pipeline_us_per_vote: float | None  # own + RabbitMQ + PostgreSQL: the machine's without the rest
    rest_us_per_vote: float | None  # the machine's CPU that is neither the consumer's nor a server's
    votes_per_busy_core_s: float | None

    @classmethod
    def median(cls, rounds: Sequence[Figures]) -> Figures:
        def med(values: Sequence[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else None

        return cls(
            votes=rounds[0].votes,
            seconds=med([r.seconds for r in rounds]),
            votes_per_s=med([r.votes_per_s for r in rounds]),
            cpu_us_per_vote=med([r.cpu_us_per_vote for r in rounds]),
            machine_us_per_vote=med([r.machine_us_per_vote for r in rounds]),
            rabbitmq_us_per_vote=med([r.rabbitmq_us_per_vote for r in rounds]),
            postgres_us_per_vote=med([r.postgres_us_per_vote for r in rounds]),
            backends_us_per_vote=med([r.backends_us_per_vote for r in rounds]),
            pipeline_us_per_vote=med([r.pipeline_us_per_vote for r in rounds]),
            rest_us_per_vote=med([r.rest_us_per_vote for r in rounds]),
            votes_per_busy_core_s=med([r.votes_per_busy_core_s for r in rounds]),
        )


@dataclass
class Latency:
    published: int
    seen: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    publish_rate: float
    poll_period_ms: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    # One result per round of the bare and the service phases, in the order they ran.
    bare_rounds: list[Throughput] = field(default_factory=list)
    service_rounds: list[Throughput] = field(default_factory=list)
    naive: Throughput | None = None
    latency: Latency | None = None
    checks: list[Check] = field(default_factory=list)
    log_dir: str | None = None
    # What the RabbitMQ and PostgreSQL columns measure (CpuSources, found before the runs).
    cpu_sources: dict[str, Any] = field(default_factory=dict)

    @property
    def checks_ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def bare(self) -> Figures | None:
        return Figures.median([t.figures() for t in self.bare_rounds]) if self.bare_rounds else None

    @property
    def service(self) -> Figures | None:
        return Figures.median([t.figures() for t in self.service_rounds]) if self.service_rounds else None

    def completed(self, phases: Sequence[str]) -> bool:
        rounds = self.settings.get("rounds", 1)
        done = {
            "bare": len(self.bare_rounds) == rounds,
            "service": len(self.service_rounds) == rounds,
            "naive": self.naive is not None,
            "latency": self.latency is not None,
        }
        return all(done[phase] for phase in phases)

    def round_ratios(self, pick: Callable[[Figures], float | None]) -> list[float]:
        """Service over bare, round by round: each pair ran one after the other."""
        ratios = []
        for bare, svc in zip(self.bare_rounds, self.service_rounds, strict=False):
            b, v = pick(bare.figures()), pick(svc.figures())
            if b and v is not None:
                ratios.append(v / b)
        return ratios


def median_ratio(ratios: Sequence[float]) -> float | None:
    return statistics.median(ratios) if ratios else None


def _own(f: Figures) -> float | None:
    return f.cpu_us_per_vote


def _machine(f: Figures) -> float | None:
    return f.machine_us_per_vote


def _pipeline(f: Figures) -> float | None:
    return f.pipeline_us_per_vote


def _rate(f: Figures) -> float | None:
    return f.votes_per_s


def cpu_ratio(report: Report) -> float | None:
    """The service's own CPU per vote (every instance) over the bare consumer's: median of the rounds."""
    return median_ratio(report.round_ratios(_own))


def machine_ratio(report: Report) -> float | None:
    """The machine's busy CPU per vote in the service's run over the bare run's: median of the rounds."""
    return median_ratio(report.round_ratios(_machine))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _target(ok: bool | None) -> str:
    return "" if ok is None else (" ok" if ok else " MISSED")


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    rounds = s.get("rounds", 1)
    lines = [
        f"bench: N={s['votes']} votes, {s['laws']} laws, {m['date']}, {m['cores']} cores, {m['cpu']}"
        + (f", {rounds} rounds" if rounds > 1 else ""),
        f"{'phase':<24}{'votes':>8}{'seconds':>10}{'votes/s':>10}{'own CPU':>10}{'machine':>10}"
        f"{'RabbitMQ':>10}{'PostgreSQL':>12}{'its DB':>8}{'rest':>8}",
        f"{'':<52}{'us/vote':>10}{'us/vote':>10}{'us/vote':>10}{'us/vote':>12}{'us/vote':>8}{'us/vote':>8}",
    ]
    label = "service (defaults)" if not s["service_env"] else "service (--service-env)"
    if s.get("instances", 1) > 1:
        label = f"service x{s['instances']}" + ("" if not s["service_env"] else " (env)")
    if rounds > 1 and (report.bare_rounds or report.service_rounds):
        for i in range(max(len(report.bare_rounds), len(report.service_rounds))):
            for name, runs in (("bare", report.bare_rounds), ("service", report.service_rounds)):
                if i < len(runs):
                    lines.append(_row(f"round {i + 1} {name}", runs[i].figures()))
        lines.append(f"median of {rounds} rounds")
    for name, result in (("bare consumer (limit)", report.bare), (label, report.service)):
        if result is not None:
            lines.append(_row(name, result))
    if report.naive is not None:
        lines.append(_row("per-message consumer", report.naive.figures()))
    lines += _ratios(report)
    lines += _latency_lines(report.latency)
    lines += _rss_lines(report)
    lines += _check_lines(report.checks)
    lines += _notes(report)
    return "\n".join(lines)


def _row(name: str, f: Figures) -> str:
    return (
        f"{name:<24}{f.votes:>8}{_fmt(f.seconds, '.2f'):>10}{_fmt(f.votes_per_s, '.0f'):>10}"
        f"{_fmt(f.cpu_us_per_vote, '.1f'):>10}{_fmt(f.machine_us_per_vote, '.1f'):>10}"
        f"{_fmt(f.rabbitmq_us_per_vote, '.1f'):>10}{_fmt(f.postgres_us_per_vote, '.1f'):>12}"
        f"{_fmt(f.backends_us_per_vote, '.1f'):>8}{_fmt(f.rest_us_per_vote, '.1f'):>8}"
    )


# The ratios printed, service over bare round by round: label, the figure, the target and its side.
_RATIOS: tuple[tuple[str, Callable[[Figures], float | None], str, float, str], ...] = (
    ("service / limit", _rate, ">=", TARGET_LIMIT_RATIO, ""),
    ("machine CPU/vote, service run / bare run", _machine, "<=", TARGET_MACHINE_RATIO, ""),
    ("  own + RabbitMQ + PostgreSQL only", _pipeline, "<=", TARGET_MACHINE_RATIO, ", without the rest"),
    ("service CPU/vote / bare CPU/vote", _own, "<=", TARGET_CPU_RATIO, ""),
)


def _ratios(report: Report) -> list[str]:
    lines = []
    several = report.settings.get("rounds", 1) > 1
    for label, pick, side, bound, remark in _RATIOS:
        ratios = report.round_ratios(pick)
        value = median_ratio(ratios)
        if value is None:
            continue
        ok = value >= bound if side == ">=" else value <= bound
        each = f"   rounds: {', '.join(f'{r:.2f}' for r in ratios)}" if several else ""
        lines.append(f"{label:<42}{value:>10.2f}   (target {side} {bound:g}{_target(ok)}{remark}){each}")
    svc = report.service.votes_per_s if report.service else None
    naive = report.naive.rate if report.naive else None
    if svc and naive:
        ratio = svc / naive
        target = f"(target >= {TARGET_NAIVE_RATIO:g}{_target(ratio >= TARGET_NAIVE_RATIO)})"
        lines.append(f"{'service / per-message':<42}{ratio:>9.1f}{TIMES}   {target}")
    return lines


def _latency_lines(lat: Latency | None) -> list[str]:
    if lat is None:
        return []
    ok = lat.p99_ms is not None and lat.p99_ms <= TARGET_P99_MS and lat.seen == lat.published
    return [
        f"{f'latency @{lat.publish_rate:.0f}/s':<24}p50 {_fmt(lat.p50_ms, '.0f')} ms   "
        f"p99 {_fmt(lat.p99_ms, '.0f')} ms  (target p99 <= {TARGET_P99_MS:g} ms{_target(ok)})"
    ]


def _rss_lines(report: Report) -> list[str]:
    runs: list[Throughput | Latency] = [*report.service_rounds, *([report.latency] if report.latency else [])]
    peaks = [r.details.get("peak_rss_mb") for r in runs if r.details]
    known = [p for p in peaks if p is not None]
    if not known:
        return []
    peak = max(known)
    return [
        f"{'service peak RSS':<24}{peak:.1f} MB (VmHWM; target <= {TARGET_RSS_MB:g} MB{_target(peak <= TARGET_RSS_MB)})"
    ]


def _check_lines(checks: list[Check]) -> list[str]:
    if not checks:
        return []
    failed = [c for c in checks if not c.ok]
    if not failed:
        return [f"{'exactly-once checks':<24}OK ({len(checks)} checks over {len({c.run for c in checks})} runs)"]
    lines = [f"{'exactly-once checks':<24}FAILED ({len(failed)} of {len(checks)})"]
    lines += [f"    {c.run}: {c.name}: {c.detail}" for c in failed]
    return lines


def _notes(report: Report) -> list[str]:
    load = ", ".join(f"{x:.2f}" for x in report.machine["loadavg_at_start"])
    lines = ["", "notes:", f"  load average at start: {load} (other work on the machine skews every figure)"]
    lines += _cpu_notes(report)
    if report.settings["service_env"]:
        env = " ".join(f"{k}={v}" for k, v in report.settings["service_env"].items())
        lines.append(f"  service env: {env}")
    pubs = [
        f"{name} {'/'.join(f'{t.publish_rate:.0f}' for t in runs if t.publish_rate)}/s"
        for name, runs in _runs(report)
        if any(t.publish_rate for t in runs)
    ]
    if pubs:
        lines.append(f"  backlog publishing (confirmed, not timed in any rate): {', '.join(pubs)}")
    several = len(report.service_rounds) > 1
    for i, svc in enumerate(report.service_rounds):
        if not svc.details:
            continue
        d = svc.details
        lines.append(
            f"  service run{f' {i + 1}' if several else ''}: first vote {_fmt(d['start_to_first_vote_s'], '.2f')} s "
            f"after start; DB span max-min(recorded_at) {_fmt(d['db_span_s'], '.2f')} s; "
            f"service CPU {_fmt(d['service_cpu_s'], '.1f')} s = "
            f"{_fmt(_pct(d['service_cpu_share']), '.0f')}% of one core; "
            f"machine busy {_fmt(_pct(d['machine_busy_share']), '.0f')}% of {report.machine['cores']} cores; "
            f"poller CPU {100 * d['poller_cpu_share']:.0f}% of a core; log lines: {_levels(d['log_levels'])}"
        )
    lat = report.latency
    if lat is not None:
        lines.append(
            f"  latency run: {lat.seen}/{lat.published} votes seen, max {_fmt(lat.max_ms, '.0f')} ms, "
            f"resolution ~{lat.poll_period_ms:.0f} ms (poll period), sampler CPU "
            f"{100 * lat.details['sampler_cpu_share']:.0f}% of a core, log lines: {_levels(lat.details['log_levels'])}"
        )
    named = (("bare", report.bare), ("service", report.service), ("naive", report.naive and report.naive.figures()))
    per_core = [f"{n} {f.votes_per_busy_core_s:.0f}" for n, f in named if f is not None and f.votes_per_busy_core_s]
    if per_core:
        lines.append(
            f"  votes per busy core-second of the whole machine (/proc/stat; RabbitMQ, PostgreSQL and the bench "
            f"included): {', '.join(per_core)}"
        )
    if report.log_dir:
        lines.append(f"  service logs kept in {report.log_dir}")
    return lines


def _cpu_notes(report: Report) -> list[str]:
    src = report.cpu_sources
    beam = f"beam.smp pid {src['rabbitmq_pid']} and its children" if src.get("rabbitmq_pid") else "not found here (-)"
    pg = (
        f"the whole cluster: postmaster pid {src['postgres_pid']} and every process it started (backends of "
        "every database, checkpointer, WAL writer, autovacuum), those that exited included"
        if src.get("postgres_pid")
        else "not found here (-)"
    )
    return [
        "  CPU per vote: utime + stime from /proc over each consumer's span, from its first vote to its last;",
        "    own: the consumer's process (the service: every instance summed);",
        f"    machine: busy time of all {report.machine['cores']} cores (/proc/stat), everything on the machine;",
        f"    RabbitMQ: {beam};",
        f"    PostgreSQL: {pg};",
        "    its DB: the backends connected to the run's database (the service's pools, the per-message "
        "consumer's connection), part of PostgreSQL;",
        "    rest: machine - own - RabbitMQ - PostgreSQL: the bench's polling, the kernel, other work.",
        "    RabbitMQ and PostgreSQL serve other work on this machine too: the bare run's PostgreSQL and the rest "
        "show that noise.",
    ]


def _runs(report: Report) -> list[tuple[str, list[Throughput]]]:
    named = (("bare", report.bare_rounds), ("service", report.service_rounds), ("naive", [report.naive]))
    return [(n, [t for t in runs if t is not None]) for n, runs in named if any(t is not None for t in runs)]


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _levels(levels: dict[str, int]) -> str:
    return ", ".join(f"{n} {level}" for level, n in levels.items())


def write_json(path: Path, report: Report) -> None:
    """Every round, plus "bare" and "service": the medians, with the details of the median round."""
    data = asdict(report)
    for name, runs in _runs(report):
        rounds = [{**asdict(t), **asdict(t.figures())} for t in runs]
        median = Figures.median([t.figures() for t in runs])
        middle = sorted(runs, key=lambda t: t.rate or 0.0)[(len(runs) - 1) // 2]
        data[name] = {**asdict(median), "publish_rate": middle.publish_rate, "details": middle.details}
        if name != "naive":
            data[f"{name}_rounds"] = rounds
    data["service_cpu_ratio"] = cpu_ratio(report)
    data["machine_cpu_ratio"] = machine_ratio(report)
    data["pipeline_cpu_ratio"] = median_ratio(report.round_ratios(_pipeline))
    data["checks_ok"] = report.checks_ok
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def new_report(s: Settings) -> Report:
    return Report(
        settings={k: v for k, v in asdict(s).items() if k not in ("endpoints", "json_path")},
        machine={
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg(),
        },
    )
