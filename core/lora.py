"""The adapter lifecycle: what a LoRA version is called, what state it is in, and the
operations on it that the proxy's admin endpoints and the CLI share
(learner -> store -> vLLM; proxy, CLI -> store, vLLM).

A version is named ``<policy>@<version:06d>`` (a user's personal adapter:
``<policy>~<user>@<version:06d>``) and lives in a directory of that name. Its row in the
store goes through these states::

    staged -> current -> previous -> unloaded      (the learner publishes, then retires it)
       |         ^
       |         +------ previous / unloaded        (a rollback makes it current again)
       +-> failed        (vLLM did not take it)
       +-> abandoned     (a learner was killed while publishing it)
    any -> forgotten     (its user was forgotten: never served again)

``refused`` is kept for stores written by older versions (the publish gate now refuses
a step before its adapter is staged). This module is the only one that spells these
states; everyone else uses `AdapterStatus`.

The operations: `load_verified` (one vLLM has it, or `NotLoaded`), `rollback` (every
backend loads the version, then it is made current), `erase` (a forgotten version's
directory deleted and every vLLM told to unload it) and `forget` (the store's part,
then `erase`). Every call to vLLM goes through `nextstate.core.vllm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextstate.core.vllm import VLLMClient, VLLMError

if TYPE_CHECKING:  # (the store spells these states through this module)
    from nextstate.core.routing import Router
    from nextstate.core.store import Forgotten, Store


class AdapterStatus(StrEnum):
    STAGED = "staged"  # written and recorded, being loaded into every backend
    CURRENT = "current"  # serving its policy
    PREVIOUS = "previous"  # retired, still loaded for requests in flight
    UNLOADED = "unloaded"  # retired and unloaded; its directory may still be there
    REFUSED = "refused"  # (older stores) refused by the publish gate
    FAILED = "failed"  # vLLM did not load it
    ABANDONED = "abandoned"  # staged by a learner that was killed before publishing it
    FORGOTTEN = "forgotten"  # trained on a forgotten user's turns


# Versions that never served, or may never serve again: no rollback to them.
NOT_SERVABLE = frozenset({AdapterStatus.REFUSED, AdapterStatus.FAILED,
                          AdapterStatus.ABANDONED, AdapterStatus.STAGED,
                          AdapterStatus.FORGOTTEN})
# Versions vLLM may have loaded: their directories are never deleted.
LOADED = frozenset({AdapterStatus.CURRENT, AdapterStatus.PREVIOUS, AdapterStatus.STAGED})
# Versions that served their policy at some point (how stale a turn is counts these).
PUBLISHED = frozenset({AdapterStatus.CURRENT, AdapterStatus.PREVIOUS,
                       AdapterStatus.UNLOADED})

BASE_SUFFIX = "@base"  # <policy>@base: the frozen base model
PERSONAL = "~"  # <policy>~<user>: the policy of one user's own adapter
_VERSION = re.compile(r"@(\d+)$")
# User ids that can name an adapter and its directory as they are; others are hashed.
_PLAIN_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def version_name(policy: str, version: int) -> str:
    return f"{policy}@{version:06d}"


def version_of(served_model: str | None) -> int:
    """The adapter version that served a turn (0: the base model)."""
    match = _VERSION.search(served_model or "")
    return int(match.group(1)) if match else 0


def personal_key(user: str) -> str:
    """``user`` as their adapter's name shows it: as is, or its hash when the id is unfit
    for a file name."""
    if _PLAIN_USER.fullmatch(user):
        return user
    return "u-" + hashlib.blake2b(user.encode(), digest_size=8).hexdigest()


def personal_policy(policy: str, user: str) -> str:
    """The policy name of ``user``'s own adapter (adapter versions are
    ``<policy>~<user>@000007``)."""
    return f"{policy}{PERSONAL}{personal_key(user)}"


def owns(policy: str, adapter_policy: str) -> bool:
    """Is ``adapter_policy`` the policy itself or one of its personal policies?"""
    return adapter_policy == policy or adapter_policy.startswith(policy + PERSONAL)


# -- operations ------------------------------------------------------------------------


class NotLoaded(Exception):
    """vLLM did not take the adapter; the version serving before keeps serving."""


class NoSuchVersion(LookupError):
    """No published version by that number (or one that may not serve again)."""


class DirectoryGone(Exception):
    """The version's directory is gone: no vLLM could load it again after a restart."""


async def load_verified(vllm: VLLMClient, name: str, path: Path) -> None:
    """Load adapter ``name`` from ``path`` into one vLLM and check that it lists it;
    `NotLoaded` if not."""
    try:
        await vllm.load_adapter(name, str(path))
        listed = name in await vllm.models()
    except VLLMError as exc:
        raise NotLoaded(str(exc)) from exc
    if not listed:
        raise NotLoaded(f"vLLM at {vllm.url} does not list {name} after loading it")


