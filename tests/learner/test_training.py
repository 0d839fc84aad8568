"""What a training step learns from (store -> training stage -> trainer): every method
takes the same judged traffic per step and trains on the turns that carry its signal."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextstate.core.store import Store
from nextstate.learner.judgment import Judgment
from nextstate.learner.trainer import TrainerConfig, TrainItem
from nextstate.learner.training import TrainingConfig, TrainingStage, informative
from tests.learner.test_store import turn


def item(name: str, reward: float | None, hinted: bool) -> TrainItem:
    return TrainItem(turn_id=name, prompt_ids=[1], completion_ids=[2], sampler_logprobs=[-1.0],
                     reward=reward, teacher_logprobs=[-0.5] if hinted else None)


BATCH = [item("corrected", -1.0, True), item("thanked", 1.0, False),
         item("hint only", None, True), item("neutral", None, False)]


@pytest.mark.parametrize(("method", "expected"), [
    ("binary", ["corrected", "thanked"]),
    ("opd", ["corrected", "hint only"]),
    ("combined", ["corrected", "thanked", "hint only"]),
])
def test_each_method_trains_on_the_turns_with_its_signal(method: str,
                                                         expected: list[str]) -> None:
    chosen = informative(BATCH, TrainerConfig(method=method))  # type: ignore[arg-type]
    assert [i.turn_id for i in chosen] == expected


async def test_a_step_without_any_signal_consumes_its_turns_and_publishes_nothing(
        tmp_path: Path) -> None:
    """Distillation over a batch in which the user was always happy: nothing to learn,
    no adapter, and the turns are not offered again."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.turns.write([turn(i) for i in range(2)])
    for i in range(2):
        store.judgments.save(f"t{i}", Judgment(score=1))
    assert store.judgments.ready_count("opd") == 2  # a step is the same traffic for every method
    stage = TrainingStage(store, tmp_path / "no-model-needed", "p", vllms=[],
                          adapters_dir=tmp_path / "adapters",
                          config=TrainingConfig(trainer=TrainerConfig(method="opd")))
    thanked = [item(f"t{i}", 1.0, False) for i in range(2)]
    result = await stage.step(thanked)
    assert (result.outcome, result.version) == ("skipped", None)
    assert "no opd signal" in (result.error or "")
    assert store.judgments.ready_count("opd") == 0
    assert store.adapters.versions() == []
