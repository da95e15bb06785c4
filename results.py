"""`python aggregator.py results`: the official counts, read from PostgreSQL, without psql."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TextIO

import db
import exits
from config import Config

_QUERY = """
SELECT law_id, oui_count, non_count, total_votes, oui_percentage, non_percentage, leading_choice, updated_at
FROM vote_statistics
WHERE %(law)s::text IS NULL OR law_id = %(law)s
ORDER BY law_id
"""


@dataclass(frozen=True)
class LawResult:
    law_id: str
    oui: int
    non: int
    total: int
    oui_percent: Decimal | None
    non_percent: Decimal | None
    leading: str
    updated_at: datetime


def fetch(config: Config, *, law_id: str | None = None) -> list[LawResult]:
    with db.read_only(config) as cur:
        cur.execute(_QUERY, {"law": law_id})
        return [LawResult(*row) for row in cur.fetchall()]


def _percent(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def render_table(rows: list[LawResult]) -> str:
    header = ("law", "oui", "non", "total", "oui %", "non %", "leading", "last update (UTC)")
    body = [
        (
            r.law_id,
            f"{r.oui:,}",
            f"{r.non:,}",
            f"{r.total:,}",
            _percent(r.oui_percent),
            _percent(r.non_percent),
            r.leading,
            r.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if r.updated_at else "-",
        )
        for r in rows
    ]
    if rows:
        oui, non = sum(r.oui for r in rows), sum(r.non for r in rows)
        body.append(("all laws", f"{oui:,}", f"{non:,}", f"{oui + non:,}", "", "", "", ""))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body, strict=False)]
    numeric = {1, 2, 3, 4, 5}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(cells) for cells in body[: len(rows)]]
    if rows:
        out += [line(tuple("-" * w for w in widths)), line(body[-1])]
    return "\n".join(out) + "\n"


def render_csv(rows: list[LawResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["law_id", "oui", "non", "total", "oui_percent", "non_percent", "leading", "updated_at"])
    for r in rows:
        writer.writerow(
            [r.law_id, r.oui, r.non, r.total, r.oui_percent, r.non_percent, r.leading, r.updated_at.isoformat()]
        )
    return buffer.getvalue()


def render_json(rows: list[LawResult]) -> str:
    def plain(r: LawResult) -> dict[str, object]:
        d = asdict(r)
        d["oui_percent"] = None if r.oui_percent is None else float(r.oui_percent)
        d["non_percent"] = None if r.non_percent is None else float(r.non_percent)
        d["updated_at"] = r.updated_at.isoformat()
        return d

    return json.dumps([plain(r) for r in rows], indent=2) + "\n"


RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json}


def print_results(config: Config, *, law_id: str | None, fmt: str, out: TextIO = sys.stdout) -> int:
    rows = fetch(config, law_id=law_id)
    if not rows and law_id is not None:
        print(f"no votes counted for law {law_id!r}", file=sys.stderr)
        return exits.FAILURE
    out.write(RENDERERS[fmt](rows))
    return exits.OK
