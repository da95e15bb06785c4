"""Batching: boundaries, prefetch against batch size, writing while the next batch fills,
and stopping while a batch is being written."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import pytest

from pipeline import AckSequencer, Batch, Buffer, Delivery
from tests.proxy import TcpProxy
from tests.support import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    Service,
    VoteMsg,
    apply_schema,
    assert_all_counted_once,
    assert_invariant,
    audit_count,
    expected_totals,
    make_votes,
    pg_connect,
    publish,
    query,
    queue_state,
    results,
    wait_for,
)
from votes import Vote, parse_vote

MakeService = Callable[..., Service]


# -- the buffer on its own --------------------------------------------------------


def _delivery(tag: int, session: int, received_at: float | None = None) -> Delivery:
    vote: Vote = parse_vote(make_votes(1, laws=1, seed=tag)[0].body(), max_bytes=4096)
    return Delivery(vote, tag, session, time.monotonic() if received_at is None else received_at)


def _tags(batch: Batch | None) -> list[int]:
    assert batch is not None
    return [d.tag for d in batch.deliveries]


def test_buffer_hands_out_full_batches_in_delivery_order() -> None:
    buffer = Buffer(batch_size=3, timeout_s=60)
    channel = 1
    for tag in range(1, 8):
        buffer.extend([_delivery(tag, channel)])
    first, second = buffer.take(wait_s=0), buffer.take(wait_s=0)
    assert _tags(first) == [1, 2, 3]
    assert _tags(second) == [4, 5, 6]
    assert first is not None
    assert second is not None
    assert (first.seq, second.seq) == (0, 1)
    assert buffer.take(wait_s=0.05) is None  # one vote left, not due yet
    assert _tags(buffer.take(wait_s=0, drain=True)) == [7]
    assert len(buffer) == 0


def test_buffer_releases_a_partial_batch_once_its_oldest_vote_is_due() -> None:
    channel = 1
    # Not before: received now, due in an hour.
    buffer = Buffer(batch_size=100, timeout_s=3600)
    buffer.extend([_delivery(1, channel)])
    assert buffer.take(wait_s=0) is None
    # Due an hour ago: released at once.
    buffer.extend([_delivery(2, channel, received_at=time.monotonic() - 3600)])
    assert buffer.take(wait_s=0) is None  # the oldest (tag 1) decides, and it is not due
    late = Buffer(batch_size=100, timeout_s=3600)
    late.extend([_delivery(3, channel, received_at=time.monotonic() - 3600)])
    assert _tags(late.take(wait_s=0)) == [3]
    # And when it falls due: a writer waiting in take() (for up to an hour) wakes for it.
    soon = Buffer(batch_size=100, timeout_s=0.3)
    soon.extend([_delivery(4, channel)])
    taken: list[list[int]] = []
    writer = threading.Thread(target=lambda: taken.append(_tags(soon.take(wait_s=3600))), daemon=True)
    writer.start()
    writer.join(60)
    assert taken == [[4]]


def test_buffer_wakes_the_writer_when_a_batch_fills() -> None:
    # Not woken, the writer would sleep out its wait or the batch timeout: an hour each.
    buffer = Buffer(batch_size=5, timeout_s=3600)
    channel = 1
    taken: list[list[int]] = []
    writer = threading.Thread(target=lambda: taken.append(_tags(buffer.take(wait_s=3600))), daemon=True)
    writer.start()
    for tag in range(1, 6):
        buffer.extend([_delivery(tag, channel)])
    writer.join(60)
    assert not writer.is_alive()
    assert taken == [[1, 2, 3, 4, 5]]


def test_buffer_forgets_the_deliveries_of_a_closed_channel_only() -> None:
    buffer = Buffer(batch_size=10, timeout_s=60)
    old, new = 1, 2
    for tag in (1, 2, 3):
        buffer.extend([_delivery(tag, old)])
    for tag in (1, 2):
        buffer.extend([_delivery(tag, new)])
    assert buffer.drop_session(old) == 3
    batch = buffer.take(wait_s=0, drain=True)
    assert batch is not None
    assert [(d.tag, d.session == new) for d in batch.deliveries] == [(1, True), (2, True)]


def test_sequencer_settles_batches_in_the_order_they_were_taken() -> None:
    settled: list[list[int]] = []
    sequencer = AckSequencer(lambda committed, rejected: settled.append([d.tag for d in committed + rejected]))
    channel = 1
    batches = [Batch(seq, [_delivery(seq * 10 + i, channel) for i in range(1, 3)]) for seq in range(4)]
    sequencer.done(batches[1], batches[1].deliveries, [])
    sequencer.done(batches[3], batches[3].deliveries[:1], batches[3].deliveries[1:])
    # Batch 0 is still being written.
    assert settled == []
    assert sequencer.waiting == 2
    sequencer.done(batches[0], batches[0].deliveries, [])
    assert settled == [[1, 2], [11, 12]]  # 3 still waits for 2
    sequencer.done(batches[2], batches[2].deliveries, [])
    assert settled == [[1, 2], [11, 12], [21, 22], [31, 32]]
    assert sequencer.waiting == 0


def test_sequencer_tracks_the_oldest_unsettled_vote_and_survives_a_failing_settle() -> None:
    settled: list[int] = []

    def settle(committed: list[Delivery], _rejected: list[Delivery]) -> None:
        if committed[0].tag == 1:
            raise RuntimeError("the connection went away")
        settled.append(committed[0].tag)

    failures: list[str] = []
    sequencer = AckSequencer(settle, on_failure=failures.append)
    first = Batch(0, [_delivery(1, 1, received_at=100.0)])
    second = Batch(1, [_delivery(2, 1, received_at=200.0)])
    assert sequencer.oldest_received_at() is None
    sequencer.taken(first)
    sequencer.taken(second)
    assert sequencer.oldest_received_at() == 100.0
    assert sequencer.unsettled == 2
    sequencer.done(second, second.deliveries, [])
    assert sequencer.oldest_received_at() == 100.0  # still held behind batch 0
    sequencer.done(first, first.deliveries, [])
    # Batch 0's settle raised: batch 1 is settled all the same, nothing is held, and the
    # failure is reported (the pipeline stops the service: the votes may still be unacked).
    assert settled == [2]
    assert failures == ["a committed batch could not be settled"]
    assert sequencer.oldest_received_at() is None
    assert sequencer.unsettled == 0


# -- the service ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [7 * 40, 7 * 40 + 3, 6])
def test_batch_boundaries_count_every_vote_once(make_service: MakeService, queue: str, dbname: str, count: int) -> None:
    votes = make_votes(count, laws=4)
    publish(queue, (v.body() for v in votes))
    svc = make_service({"BATCH_SIZE": "7", "RABBITMQ_PREFETCH_COUNT": "50", "BATCH_TIMEOUT_SECONDS": "0.2"}).start()
    wait_for(lambda: audit_count(dbname) == count, timeout=60, what="every vote counted")
    wait_for(lambda: svc.metric("batch_size_processed_total") == count, timeout=10, what="metrics")
    assert svc.metric("batch_duration_seconds_count") >= count // 7
    assert svc.stop() == 0
    assert_all_counted_once(dbname, queue, votes)


def test_prefetch_below_the_batch_size_still_counts_everything(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    votes = make_votes(300, laws=3)
    publish(queue, (v.body() for v in votes))
    svc = make_service({"BATCH_SIZE": "100", "RABBITMQ_PREFETCH_COUNT": "30", "BATCH_TIMEOUT_SECONDS": "0.2"}).start()
    wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
    assert svc.stop() == 0
    assert "batches never fill" in svc.logs()  # the operator is told why it is slow
    assert_all_counted_once(dbname, queue, votes)


def test_the_next_batch_fills_while_one_is_being_written(make_service: MakeService, queue: str, dbname: str) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    try:
        svc = make_service(
            {
                "POSTGRES_PORT": str(proxy.port),
                "BATCH_SIZE": "50",
                "RABBITMQ_PREFETCH_COUNT": "500",
                "FLUSH_WORKERS": "2",
                # Only full batches leave the buffer: on a loaded machine the publishing can take
                # longer than the default 1 s, and a partial batch taken on time would change the
                # arithmetic below.
                "BATCH_TIMEOUT_SECONDS": "120",
            }
        ).start()
        proxy.pause()  # the writes of the first two batches (one per worker) hang
        votes = make_votes(2_000, laws=5)
        publish(queue, (v.body() for v in votes))
        # The connection thread keeps receiving up to the prefetch limit meanwhile.
        wait_for(lambda: svc.metric("vote_buffer_depth") == 500 - 2 * 50, timeout=30, what="the buffer to fill")
        assert audit_count(dbname) == 0
        proxy.resume()
        wait_for(lambda: audit_count(dbname) == len(votes), timeout=60, what="every vote counted")
        assert svc.stop() == 0
    finally:
        proxy.close()
    assert_all_counted_once(dbname, queue, votes)


def test_stopping_while_a_batch_is_being_written_waits_for_it(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    proxy = TcpProxy(POSTGRES_HOST, POSTGRES_PORT)
    try:
        svc = make_service(
            {"POSTGRES_PORT": str(proxy.port), "BATCH_SIZE": "100", "SHUTDOWN_TIMEOUT_SECONDS": "30"}
        ).start()
        votes = make_votes(3_000, laws=5)
        proxy.pause()
        publish(queue, (v.body() for v in votes))
        wait_for(lambda: svc.metric("vote_buffer_depth") > 0, timeout=30, what="votes buffered")
        wait_for(proxy.holding, timeout=10, interval=0.01, what="a batch on its way to the silent database")
        svc.signal(signal.SIGTERM)
        # The stop under way with a batch on its way to the silent database; it ends well only if it
        # waits for that batch (counted below, and exit 0), since nothing is written before resume().
        wait_for(lambda: "stopping: no new messages" in svc.logs(), timeout=15, what="the stop under way")
        proxy.resume()
        assert svc.proc is not None
        assert svc.proc.wait(30) == 0
    finally:
        proxy.close()
    counted = audit_count(dbname)
    ready, _consumers = queue_state(queue)
    assert counted > 0
    assert counted + ready == len(votes)  # written and acked, or still queued: none lost, none doubled
    assert_invariant(dbname)


def test_a_later_batch_is_not_acked_before_an_earlier_one_commits(
    make_service: MakeService, queue: str, dbname: str
) -> None:
    # Batch 0 (all for law-slow) waits on a row lock the test holds; batch 1
    # commits meanwhile on the other worker. Its multiple-ack would also ack
    # batch 0's deliveries, so it must wait: after a crash both come back.
    apply_schema(dbname)
    query(dbname, "INSERT INTO vote_results (law_id) VALUES ('law-slow')")
    blocker = pg_connect(dbname)
    blocker.autocommit = False
    slow = [VoteMsg(f"{i:064x}", f"slow-{i}", "law-slow", "oui") for i in range(10)]
    fast = make_votes(10, laws=3)
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT 1 FROM vote_results WHERE law_id = 'law-slow' FOR UPDATE")
        svc = make_service({"BATCH_SIZE": "10", "FLUSH_WORKERS": "2", "BATCH_TIMEOUT_SECONDS": "0.2"}).start()
        publish(queue, [v.body() for v in slow] + [v.body() for v in fast])
        wait_for(lambda: audit_count(dbname) == len(fast), timeout=30, what="the later batch committed")
        # An ack, were one sent, is written on the connection thread's next turn. A message received
        # after the commit shows a later turn: an ack would be on the wire before the kill. (Refused
        # on arrival, it is no vote; it too waits behind batch 0.)
        publish(queue, [b"not json"])
        wait_for(lambda: svc.metric("messages_received_total") == len(slow) + len(fast) + 1, timeout=30, what="a turn")
        svc.kill()
    finally:
        blocker.rollback()
        blocker.close()
    assert queue_state(queue)[0] == len(slow) + len(fast) + 1  # nothing was acked

    again = make_service().start()
    wait_for(lambda: audit_count(dbname) == len(slow) + len(fast), timeout=30, what="every vote counted")
    wait_for(lambda: again.metric("votes_redelivered_total") == len(fast), timeout=10, what="replays absorbed")
    assert again.stop() == 0
    assert results(dbname) == expected_totals(slow + fast)
    assert queue_state(queue) == (0, 0)
    assert_invariant(dbname)
