"""Publishing adapters into the running vLLM without a pause (learner -> vLLM).

vLLM 0.16-0.32 serves stale or dead weights when an adapter is reloaded under the same
name (the prefix cache is keyed by name, and ``load_inplace`` re-reads a directory that
may be gone). So every version gets a NEW immutable directory (written elsewhere, then
renamed in) and a NEW name, ``<policy>@<version:06d>``; the proxy switches the policy's
model name to it only once vLLM has loaded it. Old versions stay loaded for a grace
period so requests already running on them finish, then are unloaded; directories
beyond the last ``keep`` are deleted, never one that is still loaded. Loading into vLLM
and checking that it serves the version: `nextstate.core.lora.load_verified`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nextstate.core.lora import LOADED


def install(staged: Path, adapters_dir: Path, name: str) -> Path:
    """Move a freshly written adapter into its final, immutable place."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    final = adapters_dir / name
    if final.exists():  # left by a learner killed between rename and record: replace
        shutil.rmtree(final)
    staged.rename(final)
    return final


def prune(adapters_dir: Path, rows: list[dict[str, Any]], keep: int) -> list[str]:
    """Delete adapter directories beyond the newest ``keep``, except loaded ones.
    Returns the names deleted."""
    loaded = {r["name"] for r in rows if r["status"] in LOADED}
    by_age = sorted(rows, key=lambda r: r["version"], reverse=True)
    deleted = []
    for row in by_age[keep:]:
        path = Path(row["path"])
        if row["name"] not in loaded and path.exists() and path.parent == adapters_dir:
            shutil.rmtree(path)
            deleted.append(row["name"])
    return deleted
