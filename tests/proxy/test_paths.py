"""Only the allowlist reaches vLLM, however a path is spelled
(agent -> path check -> routes -> vLLM).

A family of spellings of vLLM's administrative and other non-inference paths (dot
segments, encodings, double encodings, case, backslashes, repeated and trailing
slashes, ``;`` parameters, NUL and control characters, look-alikes from outside ASCII,
query and fragment tricks, absolute URLs) is sent byte for byte (as ``curl
--path-as-is`` would) to a real proxy in front of a fake vLLM over real HTTP that records
every request target it receives; hypothesis then sends random paths. Nothing outside
the allowlist may arrive, and every refusal is a 4xx in the client's error shape.
"""

from __future__ import annotations

import re
import socket
import urllib.parse

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextstate.core.vllm_server import free_port
from nextstate.proxy.errors import shape_for
from nextstate.proxy.paths import canonical
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings
from tests.proxy.upstream import RecordingUpstream

# What may reach vLLM, as vLLM receives it.
ALLOWLIST = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
             "/v1/messages/count_tokens", "/v1/models", "/v1/embeddings", "/tokenize",
             "/detokenize"}
# The dialects are spoken to vLLM over chat (proxy/dialects/routes.py).
ARRIVES_AS = {"/v1/messages": "/v1/chat/completions", "/v1/responses": "/v1/chat/completions"}
# What must not: vLLM's administration, its development and SageMaker routes, metrics.
FORBIDDEN = ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/metrics", "/adapters",
             "/invocations", "/collective_rpc", "/pause", "/sleep", "/update_weights",
             "/version", "/v1/chat/completions/render", "/inference/v1/generate"]
# The proxy's own endpoints named like vLLM's: they answer themselves, asking vLLM only
# its health (``GET /metrics``: the proxy's Prometheus metrics, never vLLM's).
OWN = {"/metrics": ("GET", b"# HELP nextstate_proxy_")}
PARSER_REFUSAL = b"Invalid HTTP request received."  # uvicorn's own, before the app


def spellings(path: str) -> list[str]:
    """Ways to write ``path`` (or to smuggle it past a check of the plain spelling)."""
    head, _, name = path.rpartition("/")
    out = [
        path, path.upper(), path.title(), head + "/" + name.upper(),
        # dot segments, plain and encoded, single and double
        f"{head}/./{name}", f"{head}/x/../{name}", f"/v1/..{path}", f"/v1/chat/../..{path}",
        f"/./{path[1:]}", f"/..{path}", f"{path}/.", f"{path}/..", f"{path}/../{name}",
        f"{head}/%2e/{name}", f"{head}/x/%2e%2e/{name}", f"/v1/%2E%2E{path}",
        f"/v1/.%2e{path}", f"/v1/%2e.{path}", f"/v1/%252e%252e{path}", f"{head}/%252e/{name}",
        # encoded slashes and backslashes
        f"{head}%2f{name}", f"{head}%2F{name}", f"{head}%252f{name}", f"{head}%5c{name}",
        f"{head}%5C{name}", f"/v1/x%2f..%2f..{path}", f"/v1/x%5c..%5c..{path}",
        f"{head}\\{name}", f"/v1/x\\..\\..{path}", "\\" + path[1:],
        # repeated and trailing slashes
        "/" + path, f"{head}//{name}", f"{head}///{name}", path + "/", path + "//",
        path + "%2f", f"/v1/models/..{path}",
        # ; parameters
        path + ";x", f"{head};x/{name}", path + ";.json", f"/v1/..;{path}", f"/v1/x;/..{path}",
        # NUL and other control characters, encoded (uvicorn refuses them raw)
        path + "%00", path + "%00.json", f"/v1/%00/..{path}", path + "%0a", path + "%0d%0a",
        path + "%09", path + "%7f", f"{head}/%00{name}", path + "%20",
        # look-alikes from outside ASCII (fullwidth solidus and full stop, division
        # slash, one dot leader, overlong UTF-8 for / and .)
        f"{head}%EF%BC%8F{name}", f"/v1/%EF%BC%8E%EF%BC%8E{path}", f"{head}%E2%88%95{name}",
        f"/v1/%E2%80%A4%E2%80%A4{path}", f"{head}%C0%AF{name}", f"/v1/%C0%AE%C0%AE{path}",
        # query and fragment tricks
        f"{path}?x=1", f"{path}%3fx=1", f"{path}%23x", f"/v1/models%3f/..{path}",
        f"/v1/models%23/..{path}", f"{path}#/../../v1/models",
        # absolute URLs in the request line
        f"http://127.0.0.1:1{path}", f"http://vllm/v1/.{path}",
    ]
    return list(dict.fromkeys(out))


