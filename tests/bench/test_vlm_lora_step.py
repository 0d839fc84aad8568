"""The VLM LoRA-step benchmark runs and reports a step with and without the images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")  # the learner extra


def test_the_benchmark_reports_a_step_per_screen_count(tmp_path: Path) -> None:
    out = tmp_path / "vlm.json"
    subprocess.run([sys.executable, "-m", "bench.vlm_lora_step", "--screens", "1", "2",
                    "--repeats", "1", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["screens"] for r in rows] == [1, 2]
    assert rows[1]["image_tokens"] == 2 * rows[0]["image_tokens"] > 0
    assert all(r["step_s"] > 0 and r["text_only_step_s"] > 0 for r in rows)
