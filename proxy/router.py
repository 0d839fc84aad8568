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

import httpx

from nextstate.proxy.store import Store

log = logging.getLogger("nextstate.router")
BASE_SUFFIX = "@base"


class Router:
    """The policy's current adapter (followed from the store), and a way to make sure a
    vLLM has it loaded.

    vLLM forgets runtime-loaded adapters when it restarts: `check_loaded` looks at a
    backend's model list and loads the current adapter again (from its directory,
    recorded in the store) when it is missing; the backend pool asks it for every
    backend it health-checks, and the relay when vLLM answers 404 for the adapter.
    """

    def __init__(self, policy: str | None, base_model: str | None = None) -> None:
        self.policy = policy
        self.base_model = base_model or policy
        self.current: str | None = None  # the adapter version serving the policy
        self.path: str | None = None

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
        """Keep in step with the store (runs for the app's lifetime)."""
        while True:
            try:
                found = await asyncio.to_thread(store.current_adapter, self.policy or "")
                name, path = found if found is not None else (None, None)
                if name != self.current:
                    log.info("policy %s now served by %s", self.policy, name or "the base")
                    self.current, self.path = name, path
            except Exception as exc:  # the store is away: keep serving what we have
                log.debug("could not read the current adapter: %s", exc)
            await asyncio.sleep(interval)

    async def check_loaded(self, client: httpx.AsyncClient) -> bool:
        """Does this backend have the current adapter? Loads it if vLLM lost it."""
        if self.current is None:
            return True
        answer = await client.get("/v1/models", timeout=5.0)
        if answer.status_code != 200:
            return False
        if self.current in {m.get("id") for m in answer.json().get("data", [])}:
            return True
        log.warning("vLLM at %s lost %s (restarted?): loading it again", client.base_url,
                    self.current)
        loaded = await client.post("/v1/load_lora_adapter", timeout=120.0, json={
            "lora_name": self.current, "lora_path": self.path})
        return loaded.status_code == 200 or "already" in loaded.text
