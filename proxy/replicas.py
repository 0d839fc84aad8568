"""Several vLLM replicas behind one proxy (agent -> proxy -> one of N vLLMs).

Requests of one session go to the same replica, so vLLM's prefix cache is reused:
replicas are ranked per session by rendezvous hashing, which moves only the sessions of a
replica that fails (and of one that comes back). A watcher health-checks every replica;
one that cannot be reached is skipped (the request fails over to the next in its ranking
as long as nothing was sent yet), and one that comes back serves again only once it has
the policy's current adapter loaded. With a single backend all of this reduces to using
it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import httpx

from nextstate.core.routing import Router
from nextstate.core.vllm import VLLMClient, VLLMUnreachable
from nextstate.proxy.transport import NOTHING_SENT

log = logging.getLogger("nextstate.backends")
# A request may go to another replica after these: it was not sent (or the replica could
# not even be asked whether it has the request's adapter).
FAIL_OVER: tuple[type[Exception], ...] = (*NOTHING_SENT, VLLMUnreachable)


class Backend:
    """One replica: ``client`` carries relayed requests, ``vllm`` the proxy's own calls
    (health, adapters), over the same connections and with the backend's key."""

    def __init__(self, url: str, client: httpx.AsyncClient, api_key: str | None = None,
                 ) -> None:
        self.url = url
        self.client = client
        # No retries: a request fails over to another replica instead, and the watcher
        # asks again in a moment.
        self.vllm = VLLMClient(url, api_key, timeout=10.0, retries=0, http=client)
        self.healthy = True
        self.adapter: str | None = None  # the policy adapter it is known to have loaded
        self.personal: set[str] = set()  # users' personal adapters it is known to have

    def has(self, adapter: str) -> bool:
        return adapter == self.adapter or adapter in self.personal

    def serving(self, adapter: str | None) -> bool:
        """Up, and holding ``adapter`` (the policy's current one; None: no adapter)."""
        return self.healthy and (adapter is None or self.adapter == adapter)


class BackendPool:
    def __init__(self, urls: Sequence[str], make_client: Callable[[str], httpx.AsyncClient],
                 api_key: str | None = None) -> None:
        self.backends = [Backend(url, make_client(url), api_key) for url in urls]

    @property
    def first(self) -> Backend:
        return self.backends[0]

    def ranked(self, affinity: str | None, adapter: str | None = None) -> list[Backend]:
        """Backends to try for a request, best first: the serving ones ranked for this
        affinity key, then the others (better a long shot than a certain failure)."""
        if len(self.backends) == 1:
            return self.backends
        key = affinity or ""
        order = sorted(self.backends, reverse=True, key=lambda b: hashlib.blake2b(
            f"{key}|{b.url}".encode(), digest_size=8).digest())
        return ([b for b in order if b.serving(adapter)]
                + [b for b in order if not b.serving(adapter)])

    async def send(self, post: Callable[[Backend], Awaitable[httpx.Response]], *,
                   affinity: str | None = None, adapter: str | None = None,
                   router: Router | None = None) -> tuple[Backend, httpx.Response]:
        """``post`` a request to the best backend for ``affinity``, failing over to the
        next while nothing was sent: the connection was refused or timed out, or the
        replica could not be asked for ``adapter`` (loaded first where a backend is not
        known to have it). Raises the last backend's error when none took it."""
        shared = router.current if router is not None and adapter is not None else None
        candidates = self.ranked(affinity, shared)
        for i, backend in enumerate(candidates):
            try:
                if router is not None and adapter is not None and not backend.has(adapter):
                    # Not known to have it (a restart, a new version): check, load if
                    # missing, before the policy request goes there.
                    await self.ensure_adapter(backend, router, adapter)
                return backend, await post(backend)
            except FAIL_OVER:
                self.mark_down(backend)
                if i == len(candidates) - 1:
                    raise
        raise AssertionError("unreachable: the pool always has a backend")

    def mark_down(self, backend: Backend) -> None:
        if backend.healthy:
            log.warning("backend %s is unreachable; failing over", backend.url)
        backend.healthy = False

    async def ensure_adapter(self, backend: Backend, router: Router,
                             adapter: str | None = None) -> None:
        """Make sure ``backend`` has the policy's current adapter, and ``adapter`` (a
        user's own) when given, loading what vLLM lost; remember that it does."""
        current = router.current
        if current is not None and backend.adapter != current and await router.check_loaded(
                backend.vllm):
            backend.adapter = current
        if adapter is not None and not backend.has(adapter) and await router.check_loaded(
                backend.vllm, adapter):
            backend.personal &= set(router.personal.values())  # forget retired versions
            backend.personal.add(adapter)

    async def watch(self, router: Router, interval: float) -> None:
        """Health-check every backend and make sure each has the current adapter
        (runs for the app's lifetime)."""
        while True:
            await asyncio.gather(*(self._check(b, router) for b in self.backends))
            await asyncio.sleep(interval)

    async def _check(self, backend: Backend, router: Router) -> None:
        up = await backend.vllm.health(timeout=5.0)
        if not up:
            backend.adapter = None  # a restart will have lost them
            backend.personal.clear()
        else:
            try:
                # A recovered backend is only taken back once it has the adapter.
                await self.ensure_adapter(backend, router)
            except VLLMUnreachable:
                up = False
        if up and not backend.healthy:
            log.info("backend %s is back", backend.url)
        backend.healthy = up

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.client.aclose()
