"""The benchmark's figures: each phase's result, the table printed, the JSON written."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_db import Check
from bench_settings import Settings

# Targets are printed next to the figures; missing one does not fail the run.
TARGET_LIMIT_RATIO = 0.85
TARGET_NAIVE_RATIO = 10.0
TARGET_P99_MS = 300.0
TARGET_RSS_MB = 80.0
# The service's own CPU per vote against the bare consumer's, in the same run (issue 13).
TARGET_CPU_RATIO = 1.5
AIM_CPU_RATIO = 1.3

TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass
class Throughput:
    votes: int
    seconds: float | None
    publish_rate: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Own CPU (every instance summed) and the machine's busy CPU, over `cpu_votes` votes.
    cpu_s: float | None = None
    busy_core_s: float | None = None
    cpu_votes: int = 0

    @property
    def rate(self) -> float | None:
        return self.votes / self.seconds if self.seconds else None

    @property
    def cpu_us_per_vote(self) -> float | None:
        return 1e6 * self.cpu_s / self.cpu_votes if self.cpu_s is not None and self.cpu_votes else None

    @property
    def machine_us_per_vote(self) -> float | None:
        """Busy CPU of the whole machine (RabbitMQ, PostgreSQL, the bench) per vote."""
        return 1e6 * self.busy_core_s / self.cpu_votes if self.busy_core_s and self.cpu_votes else None

    @property
    def votes_per_busy_core_s(self) -> float | None:
        return self.cpu_votes / self.busy_core_s if self.busy_core_s else None


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
    bare: Throughput | None = None
    service: Throughput | None = None
    naive: Throughput | None = None
    latency: Latency | None = None
    checks: list[Check] = field(default_factory=list)
    log_dir: str | None = None

    @property
    def checks_ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def completed(self, phases: Sequence[str]) -> bool:
        return all(getattr(self, phase) is not None for phase in phases)


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
    lines = [
        f"bench: N={s['votes']} votes, {s['laws']} laws, {m['date']}, {m['cores']} cores, {m['cpu']}",
        f"{'phase':<24}{'votes':>8}{'seconds':>10}{'votes/s':>10}{'own CPU':>10}{'machine':>10}",
        f"{'':<52}{'us/vote':>10}{'us/vote':>10}",
    ]
    label = "service (defaults)" if not s["service_env"] else "service (--service-env)"
    if s.get("instances", 1) > 1:
        label = f"service x{s['instances']}" + ("" if not s["service_env"] else " (env)")
    for name, result in (("bare consumer (limit)", report.bare), (label, report.service)):
        if result is not None:
            lines.append(_row(name, result))
    if report.naive is not None:
        lines.append(_row("per-message consumer", report.naive))
    lines += _ratios(report)
    lines += _latency_lines(report.latency)
    lines += _rss_lines(report)
    lines += _check_lines(report.checks)
    lines += _notes(report)
    return "\n".join(lines)


def _row(name: str, t: Throughput) -> str:
    return (
        f"{name:<24}{t.votes:>8}{_fmt(t.seconds, '.2f'):>10}{_fmt(t.rate, '.0f'):>10}"
        f"{_fmt(t.cpu_us_per_vote, '.1f'):>10}{_fmt(t.machine_us_per_vote, '.1f'):>10}"
    )


def cpu_ratio(report: Report) -> float | None:
    """The service's own CPU per vote (every instance) over the bare consumer's, same run."""
    svc = report.service.cpu_us_per_vote if report.service else None
    bare = report.bare.cpu_us_per_vote if report.bare else None
    return svc / bare if svc and bare else None


def _ratios(report: Report) -> list[str]:
    lines = []
    svc = report.service.rate if report.service else None
    bare = report.bare.rate if report.bare else None
    naive = report.naive.rate if report.naive else None
    if svc and bare:
        ratio = svc / bare
        target = f"(target >= {TARGET_LIMIT_RATIO:g}{_target(ratio >= TARGET_LIMIT_RATIO)})"
        lines.append(f"{'service / limit':<42}{ratio:>10.2f}   {target}")
    cpu = cpu_ratio(report)
    if cpu is not None:
        target = f"(target <= {TARGET_CPU_RATIO:g}{_target(cpu <= TARGET_CPU_RATIO)}, aim {AIM_CPU_RATIO:g})"
        lines.append(f"{'service CPU/vote / bare CPU/vote':<42}{cpu:>10.2f}   {target}")
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
    peaks = [r.details.get("peak_rss_mb") for r in (report.service, report.latency) if r is not None and r.details]
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
    if report.settings["service_env"]:
        env = " ".join(f"{k}={v}" for k, v in report.settings["service_env"].items())
        lines.append(f"  service env: {env}")
    pubs = [f"{n} {t.publish_rate:.0f}/s" for n, t in _throughputs(report) if t.publish_rate]
    if pubs:
        lines.append(f"  backlog publishing (confirmed, not timed in any rate): {', '.join(pubs)}")
    svc = report.service
    if svc is not None and svc.details:
        d = svc.details
        lines.append(
            f"  service run: first vote {_fmt(d['start_to_first_vote_s'], '.2f')} s after start; "
            f"DB span max-min(recorded_at) {_fmt(d['db_span_s'], '.2f')} s; "
            f"service CPU {d['service_cpu_s']:.1f} s = {_fmt(_pct(d['service_cpu_share']), '.0f')}% of one core; "
            f"machine busy {_fmt(_pct(d['machine_busy_share']), '.0f')}% of {report.machine['cores']} cores; "
            f"poller CPU {100 * d['poller_cpu_share']:.0f}% of a core"
        )
        lines.append(f"  service log lines: {_levels(d['log_levels'])}")
    lat = report.latency
    if lat is not None:
        lines.append(
            f"  latency run: {lat.seen}/{lat.published} votes seen, max {_fmt(lat.max_ms, '.0f')} ms, "
            f"resolution ~{lat.poll_period_ms:.0f} ms (poll period), sampler CPU "
            f"{100 * lat.details['sampler_cpu_share']:.0f}% of a core, log lines: {_levels(lat.details['log_levels'])}"
        )
    per_core = [f"{n} {t.votes_per_busy_core_s:.0f}" for n, t in _throughputs(report) if t.votes_per_busy_core_s]
    if per_core:
        lines.append(
            f"  votes per busy core-second of the whole machine (/proc/stat; RabbitMQ, PostgreSQL and the bench "
            f"included): {', '.join(per_core)}"
        )
    if report.log_dir:
        lines.append(f"  service logs kept in {report.log_dir}")
    return lines


def _throughputs(report: Report) -> list[tuple[str, Throughput]]:
    named = (("bare", report.bare), ("service", report.service), ("naive", report.naive))
    return [(n, t) for n, t in named if t is not None]


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _levels(levels: dict[str, int]) -> str:
    return ", ".join(f"{n} {level}" for level, n in levels.items())


def write_json(path: Path, report: Report) -> None:
    data = asdict(report)
    for name, t in _throughputs(report):
        data[name]["votes_per_s"] = t.rate
        data[name]["cpu_us_per_vote"] = t.cpu_us_per_vote
        data[name]["machine_us_per_vote"] = t.machine_us_per_vote
        data[name]["votes_per_busy_core_s"] = t.votes_per_busy_core_s
    data["service_cpu_ratio"] = cpu_ratio(report)
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
