"""The simulated users' client retries transient failures as the OpenAI SDK does, and
counts them; it gives up after two retries, and never retries a client error."""

import httpx
import pytest

from nextstate.experiment.client import RetryingTransport


def flaky(failures):
    """A server failing the first requests in the given ways, then answering 200."""
    seen = []

    def handle(request):
        seen.append(request.read())
        if len(seen) <= len(failures):
            failure = failures[len(seen) - 1]
            if isinstance(failure, int):
                return httpx.Response(failure, json={"error": "busy"})
            raise failure("connection reset by peer", request=request)
        return httpx.Response(200, json={"ok": True})

    return handle, seen


async def client_for(handle):
    transport = RetryingTransport(httpx.MockTransport(handle), initial_delay=0.001)
    return httpx.AsyncClient(base_url="http://proxy", transport=transport), transport


async def test_a_broken_connection_and_a_503_are_retried_and_counted():
    handle, seen = flaky([httpx.ReadError, 503])
    client, transport = await client_for(handle)
    async with client:
        answer = await client.post("/v1/chat/completions", json={"model": "m"})
    assert answer.status_code == 200
    assert seen == [b'{"model":"m"}'] * 3  # the same request, sent again
    assert transport.retries == {"ReadError": 1, "HTTP 503": 1}


async def test_it_gives_up_after_two_retries():
    handle, seen = flaky([httpx.RemoteProtocolError] * 3)
    client, transport = await client_for(handle)
    async with client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/v1/models")
    assert len(seen) == 3 and transport.retries == {"RemoteProtocolError": 2}


async def test_a_client_error_is_not_retried():
    handle, seen = flaky([400])
    client, transport = await client_for(handle)
    async with client:
        answer = await client.get("/v1/models")
    assert answer.status_code == 400 and len(seen) == 1 and not transport.retries
