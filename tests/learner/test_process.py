"""The learner's round as the store sees it: what it writes to the status that `nextstate
status`, doctor and the dashboard read (toy model on CPU, a fake vLLM)."""

from __future__ import annotations

from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.learner.test_personal import judged


async def test_a_step_the_gate_refused_is_counted_in_the_status_the_store_holds(
        tmp_path, toy_model, fake):
    # A bound no step can meet, and no second try: the step is refused.
    training = TrainingConfig(trainer=TrainerConfig(method="binary", batch_turns=2),
                              gate_max_kl=1e-12, gate_retries=0)
    learner = Learner(LearnerConfig(
        store_url=f"sqlite:///{tmp_path / 'store.db'}", backends=("http://vllm",),
        base_model="p", model_dir=toy_model, adapters_dir=tmp_path / "adapters",
        backend_api_key="k", training=training))
    try:
        judged(learner.store, [None, None])
        await learner.step()
        written = learner.store.status.read()
    finally:
        await learner.close()
    assert written is not None and written["state"] == "idle"
    assert written["totals"]["steps"] == {"refused": 1}
    [step] = written["steps"]
    assert step["outcome"] == "refused" and "publish gate" in step["error"]
