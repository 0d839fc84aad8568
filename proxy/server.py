"""Running the proxy: in the foreground (the CLI) or on a background thread (the learning
benchmark, the demo and the integration tests all drive a real proxy over real HTTP).

agent -> **proxy** -> vLLM.
"""

from __future__ import annotations

import gc
import threading
import time

import httpx
import uvicorn

from nextstate.proxy.app import make_app
from nextstate.proxy.settings import ProxySettings


def _config(settings: ProxySettings, host: str, port: int,
            transport: httpx.AsyncBaseTransport | None = None) -> uvicorn.Config:
    # uvloop and httptools when installed (the default install has them).
    return uvicorn.Config(make_app(settings, transport=transport), host=host, port=port,
                          log_level="warning", access_log=False, loop="auto", http="auto",
                          lifespan="on", timeout_keep_alive=settings.keep_alive_seconds)


def run_proxy(settings: ProxySettings, host: str, port: int) -> None:
    """Serve until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    server = uvicorn.Server(_config(settings, host, port))
    quiet_gc()
    server.run()


def quiet_gc() -> None:
    """Tune the cyclic garbage collector for a process that serves the proxy.

    Every request parses and builds JSON: many container objects, nearly all freed at once
    by reference counting. At the default thresholds (a young collection every 700 net
    allocations) the collector ran ~2,000 times a second, each time walking the records
    still in flight, and its full collections walked everything imported at startup:
    0.15 ms of CPU a request, 0.35 ms a stream (measured on the bench). Startup's objects
    are frozen (never scanned again) and young collections wait for 50,000 net
    allocations. Only for a process the proxy owns: `BackgroundProxy` leaves the host
    process's collector alone.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class BackgroundProxy:
    """A proxy on a loopback port, served by uvicorn on a daemon thread."""

    def __init__(self, settings: ProxySettings, port: int, host: str = "127.0.0.1",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(_config(settings, host, port, transport))
        self.thread = threading.Thread(target=self.server.run, daemon=True,
                                       name="nextstate-proxy")

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 15.0) -> BackgroundProxy:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the proxy did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> BackgroundProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
