"""Images stored once (proxy -> recorder -> store -> learner, export).

A GUI agent resends every earlier screenshot with each request, so a 30-step session
carries ~465 copies of 30 images. The recorder's writer (never the request path) swaps
each inline base64 image in a turn's JSON for a reference to one row of the ``images``
table, keyed by the sha256 of the decoded bytes:

    data:image/png;base64,iVBORw0...            (chat ``image_url``, Responses
                                                 ``input_image``: a data: URL)
        -> "nextstate-image:sha256:<64 hex>"    (the URL, in place)
    {"type": "base64", "media_type": "image/png", "data": "iVBORw0..."}
                                                (an Anthropic image block's source)
        -> {..., "data": "nextstate-image:sha256:<64 hex>"}   (only the data, in place)

Everything else stays as sent: remote ``http(s)`` URLs are kept as they are (never
fetched), and so is an image that could not be given back byte for byte (base64 that
is not canonical, a data: URL with parameters, or bytes stored under another media
type), so that `inline` always restores exactly what the client sent. ``turn_images``
records which turns reference which images; forgetting the last of them deletes the
image (`collect_garbage`, called by retention).

A string a client itself sent that begins with ``nextstate-image:`` is stored escaped
(``nextstate-image:literal:`` before it) and given back as sent: only the store makes
references, so no client can name another's image and have it inlined into its export.

Readers get references (export, the dashboard, the judge's queue); `Images.inline`
puts the images back: a reference in a URL becomes ``data:<media_type>;base64,...`` and
one in a ``data`` field the bare base64, each exactly as the client first sent it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
from sqlalchemy import Connection, Table, exists, func, insert, select, text

from nextstate.core.store.database import Database
from nextstate.core.store.schema import images, turn_images, turns

PREFIX = "nextstate-image:sha256:"
_OURS = "nextstate-image:"
_LITERAL = "nextstate-image:literal:"  # before a client's own string that looks like ours
_REFERENCE = re.compile(r"nextstate-image:sha256:([0-9a-f]{64})\Z")
# Only the plain form: anything between the media type and ";base64" could not be rebuilt.
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,")

# sha256 -> (media type, bytes)
Blobs = dict[str, tuple[str, bytes]]
# PostgreSQL advisory lock between writers that reuse stored images (shared) and the
# garbage collector (exclusive); any constant that nothing else uses.
_GC_LOCK = 0x6E657874696D67  # "nextimg"


class ImageMissing(LookupError):
    """A reference whose image is not in the store (forgotten since the turn was read)."""


def reference(sha256: str) -> str:
    return PREFIX + sha256


def _decoded(payload: str) -> bytes | None:
    """The bytes of canonical base64, else None (kept inline: it could not be rebuilt)."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == payload else None


def _is_base64_source(value: Mapping[str, Any]) -> bool:
    media = value.get("media_type")
    return (value.get("type") == "base64" and isinstance(value.get("data"), str)
            and isinstance(media, str) and media.startswith("image/"))


class _Swap:
    """One walk over a JSON value, replacing inline images by references.

    ``pinned`` maps a hash to the media type its reference restores as (the stored
    one): a data: URL of the same bytes under another type stays inline."""

    def __init__(self, pinned: Mapping[str, str]) -> None:
        self.pinned = dict(pinned)
        self.found: Blobs = {}

    def url(self, value: str) -> str:
        match = _DATA_URL.match(value)
        raw = _decoded(value[match.end():]) if match is not None else None
        if match is None or raw is None:
            return value
        media = match.group(1)
        digest = hashlib.sha256(raw).hexdigest()
        if self.pinned.setdefault(digest, media) != media:
            return value
        self.found.setdefault(digest, (media, raw))
        return reference(digest)

    def source(self, value: dict[str, Any]) -> dict[str, Any] | None:
        raw = _decoded(value["data"])
        if raw is None:
            return None
        digest = hashlib.sha256(raw).hexdigest()
        self.pinned.setdefault(digest, value["media_type"])
        self.found.setdefault(digest, (value["media_type"], raw))
        return {**value, "data": reference(digest)}

    def walk(self, value: Any) -> Any:
        """``value`` with its images swapped; the same object when it holds none."""
        if isinstance(value, str):
            if value.startswith("data:image/"):
                return self.url(value)
            return _LITERAL + value if value.startswith(_OURS) else value
        if isinstance(value, list):
            out = [self.walk(v) for v in value]
            return value if all(a is b for a, b in zip(out, value, strict=True)) else out
        if isinstance(value, dict):
            swapped = self.source(value) if _is_base64_source(value) else None
            if swapped is not None:
                return swapped
            new = {k: self.walk(v) for k, v in value.items()}
            return value if all(new[k] is value[k] for k in value) else new
        return value


def externalize(value: Any, pinned: Mapping[str, str] | None = None) -> tuple[Any, Blobs]:
    """``value`` (a request, messages: any JSON) with its inline images replaced by
    references, and the images found. Pure: ``value`` is never changed."""
    if not _may_hold_images(value):
        return value, {}
    swap = _Swap(pinned or {})
    return swap.walk(value), swap.found


def _may_hold_images(value: Any) -> bool:
    """A quick look before the walk: most turns hold no image, and orjson's pass over a
    15 kB coding agent's request (~20 µs) costs a tenth of walking it in Python."""
    try:
        raw = orjson.dumps(value)
    except TypeError:
        return True
    return b"data:image/" in raw or b'"base64"' in raw or _OURS.encode() in raw


