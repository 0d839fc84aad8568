"""Erasing forgotten personal adapters (nextstate forget / learner -> adapter
directories, vLLM).

When a user or a tenant is forgotten, `Store.forget` marks their personal adapter
versions ``forgotten`` in the transaction that deletes their turns: from then on the proxy
routes them to the shared adapter and the learner neither loads those versions again nor
starts a step from them. What a store cannot do is done here: each version's directory is
deleted and every vLLM that still has it loaded is told to unload it. ``nextstate forget``
does it at once on the backends it is given; the learner does it on its own backends for
every forgotten version it has not yet erased everywhere (a backend that was down, an
adapter a step published while its turns were being forgotten).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextstate.core.vllm import VLLMClient, VLLMError


@dataclass
class Erased:
    directories: list[str] = field(default_factory=list)  # deleted
    unloaded: dict[str, list[str]] = field(default_factory=dict)  # backend -> names
    unreachable: dict[str, str] = field(default_factory=dict)  # backend -> why

    @property
    def complete(self) -> bool:
        """Every backend was reached: none of them still holds these versions."""
        return not self.unreachable


async def erase(rows: Sequence[dict[str, Any]], vllms: Sequence[VLLMClient]) -> Erased:
    """Delete the directories of these adapter versions and unload them from every
    backend that has them."""
    erased = Erased()
    # Directories first: a proxy or learner that has not yet seen the mark (it reads the
    # store every half second or so) cannot load a version again once its files are gone.
    for row in rows:
        path = Path(row["path"])
        # Only the adapter's own directory, named after it as `publish.install` made it:
        # a path in the store is never trusted to be anything else.
        if path.name == row["name"] and path.is_dir():
            shutil.rmtree(path)
            erased.directories.append(str(path))
    for vllm in vllms:
        try:
            loaded = await vllm.models()
            for row in rows:
                if row["name"] in loaded and await vllm.unload_adapter(row["name"]):
                    erased.unloaded.setdefault(vllm.url, []).append(row["name"])
        except VLLMError as exc:
            erased.unreachable[vllm.url] = f"{type(exc).__name__}: {exc}"
    return erased
