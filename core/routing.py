"""Which model serves a request (agent -> proxy -> vLLM).

Clients ask for the policy by its plain name (``nextstate-toy``); the router sends that
to the adapter version the learner made current (``nextstate-toy@000042``), or to the
base model while there is none, and the reply comes back under the name the client asked
for. ``<policy>@base`` reaches the frozen base model. The policy's name is the base
model's own name unless told otherwise. The current version is read from the store:
the learner marks a version current only after vLLM has loaded it, so the switch never
sends a request to an adapter that is not there, and requests already running finish on
the old one.

Personal adapters: when the learner trains a user their own adapter (its policy is
``<policy>~<user>``, versioned like the shared one), that user's requests for the policy
go to it; everyone else, and a user without one yet, gets the shared adapter. vLLM
serves them all side by side on one base model (multi-LoRA).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nextstate.core.lora import BASE_SUFFIX, PERSONAL, personal_policy
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient, VLLMRefused

log = logging.getLogger("nextstate.router")


class Router:
    """The policy's current adapter, and each user's personal one (followed from the
    store), and a way to make sure a vLLM has them loaded.

    vLLM forgets runtime-loaded adapters when it restarts: `check_loaded` looks at a
    backend's model list and loads an adapter again (from its directory, recorded in the
    store) when it is missing; the backend pool asks it for every backend it
    health-checks and before a request goes to an adapter a backend is not known to
    have, and the relay when vLLM answers 404 for the adapter.
    """

    def __init__(self, policy: str | None, base_model: str | None = None,
                 store: Store | None = None) -> None:
        self.policy = policy
        self.store = store  # read again before loading an adapter vLLM lost
        self.base_model = base_model or policy
        self.current: str | None = None  # the adapter version serving the policy
        self.path: str | None = None
        self.personal: dict[str, str] = {}  # personal policy -> its current adapter
        self.paths: dict[str, str] = {}  # every current adapter -> its directory
        self._loading: dict[str, asyncio.Lock] = {}  # backend URL -> its loads, one by one

    def route(self, model: object, user: str | None = None) -> str | None:
        """The upstream model name for ``model`` asked by ``user``, or None to leave it
        as it is."""
        if self.policy is None or not isinstance(model, str):
            return None
        if model == self.policy:
            if user is not None and self.personal:
                mine = self.personal.get(personal_policy(self.policy, user))
                if mine is not None:
                    return mine
            return self.current or self.base_model
        if model == self.policy + BASE_SUFFIX:
            return self.base_model
        return None

    def private(self, model: object) -> bool:
        """Is ``model`` the name of one of the policy's adapter versions
        (``<policy>@000007``, ``<policy>~alice@000003``)? Clients never name those
        themselves: they ask for the policy and are routed, so that no one reaches
        another user's personal adapter, nor pins a version the learner has retired."""
        if self.policy is None or not isinstance(model, str):
            return False
        if model.startswith(self.policy + PERSONAL):
            return True
        prefix = self.policy + "@"
        return model.startswith(prefix) and model[len(prefix):].isdigit()

    def update(self, found: dict[str, tuple[str, str]]) -> None:
        """Take the store's current adapters: {policy: (name, directory)} for the policy
        and its personal policies."""
        name, path = found.get(self.policy or "", (None, None))
        if name != self.current:
            log.info("policy %s now served by %s", self.policy, name or "the base")
            self.current, self.path = name, path
        personal = {p: n for p, (n, _) in found.items() if p != self.policy}
        if personal != self.personal:
            log.info("%d users have a personal adapter", len(personal))
            self.personal = personal
        self.paths = {n: p for n, p in found.values()}

    async def refresh(self) -> None:
        """Read the current adapters from the store now."""
        if self.store is not None:
            self.update(await asyncio.to_thread(self.store.adapters.currents,
                                                self.policy or ""))

    async def follow(self, interval: float) -> None:
        """Keep in step with the store (runs for the app's lifetime): one query a poll,
        however many personal adapters there are."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the store is away: keep serving what we have
                log.debug("could not read the current adapters: %s", exc)
            await asyncio.sleep(interval)

    async def check_loaded(self, vllm: VLLMClient, adapter: str | None = None) -> bool:
        """Does this backend have ``adapter`` (default: the policy's current one)?
        Loads it if vLLM lost it. False when it cannot have it (vLLM refused, or the
        adapter is no longer current); VLLMUnreachable when vLLM does not answer."""
        name = adapter or self.current
        if name is None:
            return True
        try:
            if name in await vllm.models():
                return True
            # One load at a time per backend: the health watcher and a request that both
            # found it missing load it once (the second finds it there).
            async with self._loading.setdefault(vllm.url, asyncio.Lock()):
                if name in await vllm.models():
                    return True
                # What we follow may be a poll behind the learner, which unloads a version
                # once it is retired: only a version the store still calls current is
                # loaded again, never one just retired (vLLM would keep it for good).
                with contextlib.suppress(Exception):  # the store is away: the last poll
                    await self.refresh()
                path = self.paths.get(name)
                if path is None:  # no longer current: nothing to load it from
                    return False
                log.warning("vLLM at %s lost %s (restarted?): loading it again", vllm.url,
                            name)
                await vllm.load_adapter(name, path)
        except VLLMRefused as exc:
            log.warning("%s", exc)
            return False
        return True
