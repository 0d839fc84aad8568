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
from collections.abc import Callable, Sequence

import httpx

log = logging.getLogger("nextstate.backends")


class Backend:
    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client
        self.healthy = True
        self.has_adapter = True  # has the policy's current adapter (or there is none)

    @property
    def serving(self) -> bool:
        return self.healthy and self.has_adapter


class BackendPool:
    def __init__(self, urls: Sequence[str],
                 make_client: Callable[[str], httpx.AsyncClient]) -> None:
        self.backends = [Backend(url, make_client(url)) for url in urls]

    @property
    def first(self) -> Backend:
        return self.backends[0]

    def ranked(self, affinity: str | None) -> list[Backend]:
        """Backends to try for a request, best first: the serving ones ranked for this
        affinity key, then the others (better a long shot than a certain failure)."""
        if len(self.backends) == 1:
            return self.backends
        key = affinity or ""
        order = sorted(self.backends, reverse=True, key=lambda b: hashlib.blake2b(
            f"{key}|{b.url}".encode(), digest_size=8).digest())
        return [b for b in order if b.serving] + [b for b in order if not b.serving]

    def mark_down(self, backend: Backend) -> None:
        if backend.healthy:
            log.warning("backend %s is unreachable; failing over", backend.url)
        backend.healthy = False

    async def watch(self, check_adapter: Callable[[httpx.AsyncClient], object],
                    interval: float) -> None:
        """Health-check every backend and make sure each has the current adapter
        (runs for the app's lifetime)."""
        while True:
            await asyncio.gather(*(self._check(b, check_adapter) for b in self.backends))
            await asyncio.sleep(interval)

    async def _check(self, backend: Backend,
                     check_adapter: Callable[[httpx.AsyncClient], object]) -> None:
        try:
            answer = await backend.client.get("/health", timeout=5.0)
            up = answer.status_code == 200
        except httpx.HTTPError:
            up = False
        if up:
            try:
                has = await check_adapter(backend.client)  # type: ignore[misc]
                backend.has_adapter = bool(has)
            except httpx.HTTPError:
                backend.has_adapter = False
        if up and not backend.healthy:
            log.info("backend %s is back", backend.url)
        backend.healthy = up

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.client.aclose()
