"""The journal: every finished turn on disk before its client gets the end of the answer
(proxy -> **journal** -> recorder's writer -> store).

The request path appends each record as one JSON line, in one ``write()`` to an
append-only file: it is then in the page cache, so a killed proxy (SIGKILL, OOM, a
segfault) loses nothing that was answered. No fsync on the request path: a sync thread
fsyncs what was appended every ``sync_interval`` seconds (group commit), so a machine
crash (power, kernel) loses at most that interval's records. The writer thread reads the
journal back in order and writes it to the store; the journal is the only copy a record
has between the two, whether the store keeps up, is slow or is down.

The journal is a series of segment files, ``journal-<pid>-<ns>-<seq>.jsonl``. The
process appends to the newest; the writer seals it (a new one takes further appends)
once it is large, or idle and written, and deletes a sealed segment once every record in
it is in the store (or set aside as rejected). Each segment is flock-ed by its process
for as long as it holds it open: a segment whose lock can be taken belongs to a process
that died, and is adopted (read and written to the store like one's own, then deleted).
Writes to the store are idempotent by record id, so a segment replayed after a crash,
or by two processes in turn, never duplicates a record. Spool files of older versions
(``spool-*.jsonl``, the same lines) are adopted the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger("nextstate.journal")
READ_BYTES = 1 << 20  # the most the writer reads from a segment at once
ORPHANS = ("journal-*.jsonl", "spool-*.jsonl")


@dataclass(eq=False)
class Segment:
    """One journal file, its lock, and how far the writer has read and settled it."""

    path: Path
    fd: int  # read and (while it is the active segment) appended to; holds the flock
    size: int = 0  # bytes appended (an adopted segment: its size when adopted)
    offset: int = 0  # bytes read by the writer
    tail: bytes = b""  # the start of a line not yet complete
    lines: deque[bytes] = field(default_factory=deque)  # read, not yet handed out
    unsettled: int = 0  # handed out, not yet in the store
    sealed: bool = False  # no more appends
    adopted: bool = False  # left by a process that died
    dirty: bool = False  # appended since the last fsync
    opened: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        """Sealed, read to its end, and every record in it settled."""
        return (self.sealed and self.offset >= self.size and not self.lines
                and not self.tail and not self.unsettled)


class Journal:
    """Append on the event loop; read, settle and rotate on the writer thread; fsync on
    a thread of its own. ``pending``: records appended (or adopted) not yet settled."""

    def __init__(self, directory: Path, *, sync_interval: float = 1.0,
                 segment_bytes: int = 8 << 20, idle_rotate: float = 10.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.sync_interval = sync_interval
        self.segment_bytes = segment_bytes
        self.idle_rotate = idle_rotate
        self._prefix = f"journal-{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self._append_lock = threading.Lock()  # the active segment: appends vs rotation
        self._files_lock = threading.Lock()  # the segment list: fsync vs deletion
        self.appended = 0
        self.handed = 0  # of our own lines, handed out by `read`
        self.adopted = 0
        self.settled = 0
        self.torn = 0  # incomplete last lines of segments of processes that died
        self.segments: list[Segment] = []
        self.closed = False
        self.active = self._open_segment()
        self.segments.append(self.active)
        self._closing = threading.Event()
        self._syncer: threading.Thread | None = None
        if sync_interval > 0:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="nextstate-journal-sync")
            self._syncer.start()

    @property
    def pending(self) -> int:
        return self.appended + self.adopted - self.settled

    @property
    def rejected_path(self) -> Path:
        return self.directory / f"rejected-{self._prefix}.jsonl"

    # -- the request path ------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """One record (a JSON line ending in a newline) into the page cache, in one
        ``write()``. Raises OSError (a full disk): the journal is then as it was."""
        with self._append_lock:
            if self.closed:
                raise OSError(errno.EBADF, "the journal is closed")
            segment = self.active
            written = os.write(segment.fd, line)
            if written != len(line):  # a short write leaves half a line: take it back
                os.ftruncate(segment.fd, segment.size)
                raise OSError(errno.ENOSPC, "short write to the journal")
            segment.size += written
            segment.dirty = True
            self.appended += 1

    # -- the writer thread -----------------------------------------------------------------

    def read(self, limit: int) -> list[tuple[Segment, bytes, int]]:
        """Up to ``limit`` lines not yet handed out, oldest segment first, each with its
        number among this process's appends (-1: a line of an adopted segment)."""
        out: list[tuple[Segment, bytes, int]] = []
        for segment in list(self.segments):
            while len(out) < limit:
                if not segment.lines and not self._fill(segment):
                    break
                while segment.lines and len(out) < limit:
                    seq = -1
                    if not segment.adopted:
                        seq, self.handed = self.handed, self.handed + 1
                    out.append((segment, segment.lines.popleft(), seq))
                    segment.unsettled += 1
            if len(out) >= limit:
                break
        return out

    def _fill(self, segment: Segment) -> bool:
        """Read what was appended to ``segment`` since the last read; False if nothing."""
        size = segment.size  # (appends update it after their write is complete)
        if segment.offset >= size:
            if segment.sealed and segment.tail:
                self.torn += 1
                log.warning("incomplete last record in %s (its process died while writing "
                            "it, before answering): skipped", segment.path.name)
                segment.tail = b""
            return False
        data = os.pread(segment.fd, min(READ_BYTES, size - segment.offset), segment.offset)
        if not data:
            return False
        segment.offset += len(data)
        *lines, segment.tail = (segment.tail + data).split(b"\n")
        segment.lines.extend(lines)
        return bool(segment.lines)

    def settle(self, segment: Segment, count: int = 1) -> None:
        """``count`` lines of ``segment`` are in the store (or set aside)."""
        segment.unsettled -= count
        self.settled += count

    def maintain(self) -> None:
        """Seal the active segment when it is large, or idle and written; delete sealed
        segments whose records are all in the store."""
        active = self.active
        if active.size >= self.segment_bytes or (
                active.size and active.offset >= active.size and not active.unsettled
                and not active.lines and time.monotonic() - active.opened > self.idle_rotate):
            self._rotate()
        self._collect()

    def _collect(self) -> None:
        for segment in [s for s in self.segments if s.done()]:
            with self._files_lock:
                self.segments.remove(segment)
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            os.close(segment.fd)  # (after the unlink: no one adopts a finished segment)

    def _rotate(self) -> None:
        fresh = self._open_segment()
        with self._files_lock:
            self.segments.append(fresh)
        with self._append_lock:
            old, self.active = self.active, fresh
            old.sealed = True

    def _open_segment(self) -> Segment:
        """A new segment, locked before it gets its name (so that no other process
        takes it for an orphan in between)."""
        self._seq += 1
        path = self.directory / f"{self._prefix}-{self._seq:06d}.jsonl"
        opening = path.with_suffix(".opening")
        fd = os.open(opening, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(opening, path)
        self._sync_directory()
        return Segment(path, fd)

    def adopt(self) -> int:
        """Take over the segments (and old spool files) of processes that died, ahead of
        our own; returns how many records they hold."""
        found = 0
        known = {s.path for s in self.segments}
        for opening in self.directory.glob("journal-*.opening"):
            _remove_if_unlocked(opening)  # a process died between creating and naming it
        orphans = sorted({p for pattern in ORPHANS for p in self.directory.glob(pattern)})
        for path in orphans:
            if path in known or path.name.startswith(self._prefix):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # its process finished it just now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process holds it
                continue
            segment = Segment(path, fd, size=os.fstat(fd).st_size, sealed=True, adopted=True)
            count = _count_lines(fd, segment.size)
            self.adopted += count
            found += count
            with self._files_lock:
                self.segments.insert(sum(s.adopted for s in self.segments), segment)
            log.info("adopted %s (%d records) from a process that stopped", path.name, count)
        return found

    def reject(self, line: bytes, error: str) -> None:
        """Set aside a record no store can take, with why, beside the journal."""
        record: object = orjson.Fragment(line)
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            record = line.decode("utf-8", "replace")  # a damaged line, kept as text
        entry = orjson.dumps({"error": error, "record": record})
        with open(self.rejected_path, "ab") as f:
            f.write(entry + b"\n")

    # -- durability ------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._closing.wait(self.sync_interval):
            try:
                self.sync()
            except OSError as exc:
                log.error("journal fsync failed: %s", exc)

    def sync(self) -> None:
        """fsync every segment appended to since the last sync (the group commit)."""
        with self._files_lock:
            for segment in self.segments:
                if segment.dirty:
                    segment.dirty = False  # (before: an append during the fsync marks it again)
                    os.fsync(segment.fd)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """fsync and close; delete the segments that are done. What is left (the store
        is down) stays for the next process to adopt."""
        self._closing.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._append_lock:
            self.closed = True
            self.active.sealed = True
        self.sync()
        self._collect()
        for segment in self.segments:
            os.close(segment.fd)
        self.segments = []


def _count_lines(fd: int, size: int) -> int:
    count = offset = 0
    while offset < size:
        data = os.pread(fd, READ_BYTES, offset)
        if not data:
            break
        count += data.count(b"\n")
        offset += len(data)
    return count


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass  # being named by its live process
    finally:
        os.close(fd)
