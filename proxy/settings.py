"""Configuration for the proxy (agent -> proxy -> vLLM; proxy -> store), read in one place.

Settings are a frozen dataclass with defaults that work out of the box; the CLI and
environment variables (``NEXTSTATE_*``) override them. Nothing here opens a connection:
`make_app(settings)` builds clients in its lifespan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nextstate.core.paths import backend_root, data_dir, default_store_url
from nextstate.core.redact import DEFAULT_PATTERNS


@dataclass(frozen=True)
class MemorySettings:
    """The memory: lessons (hints remembered from earlier turns) added to the prompts of
    the requests they fit (proxy/memory.py). Off by default."""

    enabled: bool = False
    # Only these tenants and users get lessons (a user as the export names it:
    # ``tenant:id``, or the id without tenants); empty: everyone.
    only: tuple[str, ...] = ()
    # Lessons a request gets at most, best first. One: on the learning benchmark a second
    # and third lesson (the same user's preferences in other words) added nothing where
    # the model understands them, lowered the score where it understands them in part
    # (0.70 against 0.81 at step 8), and tripled the tokens (bench/README.md, Memory).
    # Raise it where one user's lessons are about different things.
    lessons: int = 1
    # Lessons of one scope (a user's, a tenant's, the shared ones) it is chosen from: the
    # newest (pinned first). Bounds what retrieval costs a request.
    scope_lessons: int = 64
    max_chars: int = 1200  # characters of lessons a request gets at most
    # Retrieval costing over this many milliseconds of CPU serves the request without
    # lessons (counted); so does a failed one.
    budget_ms: float = 2.0
    refresh_seconds: float = 1.0  # how often the index looks for changed lessons
    # The share of recorded requests that lessons fit and an adapter serves, served the
    # other way: without them while the asker's lessons are served, with them once the
    # learner has handed them over to the weights (core/store/handover.py). The judged
    # turns of the two arms are how the learner tells whether lessons still help. 0: never
    # (nothing is measured, and nothing is ever handed over).
    control: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.only, str):
            raise ValueError("only must be a tuple of tenants or users")
        for name in ("lessons", "max_chars", "scope_lessons"):
            if getattr(self, name) < 1:
                raise ValueError(f"memory {name} must be at least 1, not {getattr(self, name)}")
        for name in ("budget_ms", "refresh_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"memory {name} must be over 0, not {getattr(self, name)}")
        if not 0 <= self.control < 0.5:
            raise ValueError(f"memory control must be at least 0 and under 0.5 (a share of "
                             f"requests served the other way), not {self.control}")

    def serves(self, tenant: str | None, user: str | None) -> bool:
        """Does this tenant's (or user's) traffic get lessons?"""
        if not self.enabled:
            return False
        return not self.only or tenant in self.only or user in self.only


@dataclass(frozen=True)
class ProxySettings:
    """Everything `make_app` needs. Defaults suit a local vLLM on port 8000."""

    # The vLLM replicas of the model (the first is the one that answers when affinity does
    # not decide); sessions are spread across all of them.
    backends: tuple[str, ...] = ("http://127.0.0.1:8000",)
    health_interval_seconds: float = 2.0
    store_url: str = ""  # empty: a SQLite file in the data dir
    # Bearer key clients must present; None leaves the proxy open (it binds loopback).
    api_key: str | None = None
    # Per-client keys, (tenant, key) pairs: each client's sessions, feedback and export
    # are its own. May be combined with api_key (whose tenant is "default").
    client_keys: tuple[tuple[str, str], ...] = ()
    # Sees and deletes every tenant's data, lists adapters, rolls back.
    admin_key: str | None = None
    # Scrubbed from stored text (regexes); default: API keys, tokens, e-mail addresses.
    redact_patterns: tuple[str, ...] = DEFAULT_PATTERNS
    retention_days: float | None = None  # delete turns older than this; None: keep
    # Key sent to vLLM; None passes the client's own Authorization header through
    # when the proxy has no key of its own.
    backend_api_key: str | None = None
    record: bool = True
    # Ask the backend for token ids and logprobs (vLLM's extra fields) to record them.
    # Off: requests go out as the client sent them, for any OpenAI-compatible backend;
    # turns are recorded as text, which the judge and the memory learn from but the
    # trainer cannot (no token ids).
    capture: bool = True
    # Where sampled-token logprobs come from: "record" asks vLLM for them on every request;
    # "recompute" leaves them out wherever the learner can recompute them exactly (a
    # temperature of 0 or 1 and nothing else shaping the distribution, capture.py), which
    # takes most of capture's cost off the request path (bench/README, "The tax").
    sampler_logprobs: Literal["record", "recompute"] = "record"
    memory: MemorySettings = MemorySettings()
    # The model name clients use for the trained policy; None: no routing to adapters.
    policy: str | None = None
    base_model: str | None = None  # vLLM's name for the base model (default: the policy's)
    adapter_poll_seconds: float = 0.5
    # Records the writer keeps in memory, the last submitted (so as not to parse them back
    # from the journal), and those the journal could not take (the disk failed; beyond
    # this many they are dropped, counted). Memory per record: ~50 KB as Python objects.
    queue_size: int = 512
    spool_dir: Path | None = None  # the journal's directory; default: <data dir>/spool
    # The journal's group commit: a machine crash loses at most this many seconds of
    # answered turns (a killed process loses none).
    journal_sync_seconds: float = 1.0
    # A session with no new turn for this long ends; its last turn has no next state.
    session_idle_seconds: float = 900.0
    # A turn continuing a conversation the store has not seen yet waits this long for
    # the earlier turn (which another proxy process may still be writing).
    pairing_wait_seconds: float = 2.0
    # An idle client connection stays open this long: longer than clients keep theirs in
    # their pools (httpx and the OpenAI SDK 5 s, aiohttp 15 s), so that no client sends a
    # request on a connection the proxy is closing (it would get a reset, httpx.ReadError).
    keep_alive_seconds: int = 75
    upstream_timeout: float = 600.0
    upstream_connect_timeout: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_seconds: float = 30.0  # a client must send its whole body within this
    sqlite_busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.backends, str) or not self.backends:
            raise ValueError("backends must be a tuple of at least one vLLM URL")
        # Accept the URLs as users write them (http://host:8000/v1 as well).
        object.__setattr__(self, "backends", tuple(backend_root(u) for u in self.backends))
        for name in ("queue_size", "keep_alive_seconds", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.retention_days is not None and self.retention_days <= 0:
            raise ValueError(f"retention_days must be over 0, not {self.retention_days}")
        if self.sampler_logprobs not in ("record", "recompute"):
            raise ValueError("sampler_logprobs must be record or recompute, "
                             f"not {self.sampler_logprobs!r}")
        if self.base_model is not None and self.policy is None:
            raise ValueError("base_model names the policy's base model: give the policy too")

    @property
    def backend_url(self) -> str:
        """The first backend."""
        return self.backends[0]

    def tenants_by_key(self) -> dict[bytes, str]:
        """Client keys and their tenants (``api_key``'s tenant is "default")."""
        keys = {key.encode(): tenant for tenant, key in self.client_keys}
        if self.api_key:
            keys[self.api_key.encode()] = "default"
        return keys

    def resolved_store_url(self) -> str:
        return self.store_url or default_store_url()

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or data_dir() / "spool"
