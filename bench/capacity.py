#!/usr/bin/env python3
"""What one vote costs in disk and memory on the servers, for docs/capacity.md.

Run from the repository root as root (the servers run as the postgres and rabbitmq users, on
throwaway clusters of tests/pg_servers.py and tests/rabbitmq_cluster.py, so that nothing else's
traffic is counted):

    .venv/bin/python bench/capacity.py                  # 100,000 votes
    .venv/bin/python bench/capacity.py --votes 20000

- PostgreSQL (full_page_writes on, as in production): --votes votes written through
  db.Database.write_batch in batches of BATCH_SIZE (200, the default), right after a checkpoint;
  each table's size with its indexes and TOAST, and the WAL written, per vote.
- RabbitMQ: the same votes published persistent, with confirms, to a quorum queue declared as the
  service declares it (amqp.queue_arguments), on one node; the node's data directory growth and
  the queue's memory, per message waiting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/capacity.py` puts bench/ on the path, not the repository
import db  # noqa: E402
from amqp import queue_arguments  # noqa: E402
from config import Config  # noqa: E402
from tests.pg_servers import PgServer  # noqa: E402
from tests.rabbitmq_cluster import RabbitNodes  # noqa: E402
from votes import parse_message  # noqa: E402

DBNAME = "capacity"
TABLES = ("vote_audit", "vote_chain", "vote_results", "duplicate_attempts")


def bodies(count: int, *, laws: int) -> list[bytes]:
    """Votes as upstream sends them: a 64-hex hash, a citizen id of 20 characters, law-NNN."""
    out = []
    for i in range(count):
        citizen = f"FR-{i:017d}"
        law = f"law-{i % laws:03d}"
        digest = hashlib.sha256(f"{citizen}:{law}".encode()).hexdigest()
        vote = {"vote_hash": digest, "citizen_id": citizen, "law_id": law, "choice": "oui" if i % 3 else "non"}
        out.append(json.dumps({**vote, "timestamp": "2026-12-06T12:00:00Z"}).encode())
    return out


def postgres(messages: list[bytes], *, batch_size: int) -> dict[str, float]:
    server = PgServer(settings={"full_page_writes": "on", "wal_level": "replica"}).start()
    try:
        config = Config(
            postgres_host="127.0.0.1", postgres_port=server.port, postgres_user="postgres", postgres_db=DBNAME
        )
        db.create_database(config)
        database = db.Database(config=config)
        database.open()
        database.apply_schema()
        votes = [parse_message(b, max_bytes=4096).vote for b in messages]
        server.execute("CHECKPOINT")
        (start,) = server.execute("SELECT pg_current_wal_insert_lsn()")[0]
        for i in range(0, len(votes), batch_size):
            database.write_batch(votes[i : i + batch_size], chain="capacity")
        (wal,) = server.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (start,))[0]
        database.close()
        sizes = {
            t: float(server.execute("SELECT pg_total_relation_size(%s)", (t,), dbname=DBNAME)[0][0]) for t in TABLES
        }
        return {
            **{f"{t} bytes/vote": s / len(votes) for t, s in sizes.items()},
            "WAL bytes/vote": float(wal) / len(votes),
        }
    finally:
        server.remove()


def _du(path: Path) -> int:
    """Bytes in the files under `path` (the node's data directory)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rabbitmq(messages: list[bytes]) -> dict[str, float]:
    nodes = RabbitNodes(1, clustered=1).start()
    try:
        (node,) = nodes.cluster
        connection = pika.BlockingConnection(node.params())
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("capacity", durable=True, arguments=queue_arguments(Config(rabbitmq_queue="capacity")))
        data = node.dir / "mnesia"
        before = _du(data)
        persistent = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for body in messages:
            channel.basic_publish("", "capacity", body, persistent)
        connection.close()
        # The quorum queue's WAL is rolled into segment files in the background: wait until the
        # data directory stops changing (at most 30 s), and report that.
        after, deadline = _du(data), time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1)
            now = _du(data)
            if now == after:
                break
            after = now
        # The node's queue statistics come every few seconds: wait until they show every message.
        deadline = time.monotonic() + 30
        while True:
            (row,) = json.loads(node.ctl("list_queues", "name", "messages", "memory", "--formatter", "json"))
            if row["messages"] == len(messages) or time.monotonic() > deadline:
                break
            time.sleep(1)
        return {
            "messages waiting": float(row["messages"]),
            "message body bytes (mean)": sum(len(b) for b in messages) / len(messages),
            "node disk bytes/message": (after - before) / len(messages),
            "queue memory bytes/message": float(row["memory"]) / len(messages),
        }
    finally:
        nodes.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--laws", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=Config().batch_size)
    args = parser.parse_args()
    messages = bodies(args.votes, laws=args.laws)
    figures = {**postgres(messages, batch_size=args.batch_size), **rabbitmq(messages)}
    print(f"{args.votes:,} votes, {args.laws} laws, batches of {args.batch_size}")
    for name, value in figures.items():
        print(f"  {name:32} {value:12,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
