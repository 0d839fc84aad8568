"""The servers under test, started as pinned child processes, and what they cost.

load generator -> **nextstate proxy | LiteLLM proxy** -> **fake upstream (or vLLM)**.
Every server is a child in its own process group, pinned to one core (the load
generator keeps the other), on a loopback port, stopped with its whole group. A `Server`
reads its own CPU time (user + system, its whole process tree) and its resident memory
from ``/proc``, and can reset the kernel's peak-RSS mark between runs.

LiteLLM runs from a virtual environment of its own (``bench/.venv-litellm``, created on
first use with ``litellm[proxy]``), so nextstate's dependencies never see it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
LITELLM_SPEC = "litellm[proxy]==1.106.2"
MODEL = "bench-model"
# LiteLLM refuses to start without a master key; every target gets the same header.
API_KEY = "sk-bench-5f0c2a9e7d1b4c3a8e6f0d2b9a7c5e31"
_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def process_tree(pid: int) -> list[int]:
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 256:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system time of the whole process tree (and its reaped children)."""
        total = 0
        for pid in process_tree(self.pid):
            with contextlib.suppress(OSError, IndexError):
                fields = _stat(pid)
                total += int(fields[11]) + int(fields[12])
                if pid == self.pid:
                    total += int(fields[13]) + int(fields[14])
        return total / _TICK

    def rss_mb(self) -> float:
        return sum(_status_kb(p, "VmRSS") for p in process_tree(self.pid)) / 1024

    def peak_rss_mb(self) -> float:
        return sum(_status_kb(p, "VmHWM") for p in process_tree(self.pid)) / 1024

    def reset_peak_rss(self) -> None:
        for pid in process_tree(self.pid):
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def _spawn(name: str, command: list[str], core: int | None, log: Path, url: str,
           env: dict[str, str] | None = None) -> Server:
    def pin() -> None:  # in the child, before exec: it and its threads stay on `core`
        if core is not None:
            os.sched_setaffinity(0, {core})

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, cwd=REPO,
                                   start_new_session=True, preexec_fn=pin)
    return Server(name, url, process, log)


def wait_ready(server: Server, path: str, timeout: float) -> None:
    """Until ``path`` answers 200; stops the server if it never does (or on Ctrl-C)."""
    deadline = time.monotonic() + timeout
    last = ""
    try:
        while time.monotonic() < deadline:
            if not server.alive():
                break
            try:
                if httpx.get(server.url + path, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    server.stop()
    tail = server.log.read_text(errors="replace")[-3000:] if server.log.exists() else ""
    raise RuntimeError(f"{server.name} did not become ready at {server.url}{path} "
                       f"({last}); log tail:\n{tail}")


def start_fake_upstream(port: int, core: int | None, workdir: Path) -> Server:
    server = _spawn("upstream", [sys.executable, "-m", "bench.fake_upstream", "--port",
                                 str(port)], core, workdir / "upstream.log",
                    f"http://127.0.0.1:{port}")
    wait_ready(server, "/health", 20)
    return server


def start_nextstate(backend: str, port: int, core: int | None, workdir: Path,
                    extra: tuple[str, ...] = (), name: str = "nextstate",
                    source: Path | None = None) -> Server:
    """``nextstate serve`` with recording on, to a fresh SQLite store in ``workdir``.

    ``source``: a folder holding another ``nextstate/proxy`` (a copy taken before a
    change) to run instead of the installed one, for before/after comparisons."""
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from nextstate.cli import main; main()", "serve",
               "--backend", backend, "--port", str(port),
               "--store", f"sqlite:///{home / 'store.db'}", *extra]
    env = {"NEXTSTATE_HOME": str(home)}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    server = _spawn(name, command, core, home / "proxy.log", f"http://127.0.0.1:{port}",
                    env=env)
    wait_ready(server, "/health", 60)
    return server


def ensure_litellm(venv: Path = LITELLM_VENV) -> Path:
    """The bench's own LiteLLM install; returns its ``litellm`` executable."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing {LITELLM_SPEC} into {venv} (once, a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    LITELLM_SPEC], check=True, timeout=1800)
    return exe


def litellm_config(backend: str) -> str:
    """One deployment of the bench model, pointed at the same upstream."""
    return (f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n"
            f"      model: hosted_vllm/{MODEL}\n      api_base: {backend}/v1\n"
            "      api_key: unused\n"
            "litellm_settings:\n  telemetry: false\n  request_timeout: 60\n")


def start_litellm(backend: str, port: int, core: int | None, workdir: Path,
                  model: str = MODEL) -> Server:
    exe = ensure_litellm()
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(backend).replace(MODEL, model))
    env = {"LITELLM_MASTER_KEY": API_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True",
           "DISABLE_ADMIN_UI": "True"}
    command = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"]
    server = _spawn("litellm", command, core, workdir / "litellm.log",
                    f"http://127.0.0.1:{port}", env=env)
    wait_ready(server, "/health/liveliness", 180)
    return server
