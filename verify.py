"""`python aggregator.py verify`: recount the audit trail and check its hash chains.

Three checks, on one snapshot of the database (the service may keep writing meanwhile):
1. the recount: vote_audit grouped by law and choice against vote_results;
2. the chains: every link's digest recomputed from its content and the link before it,
   with no link missing, and each head given with --head found unchanged;
3. the rows: every audit row against the digest its link recorded for it, so that a row
   added, removed or altered after the fact is named.
With --heads FILE (signed heads, heads.py), the database must hold exactly what FILE vouches for:
every chain in it appears in FILE (signed by a key of --keys when given), no link lies past a final
head, none is missing up to the last head. Every digest is recomputed here, in Python.
Exit code 0 when everything agrees, 1 otherwise, 2 for bad input (docs/security.md#verify).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import chain
import db
import heads as heads_mod
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

# Every link, streamed: its digest and content are recomputed here, not by the server.
_LINKS = """
SELECT chain_id, seq, digest, vote_hashes, row_digests
FROM vote_chain
ORDER BY chain_id, seq
"""

# Audit rows against the rows the chains recorded, matched by vote_hash, streamed: each row's
# digest is recomputed here from its columns. A row recorded before chains existed is in no link.
_ROWS = """
WITH recorded AS (
    SELECT c.chain_id, c.seq, c.digest_format, e.vote_hash,
           substring(c.row_digests FROM (32 * (e.i - 1) + 1)::int FOR 32) AS d
    FROM vote_chain c, unnest(c.vote_hashes) WITH ORDINALITY AS e(vote_hash, i)
)
SELECT coalesce(a.vote_hash, r.vote_hash), r.chain_id, r.seq, r.digest_format, r.d, a.vote_hash IS NOT NULL,
       a.citizen_id, a.law_id, a.choice, timestamptz_send(a."timestamp"), timestamptz_send(a.recorded_at)
FROM recorded r FULL JOIN vote_audit a ON a.vote_hash = r.vote_hash
"""
_STREAM_ROWS = 20_000


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
    notes: list[str] = field(default_factory=list)  # said, not failed on
    unvouched: list[str] = field(default_factory=list)  # chains with links past their last head (none final)

    @property
    def differing_laws(self) -> list[str]:
        return [law.law_id for law in self.laws if not law.agrees]

    @property
    def ok(self) -> bool:
        return not (self.differing_laws or self.broken_links or self.heads or self.row_counts)


def run_checks(config: Config, *, heads: Sequence[Head] = (), signed: SignedHeads | None = None) -> Report:
    return run_checks_with_chains(config, heads=heads, signed=signed)[0]


def run_checks_with_chains(
    config: Config, *, heads: Sequence[Head] = (), signed: SignedHeads | None = None
) -> tuple[Report, dict[str, dict[int, bytes]]]:
    """The report, and every chain's links as recomputed (chain id -> seq -> digest)."""
    report = Report()
    with db.read_only(config, snapshot=True) as cur:
        cur.execute(_RECOUNT)
        report.laws = [LawCount(*row) for row in cur.fetchall()]
        conn = cur.connection
        with conn.cursor(name="verify_links") as links:
            links.itersize = 1_000
            links.execute(_LINKS)
            recomputed = _check_links(report, links, heads)
        with conn.cursor(name="verify_rows") as rows:
            rows.itersize = _STREAM_ROWS
            rows.execute(_ROWS)
            _check_rows(report, rows)
    if signed is not None:
        _check_signed_heads(report, recomputed, signed)
        _check_seals(report, signed)
    return report, recomputed


def _check_rows(report: Report, rows: Iterable[tuple[Any, ...]]) -> None:
    """Each audit row's digest, recomputed here, against the one its link recorded."""
    found: dict[str, list[tuple[str, str | None, int | None]]] = {}
    for vote_hash, chain_id, seq, digest_format, recorded, stored, citizen, law, choice, ts, recorded_at in rows:
        if not stored:
            kind = "removed"
        elif chain_id is None:
            kind = "added"
        else:
            timestamp_us = int.from_bytes(ts, "big", signed=True)
            if digest_format == 1:
                recorded_us = int.from_bytes(recorded_at, "big", signed=True)
                digest = chain.row_digest_v1(vote_hash, citizen, law, choice, timestamp_us, recorded_us)
            else:
                digest = chain.row_digest(vote_hash, citizen, law, choice, timestamp_us)
            if digest == bytes(recorded):
                continue
            kind = "altered"
        found.setdefault(kind, []).append((vote_hash, chain_id, seq))
    for kind, findings in found.items():
        findings.sort(key=lambda f: f[0])
        report.row_counts[kind] = len(findings)
        report.rows[kind] = findings[:MAX_NAMED]


