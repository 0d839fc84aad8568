"""The recorder: journal, replay, deferral and rejection, with a store that fails."""

import asyncio
import time

import pytest

from nextstate.core.records import TurnRecord
from nextstate.core.store import Store
from nextstate.proxy.recorder import Recorder


class FlakyStore:
    """A real in-memory store that can be switched off, like a locked or dead database."""

    def __init__(self) -> None:
        self.inner = Store("sqlite://")
        self.down = False
        self.turns = self.retention = self  # what the recorder writes and sweeps through

    def write(self, records):
        return self.write_or_defer(records)[0]

    def write_or_defer(self, records, pairing_wait=0.0, now=None):
        if self.down:
            raise OSError("database is locked")
        return self.inner.turns.write_or_defer(records, pairing_wait, now)

    def expire_idle(self, idle_seconds, now=None):
        return 0


async def until(condition, timeout=30.0):
    """Wait for the writer (a thread, slow to start on a busy machine) to get there."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def rec(i):
    return TurnRecord(turn_id=f"r{i}", endpoint="chat", created_at=float(i),
                      request={"messages": [{"role": "user", "content": str(i)}]},
                      response={"choices": []})


async def test_records_wait_on_disk_while_the_store_is_down(tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path, queue_size=4)
    recorder._backoff = 0.01
    store.down = True
    recorder.start()
    for i in range(10):  # more than the memory queue would hold
        recorder.submit(rec(i))
    await until(lambda: recorder.stats.spooled == 10)
    assert store.inner.turns.count() == 0
    assert recorder.stats.spooled == 10 and recorder.snapshot()["spool_pending"] == 10
    assert recorder.stats.dropped == 0
    store.down = False
    await recorder.flush(timeout=10)
    await recorder.stop()
    assert [t["turn_id"] for t in store.inner.turns.iterate()] == [f"r{i}" for i in range(10)]
    assert list(tmp_path.glob("*.jsonl")) == []


async def test_records_arriving_while_the_store_fails_wait_with_those_it_failed_on(tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path)
    recorder._backoff = 0.01
    store.down = True
    recorder.start()
    for i in range(5):
        recorder.submit(rec(i))
    await until(lambda: recorder.stats.store_errors >= 1)
    for i in range(5, 10):  # the store has failed on the first five: these join them
        recorder.submit(rec(i))
    await until(lambda: recorder.stats.spooled == 10)
    assert recorder.stats.spooled == 10 and recorder.stats.written == 0
    store.down = False
    await recorder.flush(timeout=10)
    await recorder.stop()
    assert [t["turn_id"] for t in store.inner.turns.iterate()] == [f"r{i}" for i in range(10)]


async def test_spool_left_by_a_dead_process_is_replayed_on_start(tmp_path):
    store = FlakyStore()
    store.down = True
    first = Recorder(store, tmp_path)
    first.start()
    first.submit(rec(1))
    await asyncio.sleep(0.1)
    await first.stop()  # store still down: the record stays on disk
    assert list(tmp_path.glob("*.jsonl"))
    store.down = False
    second = Recorder(store, tmp_path)
    second.start()
    await second.flush()
    await second.stop()
    assert store.inner.turns.get("r1") is not None


@pytest.mark.parametrize("n", [1, 50])
async def test_submit_never_blocks_and_everything_is_written(tmp_path, n):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path)
    recorder.start()
    for i in range(n):
        recorder.submit(rec(i))
    await recorder.flush()
    await recorder.stop()
    assert store.inner.turns.count() == n
    assert recorder.stats.written == n


async def test_a_turn_waiting_for_its_parent_is_written_once_the_parent_arrives(tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path, pairing_wait=5.0)
    recorder.start()
    first = [{"role": "user", "content": "q"}]
    child = TurnRecord(turn_id="child", endpoint="chat", created_at=time.time(),
                       request={"messages": [*first, {"role": "assistant", "content": "r"},
                                             {"role": "user", "content": "more"}]},
                       response={"choices": []})
    parent = TurnRecord(turn_id="parent", endpoint="chat", created_at=time.time() - 1,
                        request={"messages": first}, response={"choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "r"}}]})
    recorder.submit(child)
    await asyncio.sleep(0.3)
    assert store.inner.turns.count() == 0  # waiting, not lost
    recorder.submit(parent)
    await recorder.flush(timeout=5)
    await recorder.stop()
    assert store.inner.turns.get("parent")["next_turn_id"] == "child"


class PoisonStore(FlakyStore):
    """Fails on one record (like a bug or data no database takes), not for being down."""

    def write_or_defer(self, records, pairing_wait=0.0, now=None):
        if any(r.turn_id == "poison" for r in records):
            raise ValueError("cannot store this one")
        return super().write_or_defer(records, pairing_wait, now)


async def test_one_bad_record_is_set_aside_and_never_blocks_the_rest(tmp_path):
    store = PoisonStore()
    recorder = Recorder(store, tmp_path)
    recorder.start()
    for i in (1, 2):
        recorder.submit(rec(i))
    poison = rec(3)
    poison.turn_id = "poison"
    recorder.submit(poison)
    recorder.submit(rec(4))
    await recorder.flush(timeout=5)
    await recorder.stop()
    assert sorted(t["turn_id"] for t in store.inner.turns.iterate()) == ["r1", "r2", "r4"]
    assert recorder.stats.rejected == 1 and recorder.stats.spooled == 0
    [rejected] = tmp_path.glob("rejected-*.jsonl")
    assert b'"poison"' in rejected.read_bytes()


def disk_full(line):
    raise OSError(28, "No space left on device")


async def test_a_full_disk_keeps_records_in_memory_then_drops_counted_and_never_raises(
        tmp_path):
    store = FlakyStore()
    store.down = True
    recorder = Recorder(store, tmp_path, queue_size=1)
    recorder._backoff = 0.01
    recorder.journal.append = disk_full
    recorder.submit(rec(1))  # the request path never sees the failure
    recorder.submit(rec(2))  # and memory holds one
    assert (recorder.stats.unlogged, recorder.stats.dropped) == (1, 1)
    assert "No space left" in recorder.stats.last_error
    # Started only now: a writer already running could take r1 out of memory (to try the
    # store) between the two submits, and r2 would fit.
    recorder.start()
    store.down = False
    await recorder.flush()
    await recorder.stop()
    assert [t["turn_id"] for t in store.inner.turns.iterate()] == ["r1"]


async def test_stop_returns_with_the_store_locked_and_the_next_start_writes_the_rest(
        tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path, stop_timeout=0.5)
    recorder.start()
    store.down = True
    for i in range(3):
        recorder.submit(rec(i))
    await asyncio.wait_for(recorder.stop(), timeout=10)
    assert store.inner.turns.count() == 0
    store.down = False
    again = Recorder(store, tmp_path)
    again.start()
    await again.flush()
    await again.stop()
    assert sorted(t["turn_id"] for t in store.inner.turns.iterate()) == ["r0", "r1", "r2"]
    assert list(tmp_path.glob("journal-*")) == []
