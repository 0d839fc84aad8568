"""Several training processes (gloo, CPU): one step on two processes gives the same
adapter as one process on the same batch, to float tolerance, with each process holding
the whole model (gradients summed by all-reduce) or half of every weight (FSDP)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nextstate.learner import ranks
from nextstate.learner.items import TrainItem
from nextstate.learner.trainer import Trainer, TrainerConfig

CONFIG = TrainerConfig(method="combined", learning_rate=1e-2, passes=2, seed=3)


def batch() -> list[TrainItem]:
    """Turns of different lengths and signals, as a real batch has (5 of them: the ranks
    get unequal shares)."""
    return [TrainItem(f"t{i}", [1, 40 + i, 2, 1], [50 + i, 60, 70 + i][: 1 + i % 3],
                      [-6.0] * (1 + i % 3), reward=(-1.0, 1.0, None)[i % 3],
                      teacher_logprobs=None if i % 2 else [-5.0] * (1 + i % 3))
            for i in range(5)]


def train(trainer: Trainer, out: Path) -> None:
    """What the learner does with a trainer: step and save; go back to a fresh adapter;
    load the saved one (weights and optimizer state) and step again."""
    trainer.mark("fresh")
    stats = trainer.step(batch())
    trainer.save(out / "one", stats)
    trainer.rewind("fresh")
    trainer.load(out / "one")
    trainer.step(batch()[::-1])
    trainer.save(out / "two")


def _worker(rank: int, world: int, model: str, config: TrainerConfig, init_file: str,
            out: str) -> None:
    torch.set_num_threads(1)
    ranks.join("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(Trainer(model, config), Path(out))
    finally:
        ranks.leave()


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp"])
def test_two_processes_make_the_same_steps_as_one(toy_model, tmp_path, shard):
    single = Trainer(toy_model, CONFIG)
    fresh = {k: v.clone() for k, v in single.model.state_dict().items() if "lora_" in k}
    train(single, tmp_path / "single")

    mp.spawn(_worker, args=(2, str(toy_model), replace(CONFIG, shard=shard),
                            str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2,
             join=True)
    for name in ("one", "two"):
        expected = load_file(tmp_path / "single" / name / "adapter_model.safetensors")
        got = load_file(tmp_path / "two" / name / "adapter_model.safetensors")
        assert got.keys() == expected.keys()
        diffs = torch.cat([(got[k] - expected[k]).abs().flatten() for k in expected])
        # Adam divides each gradient by its own running size, so on a weight whose
        # gradient is ~0, the float noise of summing in another order can become a
        # visible update: allow 10% of the learning rate (1e-2) on any one weight...
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-3, rtol=1e-3)
        assert float(diffs.mean()) < 1e-6  # ...while nearly all are the same
    # ...which is far below how much the steps changed the adapter.
    moved = max(float((expected[k] - fresh[k.replace(".weight", ".default.weight")])
                      .abs().max()) for k in expected)
    assert moved > 1e-2
    # The step's numbers cover the whole batch, not rank 0's share of it.
    one, two = (json.loads((tmp_path / run / "one" / "step.json").read_text())
                for run in ("single", "two"))
    for key in ("loss", "clip_fraction", "importance_weight", "kl", "advantage_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-6), key
    # The optimizer state resumes the same way whoever wrote it.
    mine = torch.load(tmp_path / "two" / "two" / "optimizer.pt")
    theirs = torch.load(tmp_path / "single" / "two" / "optimizer.pt")
    assert mine["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        torch.testing.assert_close(mine["state"][index]["exp_avg_sq"], entry["exp_avg_sq"],
                                   atol=1e-6, rtol=1e-2)
