"""The recorder: finished turns from the request path to the store
(proxy -> recorder -> journal -> writer thread -> store).

`Recorder.submit` runs on the request path before the client gets the end of its answer
(relay.py calls it before the last bytes go out): it appends the record to the journal,
one ``write()`` into the page cache (journal.py), and never raises nor waits on the
store. A writer thread reads the journal back in order and writes it to the store in
batches. When the store fails (locked, full, down), records simply wait in the journal
and are written, in order, once it answers again; writes are idempotent by record id, so
a replay never duplicates. A process that dies leaves its journal behind, and the next
one to start on the same directory writes it (see `Journal.adopt`).

So a process crash (SIGKILL, OOM) loses no record whose client got its answer, and a
machine crash loses at most the last ``sync_interval`` seconds of them (the journal's
group commit; a SQLite store's own last commits may be lost too, by its
``synchronous=NORMAL``). A record no store can take however often tried is set aside in
a ``rejected-*.jsonl`` file. If the disk fails as well, records wait in memory (up to
``queue_size``), then are dropped; all of it is counted (`snapshot`, on ``/health``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError

from nextstate.core.records import Record, TurnRecord, decode, encode
from nextstate.core.store import Store
from nextstate.proxy.journal import Journal, Segment

log = logging.getLogger("nextstate.recorder")
RECENT_IDS = 10_000
# A record in the writer's hands: the journal segment it is in (None: only in memory,
# the journal could not take it), the record, and its journal line.
Entry = tuple[Segment | None, Record, bytes | None]


@dataclass
class RecorderStats:
    submitted: int = 0
    logged: int = 0  # into the journal, on the request path
    written: int = 0  # into the store (replays of records already there do not count)
    spooled: int = 0  # waited in the journal for a store that failed
    unlogged: int = 0  # the journal could not take them (the disk failed): kept in memory
    dropped: int = 0  # neither the journal nor memory could take them
    rejected: int = 0  # records the store could not take however often tried (set aside)
    store_errors: int = 0
    last_error: str | None = None


class RecentOwners:
    """The tenant of each turn and session submitted lately (the newest ``size``)."""

    def __init__(self, size: int = RECENT_IDS) -> None:
        self.size = size
        self._tenants: OrderedDict[str, str | None] = OrderedDict()

    def add(self, record: TurnRecord) -> None:
        self._remember(record.turn_id, record.tenant)
        if record.session_id:
            self._remember(f"session:{record.session_id}", record.tenant)

    def _remember(self, key: str, tenant: str | None) -> None:
        self._tenants[key] = tenant
        if len(self._tenants) > self.size:
            self._tenants.popitem(last=False)

    def owner(self, turn_id: str | None, session_id: str | None) -> tuple[str | None] | None:
        """(tenant,) if the turn or session was submitted recently, else None."""
        key = turn_id if turn_id is not None else f"session:{session_id}"
        return (self._tenants[key],) if key in self._tenants else None


class Recorder:
    def __init__(self, store: Store, spool_dir: Path, *, queue_size: int = 512,
                 idle_seconds: float = 900.0, batch_size: int = 128, linger: float = 0.02,
                 pairing_wait: float = 2.0, retention_days: float | None = None,
                 sync_interval: float = 1.0, stop_timeout: float = 10.0) -> None:
        self.store = store
        self.journal = Journal(spool_dir, sync_interval=sync_interval)
        # Records kept in memory for the writer (and when the journal fails).
        self.queue_size = queue_size
        self.idle_seconds = idle_seconds
        self.batch_size = batch_size
        self.linger = linger
        self.pairing_wait = pairing_wait
        self.retention_days = retention_days
        self.stop_timeout = stop_timeout
        self.stats = RecorderStats()
        # Records just appended, with their number in the journal: the writer takes them
        # from here rather than parse their lines again (up to ``queue_size``).
        self._fresh: deque[tuple[int, Record]] = deque()
        self._memory: deque[Record] = deque()
        self._in_memory = 0  # records only in memory, not yet in the store
        self._memory_lock = threading.Lock()  # (counted from both threads)
        # Turns whose earlier turn is not in the store yet, retried shortly.
        self._deferred: list[Entry] = []
        self._held: list[Entry] = []  # a batch the store failed on, retried after a backoff
        self._retry_at = 0.0
        self._backoff = 0.5
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = False  # adopting what earlier processes left
        # Feedback may name a turn whose record is still on its way to the store.
        self.recent = RecentOwners()

    # -- request path -------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Into the journal (the page cache) now; into the store soon. Never raises."""
        self.stats.submitted += 1
        if isinstance(record, TurnRecord):
            self.recent.add(record)
        try:
            self.journal.append(encode(record))
        except (OSError, TypeError) as exc:  # a full disk; a value JSON cannot hold
            self._keep_in_memory(record, exc)
        else:
            self.stats.logged += 1
            if len(self._fresh) < self.queue_size:
                self._fresh.append((self.journal.appended - 1, record))
        if not self._wake.is_set():
            self._wake.set()

    def _keep_in_memory(self, record: Record, exc: Exception) -> None:
        self.stats.last_error = f"journal: {type(exc).__name__}: {exc}"[:500]
        if len(self._memory) >= self.queue_size:
            self.stats.dropped += 1
            log.error("record dropped (journal and memory full): %s", exc)
            return
        with self._memory_lock:
            self._in_memory += 1
        self._memory.append(record)
        self.stats.unlogged += 1
        log.warning("record kept in memory only: %s", exc)

    # -- lifecycle and status ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records submitted (or left by an earlier process) not yet in the store."""
        return self.journal.pending + self._in_memory

    def start(self) -> None:
        self._starting = True
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="nextstate-recorder")
        self._thread.start()

    async def stop(self) -> None:
        """Write what is waiting (within ``stop_timeout``), then close the journal; what
        the store did not take stays in it for the next start."""
        if self._thread is not None:
            self._stopping.set()
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.journal.close)  # (fsyncs: off the event loop)

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.stats), "queued": self._in_memory,
                "spool_pending": self.pending, "starting": self._starting}

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is in the store (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.pending or self._starting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorder did not flush: {self.snapshot()}")
            await asyncio.sleep(0.01)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._guard(self.journal.adopt)
        self._starting = False
        next_sweep = time.monotonic()
        while not self._stopping.is_set():
            if self._guard(self._pass) >= self.batch_size:
                continue  # a backlog: the next batch at once
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + min(30.0, self.idle_seconds / 4)
                self._guard(self._sweep)
            if self._wake.wait(0.05 if self._deferred or self._held else 1.0):
                self._wake.clear()
                # Let a batch gather: the store's cost is mostly per transaction and per
                # call, so a few records a write cost much less each than one.
                self._stopping.wait(self.linger)
        self.pairing_wait = 0.0  # shutting down: write what waits, paired or not
        self._retry_at = 0.0
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and self._guard(self._pass):
            pass

    def _guard(self, work: Callable[[], int]) -> int:
        """Run a piece of the writer's work; the thread never dies of a bug in it."""
        try:
            return work()
        except Exception as exc:
            self.stats.last_error = f"recorder: {type(exc).__name__}: {exc}"[:500]
            log.exception("recorder writer failed")
            return 0

    def _pass(self) -> int:
        """Write one batch; returns how many of its records were settled (0: none, the
        store failed, or nothing was waiting)."""
        if self._held and time.monotonic() < self._retry_at:
            return 0
        # A batch the store failed on goes first, topped up with what arrived since: all
        # of it waits on the store together (and is counted so), in order.
        batch, self._held = self._held, []
        held = len(batch)
        if not held:
            batch, self._deferred = self._deferred, []
        while self._memory and len(batch) < self.batch_size:
            batch.append((None, self._memory.popleft(), None))
        for segment, line, seq in self.journal.read(self.batch_size - len(batch)):
            entry = self._entry(segment, line, seq)
            if entry is not None:
                batch.append(entry)
        done = self._write(batch, held) if batch else 0
        self.journal.maintain()
        return done

    def _entry(self, segment: Segment, line: bytes, seq: int) -> Entry | None:
        """A journal line as the record it holds: the one just submitted, if still in
        memory, else parsed from the line."""
        fresh = self._fresh
        while fresh and fresh[0][0] < seq:
            fresh.popleft()  # (read before it was remembered: parsed instead)
        if fresh and fresh[0][0] == seq:
            return segment, fresh.popleft()[1], line
        if not line.strip():
            self.journal.settle(segment)
            return None
        try:
            return segment, decode(line), line
        except Exception as exc:  # a damaged line (a disk error): set aside, go on
            self._reject(segment, None, line, exc)
            return None

    def _write(self, batch: list[Entry], held: int) -> int:
        """Write ``batch``, whose first ``held`` entries the store already failed on."""
        try:
            written, deferred = self.store.turns.write_or_defer([r for _, r, _ in batch],
                                                          self.pairing_wait)
        except (DBAPIError, OSError) as exc:  # the store is away: they wait in the journal
            self._store_failed(exc, batch, held)
            return 0
        except Exception:  # a record the store cannot take: find it, set it aside
            return self._isolate(batch, held)
        self._backoff = 0.5
        self.stats.written += written
        waiting = {id(r) for r in deferred}
        self._deferred = [e for e in batch if id(e[1]) in waiting]
        self._settle([e for e in batch if id(e[1]) not in waiting])
        return len(batch) - len(self._deferred)

    def _isolate(self, batch: list[Entry], held: int) -> int:
        """Write a failed batch one record at a time, so that one bad record (a bug, or
        data no store can take) never holds up the rest: it goes to a rejected-*.jsonl
        file beside the journal, counted, instead of being retried forever."""
        for i, entry in enumerate(batch):
            try:
                self.stats.written += self.store.turns.write([entry[1]])
            except (DBAPIError, OSError) as exc:
                self._store_failed(exc, batch[i:], max(held - i, 0))
                return i
            except Exception as exc:
                self._reject(*entry, exc)
            else:
                self._settle([entry])
        return len(batch)

    def _reject(self, segment: Segment | None, record: Record | None, line: bytes | None,
                exc: Exception) -> None:
        self.stats.rejected += 1
        self.stats.last_error = f"rejected record: {type(exc).__name__}: {exc}"[:500]
        log.error("record rejected by the store; set aside in %s: %s",
                  self.journal.rejected_path, self.stats.last_error)
        if line is None:
            line = orjson.dumps(record, default=str)
        try:
            self.journal.reject(line, f"{type(exc).__name__}: {exc}")
        except OSError as error:
            log.error("could not set the record aside: %s", error)
        self._settle_one(segment)

    def _settle(self, entries: list[Entry]) -> None:
        for segment, _, _ in entries:
            self._settle_one(segment)

    def _settle_one(self, segment: Segment | None) -> None:
        if segment is None:
            with self._memory_lock:
                self._in_memory -= 1
        else:
            self.journal.settle(segment)

    def _store_failed(self, exc: Exception, batch: list[Entry] | None = None,
                      held: int = 0) -> None:
        """The store failed on ``batch`` (its first ``held`` entries, again): it is held
        and retried after a growing backoff, each record counted once as spooled."""
        self.stats.store_errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
        if batch:
            self._held = list(batch)
            self.stats.spooled += len(batch) - held
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)
        log.warning("store unavailable, records wait in the journal: %s",
                    self.stats.last_error)

    def _sweep(self) -> int:
        """End idle sessions; delete turns past their retention period; adopt the journal
        of a process that died since."""
        try:
            self.store.retention.expire_idle(self.idle_seconds)
            if self.retention_days is not None:
                self.store.retention.forget(older_than=time.time() - self.retention_days * 86400)
        except Exception as exc:
            self._store_failed(exc)
        return self.journal.adopt()
