"""What every endpoint of the proxy shares, built once in `make_app`'s lifespan.

agent -> proxy -> vLLM (``backends``, ``router``, ``memory``); proxy -> store
(``recorder``, ``store``); what the proxy counts (``metrics``, read by ``GET /metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nextstate.core.routing import Router
from nextstate.core.store import Store
from nextstate.proxy.memory import Memory
from nextstate.proxy.recorder import Recorder
from nextstate.proxy.replicas import BackendPool
from nextstate.proxy.settings import ProxySettings

if TYPE_CHECKING:  # (metrics.py reads Deps when scraped)
    from nextstate.proxy.metrics import ProxyMetrics


@dataclass(frozen=True)
class Deps:
    settings: ProxySettings
    backends: BackendPool
    recorder: Recorder
    store: Store
    router: Router
    metrics: ProxyMetrics
    memory: Memory | None = None  # lessons added to prompts (settings.memory.enabled)
