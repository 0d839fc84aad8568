"""The learning benchmark, short and seeded: a simulated student speaking in words the
model never saw in an instruction (the held-out wording) -> proxy -> vLLM -> store ->
learner (rules judge, combined method, the adapter as its own teacher) -> adapter ->
vLLM. A change that breaks learning anywhere on that path, or the toy model's
understanding of unseen wording, fails here.

It needs the hint-following toy model (`nextstate toy-model --trained`): built on first
use (about 10 minutes on 2 cores, 20 on a busy machine; one thread, byte-identical every
time) and cached in the data dir, like the untrained one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextstate.core.vllm_server import VLLMProcess, toy_model_config
from nextstate.experiment.bench import BASE_MODEL, trained_toy_model
from nextstate.experiment.following import tone_readings, transformers_generator
from nextstate.experiment.personas import load_personas
from nextstate.experiment.run import BenchConfig, run_method
from nextstate.experiment.styles import detect, make_problem
from nextstate.learner.teacher import with_hint
from tests.conftest import _require_vllm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMProcess]:
    _require_vllm()
    model_dir = trained_toy_model(progress=print)
    log = tmp_path_factory.mktemp("vllm-trained") / "vllm.log"
    with VLLMProcess(toy_model_config(model_dir, BASE_MODEL, log_path=log,
                                      max_loras=4)) as server:
        yield server


async def test_the_combined_method_raises_the_students_score_well_above_base(
        trained_vllm: VLLMProcess, tmp_path: Path) -> None:
    student = load_personas()["student-own-words"]
    assert student.wording == "held-out"
    # The recipe that learns held-out wording (bench/README.md, "The adapter as its own
    # teacher"): with the frozen base model as teacher this persona ends at 0.47-0.64,
    # too near the bound below for a seeded check of the path.
    config = BenchConfig(steps=8, eval_problems=16, seed=0, teacher="policy",
                         learning_rate=2e-3)
    run = await run_method(student, "combined", config, vllm_url=trained_vllm.url,
                           base_model=BASE_MODEL, model_dir=trained_toy_model(print),
                           workdir=tmp_path, progress=print)
    base, final = run.scores[0], run.scores[-1]
    assert base <= 0.4, f"the base model already pleases the student ({base:.2f})"
    assert final >= base + 0.25, f"score {base:.2f} -> {final:.2f} after 8 steps: {run.scores}"
    assert len(run.versions) == 8 and len(set(run.versions)) == 8  # one adapter per step
    # Every turn trained on was made by the simulated user (a step may also use turns
    # left over from the traffic of the step before, so only the total is exact).
    assert sum(run.turns_recorded) >= config.steps * config.batch_turns


def test_a_tone_reading_is_the_share_of_sampled_replies_in_that_tone() -> None:
    """``following.tone_readings`` reads how formal a reply will be off its first token;
    the replies the model samples agree (the reading ``bench following --tone-words``
    rests on)."""
    model_dir = trained_toy_model(print)
    hints = [None, "Talk to me like a friend."]  # the toy's defaults; a phrase it follows
    exact = tone_readings(model_dir, hints)
    assert exact[0] > 0.5 > exact[1], exact  # formal by default, casual when asked
    rng = random.Random(0)
    generate = transformers_generator(model_dir, max_tokens=60, seed=0)
    for hint, reading in zip(hints, exact, strict=True):
        asked = [[{"role": "user", "content": make_problem(rng).question}] for _ in range(96)]
        replies = generate([m if hint is None else with_hint(m, hint) for m in asked])
        sampled = sum(detect(r)["tone"] == "formal" for r in replies) / len(replies)
        # 96 replies: a share is within ±0.15 of its expectation (about 3 sigma).
        assert abs(sampled - reading) <= 0.15, (hint, reading, sampled)
