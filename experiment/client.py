"""The simulated users' HTTP client: it retries as a real agent's client does
(persona -> **client** -> proxy -> vLLM).

The OpenAI SDK retries a request that failed for a transient reason: the connection
could not be made or broke, it timed out, or the server answered 408, 409, 429 or 5xx;
twice by default, after about 0.5 s and 1 s (doubling, at most 8 s, less up to a quarter
of jitter). The benchmarks' simulated users do the same through `RetryingTransport`, and
count each retry by its cause, so that a run reports what it needed rather than being
lost to one broken connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

import httpx

log = logging.getLogger("nextstate.experiment.client")
RETRY_STATUSES = frozenset({408, 409, 429})


def transient(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


class RetryingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that retries transient failures (the OpenAI SDK's policy) and
    counts them in ``retries`` (cause -> count)."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None, *, max_retries: int = 2,
                 initial_delay: float = 0.5, max_delay: float = 8.0) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.max_retries = max_retries
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.retries: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                if last:
                    raise
                cause = type(exc).__name__
            else:
                if last or not transient(response.status_code):
                    return response
                await response.aclose()
                cause = f"HTTP {response.status_code}"
            self.retries[cause] += 1
            delay = min(self.max_delay, self.initial_delay * 2 ** attempt)
            log.warning("retrying %s %s after %s (in %.2f s)", request.method,
                        request.url.path, cause, delay)
            await asyncio.sleep(delay * (1 - 0.25 * random.random()))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        await self.inner.aclose()
