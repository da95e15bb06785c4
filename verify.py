"""`python aggregator.py verify`: recount the audit trail and check its hash chains.

Three checks, on one snapshot of the database (the service may keep writing meanwhile):
1. the recount: vote_audit grouped by law and choice against vote_results;
2. the chains: every link's digest recomputed from its content and the link before it,
   with no link missing, and each head given with --head found unchanged;
3. the rows: every audit row against the digest its link recorded for it, so that a row
   added, removed or altered after the fact is named.
Exit code 0 when everything agrees, 1 otherwise (docs/security.md#verify).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import db
from config import Config

# At most this many rows are named per kind of finding; the count is always complete.
MAX_NAMED = 20

_RECOUNT = """
SELECT coalesce(a.law_id, r.law_id), coalesce(a.oui, 0), coalesce(a.non, 0), r.oui_count, r.non_count
FROM (SELECT law_id,
             count(*) FILTER (WHERE choice = 'oui') AS oui,
             count(*) FILTER (WHERE choice = 'non') AS non
      FROM vote_audit GROUP BY law_id) a
FULL JOIN vote_results r ON r.law_id = a.law_id
ORDER BY 1
"""

# Each link with the digest of its content, computed by the server from the stored arrays.
_LINKS = """
SELECT chain_id, seq, digest, cardinality(vote_hashes), length(row_digests),
       sha256(convert_to(array_to_string(vote_hashes, ','), 'UTF8') || row_digests)
FROM vote_chain
ORDER BY chain_id, seq
"""

# Audit rows against the rows the chains recorded, matched by vote_hash: what is
# in one and not the other, or differs. A row recorded before chains existed is in no link.
# Composed from db.py's constants only (S608): no value from outside.
_ROWS = f"""
WITH recorded AS (
    SELECT c.chain_id, c.seq, e.vote_hash, substring(c.row_digests FROM (32 * (e.i - 1) + 1)::int FOR 32) AS d
    FROM vote_chain c, unnest(c.vote_hashes) WITH ORDINALITY AS e(vote_hash, i)
), stored AS (
    SELECT a.vote_hash, {db.row_digest_sql("a")} AS d FROM vote_audit a
)
SELECT CASE WHEN s.vote_hash IS NULL THEN 'removed' WHEN r.vote_hash IS NULL THEN 'added' ELSE 'altered' END,
       coalesce(s.vote_hash, r.vote_hash), r.chain_id, r.seq
