"""The soak: tens of thousands of requests through the proxy at concurrency 32, streaming
and not, with faults injected, and the books balanced at the end.

load generator -> nextstate proxy -> fake upstream; proxy -> SQLite store.
Faults: the upstream (standing in for vLLM) is killed and restarted mid-round; the store
is locked mid-round for longer than the writer waits (records go to the spool).
Reported: requests served, errors by cause, records written vs requests that reached the
proxy (must be equal: every request is recorded, served or not), and the proxy's memory
over time (must stay flat).

    python -m bench.soak [--requests 20000] [--out bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.loadgen import LoadSpec, Request, run_load
from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port, spawn, stop_group

CHAT = {"model": "bench", "max_tokens": 32,
        "messages": [{"role": "user", "content": "soak " * 40}]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_upstream(port: int, log: Path):  # noqa: ANN201 - a Popen
    return spawn([sys.executable, "-m", "bench.fake_upstream", "--port", str(port)], log)


def wait(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def restart_upstream_later(holder: dict, port: int, log: Path) -> None:
    await asyncio.sleep(1.0)
    stop_group(holder["upstream"])            # vLLM dies mid-round ...
    await asyncio.sleep(2.0)
    holder["upstream"] = start_upstream(port, log)  # ... and comes back


async def lock_store_later(db: Path) -> None:
    await asyncio.sleep(1.0)
    lock = sqlite3.connect(db, timeout=30)  # wait for the writer, then hold the lock
    lock.execute("BEGIN EXCLUSIVE")  # locked for 8 s, past the writer's 5 s busy timeout
    await asyncio.sleep(8.0)
    lock.rollback()
    lock.close()


async def soak(total: int, rounds: int, work: Path) -> dict:
    up_port, proxy_port = free_port(), free_port()
    db = work / "store.db"
    Store(f"sqlite:///{db}").turns.count()  # create the tables before locking them
    holder = {"upstream": start_upstream(up_port, work / "upstream.log")}
    wait(f"http://127.0.0.1:{up_port}/health")
    proxy = spawn([sys.executable, "-m", "nextstate.cli", "serve", "--backend",
                   f"http://127.0.0.1:{up_port}", "--port", str(proxy_port), "--store",
                   f"sqlite:///{db}"], work / "proxy.log",
                  env={**os.environ, "NEXTSTATE_HOME": str(work)})
    wait(f"http://127.0.0.1:{proxy_port}/health")
    served, errors, reached, rss = 0, Counter(), 0, []
    started = time.monotonic()
    try:
        for k in range(rounds):
            body = {**CHAT, "stream": k % 2 == 1}
            fault = {1: "upstream restart", 3: "store locked"}.get(k % 4, "none")
            side = (restart_upstream_later(holder, up_port, work / "upstream.log")
                    if fault == "upstream restart" else
                    lock_store_later(db) if fault == "store locked" else asyncio.sleep(0))
            load = run_load(Request("127.0.0.1", proxy_port, "/v1/chat/completions", body),
                            LoadSpec(concurrency=32, duration_s=120,
                                     max_requests=total // rounds))
            result, _ = await asyncio.gather(load, side)
            served += result.ok
            errors.update(result.errors)
            # Every request that got an HTTP answer from the proxy was recorded.
            # (an error answer, or a stream the proxy ended early with an error event).
            reached += result.ok + sum(n for kind, n in result.errors.items()
                                       if kind.startswith("http ")
                                       or kind == "stream without [DONE]")
            rss.append(round(rss_mb(proxy.pid), 1))
            print(f"round {k + 1}/{rounds} ({fault}): {result.ok} ok, "
                  f"{dict(result.errors)} failed, proxy RSS {rss[-1]} MB", flush=True)
        deadline = time.monotonic() + 120
        health: dict = {}
        while time.monotonic() < deadline:  # the recorder catches up with the store
            health = httpx.get(f"http://127.0.0.1:{proxy_port}/health").json()["recorder"]
            if not health["queued"] and not health["spool_pending"]:
                break
            await asyncio.sleep(0.5)
        store = Store(f"sqlite:///{db}")
        written = store.turns.count()
        store.close()
    finally:
        stop_group(proxy)
        stop_group(holder["upstream"])
    return {"requests": served + sum(errors.values()), "served": served,
            "errors": dict(errors), "reached_proxy": reached, "records": written,
            "recorder": health, "rss_mb": rss, "seconds": time.monotonic() - started}


def report(r: dict) -> str:
    half = len(r["rss_mb"]) // 2
    first, second = max(r["rss_mb"][:half] or [0]), max(r["rss_mb"][half:] or [0])
    balanced = "yes" if r["records"] == r["reached_proxy"] else "NO"
    return "\n".join([
        f"Soak, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores: "
        f"{r['requests']} requests at concurrency 32 in {r['seconds']:.0f} s, "
        "streaming and not, with the upstream restarted and the store locked mid-round.",
        "",
        "| served | errors by cause | reached the proxy | records written | balanced | "
        "proxy RSS per round (MB) |",
        "|---|---|---|---|---|---|",
        f"| {r['served']} | {r['errors'] or 'none'} | {r['reached_proxy']} | {r['records']} "
        f"| {balanced} | {r['rss_mb']} (max first half {first}, second half {second}) |",
        "", f"Recorder at the end: {r['recorder']}", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nextstate-soak-") as work:
        result = asyncio.run(soak(args.requests, args.rounds, Path(work)))
    text = report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if result["records"] != result["reached_proxy"]:
        raise SystemExit("records written do not match the requests that reached the proxy")


if __name__ == "__main__":
    main()
