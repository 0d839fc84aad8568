"""One canonical path per request, settled before anything reads it
(agent -> **path check** -> API key -> routes -> vLLM).

uvicorn gives the app a path twice: as sent (``raw_path``, percent-encoded) and decoded
(``path``). Servers and HTTP clients disagree about what dot segments, encoded slashes or
backslashes mean (httpx, for one, drops ``..`` segments when it builds a URL), which is
how ``/v1/x/../load_lora_adapter`` once reached vLLM's adapter loader through a proxy that
refused ``/v1/load_lora_adapter``. So a path that would need interpreting is refused
with a 400 before routing, and is never forwarded:

- a character outside RFC 3986's path characters (letters, digits, ``-._~!$&'()*+,=:@/``
  and ``%`` escapes): backslashes, ``;`` parameters, ``"<>^`{|}[]#``, spaces, control
  characters, non-ASCII bytes (uvicorn's HTTP parser refuses the last three itself,
  with a plain-text 400, before the proxy sees the request);
- an escape that is malformed or decodes to ``/``, ``\\``, ``.``, ``%`` (double encoding),
  ``;``, ``?``, ``#``, a control character or a non-ASCII byte (so no look-alike of
  ``/`` or ``.`` from outside ASCII);
- a ``.`` or ``..`` segment, an empty segment (``//``), a path not starting with ``/``.

Any other escape is decoded (``%41`` is ``A``). The decoded path replaces ``path`` in the
scope: routing, the API-key check and the endpoints all see that one, and what goes to
vLLM is the allowlisted route's own path (proxy/passthrough.py), never the client's
spelling. A trailing slash is kept, not normalised away: no route ends with one, so it
is a 404.
"""

from __future__ import annotations

import string
import urllib.parse

from nextstate.proxy.errors import InvalidRequest, send_error, shape_for
from nextstate.proxy.types import ASGIApp, Receive, Scope, Send

_PATH_BYTES = (string.ascii_letters + string.digits + "-._~!$&'()*+,=:@/%").encode()
_PATH_CHARS = frozenset(_PATH_BYTES)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_NEVER_ENCODED = frozenset(b"/\\.%;?#")  # an escape of these is an attempt to hide one


def canonical(raw: bytes) -> str:
    """The decoded path of the request target ``raw`` (the path part, as sent); raises
    InvalidRequest saying what is wrong with it."""
    if not raw.startswith(b"/"):
        raise InvalidRequest("The request path must start with '/'.")
    if b"%" not in raw and not raw.translate(None, _PATH_BYTES):  # nothing to decode
        return _segments_checked(raw.decode("ascii"))
    decoded = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char not in _PATH_CHARS:
            raise InvalidRequest(f"The request path contains {_describe(char)}, which no "
                                 "endpoint takes.")
        if char == ord("%"):
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise InvalidRequest("The request path has a malformed %-escape.")
            char = int(pair, 16)
            if char < 0x20 or char >= 0x7F or char in _NEVER_ENCODED:
                raise InvalidRequest(f"The request path encodes {_describe(char)} as "
                                     f"%{pair.decode()}; send paths unencoded.")
            i += 2
        decoded.append(char)
        i += 1
    return _segments_checked(decoded.decode("ascii"))


def _segments_checked(path: str) -> str:
    segments = path.split("/")[1:]
    for n, segment in enumerate(segments):
        if segment in (".", ".."):
            raise InvalidRequest(f"The request path has a '{segment}' segment; send the "
                                 "path without dot segments.")
        if not segment and n < len(segments) - 1:
            raise InvalidRequest("The request path has an empty segment ('//').")
    return path


def _describe(char: int) -> str:
    if char < 0x20 or char == 0x7F:
        return f"a control character (0x{char:02x})"
    if char >= 0x80:
        return f"a non-ASCII byte (0x{char:02x})"
    if char == ord("\\"):
        return "a backslash"
    return repr(chr(char))


class PathGuard:
    """Pure-ASGI, outermost: a request whose path is not canonical gets a 400 in its
    API's error shape; any other goes on with ``path`` decoded once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        try:
            scope["path"] = canonical(raw)
        except InvalidRequest as exc:
            # Anthropic's clients read Anthropic's error shape, however they spelled it.
            shape = shape_for(urllib.parse.unquote(raw.decode("latin-1")))
            await send_error(send, exc, shape)
            return
        scope["raw_path"] = raw
        await self.app(scope, receive, send)