# Request targets an HTTP parser must refuse: raw control characters, spaces, non-ASCII.
RAW = [b"/v1/load_lora_adapter\x00", b"/v1/load_lora_adapter\x01", b"/v1/./load\x7f",
       b"/v1/load_lora_adapter x", b"/v1/load_lora_adapter\t", "/v1/\u2215load".encode(),
       "/v1/\uff0e\uff0e/v1/load_lora_adapter".encode()]

PROBE = orjson.dumps({"lora_name": "evil", "lora_path": "/tmp/evil", "model": "toy",
                      "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                      "input": "hi", "max_tokens": 1})

# (a Responses ``prompt`` is a stored prompt template, which the proxy refuses)
PROBES = {"/v1/responses": orjson.dumps({"model": "toy", "input": "hi"})}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    with RecordingUpstream() as upstream:
        settings_ = ProxySettings(backends=(upstream.url,), store_url=f"sqlite:///{tmp}/s.db",
                                  spool_dir=tmp / "spool")
        with BackgroundProxy(settings_, free_port()) as proxy:
            yield proxy, upstream


def send_raw(proxy: BackgroundProxy, method: str, target: bytes,
             body: bytes = PROBE) -> tuple[int, dict[str, str], bytes]:
    """One request with ``target`` exactly as given in its request line."""
    host, port = proxy.url.removeprefix("http://").split(":")
    head = (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode("latin-1").lower().split(": ", 1)
                   for line in header_block.split(b"\r\n") if b": " in line)
    if headers.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), headers, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2:]
    return out


def assert_refused_in_shape(target: str, status: int, body: bytes) -> None:
    """A 4xx whose body is the error shape of the API the path belongs to (or, for a
    request target that is neither a path nor a URL, uvicorn's parser's own 400)."""
    assert 400 <= status < 500, (target, status, body)
    if not target.startswith(("/", "http://")) and body == PARSER_REFUSAL:
        assert status == 400, target  # the parser refused it before the app saw it
        return
    error = orjson.loads(body)
    path = urllib.parse.unquote(target.split("?", 1)[0])
    if shape_for(path) == "anthropic":
        assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"}, (target, error)
    assert error["error"]["message"]


@pytest.mark.parametrize("path", FORBIDDEN)
def test_no_spelling_of_a_path_outside_the_allowlist_reaches_vllm(stack, path):
    proxy, upstream = stack
    for target in spellings(path):
        for method in ("POST", "GET", "DELETE"):
            before = len(upstream.targets)
            status, _, body = send_raw(proxy, method, target.encode())
            own = OWN.get(path)
            arrived = [t for t in upstream.targets[before:]
                       if not (own and t == ("GET", "/health"))]
            assert arrived == [], (target, arrived)
            plain = target.split("?", 1)[0].split("#", 1)[0]
            if own and method == own[0] and plain in (path, f"http://127.0.0.1:1{path}"):
                assert status == 200 and body.startswith(own[1]), (target, body[:80])
            else:
                assert_refused_in_shape(target, status, body)


@pytest.mark.parametrize("path", sorted(ALLOWLIST))
def test_an_allowed_path_spelled_oddly_is_refused_not_interpreted(stack, path):
    """Dot segments, encodings, slashes and the rest around an allowed path: a clear 4xx,
    never forwarded (the allowed spelling itself, and its query, are)."""
    proxy, upstream = stack
    for target in spellings(path):
        before = len(upstream.targets)
        status, _, body = send_raw(proxy, "POST" if path != "/v1/models" else "GET",
                                   target.encode(), PROBES.get(path, PROBE))
        arrived = upstream.paths()[before:]
        plain = target.split("?", 1)[0].split("#", 1)[0]
        if plain in (path, f"http://127.0.0.1:1{path}"):  # as written (a query is no path)
            # (the Responses route asks vLLM's model list once, for its context length)
            assert arrived[-1:] == [ARRIVES_AS.get(path, path)] and status < 500, (target,
                                                                                   status)
            assert set(arrived[:-1]) <= {"/v1/models"}, arrived
        else:
            assert arrived == [], (target, arrived)
            assert_refused_in_shape(target, status, body)


