"""Running the proxy: the collector tuning applies to a process the proxy owns only."""

import gc
import subprocess
import sys


def test_a_served_process_freezes_startup_and_collects_young_objects_rarely():
    code = ("import gc; from nextstate.proxy.server import quiet_gc; quiet_gc(); "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["50000", "True"]


def test_importing_the_server_leaves_this_process_collector_alone():
    import nextstate.proxy.server  # noqa: F401

    assert gc.get_threshold()[0] < 50_000


def test_a_client_connection_idle_longer_than_client_pools_keep_it_is_still_served(tmp_path):
    """httpx and the OpenAI SDK reuse a pooled connection for up to 5 s. A server that
    closed idle connections at 5 s too (uvicorn's default) raced them: a request sent as
    it closed got a reset (the benchmark's httpx.ReadError). The proxy outlasts them."""
    import socket
    import time

    import httpx

    from nextstate.core.vllm_server import free_port
    from nextstate.proxy.server import BackgroundProxy
    from nextstate.proxy.settings import ProxySettings
    from tests.proxy.fake_vllm import FakeVLLM

    settings = ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                             spool_dir=tmp_path / "spool")
    port = free_port()
    with (BackgroundProxy(settings, port, transport=httpx.MockTransport(FakeVLLM())),
          socket.create_connection(("127.0.0.1", port), timeout=10) as conn):
        for _ in range(2):
            conn.sendall(b"GET /health HTTP/1.1\r\nhost: proxy\r\n\r\n")
            assert _response(conn).startswith(b"HTTP/1.1 200")
            time.sleep(5.5)  # past every client pool's expiry: the proxy keeps it


def _response(conn) -> bytes:
    """One whole HTTP/1.1 response (framed by its content-length) from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the proxy closed the connection: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return head
