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
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum


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