FROM recorded r FULL JOIN stored s ON s.vote_hash = r.vote_hash
WHERE s.vote_hash IS NULL OR r.vote_hash IS NULL OR s.d <> r.d
ORDER BY 1, 2
"""  # noqa: S608


@dataclass(frozen=True)
class LawCount:
    law_id: str
    audit_oui: int
    audit_non: int
    results_oui: int | None  # None: no vote_results row for a law with audit rows
    results_non: int | None

    @property
    def agrees(self) -> bool:
        return (self.audit_oui, self.audit_non) == (self.results_oui, self.results_non)


@dataclass(frozen=True)
class Head:
    """A chain head as the service logs it: `<chain id>:<seq>:<digest hex>`."""

    chain_id: str
    seq: int
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> Head:
        try:
            chain_id, seq, digest = text.strip().rsplit(":", 2)
            head = cls(chain_id, int(seq), bytes.fromhex(digest))
        except ValueError:
            raise ValueError(f"--head must be <chain id>:<seq>:<digest hex>, got {text!r}") from None
        if not chain_id or head.seq < 1 or len(head.digest) != 32:
            raise ValueError(f"--head must be <chain id>:<seq>:<64 hex digits>, got {text!r}")
        return head

    def __str__(self) -> str:
        return f"{self.chain_id}:{self.seq}:{self.digest.hex()}"


@dataclass
class Report:
    laws: list[LawCount] = field(default_factory=list)
    chains: int = 0
    links: int = 0
    chained_rows: int = 0
    broken_links: list[str] = field(default_factory=list)  # one line per link that does not add up
    heads: list[str] = field(default_factory=list)  # one line per --head that is not found as given
    rows: dict[str, list[tuple[str, str | None, int | None]]] = field(default_factory=dict)  # kind -> findings
    row_counts: dict[str, int] = field(default_factory=dict)

    @property
    def differing_laws(self) -> list[str]:
        return [law.law_id for law in self.laws if not law.agrees]

    @property
    def ok(self) -> bool:
        return not (self.differing_laws or self.broken_links or self.heads or self.row_counts)


def run_checks(config: Config, *, heads: Sequence[Head] = ()) -> Report:
    report = Report()
    with db.read_only(config, snapshot=True) as cur:
        cur.execute(_RECOUNT)
        report.laws = [LawCount(*row) for row in cur.fetchall()]
        cur.execute(_LINKS)
        _check_links(report, cur.fetchall(), heads)
        cur.execute(_ROWS)
        for kind, vote_hash, chain_id, seq in cur.fetchall():
            report.row_counts[kind] = report.row_counts.get(kind, 0) + 1
            named = report.rows.setdefault(kind, [])
            if len(named) < MAX_NAMED:
                named.append((vote_hash, chain_id, seq))
    return report


def _check_links(
    report: Report, links: list[tuple[str, int, memoryview, int, int, memoryview]], heads: Sequence[Head]
) -> None:
    """Fold each chain from its genesis: a link whose digest differs was altered, or one before it was."""
    recomputed: dict[tuple[str, int], bytes] = {}
    chain: str | None = None
    previous, expected_seq = b"", 1
    for chain_id, seq, stored, hashes, digest_bytes, content in links:
        if chain_id != chain:
            chain, previous, expected_seq = chain_id, db.genesis_digest(chain_id), 1
            report.chains += 1
        report.links += 1
        report.chained_rows += hashes
        if seq != expected_seq:
            report.broken_links.append(f"chain {chain_id}: links {expected_seq} to {seq - 1} are missing")
        digest = db.link_digest_from_content(previous, seq, bytes(content))
        if digest_bytes != 32 * hashes:
            report.broken_links.append(
                f"chain {chain_id} link {seq}: {hashes} vote hashes but {digest_bytes} bytes of row digests"
            )
        elif digest != bytes(stored):
            report.broken_links.append(
                f"chain {chain_id} link {seq}: its digest does not match its content and the link before it "
                "(the link, or one before it, was altered)"
            )
        recomputed[(chain_id, seq)] = digest
        previous, expected_seq = digest, seq + 1
    for head in heads:
        found = recomputed.get((head.chain_id, head.seq))
        if found is None:
            report.heads.append(f"head {head}: chain {head.chain_id} has no link {head.seq} (links were removed)")
        elif found != head.digest:
            report.heads.append(f"head {head}: the chain up to link {head.seq} was rewritten ({found.hex()} now)")


def _table(laws: list[LawCount]) -> list[str]:
    header = ("law", "audit oui", "audit non", "results oui", "results non", "")
    body = [
        (
            law.law_id,
            f"{law.audit_oui:,}",
            f"{law.audit_non:,}",
            "-" if law.results_oui is None else f"{law.results_oui:,}",
            "-" if law.results_non is None else f"{law.results_non:,}",
            "ok" if law.agrees else "DIFFERS",
        )
        for law in laws
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header).rstrip(), *(line(row).rstrip() for row in body)]


_ROW_WORDS = {
    "added": "in no chain link: added after the fact (or recorded before hash chains existed)",
    "removed": "recorded in a chain link but missing from vote_audit: removed after the fact",
    "altered": "differs from what its chain link recorded: altered after the fact",
}


def render(report: Report) -> str:
    out = _table(report.laws)
    total = sum(law.audit_oui + law.audit_non for law in report.laws)
    out.append(f"hash chains: {report.chains} chains, {report.links:,} links, {report.chained_rows:,} rows chained")
    out += [f"link: {line}" for line in report.broken_links]
    out += [f"head: {line}" for line in report.heads]
    for kind in ("altered", "removed", "added"):
        for vote_hash, chain_id, seq in report.rows.get(kind, []):
            where = f" (chain {chain_id} link {seq})" if chain_id is not None else ""
            out.append(f"{kind}: vote {vote_hash}{where} {_ROW_WORDS[kind]}")
        hidden = report.row_counts.get(kind, 0) - len(report.rows.get(kind, []))
        if hidden > 0:
            out.append(f"{kind}: ... and {hidden:,} more")
    out.append(_verdict(report, total))
    return "\n".join(out) + "\n"


def _verdict(report: Report, total: int) -> str:
    if report.ok:
        return (
            f"verdict: OK: {len(report.laws)} laws, {total:,} votes: vote_results matches vote_audit; "
            f"{report.chains} hash chains intact, every audit row as chained"
        )
    problems = []
    if report.differing_laws:
        problems.append("vote_results differs from vote_audit for " + ", ".join(report.differing_laws))
    counts = [f"{report.row_counts[k]:,} {k}" for k in ("altered", "removed", "added") if k in report.row_counts]
    if counts:
        problems.append("audit rows " + ", ".join(counts))
    if report.broken_links:
        problems.append(f"{len(report.broken_links)} chain links broken")
    if report.heads:
        problems.append(f"{len(report.heads)} given heads not found")
    return "verdict: FAILED: " + "; ".join(problems)


def print_verify(config: Config, *, heads: Sequence[str], out: TextIO = sys.stdout) -> int:
    try:
        parsed = [Head.parse(h) for h in heads]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_checks(config, heads=parsed)
    out.write(render(report))
    return 0 if report.ok else 1
