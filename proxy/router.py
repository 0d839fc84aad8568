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
    """The policy's current adapter, and whether vLLM has it loaded right now.

    vLLM forgets runtime-loaded adapters when it restarts. The router checks vLLM's model
    list as it follows the store, and loads the current adapter again (from its
    directory, recorded in the store) when it is missing; policy requests wait for that
    instead of reaching a vLLM that does not know the adapter.
    """

    def __init__(self, policy: str | None, base_model: str | None = None) -> None:
        self.policy = policy
        self.base_model = base_model or policy
        self.current: str | None = None  # the adapter version serving the policy
        self.path: str | None = None
        self._loaded = asyncio.Event()
        self._loaded.set()

    def route(self, model: object) -> str | None:
        """The upstream model name for ``model``, or None to leave it as it is."""
        if self.policy is None or not isinstance(model, str):
            return None
        if model == self.policy:
            return self.current or self.base_model
        if model == self.policy + BASE_SUFFIX:
            return self.base_model
        return None

    async def ready(self, timeout: float = 30.0) -> None:
        """Return once the current adapter is loaded (at once, in the normal case)."""
        if not self._loaded.is_set():
            try:
                await asyncio.wait_for(self._loaded.wait(), timeout)
            except TimeoutError:
                log.warning("serving %s while vLLM may not have it loaded", self.current)

    async def follow(self, store: Store, client: httpx.AsyncClient, interval: float) -> None:
        """Keep in step with the store and with vLLM (runs for the app's lifetime)."""
        while True:
            try:
                found = await asyncio.to_thread(store.current_adapter, self.policy or "")
                name, path = found if found is not None else (None, None)
                if name != self.current:
                    log.info("policy %s now served by %s", self.policy, name or "the base")
                    self.current, self.path = name, path
                await self.check_loaded(client)
            except Exception as exc:  # store or vLLM away: keep serving what we have
                log.debug("could not follow the current adapter: %s", exc)
            await asyncio.sleep(interval)

    async def check_loaded(self, client: httpx.AsyncClient) -> None:
        """Load the current adapter into vLLM if vLLM lost it (a restart)."""
        if self.current is None:
            self._loaded.set()
            return
        answer = await client.get("/v1/models", timeout=5.0)
        if answer.status_code != 200:
            return
        if self.current in {m.get("id") for m in answer.json().get("data", [])}:
            self._loaded.set()
            return
        self._loaded.clear()
        log.warning("vLLM lost %s (restarted?): loading it again", self.current)
        loaded = await client.post("/v1/load_lora_adapter", timeout=120.0, json={
            "lora_name": self.current, "lora_path": self.path})
        if loaded.status_code == 200 or "already" in loaded.text:
            self._loaded.set()
