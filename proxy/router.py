"""Which model serves a request (agent -> proxy -> vLLM).

Clients ask for the policy by its plain name (``nextstate-toy``); the router sends that
to the adapter version the learner made current (``nextstate-toy@000042``), or to the
base model while there is none, and the reply comes back under the name the client asked
for. ``<policy>@base`` reaches the frozen base model. The policy's name is the base
model's own name unless told otherwise. The current version is read from the store:
the learner marks a version current only after vLLM has loaded it, so the switch never
sends a request to an adapter that is not there, and requests already running finish on
the old one.
"""

from __future__ import annotations

import asyncio
import logging

from nextstate.proxy.store import Store

log = logging.getLogger("nextstate.router")
BASE_SUFFIX = "@base"


class Router:
    def __init__(self, policy: str | None, base_model: str | None = None) -> None:
        self.policy = policy
        self.base_model = base_model or policy
        self.current: str | None = None  # the adapter version serving the policy

    def route(self, model: object) -> str | None:
        """The upstream model name for ``model``, or None to leave it as it is."""
        if self.policy is None or not isinstance(model, str):
            return None
        if model == self.policy:
            return self.current or self.base_model
        if model == self.policy + BASE_SUFFIX:
            return self.base_model
        return None

    async def follow(self, store: Store, interval: float) -> None:
        """Keep ``current`` in step with the store (runs for the app's lifetime)."""
        while True:
            try:
                current = await asyncio.to_thread(store.current_adapter, self.policy or "")
                if current != self.current:
                    log.info("policy %s now served by %s", self.policy, current or "the base")
                    self.current = current
            except Exception as exc:  # the store is away: keep serving the last version
                log.debug("could not read the current adapter: %s", exc)
            await asyncio.sleep(interval)
