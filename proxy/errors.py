"""The proxy's own errors, shaped as OpenAI error bodies and mapped in one place.

    ProxyError
     ├── InvalidRequest      400  malformed JSON, a body that is not an object, bad fields,
     │                            a path that is not canonical (proxy/paths.py)
     ├── Unauthorized        401  missing or wrong proxy API key
     ├── Forbidden           403  an endpoint that needs the admin key
     ├── NotFound            404  unknown route (anything outside the allowlist), turn
     │                            or session
     ├── RequestTimeout      408  a client too slow to send its body
     ├── Conflict            409  feedback on another client's session
     ├── PayloadTooLarge     413  body over the configured limit
     ├── BackendUnavailable  502  vLLM cannot be reached
     └── StoreUnavailable    503  the store cannot answer a question only it can

Under ``/v1/messages`` (Anthropic's API) the same errors take Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, so that Anthropic clients read them.
Errors that vLLM itself returns are never wrapped: they pass through untouched. A
backend that cannot be reached at all is one error, `BackendUnavailable`, made in one
place (`map_upstream`); `send_error` writes any of them to the client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import httpx
import orjson

from nextstate.core.vllm import VLLMUnreachable
from nextstate.proxy.types import Send

Shape = Literal["openai", "anthropic"]
ANTHROPIC_PREFIX = "/v1/messages"


def shape_for(path: str) -> Shape:
    """The error shape a client of ``path`` reads."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "openai"


class ProxyError(Exception):
    status = 500
    type = "nextstate_error"
    anthropic_type = "api_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self, shape: Shape = "openai") -> bytes:
        if shape == "anthropic":
            return orjson.dumps({"type": "error", "error": {"type": self.anthropic_type,
                                                            "message": self.message}})
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    anthropic_type = "authentication_error"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    anthropic_type = "permission_error"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"
    anthropic_type = "not_found_error"


class RequestTimeout(ProxyError):
    status = 408
    type = "timeout_error"
    anthropic_type = "timeout_error"


class Conflict(ProxyError):
    status = 409
    type = "conflict_error"
    anthropic_type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    anthropic_type = "request_too_large"


class BackendUnavailable(ProxyError):
    status = 502
    type = "backend_unavailable"
    anthropic_type = "api_error"


class StoreUnavailable(ProxyError):
    status = 503
    type = "store_unavailable"
    anthropic_type = "api_error"


def unknown_model(model: str) -> NotFound:
    """What a client that names an adapter version itself is told (vLLM's own words for a
    model it does not serve): versions are reached through the policy's name only."""
    return NotFound(f"The model `{model}` does not exist.", param="model")


@contextlib.contextmanager
def map_upstream(message: str = "The model backend could not be reached",
                 hint: str = "") -> Iterator[None]:
    """The one translation of "vLLM could not be reached" (a transport error, or the
    proxy's own call to vLLM getting no answer) into `BackendUnavailable`, with the
    transport error as its cause."""
    try:
        yield
    except (httpx.TransportError, VLLMUnreachable) as exc:
        raise BackendUnavailable(f"{message} ({type(exc).__name__}).{hint}") from exc


async def send_error(send: Send, exc: ProxyError, shape: Shape = "openai") -> None:
    """The error as the whole reply, in the client's API shape."""
    body = exc.body(shape)
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