def references(value: Any) -> Iterator[str]:
    """The hashes ``value`` references, in order (repeats included)."""
    if isinstance(value, str):
        match = _REFERENCE.match(value) if value.startswith(PREFIX) else None
        if match is not None:
            yield match.group(1)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from references(v)


def restore(value: Any, blobs: Mapping[str, tuple[str, bytes]]) -> Any:
    """``value`` with every reference replaced by its image (as `externalize` found it).
    Raises ImageMissing for a reference ``blobs`` lacks."""

    def image(ref: str) -> tuple[str, bytes]:
        digest = ref[len(PREFIX):]
        if digest not in blobs:
            raise ImageMissing(f"image {ref} is not in the store (forgotten?)")
        return blobs[digest]

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            if not v.startswith(_OURS):
                return v
            if v.startswith(_LITERAL):
                return v[len(_LITERAL):]
            if _REFERENCE.match(v) is None:
                return v
            media, raw = image(v)
            return f"data:{media};base64,{base64.b64encode(raw).decode('ascii')}"
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            data = v.get("data")
            if v.get("type") == "base64" and isinstance(data, str) and _REFERENCE.match(data):
                return {**v, "data": base64.b64encode(image(data)[1]).decode("ascii")}
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value)


def _insert_new(conn: Connection, table: Table) -> Any:
    """An insert that skips rows already there: another proxy's writer may store the same
    image between our select and our insert."""
    name = conn.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    return insert(table)


def _lock(conn: Connection, shared: bool) -> None:
    """On PostgreSQL, keep the garbage collector out while a writer references images
    it found stored, until the writer commits: under READ COMMITTED the collector could
    otherwise delete an image between the writer's look and its commit. (SQLite has one
    writer at a time, and a writer whose snapshot went stale is refused and retried.)"""
    if conn.dialect.name == "postgresql":
        which = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        conn.execute(text(f"SELECT {which}(:key)"), {"key": _GC_LOCK})


class Images:
    """The ``images`` and ``turn_images`` tables: writes in the recorder's transaction,
    reads for the learner and export."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writing (the recorder's worker thread, inside its transaction) ---------------

    def store(self, conn: Connection, value: Any) -> tuple[Any, set[str]]:
        """``value`` with its images stored and replaced by references, and the hashes
        it references (new or already stored)."""
        swapped, found = externalize(value)
        if found:
            _lock(conn, shared=True)
            stored = {row.sha256: row.media_type for row in conn.execute(select(
                images.c.sha256, images.c.media_type).where(images.c.sha256.in_(list(found))))}
            if any(stored[h] != found[h][0] for h in found if h in stored):
                # Bytes seen before under another media type: their reference restores
                # as the stored type, so these stay inline (rare; exactness first).
                swapped, found = externalize(value, stored)
            new = [{"sha256": h, "media_type": media, "size": len(raw), "data": raw,
                    "created_at": time.time()}
                   for h, (media, raw) in found.items() if h not in stored]
            if new:
                conn.execute(_insert_new(conn, images), new)
        return swapped, set(references(swapped))

    @staticmethod
    def link(conn: Connection, turn_id: str, hashes: Iterable[str]) -> None:
        """Note that ``turn_id`` references ``hashes`` (again is fine)."""
        wanted = set(hashes)
        if not wanted:
            return
        have = set(conn.execute(select(turn_images.c.sha256).where(
            turn_images.c.turn_id == turn_id, turn_images.c.sha256.in_(wanted))).scalars())
        rows = [{"turn_id": turn_id, "sha256": h} for h in sorted(wanted - have)]
        if rows:
            conn.execute(_insert_new(conn, turn_images), rows)

    @staticmethod
    def collect_garbage(conn: Connection) -> int:
        """Delete the images no turn references any more; returns how many."""
        _lock(conn, shared=False)
        used = exists().where(turn_images.c.sha256 == images.c.sha256)
        return int(conn.execute(images.delete().where(~used)).rowcount or 0)

    # -- reading ---------------------------------------------------------------------

    def blobs(self, hashes: Iterable[str], conn: Connection | None = None) -> Blobs:
        wanted = sorted(set(hashes))
        if not wanted:
            return {}
        query = select(images.c.sha256, images.c.media_type, images.c.data).where(
            images.c.sha256.in_(wanted))
        if conn is not None:
            rows = conn.execute(query).all()
        else:
            with self.db.connect() as own:
                rows = own.execute(query).all()
        return {row.sha256: (row.media_type, bytes(row.data)) for row in rows}

    def inline(self, value: Any, conn: Connection | None = None) -> Any:
        """``value`` (a turn as exported, a request, messages) with its images back
        inline, exactly as recorded. Raises ImageMissing if one was forgotten since."""
        if not _may_hold_images(value):
            return value
        return restore(value, self.blobs(references(value), conn))

    def image(self, sha256: str, *, tenant: str | None = None) -> tuple[str, bytes] | None:
        """One image (media type, bytes) by its hash; None when there is none, or when
        no turn of ``tenant`` (when given) references it: a tenant sees only its own."""
        query = select(images.c.media_type, images.c.data).where(images.c.sha256 == sha256)
        if tenant is not None:
            query = query.where(exists().where(
                turn_images.c.sha256 == images.c.sha256, turn_images.c.turn_id == turns.c.id,
                turns.c.tenant == tenant))
        with self.db.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else (row.media_type, bytes(row.data))

    def usage(self) -> tuple[int, int]:
        """(images stored, their bytes)."""
        with self.db.connect() as conn:
            count, size = conn.execute(select(func.count(), func.coalesce(
                func.sum(images.c.size), 0)).select_from(images)).one()
        return int(count), int(size)
