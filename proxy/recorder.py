"""The recorder: hands finished turns from the request path to the store (proxy -> store).

`Recorder.submit` never blocks and never raises: it puts the record on a bounded queue.
A writer task drains the queue in batches and writes them in a worker thread. When the
store fails (locked, full, down), batches go to an append-only spool file on disk, in
order, and are replayed once the store answers again; writes are idempotent by turn id,
so a replay never duplicates. If the queue itself overflows, records are spooled
directly. Nothing is dropped unless the disk fails too, and that is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy.exc import DBAPIError

from nextstate.proxy.record import Record, TurnRecord, record_from_dict
from nextstate.proxy.store import Store

log = logging.getLogger("nextstate.recorder")
RECENT_IDS = 10_000


@dataclass
class RecorderStats:
    submitted: int = 0
    written: int = 0
    spooled: int = 0
    dropped: int = 0
    rejected: int = 0  # records the store could not take however often tried (set aside)
    store_errors: int = 0
    last_error: str | None = None


class Spool:
    """Append-only JSONL files of records waiting for the store, in arrival order.

    Appends go to an active file; a drain first seals it (a new active file takes further
    appends) and replays sealed files oldest first, deleting each once written. Each file
    is flock-ed by its process: files left by a process that died are adopted and
    replayed too. The lock guards only file rotation, so appends never wait on a drain.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._prefix = f"spool-{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self._lock = threading.Lock()
        self._sealed: list[tuple[Path, IO[bytes], int]] = []
        self._active_count = 0
        self._active_path, self._active = self._open_new()

    @property
    def pending(self) -> int:
        return self._active_count + sum(count for _, _, count in self._sealed)

    def _open_new(self) -> tuple[Path, IO[bytes]]:
        self._seq += 1
        path = self.directory / f"{self._prefix}-{self._seq:06d}.jsonl"
        f = open(path, "ab")  # noqa: SIM115 - held (and locked) until replayed
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return path, f

    def append(self, records: list[Record]) -> None:
        data = b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records)
        with self._lock:
            self._active.write(data)
            self._active.flush()
            os.fsync(self._active.fileno())
            self._active_count += len(records)

    def _seal(self) -> None:
        with self._lock:
            if self._active_count:
                self._sealed.append((self._active_path, self._active, self._active_count))
                self._active_path, self._active = self._open_new()
                self._active_count = 0

    def drain(self, store: Store, batch: int = 256) -> int:
        """Write spooled records (orphans first, then ours, oldest first) to the store.
        Raises on a store failure, leaving what is not yet written on disk."""
        written = 0
        for path in sorted(self.directory.glob("spool-*.jsonl")):
            if not path.name.startswith(self._prefix):
                written += self._adopt(path, store, batch)
        self._seal()
        while self._sealed:
            path, f, _count = self._sealed[0]
            written += _replay(path, store, batch)
            f.close()
            path.unlink()
            with self._lock:
                self._sealed.pop(0)
        return written

    def _adopt(self, path: Path, store: Store, batch: int) -> int:
        with open(path, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process owns it
            written = _replay(path, store, batch)
            path.unlink()
            return written

    @property
    def rejected_path(self) -> Path:
        return self.directory / f"rejected-{self._prefix}.jsonl"

    def reject(self, record: Record, error: Exception) -> None:
        line = orjson.dumps({"error": f"{type(error).__name__}: {error}",
                             "record": record.to_dict()}, default=str)
        with self._lock, open(self.rejected_path, "ab") as f:
            f.write(line + b"\n")

    def close(self) -> None:
        """Close our files; what is still pending stays on disk for the next start."""
        with self._lock:
            for _, f, _ in self._sealed:
                f.close()
            self._active.close()
            if self._active_count == 0:
                with contextlib.suppress(FileNotFoundError):
                    self._active_path.unlink()


def _replay(path: Path, store: Store, batch: int) -> int:
    records: list[Record] = []
    written = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                records.append(record_from_dict(orjson.loads(line)))
            if len(records) >= batch:
                written += store.write(records)
                records = []
    if records:
        written += store.write(records)
    return written


class Recorder:
    def __init__(self, store: Store, spool_dir: Path, *, queue_size: int = 2048,
                 idle_seconds: float = 900.0, batch_size: int = 128, linger: float = 0.02,
                 pairing_wait: float = 2.0, retention_days: float | None = None) -> None:
        self.store = store
        self.spool = Spool(spool_dir)
        self.queue: asyncio.Queue[Record] = asyncio.Queue(maxsize=queue_size)
        self.idle_seconds = idle_seconds
        self.batch_size = batch_size
        self.linger = linger
        self.pairing_wait = pairing_wait
        self.retention_days = retention_days
        # Turns whose earlier turn is not in the store yet, retried shortly.
        self._deferred: list[Record] = []
        self.stats = RecorderStats()
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._backoff = 0.5
        self._outstanding = 0  # submitted, not yet written or spooled
        # Turn and session ids recently submitted, with their tenant: feedback may name a
        # turn whose record is still on its way to the store.
        self._recent: OrderedDict[str, str | None] = OrderedDict()
        self._starting = False  # replaying an earlier run's spool

    # -- request path -------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        self.stats.submitted += 1
        self._outstanding += 1
        if isinstance(record, TurnRecord):
            self._remember(record.turn_id, record.tenant)
            if record.session_id:
                self._remember(f"session:{record.session_id}", record.tenant)
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self._spool([record])
            self._outstanding -= 1

    def _remember(self, key: str, tenant: str | None) -> None:
        self._recent[key] = tenant
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    def recent_owner(self, turn_id: str | None, session_id: str | None,
                     ) -> tuple[str | None] | None:
        """(tenant,) if the turn or session was submitted recently, else None."""
        key = turn_id if turn_id is not None else f"session:{session_id}"
        return (self._recent[key],) if key in self._recent else None

    # -- writer ---------------------------------------------------------------------------

    def start(self) -> None:
        self._starting = True
        self._task = asyncio.create_task(self._run(), name="nextstate-recorder")

    async def stop(self) -> None:
        """Write what is queued (or spool it), then stop."""
        if self._task is not None:
            # Python 3.11's wait_for can swallow a cancellation that arrives as the queue
            # hands over a record (the loop then runs on and this await never returns):
            # cancel until the task is done.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                self._task.result()
        self.pairing_wait = 0.0  # shutting down: write what waits, paired or not
        batch = self._deferred + self._take_batch(limit=None)
        self._deferred = []
        if batch:
            await self._write(batch)
        if self.spool.pending:
            await self._drain_spool()
        self.spool.close()

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.stats), "queued": self.queue.qsize(),
                "spool_pending": self.spool.pending}

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is in the store (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._outstanding or self.spool.pending or self._starting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorder did not flush: {self.snapshot()}")
            await asyncio.sleep(0.01)

    async def _run(self) -> None:
        await self._drain_spool()  # records left by an earlier run
        self._starting = False
        next_sweep = time.monotonic()
        while True:
            try:
                first = await asyncio.wait_for(self.queue.get(),
                                               timeout=0.05 if self._deferred else 1.0)
            except TimeoutError:
                first = None
            if first is not None and self.queue.qsize() < self.batch_size - 1:
                # Let a batch gather: the store's cost is mostly per transaction and per
                # call, so a few records a write cost much less each than one.
                await asyncio.sleep(self.linger)
            batch = ([first] if first is not None else []) + self._take_batch(
                limit=self.batch_size)
            if self._deferred:
                batch, self._deferred = self._deferred + batch, []
            if batch:
                await self._write(batch)
            if self.spool.pending and time.monotonic() >= self._retry_at:
                await self._drain_spool()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + min(30.0, self.idle_seconds / 4)
                await self._expire_idle()

    def _take_batch(self, limit: int | None) -> list[Record]:
        batch: list[Record] = []
        while not self.queue.empty() and (limit is None or len(batch) < limit):
            batch.append(self.queue.get_nowait())
        return batch

    async def _write(self, batch: list[Record]) -> None:
        try:
            if self.spool.pending:  # keep order: the store is behind the spool
                self._spool(batch)
                return
            try:
                written, deferred = await asyncio.to_thread(
                    self.store.write_or_defer, batch, self.pairing_wait)
                self.stats.written += written
                self._deferred = list(deferred)
            except (DBAPIError, OSError) as exc:  # the store is away: keep them on disk
                self._store_failed(exc)
                self._spool(batch)
            except Exception:  # a record the store cannot take: find it, set it aside
                await self._isolate(batch)
        finally:
            self._outstanding -= len(batch) - len(self._deferred)

    async def _isolate(self, batch: list[Record]) -> None:
        """Write a failed batch one record at a time, so that one bad record (a bug, or
        data no store can take) never holds up the rest: it goes to a rejected-*.jsonl
        file beside the spool, counted, instead of being retried forever."""
        for record in batch:
            try:
                self.stats.written += await asyncio.to_thread(self.store.write, [record])
            except (DBAPIError, OSError) as exc:
                self._store_failed(exc)
                self._spool([record])
            except Exception as exc:
                self.stats.rejected += 1
                self.stats.last_error = f"rejected record: {type(exc).__name__}: {exc}"[:500]
                log.exception("record rejected by the store; set aside in %s",
                              self.spool.rejected_path)
                self.spool.reject(record, exc)

    async def _drain_spool(self) -> None:
        try:
            self.stats.written += await asyncio.to_thread(self.spool.drain, self.store)
            self._backoff = 0.5
        except Exception as exc:
            self._store_failed(exc)

    async def _expire_idle(self) -> None:
        """End idle sessions; delete turns past their retention period."""
        try:
            await asyncio.to_thread(self.store.expire_idle, self.idle_seconds)
            if self.retention_days is not None:
                cutoff = time.time() - self.retention_days * 86400
                await asyncio.to_thread(lambda: self.store.forget(older_than=cutoff))
        except Exception as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: Exception) -> None:
        self.stats.store_errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)
        log.warning("store unavailable, spooling records: %s", self.stats.last_error)

    def _spool(self, records: list[Record]) -> None:
        try:
            self.spool.append(records)
            self.stats.spooled += len(records)
        except OSError as exc:
            self.stats.dropped += len(records)
            self.stats.last_error = f"spool failed: {exc}"[:500]
            log.error("dropped %d records: %s", len(records), exc)
