"""`python aggregator.py seal`: the signed record of the count when the polls close.

Run once the queue is drained and every instance has stopped (it checks both). It verifies the
database first (the recount, every chain and row digest, recomputed in Python; with --heads, against
the instances' signed heads as `verify --heads` does, every link vouched for) and refuses to seal
anything that does not add up; then it writes one JSON line, signed with CHAIN_SIGNING_KEY_FILE:
the per-law totals, a digest of them, and every chain's final head. The officials publish that
line; `python aggregator.py verify --heads SEAL_FILE --keys KEY` later proves that nothing in the
database has changed since (docs/security.md#sealing-the-count).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import pika.exceptions

import heads
import verify
from amqp import amqp_parameters, close_quietly, describe_error, open_connection
from config import Config

logger = logging.getLogger(__name__)


def _queue_busy(config: Config) -> str | None:
    """Why the count may still move: votes waiting in RABBITMQ_QUEUE, or a consumer on it."""
    connection = open_connection(amqp_parameters(config, name="vote-aggregator seal"))
    try:
        ok = connection.channel().queue_declare(config.rabbitmq_queue, passive=True).method
    finally:
        close_quietly(connection.close)
    if ok.message_count or ok.consumer_count:
        return (
            f"queue {config.rabbitmq_queue} holds {ok.message_count} messages and has {ok.consumer_count} consumers: "
            "drain it and stop every instance before sealing"
        )
    return None


def seal_record(config: Config, report: verify.Report, chains: dict[str, dict[int, bytes]]) -> dict[str, Any]:
    totals = {law.law_id: [law.results_oui or 0, law.results_non or 0] for law in report.laws}
    return {
        "kind": "seal",
        "database": config.postgres_db,
        "sealed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "totals": totals,
        "totals_digest": verify.totals_digest(totals),
        "chains": {chain_id: [max(links), links[max(links)].hex()] for chain_id, links in sorted(chains.items())},
    }


def run(
    config: Config,
    *,
    out_path: str | None,
    skip_queue_check: bool = False,
    heads_files: Sequence[str] = (),
    keys: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    try:
        key = heads.load_signing_key(config.chain_signing_key_file, heads_file=config.chain_heads_file)
        if keys and not heads_files:
            raise ValueError("--keys needs --heads")
        signed = verify.SignedHeads.load(heads_files, keys) if heads_files else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not skip_queue_check:
        try:
            busy = _queue_busy(config)
        except (pika.exceptions.AMQPError, OSError) as exc:
            print(f"error: RabbitMQ {config.rabbitmq_url_for_logs()}: {describe_error(exc)}", file=sys.stderr)
            return 1
        if busy:
            print(f"error: {busy}", file=sys.stderr)
            return 1
    # In the same snapshot as the record: nothing can slip in between the check and the seal.
    report, chains = verify.run_checks_with_chains(config, signed=signed)
    if not report.ok:
        out.write(verify.render(report, embargo=True))
        print("error: the database does not verify: nothing sealed", file=sys.stderr)
        return 1
    if report.unvouched:
        out.write(verify.render(report, embargo=True))
        print(
            f"error: links of {', '.join(report.unvouched)} are past every head given with --heads: "
            "nothing sealed (an instance still running, or killed after its last head)",
            file=sys.stderr,
        )
        return 1
    record = heads.sign(key, seal_record(config, report, chains))
    line = json.dumps(record, sort_keys=True) + "\n"
    if out_path:
        with open(out_path, "a", encoding="ascii") as sealed:
            sealed.write(line)
    out.write(line)
    logger.warning(
        "sealed the count: %d laws, %d chains, totals digest %s (the polls are closed)",
        len(record["totals"]),
        len(record["chains"]),
        record["totals_digest"],
    )
    return 0