async def rollback(store: Store, vllms: Sequence[VLLMClient], version: int,
                   ) -> dict[str, Any]:
    """Serve ``version`` again: loaded (and verified) on every backend first, then made
    current in the store, so that no proxy routes to it before every vLLM has it. A
    version whose directory is gone is refused too: no vLLM could load it again after a
    restart. Raises `NoSuchVersion`, `DirectoryGone` or `NotLoaded` (nothing changed
    then).
    Returns the version's row."""
    rows = await asyncio.to_thread(store.adapters.versions)
    row = next((r for r in rows if r["version"] == version), None)
    if row is None or row["status"] in NOT_SERVABLE:
        raise NoSuchVersion(f"no published version {version}")
    path = Path(row["path"])
    if await asyncio.to_thread(_gone, path):
        raise DirectoryGone(f"{row['name']}'s directory is gone ({row['path']})")
    for vllm in vllms:  # every replica has it before it is current
        try:
            await load_verified(vllm, row["name"], path)
        except NotLoaded as exc:
            raise NotLoaded(f"{row['name']} was not loaded: {exc}") from exc
    return await asyncio.to_thread(store.adapters.rollback, version)


def _gone(path: Path) -> bool:
    """Is an adapter's directory gone? Only where the adapters' folder is to be seen: a
    proxy on another machine than the learner leaves it to vLLM, which refuses to load
    a directory that is not there."""
    return path.parent.is_dir() and not path.is_dir()


@dataclass
class Erased:
    directories: list[str] = field(default_factory=list)  # deleted
    unloaded: dict[str, list[str]] = field(default_factory=dict)  # backend -> names
    unreachable: dict[str, str] = field(default_factory=dict)  # backend -> why

    @property
    def complete(self) -> bool:
        """Every backend was reached: none of them still holds these versions."""
        return not self.unreachable


def _delete_directories(rows: Sequence[dict[str, Any]]) -> list[str]:
    deleted = []
    for row in rows:
        path = Path(row["path"])
        # Only the adapter's own directory, named after it as `publish.install` made it:
        # a path in the store is never trusted to be anything else.
        if path.name == row["name"] and path.is_dir():
            shutil.rmtree(path)
            deleted.append(str(path))
    return deleted


async def erase(rows: Sequence[dict[str, Any]], vllms: Sequence[VLLMClient]) -> Erased:
    """Delete the directories of these (forgotten) adapter versions and unload them from
    every backend that has them.

    When a user or a tenant is forgotten, the store marks their personal adapter
    versions ``forgotten`` in the transaction that deletes their turns: from then on the
    proxy routes them to the shared adapter and the learner neither loads those versions
    again nor starts a step from them. What a store cannot do is done here. ``nextstate
    forget`` and the proxy's ``DELETE /v1/tenants`` do it at once on their backends; the
    learner does it on its own for every forgotten version not yet erased everywhere (a
    backend that was down, an adapter a step published while its turns were being
    forgotten)."""
    erased = Erased()
    # Directories first: a proxy or learner that has not yet seen the mark (it reads the
    # store every half second or so) cannot load a version again once its files are gone.
    erased.directories = await asyncio.to_thread(_delete_directories, rows)
    for vllm in vllms:
        try:
            loaded = await vllm.models()
            for row in rows:
                if row["name"] in loaded and await vllm.unload_adapter(row["name"]):
                    erased.unloaded.setdefault(vllm.url, []).append(row["name"])
        except VLLMError as exc:
            erased.unreachable[vllm.url] = f"{type(exc).__name__}: {exc}"
    return erased


async def forget(store: Store, vllms: Sequence[VLLMClient], *, router: Router | None = None,
                 session_id: str | None = None, tenant: str | None = None,
                 user: str | None = None, older_than: float | None = None,
                 ) -> tuple[Forgotten, Erased]:
    """Delete turns (`Retention.forget`: of a session, a tenant, a user, or older than a
    time), then erase the personal adapters of a user or tenant forgotten as a whole.
    ``router`` (a proxy's) stops routing to those adapters before they are unloaded."""
    forgotten = await asyncio.to_thread(store.retention.forget, session_id=session_id,
                                        tenant=tenant, user=user, older_than=older_than)
    if not forgotten.adapters:
        return forgotten, Erased()
    if router is not None:
        with contextlib.suppress(Exception):  # it reads the store again in a moment
            router.update(await asyncio.to_thread(store.adapters.currents,
                                                  router.policy or ""))
    return forgotten, await erase(forgotten.adapters, vllms)
