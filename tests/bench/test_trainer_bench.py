"""The trainer benchmark runs, alone and as two processes with FSDP, and reports what it
measured (a tiny model on the CPU: the numbers worth having come from GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ARGS = ["--size", "tiny", "--turns", "3", "--prompt", "12", "--completion", "6",
        "--steps", "2"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_benchmark_reports_each_step(tmp_path, ranks):
    out = tmp_path / "trainer.json"
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(ranks)]
    shard = ["--shard"] if ranks > 1 else []
    subprocess.run([*launch, "-m", "bench.trainer_bench", *ARGS, *shard, "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    summary = json.loads(out.read_text())
    assert summary["ranks"] == ranks and summary["sharded"] == (ranks > 1)
    assert len(summary["steps"]) == 2
    assert all(s["seconds"] > 0 and s["kl"] > 0 for s in summary["steps"])  # it trained