def test_anthropic_paths_are_refused_in_anthropics_error_shape(stack):
    proxy, upstream = stack
    before = len(upstream.targets)
    for target in ["/v1/messages/../../v1/load_lora_adapter", "/v1/messages/%2e%2e/x",
                   "/v1/messages/batches", "/v1/messages/", "/v1/mess%61ges/x"]:
        status, _, body = send_raw(proxy, "POST", target.encode())
        error = orjson.loads(body)
        assert 400 <= status < 500 and error["type"] == "error", (target, error)
        assert error["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert upstream.targets[before:] == []


def test_a_request_line_http_forbids_is_refused_before_the_proxy(stack):
    """Raw control characters, spaces and non-ASCII bytes in the request line: uvicorn's
    parser answers a plain 400 itself (the request never reaches the app)."""
    proxy, upstream = stack
    before = len(upstream.targets)
    for target in RAW:
        status, _, body = send_raw(proxy, "POST", target)
        assert (status, body) == (400, PARSER_REFUSAL), target
    assert upstream.targets[before:] == []


def test_what_is_forwarded_is_the_routes_own_path_with_the_query(stack):
    proxy, upstream = stack
    before = len(upstream.targets)
    assert send_raw(proxy, "GET", b"/v1/mo%64els?x=/../load_lora_adapter")[0] == 200
    assert send_raw(proxy, "POST", b"/v1/chat/complet%69ons?debug=1")[0] == 200
    assert upstream.targets[before:] == [("GET", "/v1/models?x=/../load_lora_adapter"),
                                         ("POST", "/v1/chat/completions")]


# -- the rules, one by one --------------------------------------------------------------

@pytest.mark.parametrize("raw,decoded", [
    (b"/v1/chat/completions", "/v1/chat/completions"), (b"/v1/sessions/a%20b%3Ac",
                                                         "/v1/sessions/a b:c"),
    (b"/v1/mo%64els", "/v1/models"), (b"/v1/models/", "/v1/models/"), (b"/", "/"),
    (b"/v1/a.b/..c/...", "/v1/a.b/..c/..."), (b"/v1/sessions/x@y~z!$&'()*+,=", None)])
def test_a_canonical_path_is_decoded_once(raw, decoded):
    assert canonical(raw) == (decoded or raw.decode())


@pytest.mark.parametrize("raw,why", [
    (b"v1/models", "start with '/'"), (b"*", "start with '/'"),
    (b"/v1/./models", "'.' segment"), (b"/v1/x/../models", "'..' segment"),
    (b"/v1//models", "empty segment"), (b"//v1/models", "empty segment"),
    (b"/v1%2fmodels", "encodes '/'"), (b"/v1/%2e%2e/models", "encodes '.'"),
    (b"/v1/%252e", "encodes '%'"), (b"/v1\\models", "a backslash"), (b"/v1/models;x", "';'"),
    (b"/v1/models%00", "control character (0x00)"), (b"/v1/models%7F", "control"),
    (b"/v1/%C0%AF", "non-ASCII byte (0xc0)"), (b"/v1/\xc3\xa9", "non-ASCII byte (0xc3)"),
    (b"/v1/%zz", "malformed"), (b"/v1/%4", "malformed"), (b"/v1/models%3f", "encodes '?'"),
    (b"/v1/a#b", "'#'"), (b"/v1/a b", "' '"), (b"/v1/{x}", "'{'")])
def test_a_path_that_needs_interpreting_is_refused_with_the_reason(raw, why):
    from nextstate.proxy.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=re.escape(why)):
        canonical(raw)


# -- random paths -------------------------------------------------------------------------

PIECES = ["/", "v1", "chat", "completions", "models", "messages", "count_tokens",
          "load_lora_adapter", "unload_lora_adapter", "tokenize", "metrics", "adapters",
          "responses", "cancel", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%00",
          "%0a", "%20", "%41", "%C0%AF", "%EF%BC%8F", ";", "\\", "?", "#", "x", "~", "@",
          ":", "//", "http://vllm"]
random_targets = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=10).map("".join),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
            max_size=40))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=random_targets, method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]))
def test_random_paths_reach_vllm_only_as_an_allowlisted_path(stack, target, method):
    proxy, upstream = stack
    before = len(upstream.targets)
    status, _, body = send_raw(proxy, method, target.encode())
    arrived = upstream.paths()[before:]
    assert status < 500, (target, status, body)
    assert set(arrived) <= ALLOWLIST, (target, arrived)
    if body == PARSER_REFUSAL:  # a request line uvicorn's parser refused
        assert status == 400 and not arrived
    elif arrived:  # forwarded: the path as the client meant it, exactly, once
        [path] = arrived
        sent = target.split("?", 1)[0].split("#", 1)[0].removeprefix("http://vllm")
        assert canonical(sent.encode()) == path, (target, path)
    elif status >= 400:
        assert_refused_in_shape(target, status, body)
