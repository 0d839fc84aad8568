"""What a training step learns from (store -> training stage -> trainer): every method
takes the same judged traffic per step and trains on the turns that carry its signal."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nextstate.core.store import Store
from nextstate.learner.items import TrainItem, informative, weak_hints
from nextstate.learner.judgment import Judgment
from nextstate.learner.personal import Lane
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig, TrainingStage
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


def hinted(name: str, teacher: list[float], reward: float | None = -1.0) -> TrainItem:
    return TrainItem(turn_id=name, prompt_ids=[1], completion_ids=[2, 3],
                     sampler_logprobs=[-1.0, -2.0], reward=reward, teacher_logprobs=teacher)


def test_a_turn_whose_hint_barely_moved_the_teacher_teaches_nothing() -> None:
    """A hint the model did not understand (its teacher scores the reply as the student
    did): the turn is dropped from distillation, its −1 with it (alone it would push down
    every token of the reply); a turn whose hint moved the teacher is kept."""
    understood = hinted("understood", [-3.0, -2.5])  # mean |change| 1.25
    vague = hinted("vague", [-1.02, -1.99])  # 0.015
    vague_unrewarded = hinted("vague, no reward", [-1.0, -2.0], reward=None)
    batch = [understood, vague, vague_unrewarded]
    stats = weak_hints(batch, min_change=0.05)
    assert understood.teacher_logprobs == [-3.0, -2.5]
    assert vague.teacher_logprobs is None and vague.reward is None
    for method in ("opd", "combined"):
        chosen = informative(batch, TrainerConfig(method=method))  # type: ignore[arg-type]
        assert [i.turn_id for i in chosen] == ["understood"]
    assert stats["hinted"] == 3 and stats["hints_dropped"] == 2
    # the teacher was less sure than the student of "understood" and "vague" (a reply
    # that was corrected), as sure of the third: none of the three gained
    assert stats["teacher_no_gain"] == 1.0


def test_by_default_every_hint_counts_and_the_step_says_what_the_hints_did() -> None:
    batch = [hinted("less sure", [-3.0, -2.5]), hinted("surer", [-0.5, -1.0]),
             item("thanked", 1.0, False)]
    stats = weak_hints(batch, min_change=0.0)
    assert all(i.teacher_logprobs for i in batch[:2])
    assert stats == {"hinted": 2.0, "teacher_no_gain": 0.5,
                     "teacher_change": (1.25 + 0.75) / 2, "hints_dropped": 0.0}
    assert weak_hints([item("thanked", 1.0, False)], 1.0) == {"hinted": 0.0}


async def test_binary_rl_keeps_the_reward_of_a_turn_whose_hint_was_weak(
        toy_model: Path, tmp_path: Path) -> None:
    """Dropping weak hints is about distillation: binary RL never uses the teacher."""
    store = judged_store(tmp_path, 1)
    config = TrainingConfig(trainer=TrainerConfig(method="binary", batch_turns=1),
                            min_teacher_change=10.0)
    stage = TrainingStage(store, toy_model, "p", vllms=[], adapters_dir=tmp_path / "adapters",
                          config=config)
    result = await stage.step([hinted("t0", [-1.0, -2.0])])
    assert result.outcome == "published" and result.stats.reward_mean == -1.0
    assert result.stats.extra["hints_dropped"] == 0


def judged_store(tmp_path: Path, count: int) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.turns.write([turn(i) for i in range(count)])
    for i in range(count):
        store.judgments.save(f"t{i}", Judgment(score=-1))
    return store


def corrected(count: int) -> list[TrainItem]:
    return [TrainItem(turn_id=f"t{i}", prompt_ids=[1, 40, 41, 42, 2], completion_ids=[50, 51, 52],
                      sampler_logprobs=[-7.0] * 3, reward=-1.0) for i in range(count)]


def kl_at(toy_model: Path, config: TrainerConfig, scale: float) -> float:
    from nextstate.learner.trainer import Trainer

    return Trainer(toy_model, config).step(corrected(4), scale).kl


STEEP = TrainerConfig(method="binary", learning_rate=3e-3, batch_turns=4)


async def test_a_step_over_the_gate_is_taken_again_at_half_the_rate_and_published(
        toy_model: Path, tmp_path: Path) -> None:
    full, half = kl_at(toy_model, STEEP, 1.0), kl_at(toy_model, STEEP, 0.5)
    assert half < full
    store = judged_store(tmp_path, 4)
    stage = TrainingStage(store, toy_model, "p", vllms=[], adapters_dir=tmp_path / "adapters",
                          config=TrainingConfig(trainer=STEEP, gate_max_kl=(full + half) / 2))
    result = await stage.step(corrected(4))
    assert result.outcome == "published" and result.version is not None
    assert result.stats.extra["lr_scale"] == 0.5
    assert abs(result.stats.kl - half) < 1e-6  # the same step as a trainer taking it alone
    assert store.judgments.trained_count() == 4 and store.judgments.ready_count("binary") == 0


async def test_a_step_over_the_gate_at_every_rate_is_refused_and_its_turns_skipped(
        toy_model: Path, tmp_path: Path) -> None:
    """Neither lost silently nor retried forever: the step is tried at 1, 1/2 and 1/4 of
    the learning rate, then its turns are marked skipped with the reason (they are not
    offered again), the weights are as before, and the refusal is in the history."""
    store = judged_store(tmp_path, 4)
    stage = TrainingStage(store, toy_model, "p", vllms=[], adapters_dir=tmp_path / "adapters",
                          config=TrainingConfig(trainer=STEEP, gate_max_kl=1e-9))
    trainer = stage._trainer(stage_lane(stage))
    before = trainer.logprobs(corrected(1))[0]
    result = await stage.step(corrected(4))
    assert (result.outcome, result.version) == ("refused", None)
    assert result.error is not None and result.error.count(" at ") == 3
    assert "1x" in result.error and "0.5x" in result.error and "0.25x" in result.error
    assert store.judgments.ready_count("binary") == 0 and store.judgments.trained_count() == 0
    for i in range(4):
        row = store.judgments.get(f"t{i}")
        assert row is not None and row["trained_version"] == -1
        assert row["error"] == result.error
    assert (trainer.logprobs(corrected(1))[0] == before).all()
    assert stage.history[-1]["outcome"] == "refused"
    assert stage.history[-1]["error"] == result.error
    assert store.adapters.versions() == []


def stage_lane(stage: TrainingStage) -> Lane:
    return Lane(stage.policy)


def served_store(tmp_path: Path, served: dict[str, str]) -> Store:
    """Judged turns (each a correction) served by the given model names, and four
    published versions of policy ``p``."""
    from nextstate.core.store.schema import adapters

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    records = []
    for i, model in enumerate(served.values()):
        record = turn(i)
        records.append(replace(record, turn_id=list(served)[i],
                               response={**record.response, "model": model}))
    store.turns.write(records)
    for turn_id in served:
        store.judgments.save(turn_id, Judgment(score=-1))
    with store.db.begin() as conn:
        for version in range(1, 5):
            conn.execute(adapters.insert().values(
                version=version, name=f"p@{version:06d}", policy="p", path="/nowhere",
                status="current" if version == 4 else "previous", created_at=0.0))
    return store


SERVED = {"now": "p@000004", "one behind": "p@000003", "three behind": "p@000001",
          "base": "p"}


@pytest.mark.parametrize("stale", ["drop", "downweight"])
def test_turns_served_too_many_versions_ago_are_dropped_or_down_weighted(
        tmp_path: Path, stale: str) -> None:
    """max_staleness 1: a turn served by the current version or the one before trains at
    full weight; older ones are skipped with the reason ("drop") or weighted
    1/(1 + versions beyond the bound) ("downweight")."""
    store = served_store(tmp_path, SERVED)
    stage = TrainingStage(store, tmp_path / "no-model-needed", "p", vllms=[],
                          adapters_dir=tmp_path / "adapters", config=TrainingConfig(
                              trainer=TrainerConfig(method="binary"), max_staleness=1,
                              stale=stale))  # type: ignore[arg-type]
    weights = {item.turn_id: item.weight for item in stage.ready()}
    if stale == "drop":
        assert weights == {"now": 1.0, "one behind": 1.0}
        for turn_id in ("three behind", "base"):
            row = store.judgments.get(turn_id)
            assert row is not None and row["trained_version"] == -1
            assert row["error"] == "stale: served more than 1 versions ago"
        assert store.judgments.ready_count("binary") == 2
    else:
        assert weights == {"now": 1.0, "one behind": 1.0, "three behind": 1 / 3,
                           "base": 1 / 4}
        assert store.judgments.ready_count("binary") == 4


PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4"
       "z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def test_a_turn_with_screens_trains_with_them_and_one_given_by_url_is_skipped(
        tmp_path: Path) -> None:
    """The store keeps a screenshot once, by reference; the trainer gets it back as the
    client sent it. An image given by http URL is never fetched: that turn is skipped,
    with the reason, rather than trained without its image."""
    def with_image(i: int, url: str) -> Any:
        record = turn(i)
        return replace(record, request={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Click OK."}]}]})

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.turns.write([turn(0), with_image(1, PNG), with_image(2, "https://example.com/s.png")])
    for i in range(3):
        store.judgments.save(f"t{i}", Judgment(score=-1))
    assert store.turns.images.usage()[0] == 1  # kept by reference, once
    stage = TrainingStage(store, tmp_path / "no-model-needed", "p", vllms=[],
                          adapters_dir=tmp_path / "adapters",
                          config=TrainingConfig(trainer=TrainerConfig(method="binary")))
    assert {item.turn_id: item.images for item in stage.ready()} == {"t0": [], "t1": [PNG]}
    skipped = store.judgments.get("t2")
    assert skipped is not None and skipped["trained_version"] == -1
    assert "an image given by URL" in skipped["error"]


def test_a_turn_whose_prompt_holds_image_placeholders_but_no_images_is_skipped(
        tmp_path: Path) -> None:
    """For a vision-language model, a prompt with the image token and no image the
    trainer can read would train on placeholders without pixels: skipped, with why."""
    model_dir = tmp_path / "vlm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"vision_config": {}, "image_token_id": 5}')
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.turns.write([turn(0)])  # its prompt is [5]: the image token, here
    store.judgments.save("t0", Judgment(score=-1))
    stage = TrainingStage(store, model_dir, "p", vllms=[], adapters_dir=tmp_path / "adapters",
                          config=TrainingConfig(trainer=TrainerConfig(method="binary")))
    assert stage.ready() == []
    skipped = store.judgments.get("t0")
    assert skipped is not None and "image placeholders" in skipped["error"]
