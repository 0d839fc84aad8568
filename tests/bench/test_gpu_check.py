"""`bench/gpu_check.sh --tiny`: the GPU check's own run on the CPU, as `make test` keeps
it working for the day a GPU is lent (its numbers say nothing about GPUs). The learner's
round is nextstate's real one on a store recorded through the real proxy and vLLM
(bench/gpu_store.db): one process, and two sharded processes standing in for two GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_check_trains_and_publishes_in_every_launch(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--tiny", "--out", str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    [trainer] = results["trainer"]
    assert trainer["ok"] and trainer["size"] == "tiny" and len(trainer["steps"]) == 2
    assert [r["launch"] for r in results["learner"]] == ["one process", "2 processes, sharded"]
    for round_ in results["learner"]:
        assert round_["ok"] and round_["outcome"] == "published", round_
        assert round_["turns"] == 16 and round_["written"]  # the adapter, on disk
        assert round_["loaded_on_stand_in"] == [round_["adapter"]]  # and published
    assert [r["sharded"] for r in results["learner"]] == [False, True]
    assert "| one process | published | 16 |" in (out / "results.md").read_text()
