"""Starting vLLM, and nextstate's other child processes (CLI, experiment -> vLLM).

agent -> proxy -> **vLLM**. `VLLMProcess` starts ``python -m vllm.entrypoints.openai.
api_server`` from the current environment with runtime LoRA loading enabled and
``--logprobs-mode processed_logprobs`` (so recorded logprobs match the sampling
distribution), on a free loopback port; it waits until the server answers, and fails
with the tail of vLLM's log if it does not. Given a key, vLLM asks for it on every path
but ``/health``: vLLM's own check (``VLLM_API_KEY``, which guards ``/v1/*``) and
`nextstate.core.vllm_guard` for the rest. The key goes through the environment, not the
command line, where any local user could read it. The child is stopped with its whole process
group on exit, and is told to die with its parent (PR_SET_PDEATHSIG), so no orphan
survives even a ``kill -9`` of nextstate (`spawn`, `stop_group`: how ``nextstate up``
also runs the learner). `check_backend` looks at a vLLM that someone else started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nextstate.core.vllm import auth_headers
from nextstate.core.vllm_guard import KEY_ENV

GUARD = "nextstate.core.vllm_guard.RequireKey"


class BackendStartError(RuntimeError):
    """vLLM did not come up; the message quotes the end of its log."""


@dataclass(frozen=True)
class VLLMConfig:
    model: Path
    served_model_name: str
    port: int = 0  # 0: pick a free loopback port
    max_lora_rank: int = 16
    max_loras: int = 4
    max_model_len: int = 4096
    dtype: str = "auto"
    # Lets vLLM accept `tools` and parse the model's tool calls; depends on the model's
    # chat template (hermes: <tool_call>{...}</tool_call>, as the toy model uses).
    tool_call_parser: str | None = None
    kv_cache_gib: int = 1  # CPU KV cache size
    startup_timeout: float = 300.0
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None  # clients must send it (Bearer); None: vLLM is open


def toy_model_config(model: Path, served_model_name: str, **overrides: Any) -> VLLMConfig:
    """The embedded toy model's server: float32, so the learner reproduces its logprobs
    exactly (vLLM would pick bfloat16 on CPU), and the Hermes tool-call format."""
    return VLLMConfig(model=model, served_model_name=served_model_name, dtype="float32",
                      tool_call_parser="hermes", **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    # A shell starts background jobs (`nohup ... &`) with SIGINT ignored, and children
    # inherit that: the child answers SIGINT as Ctrl-C however its parent was started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None,
          ) -> subprocess.Popen[bytes]:
    """A child in its own process group, logging to ``log_path``, that dies with us."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_group(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left."""
    if process.poll() is not None:
        return
    pgid = os.getpgid(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM on this kind of machine (see docs: vLLM on CPU)."""
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD")) if p)
    env.update(extra or {})
    return env


class VLLMProcess:
    """A vLLM OpenAI server owned by this process. Use as a context manager."""

    def __init__(self, config: VLLMConfig) -> None:
        self.config = config
        self.port = config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.log_path or Path(f"/tmp/nextstate-vllm-{self.port}.log")
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(c.model), "--served-model-name", c.served_model_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-lora", "--max-lora-rank", str(c.max_lora_rank),
            "--max-loras", str(c.max_loras),
            "--logprobs-mode", "processed_logprobs",
            "--max-model-len", str(c.max_model_len), "--dtype", c.dtype,
            *(["--enable-auto-tool-choice", "--tool-call-parser", c.tool_call_parser]
              if c.tool_call_parser else []),
            *(["--middleware", GUARD] if c.api_key else []),
            *c.extra_args,
        ]

    def start(self) -> VLLMProcess:
        env = vllm_env({"VLLM_CPU_KVCACHE_SPACE": str(self.config.kv_cache_gib),
                        **self.config.env})
        if self.config.api_key:
            env[KEY_ENV] = self.config.api_key
        elif KEY_ENV not in self.config.env:  # not a key of the shell's we would not send
            env.pop(KEY_ENV, None)
        self.process = spawn(self.command(), self.log_path, env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BackendStartError(
                    f"vLLM exited with code {self.process.returncode} while starting.\n"
                    f"Last lines of {self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/models", timeout=2.0,
                             headers=auth_headers(self.config.api_key)).status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise BackendStartError(
            f"vLLM did not answer within {self.config.startup_timeout:.0f}s.\n"
            f"Last lines of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the whole process group (vLLM forks an engine process)."""
        if self.process is not None:
            stop_group(self.process, timeout)

    def __enter__(self) -> VLLMProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackendUnreachable(BackendStartError):
    """Nothing answers at the backend's address (yet)."""


def check_backend(url: str, api_key: str | None = None, timeout: float = 5.0) -> list[str]:
    """Model names served by an existing vLLM at ``url`` (its root URL). Raises
    `BackendUnreachable` when nothing answers, `BackendStartError` (one sentence saying
    what to do) when something answers that is not a usable OpenAI-compatible server."""
    models = f"{url.rstrip('/')}/v1/models"
    try:
        answer = httpx.get(models, timeout=timeout, headers=auth_headers(api_key))
    except httpx.HTTPError as exc:
        raise BackendUnreachable(
            f"nothing answers at {url} ({type(exc).__name__}): is vLLM running there?") from exc
    if answer.status_code == 404:
        raise BackendStartError(
            f"{url} answers 404 for /v1/models: that is not the address of an OpenAI-"
            "compatible server such as vLLM; give its root URL, e.g. http://HOST:8000 "
            "(with or without /v1)")
    if answer.status_code in (401, 403):
        raise BackendStartError(
            f"{url} refused {'the key given' if api_key else 'a request without a key'} "
            f"({answer.status_code}): give the key vLLM was started with (--api-key) as "
            "--backend-api-key or NEXTSTATE_BACKEND_API_KEY")
    try:
        answer.raise_for_status()
        return [m["id"] for m in answer.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise BackendStartError(
            f"{url} answered {answer.status_code} for /v1/models, not a model list: is it "
            "an OpenAI-compatible server such as vLLM?") from exc