def _check_links(
    report: Report, links: Iterable[tuple[str, int, memoryview, list[str], memoryview]], heads: Sequence[Head]
) -> dict[str, dict[int, bytes]]:
    """Fold each chain from its genesis: a link whose digest differs was altered, or one before it was.

    Returns chain id -> seq -> digest as recomputed.
    """
    recomputed: dict[str, dict[int, bytes]] = {}
    current: dict[int, bytes] = {}
    chain_id_now: str | None = None
    previous, expected_seq = b"", 1
    for chain_id, seq, stored, hashes, row_digests in links:
        if chain_id != chain_id_now:
            chain_id_now, previous, expected_seq = chain_id, chain.genesis_digest(chain_id), 1
            current = recomputed[chain_id] = {}
            report.chains += 1
        report.links += 1
        report.chained_rows += len(hashes)
        if seq != expected_seq:
            report.broken_links.append(f"chain {chain_id}: links {expected_seq} to {seq - 1} are missing")
        digest = chain.link_digest(previous, seq, chain.content_digest(hashes, bytes(row_digests)))
        if len(row_digests) != 32 * len(hashes):
            report.broken_links.append(
                f"chain {chain_id} link {seq}: {len(hashes)} vote hashes but {len(row_digests)} bytes of row digests"
            )
        elif digest != bytes(stored):
            report.broken_links.append(
                f"chain {chain_id} link {seq}: its digest does not match its content and the link before it "
                "(the link, or one before it, was altered)"
            )
        current[seq] = digest
        previous, expected_seq = digest, seq + 1
    for head in heads:
        found = recomputed.get(head.chain_id, {}).get(head.seq)
        if found is None:
            report.heads.append(f"head {head}: chain {head.chain_id} has no link {head.seq} (links were removed)")
        elif found != head.digest:
            report.heads.append(f"head {head}: the chain up to link {head.seq} was rewritten ({found.hex()} now)")
    return recomputed


@dataclass(frozen=True)
class SignedHeads:
    """The heads of the --heads files, and the keys they must be signed with (None: --keys not given)."""

    source: str
    heads: list[heads_mod.SignedHead]
    trusted: set[str] | None
    seals: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, paths: Sequence[str], keys: str | None) -> SignedHeads:
        """ValueError (bad input: exit 2) when a file or the keys cannot be read."""
        found: list[heads_mod.SignedHead] = []
        seals: list[dict[str, Any]] = []
        try:
            trusted = heads_mod.load_public_keys(keys) if keys else None
            for path in paths:
                with open(path, encoding="utf-8") as lines:
                    records = heads_mod.parse_records(lines, source=path)
                if not records:
                    raise ValueError(f"{path}: no chain head or seal in it")
                for record in records:
                    record["_source"] = path
                    if record["kind"] == "seal":
                        seals.append(record)
                        # A seal vouches for each chain's final head, on the seal's own signature.
                        found += _seal_heads(record, source=path)
                    else:
                        found.append(heads_mod.parse_head(record, source=path))
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return cls(", ".join(paths), found, trusted, seals)


def _seal_heads(record: dict[str, Any], *, source: str) -> list[heads_mod.SignedHead]:
    number = record.get("_line", 0)
    try:
        ok = heads_mod.signature_ok({k: v for k, v in record.items() if not k.startswith("_")})
        key = str(record["key"])
        return [
            heads_mod.SignedHead(str(chain_id), int(seq), bytes.fromhex(digest), True, key, ok, number, source)
            for chain_id, (seq, digest) in record["chains"].items()
        ]
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ValueError(f"{source} line {number}: a seal needs chains, totals, key and signature") from None


def _check_seals(report: Report, signed: SignedHeads) -> None:
    """The totals in vote_results must be the sealed ones, and the seal's digest must be of them."""
    stored = {law.law_id: [law.results_oui or 0, law.results_non or 0] for law in report.laws}
    for record in signed.seals:
        where = f"{record['_source']} line {record.get('_line', 0)}"
        totals = record.get("totals")
        if not isinstance(totals, dict) or record.get("totals_digest") != totals_digest(totals):
            report.heads.append(f"{where}: the seal's totals do not match its totals digest")
            continue
        differing = sorted(law for law in stored.keys() | totals.keys() if stored.get(law) != totals.get(law))
        if differing:
            report.heads.append(f"{where}: vote_results differs from the sealed totals for {', '.join(differing)}")


