"""What storing each image once saves: bytes a turn for a GUI agent's session
(agent -> proxy -> recorder -> store).

A computer-use agent sends its whole history with every step, so step k's request
carries k + 1 screenshots and a 30-step session ~465 copies of 30 images. The same
session (`bench.gui_session`: 640x400 PNGs, the agent's action after each) is written
through the store twice, into two SQLite files: as nextstate stores it (each image once,
references in the turns, `nextstate.core.store.images`) and with images left inline (the
store before this change). Reported: what the client sent, what each store keeps (the
turns' JSON, the image bytes, the database file), per turn and in all, and the writer's
time a turn (the recorder's thread, off the request path).

    python -m bench.image_store              # 30 steps, a few seconds
    python -m bench.image_store --steps 60

Results go to ``bench/results/image_store.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
from sqlalchemy import func, select

from bench.gui_session import gui_session
from nextstate.core.store import Store
from nextstate.core.store.images import Images
from nextstate.core.store.schema import turns

RESULTS = Path(__file__).parent / "results"


def _inline(self: Images, conn: Any, value: Any) -> tuple[Any, set[str]]:
    return value, set()  # the store before images were kept once


def measure(steps: int, dedup: bool, directory: Path) -> dict[str, Any]:
    shots, records = gui_session(steps)
    path = directory / f"{'dedup' if dedup else 'inline'}.db"
    store = Store(f"sqlite:///{path}")
    store.turns.count()  # (the tables, before the clock starts)
    with mock.patch.object(Images, "store", _inline) if not dedup else nullcontext():
        started = time.perf_counter()
        for record in records:  # one turn a transaction, as the recorder writes a step
            store.turns.write([record])
        elapsed = time.perf_counter() - started
    with store.db.connect() as conn:
        json_bytes = sum(len(orjson.dumps(r.request)) + len(orjson.dumps(r.next_state or []))
                         for r in conn.execute(select(turns.c.request, turns.c.next_state)))
        assert conn.execute(select(func.count()).select_from(turns)).scalar_one() == steps
    images, image_bytes = store.turns.images.usage()
    store.close()
    sent = sum(len(orjson.dumps(r.request)) for r in records)
    return {"mode": "once" if dedup else "inline", "steps": steps, "screenshot_bytes":
            sum(map(len, shots)), "copies_sent": sum(i + 1 for i in range(steps)),
            "sent_bytes": sent, "images": images, "image_bytes": image_bytes,
            "json_bytes": json_bytes, "stored_bytes": json_bytes + image_bytes,
            "stored_per_turn": (json_bytes + image_bytes) // steps,
            "file_bytes": path.stat().st_size, "file_per_turn": path.stat().st_size // steps,
            "write_ms_per_turn": round(elapsed * 1000 / steps, 2)}


def report(rows: list[dict[str, Any]]) -> str:
    once, inline = (next(r for r in rows if r["mode"] == m) for m in ("once", "inline"))
    lines = [
        f"{once['steps']}-step GUI session, 640x400 PNG screenshots "
        f"({once['screenshot_bytes'] / once['steps'] / 1024:.1f} KiB each on average), "
        f"{once['copies_sent']} image copies sent, {once['sent_bytes'] / 2**20:.1f} MiB of "
        "request JSON.", "",
        "| store | images kept | turns' JSON | image bytes | kept a turn | SQLite file "
        "| file a turn | write a turn |", "|---|---|---|---|---|---|---|---|"]
    for r in (inline, once):
        lines.append(
            # inline: every copy sent, and one more in each paired turn's next state
            f"| {r['mode']} | {r['images'] or r['copies_sent'] + r['steps'] - 1} | "
            f"{r['json_bytes'] / 1024:,.0f} KiB | {r['image_bytes'] / 1024:,.0f} KiB | "
            f"{r['stored_per_turn'] / 1024:,.1f} KiB | {r['file_bytes'] / 2**20:.2f} MiB | "
            f"{r['file_per_turn'] / 1024:,.1f} KiB | {r['write_ms_per_turn']} ms |")
    lines += ["", f"Kept bytes: {inline['stored_bytes'] / once['stored_bytes']:.0f}x fewer; "
              f"database file: {inline['file_bytes'] / once['file_bytes']:.0f}x smaller."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args.steps, dedup, Path(tmp)) for dedup in (True, False)]
    text = report(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "image_store.md").write_text(text + "\n")
    (RESULTS / "image_store.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
