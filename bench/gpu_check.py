"""The GPU path, measured in minutes on a lent GPU machine (learner -> trainer -> publish).

    bench/gpu_check.sh            # there: under 8 minutes, JSON and a table in --out
    bench/gpu_check.sh --tiny     # the same on the CPU with a tiny model (make test runs it)
    python -m bench.gpu_check make-store bench/gpu_store.db   # here, with the real vLLM

Three parts, each in a process of its own (a failure or an out-of-memory ends that part,
not the check):

1. **trainer**: `bench.trainer_bench` at 0.5B and 8B, then the largest of the bigger
   sizes that runs on one GPU in bf16 (tried from the largest down);
2. **learner**: one round of nextstate's own learner (`Learner.step()`, what
   `nextstate learn --once` runs) on the judged turns of a store recorded here through
   the real proxy and vLLM (teacher logprobs included): the LoRA step in bf16 on the GPU,
   the adapter written and published. There is no vLLM on that machine, so a stand-in
   answers the publish (`/v1/models`, `/v1/load_lora_adapter`); the publish gate is off,
   since what is checked is the path, not what the step learned;
3. **sharded**: part 2 under torchrun with ``--shard`` (FSDP), when there are several GPUs.

The store's turns were sampled from the untrained toy model, which the check builds there
(seconds; no hub): its step times say nothing about real sizes, part 1 does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STORE = Path(__file__).with_name("gpu_store.db")
TOY = "nextstate-toy"
FIRST = ("0.5b", "8b")
LARGEST_FIRST = ("70b", "32b", "14b")  # the first of these that runs is the largest fitting


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", default="all",
                        choices=["all", "learner-step", "make-store"])
    parser.add_argument("path", nargs="?", type=Path, default=None,
                        help="make-store: where to write the store")
    parser.add_argument("--tiny", action="store_true", help="the CPU's version: tiny sizes")
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    parser.add_argument("--shard", action="store_true", help="(learner-step) FSDP")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole check (each part gets what is left)")
    args = parser.parse_args(argv)
    if args.part == "make-store":
        make_store(args.path or STORE)
    elif args.part == "learner-step":
        learner_step(args.store, args.out, shard=args.shard)
    else:
        check(args)


# -- the check -------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> None:
    import torch

    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "gpus": gpus,
        "device": torch.cuda.get_device_name() if gpus else "cpu", "trainer": [],
        "learner": [], "tiny": args.tiny}
    sizes = ["tiny"] if args.tiny else list(FIRST)
    for size in sizes:
        results["trainer"].append(trainer_size(size, args, deadline))
    if not args.tiny:  # the largest that fits: the first of the big ones that runs
        for size in LARGEST_FIRST:
            row = trainer_size(size, args, deadline)
            results["trainer"].append(row)
            if row["ok"]:
                break
    runs = [("one process", [sys.executable])]
    if gpus > 1 or args.tiny:  # (two CPU processes stand in for two GPUs in --tiny)
        ranks = gpus if gpus > 1 else 2
        runs.append((f"{ranks} processes, sharded", [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks)]))
    for name, launch in runs:
        shard = ["--shard"] if "sharded" in name else []
        out = args.out / ("learner-sharded.json" if shard else "learner.json")
        ok, seconds, log = run([*launch, "-m", "bench.gpu_check", "learner-step",
                                "--store", str(args.store), "--out", str(out), *shard],
                               deadline)
        row = json.loads(out.read_text()) if ok and out.exists() else {"error": log[-2000:]}
        results["learner"].append({"launch": name, "ok": ok, "seconds": seconds, **row})
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results))
    print(table(results))


def trainer_size(size: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    out = args.out / f"trainer-{size}.json"
    shape = ["--turns", "3", "--prompt", "12", "--completion", "6", "--steps", "2"] \
        if args.tiny else ["--steps", "3"]
    ok, seconds, log = run([sys.executable, "-m", "bench.trainer_bench", "--size", size,
                            *shape, "--out", str(out)], deadline)
    if ok:
        return {"size": size, "ok": True, "wall_seconds": seconds,
                **json.loads(out.read_text())}
    why = "out of memory" if "out of memory" in log.lower() else log[-600:]
    return {"size": size, "ok": False, "wall_seconds": seconds, "error": why}


def run(command: list[str], deadline: float) -> tuple[bool, float, str]:
    """A part in its own process, within what is left of the budget."""
    left = deadline - time.monotonic()
    if left < 10:
        return False, 0.0, "skipped: the check's time budget is spent"
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start, "timed out: the check's budget ran out"
    seconds = round(time.monotonic() - start, 1)
    log = done.stdout + done.stderr
    print(f"{' '.join(command[-8:])}: exit {done.returncode} in {seconds} s", flush=True)
    return done.returncode == 0, seconds, log


def table(results: dict[str, Any]) -> str:
    lines = [f"GPU check {results['date']}: {results['gpus']} x {results['device']}, "
             f"torch {results['torch']}", "",
             "| trainer size | ranks | s a step | tokens/s | peak GiB | |",
             "|---|---:|---:|---:|---:|---|"]
    for row in results["trainer"]:
        if row["ok"]:
            tps = sum(s["tokens_trained_per_s"] for s in row["steps"][1:] or row["steps"])
            tps //= max(1, len(row["steps"][1:] or row["steps"]))
            lines.append(f"| {row['size']} | {row['ranks']} | {row['seconds_per_step']} | "
                         f"{tps} | {row['peak_gib']} | |")
        else:
            lines.append(f"| {row['size']} | | | | | {row['error'][:80]} |")
    lines += ["", "| learner round | outcome | turns | s the round | s the step | device | |",
              "|---|---|---:|---:|---:|---|---|"]
    for row in results["learner"]:
        lines.append(f"| {row['launch']} | {row.get('outcome', 'failed')} | "
                     f"{row.get('turns', '')} | {row.get('round_seconds', '')} | "
                     f"{row.get('step_seconds', '')} | {row.get('device', '')} | "
                     f"{'' if row['ok'] else str(row.get('error', ''))[-80:]} |")
    return "\n".join(lines) + "\n"


# -- part 2: one round of the real learner ---------------------------------------------------


class StandInVLLM:
    """What the learner asks of vLLM when it publishes, answered: the model list, loading
    and unloading adapters, health (stdlib only: nothing else is on that machine)."""

    def __init__(self) -> None:
        loaded: set[str] = set()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any] | str) -> None:
                raw = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(status)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path == "/v1/models":
                    self._answer(200, {"data": [{"id": m} for m in [TOY, *sorted(loaded)]]})
                else:
                    self._answer(200 if self.path == "/health" else 404, {})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path == "/v1/load_lora_adapter":
                    assert (Path(body["lora_path"]) / "adapter_config.json").exists()
                    loaded.add(body["lora_name"])
                    self._answer(200, "Success")
                elif self.path == "/v1/unload_lora_adapter":
                    loaded.discard(body["lora_name"])
                    self._answer(200, "Success")
                else:
                    self._answer(404, {"error": {"message": "not on the stand-in"}})

            def log_message(self, *args: Any) -> None:
                pass

        self.loaded = loaded
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def learner_step(store: Path, out: Path, *, shard: bool) -> None:
    """One learner round on a copy of ``store`` (rank 0; other ranks follow its trainer
    calls, as under `nextstate learn`)."""
    from dataclasses import replace

    import torch

    from nextstate.learner import ranks
    from nextstate.learner.config import LearnerConfig, TrainingConfig
    from nextstate.learner.process import Learner
    from nextstate.learner.toy_model import ensure_toy_model
    from nextstate.learner.trainer import TrainerConfig

    rank = ranks.start()
    if rank:
        try:
            ranks.follow()
        finally:
            ranks.leave()
        return
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    shutil.copy(store, work / "store.db")
    vllm = StandInVLLM()
    model_dir = ensure_toy_model(work / "data")
    trainer = replace(TrainerConfig(), batch_turns=16, shard=shard)
    learner = Learner(LearnerConfig(
        store_url=f"sqlite:///{work / 'store.db'}", backends=(vllm.url,), base_model=TOY,
        model_dir=model_dir, adapters_dir=work / "adapters",
        training=TrainingConfig(trainer=trainer, gate=False)))
    start = time.monotonic()
    try:
        asyncio.run(_one_round(learner))
        history = learner.training.history if learner.training else []
        step = history[-1] if history else {}
        adapter = learner.store.adapters.current(TOY)
        result = {"outcome": step.get("outcome", "no step"), "turns": step.get("turns"),
                  "step_seconds": step.get("seconds"), "loss": step.get("loss"),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                  else "cpu", "ranks": ranks.world_size(), "sharded": shard,
                  "adapter": adapter["name"] if adapter else None,
                  "loaded_on_stand_in": sorted(vllm.loaded),
                  "written": sorted(p.name for p in (work / "adapters").rglob("*.safetensors")),
                  "round_seconds": round(time.monotonic() - start, 1)}
    finally:
        ranks.stop()
        ranks.leave()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if result["outcome"] != "published" or not result["written"]:
        sys.exit(f"the learner's round did not publish an adapter: {result}")


async def _one_round(learner: Any) -> None:
    try:
        await learner.step()
    finally:
        await learner.close()


async def _judge_all(learner: Any) -> None:
    try:
        while await learner.step():  # (no model_dir: it only judges)
            pass
    finally:
        await learner.close()


# -- the store, made here ---------------------------------------------------------------------


def make_store(path: Path) -> None:
    """Record judged turns through the real proxy and vLLM (the toy model), judged by
    the rules judge with the teacher's logprobs for hints, into a store at ``path``."""
    from nextstate.core.paths import data_dir
    from nextstate.core.vllm_server import VLLMProcess, free_port, toy_model_config
    from nextstate.experiment.converse import converse
    from nextstate.learner.config import LearnerConfig
    from nextstate.learner.process import Learner
    from nextstate.learner.toy_model import ensure_toy_model
    from nextstate.proxy.server import BackgroundProxy
    from nextstate.proxy.settings import ProxySettings

    path.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-store-"))
    url = f"sqlite:///{path.resolve()}"
    model = ensure_toy_model(data_dir())
    with VLLMProcess(toy_model_config(model, TOY, log_path=work / "vllm.log")) as vllm:
        settings = ProxySettings(backends=(vllm.url,), store_url=url, spool_dir=work / "spool")
        with BackgroundProxy(settings, free_port()) as proxy:
            converse(proxy.base_url, 20)  # 20 corrected turns: a step of 16 and more
            time.sleep(2.0)  # the recorder writes off the request path
        learner = Learner(LearnerConfig(store_url=url, backends=(vllm.url,), base_model=TOY))
        asyncio.run(_judge_all(learner))
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