def totals_digest(totals: dict[str, Any]) -> str:
    """sha256 of the totals' canonical JSON ({law: [oui, non]}, sorted keys, no spaces), as a seal holds it."""
    text = json.dumps(totals, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_signed_heads(report: Report, recomputed: dict[str, dict[int, bytes]], signed: SignedHeads) -> None:
    """The database must hold exactly what the file vouches for (docs/security.md#verify)."""
    by_chain: dict[str, list[heads_mod.SignedHead]] = {}
    for head in signed.heads:
        where = f"{head.source} line {head.line}"
        if not head.signature_ok:
            report.heads.append(f"{where}: head {head}: its signature does not match it (forged or altered)")
            continue
        if signed.trusted is not None and head.key not in signed.trusted:
            report.heads.append(f"{where}: head {head}: signed by a key that is not among the trusted ones")
            continue
        by_chain.setdefault(head.chain_id, []).append(head)
    for chain_id in sorted(recomputed.keys() - by_chain.keys()):
        links = recomputed[chain_id]
        report.heads.append(
            f"chain {chain_id} ({len(links)} links) is in the database but no head in {signed.source} vouches "
            "for it: written by an unknown writer"
        )
    for chain_id, chain_heads in sorted(by_chain.items()):
        links = recomputed.get(chain_id, {})
        last = max(links, default=0)
        for head in chain_heads:
            found = links.get(head.seq)
            if found is None:
                report.heads.append(
                    f"head {head}: chain {chain_id} has no link {head.seq} (it ends at link {last}: links were removed)"
                )
            elif found != head.digest:
                report.heads.append(f"head {head}: the chain up to link {head.seq} was rewritten ({found.hex()} now)")
        finals = [h.seq for h in chain_heads if h.final]
        if finals and last > min(finals):
            report.heads.append(
                f"chain {chain_id}: links {min(finals) + 1} to {last} lie past its final head (link {min(finals)}): "
                "added after the instance stopped"
            )
        newest = max(h.seq for h in chain_heads)
        if not finals and last > newest:
            report.unvouched.append(chain_id)
            report.notes.append(
                f"chain {chain_id}: links {newest + 1} to {last} are past its last head and not yet vouched for "
                "(the instance is running, or was killed before its next head)"
            )
    if signed.trusted is None:
        report.notes.append("signatures checked against the keys the records name, not trusted keys (--keys)")


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


def render(report: Report, *, embargo: bool = False) -> str:
    """The report; under the embargo without a per-law figure (which laws differ is still named)."""
    out = _table(report.laws) if not embargo else [f"per-law counts withheld: RESULTS_EMBARGO ({_EMBARGO_HINT})"]
    total = sum(law.audit_oui + law.audit_non for law in report.laws)
    out.append(f"hash chains: {report.chains} chains, {report.links:,} links, {report.chained_rows:,} rows chained")
    out += [f"link: {line}" for line in report.broken_links]
    out += [f"head: {line}" for line in report.heads]
    out += [f"note: {line}" for line in report.notes]
    for kind in ("altered", "removed", "added"):
        for vote_hash, chain_id, seq in report.rows.get(kind, []):
            where = f" (chain {chain_id} link {seq})" if chain_id is not None else ""
            out.append(f"{kind}: vote {vote_hash}{where} {_ROW_WORDS[kind]}")
        hidden = report.row_counts.get(kind, 0) - len(report.rows.get(kind, []))
        if hidden > 0:
            out.append(f"{kind}: ... and {hidden:,} more")
    out.append(_verdict(report, total))
    return "\n".join(out) + "\n"


_EMBARGO_HINT = "--polls-closed prints them once the polls have closed"


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
        problems.append(f"{len(report.heads)} differences from the heads")
    return "verdict: FAILED: " + "; ".join(problems)


def print_verify(
    config: Config,
    *,
    heads: Sequence[str],
    heads_files: Sequence[str] = (),
    keys: str | None = None,
    embargo: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    try:
        parsed = [Head.parse(h) for h in heads]
        if keys and not heads_files:
            raise ValueError("--keys needs --heads")
        signed = SignedHeads.load(heads_files, keys) if heads_files else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_checks(config, heads=parsed, signed=signed)
    out.write(render(report, embargo=embargo))
    return 0 if report.ok else 1
