"""The journal: on disk at once, adopted after a crash, rotated, never fsynced per record."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import orjson

from nextstate.core.records import FeedbackRecord, TurnRecord, decode, encode
from nextstate.core.store import Store
from nextstate.proxy import journal as journal_module
from nextstate.proxy.recorder import Recorder
from tests.proxy.test_recorder import FlakyStore, rec


def journal_lines(directory):
    return [line for path in sorted(directory.glob("journal-*.jsonl"))
            for line in path.read_bytes().splitlines()]


def test_a_record_is_in_the_journal_when_submit_returns(tmp_path):
    recorder = Recorder(FlakyStore(), tmp_path)  # no writer running: only the journal
    turn = rec(1)
    turn.chunks = [{"choices": [{"delta": {"content": "é"}, "token_ids": [1]}]}]
    recorder.submit(turn)
    recorder.submit(FeedbackRecord(feedback_id="f1", created_at=1.0, score=1, source="header",
                                   turn_id="r1"))
    first, second = journal_lines(tmp_path)
    assert decode(first) == turn
    assert decode(second).feedback_id == "f1"
    assert recorder.snapshot()["spool_pending"] == 2


def test_encode_writes_what_decode_reads_for_every_kind():
    turn = TurnRecord(turn_id="t", endpoint="completions", created_at=2.5, request={"p": 1},
                      feedback={"score": -1}, status="aborted")
    line = encode(turn)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line)["kind"] == "turn"
    assert decode(line) == turn


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from nextstate.core.records import TurnRecord
    from nextstate.proxy.recorder import Recorder
    from nextstate.core.store import Store

    recorder = Recorder(Store(sys.argv[1]), Path(sys.argv[2]))  # its writer never runs
    for i in range(20):
        recorder.submit(TurnRecord(turn_id=f"k{i}", endpoint="chat", created_at=float(i),
                                   request={"messages": []}, response={"choices": []}))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_records_of_a_killed_process_are_written_once_by_the_next_one(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    died = subprocess.run([sys.executable, "-c", KILLED, url, str(tmp_path / "j")],
                          capture_output=True)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert len(journal_lines(tmp_path / "j")) == 20
    store = Store(url)
    for _ in range(2):  # a second start finds nothing left to do
        recorder = Recorder(store, tmp_path / "j")
        recorder.start()
        _flush(recorder)
    assert [t["turn_id"] for t in store.turns.iterate()] == [f"k{i}" for i in range(20)]
    assert list((tmp_path / "j").glob("journal-*")) == []


def _flush(recorder):
    async def go():
        await recorder.flush()
        await recorder.stop()

    asyncio.run(go())


def test_a_live_process_journal_is_left_to_it(tmp_path):
    store = FlakyStore()
    alive = Recorder(store, tmp_path)  # its writer has not got to these yet
    for i in range(3):
        alive.submit(rec(i))
    other = Recorder(store, tmp_path)
    other.start()
    _flush(other)
    assert store.inner.turns.count() == 0  # locked by its owner: not an orphan
    alive.start()
    _flush(alive)
    assert sorted(t["turn_id"] for t in store.inner.turns.iterate()) == ["r0", "r1", "r2"]


def test_segments_rotate_and_each_is_deleted_once_written(tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path, batch_size=7)
    recorder.journal.segment_bytes = 1000
    for i in range(30):
        recorder.submit(rec(i))
        if i % 10 == 9:
            recorder.journal.maintain()  # (the writer's housekeeping) seals the segment
    assert len(list(tmp_path.glob("journal-*.jsonl"))) >= 3
    recorder.start()
    _flush(recorder)
    assert [t["turn_id"] for t in store.inner.turns.iterate()] == [f"r{i}" for i in range(30)]
    assert list(tmp_path.glob("journal-*")) == []


def test_an_incomplete_last_line_left_by_a_crash_is_skipped(tmp_path):
    orphan = tmp_path / "journal-1-1-000001.jsonl"
    orphan.write_bytes(encode(rec(1)) + encode(rec(2)) + encode(rec(3))[:40])
    old_spool = tmp_path / "spool-1-1-000001.jsonl"  # what an older version left
    old_spool.write_bytes(encode(rec(4)))
    store = FlakyStore()
    recorder = Recorder(store, tmp_path)
    recorder.start()
    _flush(recorder)
    assert sorted(t["turn_id"] for t in store.inner.turns.iterate()) == ["r1", "r2", "r4"]
    assert recorder.journal.torn == 1
    assert not orphan.exists() and not old_spool.exists()


def test_appends_are_fsynced_in_groups_not_one_by_one(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(journal_module.os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    recorder = Recorder(FlakyStore(), tmp_path, sync_interval=0.2)
    synced.clear()
    for i in range(300):
        recorder.submit(rec(i))
    assert synced == []  # never on the request path
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert 1 <= len(synced) <= 4  # one group commit for all of them (and maybe an idle one)
    recorder.journal.close()


async def test_a_running_proxy_takes_over_the_journal_of_one_that_died_since(tmp_path):
    store = FlakyStore()
    recorder = Recorder(store, tmp_path, idle_seconds=0.4)  # its sweep: every 0.1 s
    recorder.start()
    await recorder.flush()
    (tmp_path / "journal-1-1-000001.jsonl").write_bytes(encode(rec(7)))  # left by the dead
    deadline = time.monotonic() + 30  # the writer is a thread: slow on a loaded machine
    while store.inner.turns.count() == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await recorder.stop()
    assert [t["turn_id"] for t in store.inner.turns.iterate()] == ["r7"]
