"""Personal adapters: which adapter a judged turn trains (store -> learner -> trainer).

By default there is one *lane*, the shared policy, trained on everyone's turns. With
``personal_min_turns`` (``nextstate learn --personal-after N``), a user with N judged
turns that carry a signal gets a lane of their own, the personal policy
``<policy>~<user>``: from then on their turns train their own adapter, which starts from
the shared adapter's current weights, and the shared adapter keeps learning from
everyone else (new users, turns with no user). A user with strong tastes so stops
pulling the shared adapter their way, and each adapter learns from turns its own
versions served. The proxy routes each user to their adapter (`nextstate.core.routing`).

Every lane goes through the same step, publish gate, versioned directories and
housekeeping (`training`); one trainer swaps lanes in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextstate.core.lora import personal_policy
from nextstate.core.store import AdapterRegistry, Judgments


@dataclass(frozen=True)
class Lane:
    """An adapter and the turns it learns from."""

    policy: str  # <policy> (shared) or <policy>~<user>
    user: str | None = None  # None: the shared lane


def full_lanes(store: Judgments, policy: str, method: str, batch_turns: int,
               min_turns: int | None) -> list[Lane]:
    """The lanes with a full batch of turns ready to train on, the one with the most
    waiting first (the shared lane first on a tie). Two queries however many users."""
    sizes = [(n, Lane(policy) if user is None else Lane(personal_policy(policy, user), user))
             for user, n in store.lanes(method, min_turns).items()]
    full = [(n, lane) for n, lane in sizes if n >= batch_turns]
    return [lane for _, lane in sorted(full, key=lambda pair: -pair[0])]


def personal_adapters(store: AdapterRegistry, policy: str) -> dict[str, str]:
    """Each user's current personal adapter, {user: adapter name} (a user id unfit for a
    file name shows as its hash), for the status endpoint."""
    return {p[len(policy) + 1:]: name
            for p, (name, _) in store.currents(policy).items() if p != policy}
