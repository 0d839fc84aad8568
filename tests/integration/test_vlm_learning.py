"""A GUI agent's turns through the whole loop on the real vLLM serving the VLM toy
(proxy -> store -> learner: judge, image teacher, trainer -> publish -> vLLM -> proxy).

A two-step episode on the simulated form: the second screen is the first turn's next
state, the agent's own verdict (-1 with a hint) is feedback on the second turn. The
learner scores that turn's recorded reply under the hint with its screens (vLLM's render
and token-in routes: the ``vlm`` fixture starts it with ``--enable-scale-out``), trains a
LoRA step on the recorded ids and the screens' pixels, and publishes the adapter; vLLM
then serves image requests through it, scoring them as the trainer does.
"""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.gui_env import FormApp, png_bytes
from nextstate.adapters.openai import Session
from nextstate.core.sessions import image_urls
from nextstate.core.vllm import VLLMClient
from nextstate.core.vllm_server import VLLMProcess
from nextstate.learner.image_teacher import score_with_images
from nextstate.learner.items import to_item
from nextstate.learner.multimodal import image_token_id
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.teacher import with_hint
from nextstate.learner.trainer import TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.conftest import VLM_MODEL_NAME, ProxyServer

pytestmark = pytest.mark.integration
HINT = "Click the Save button at the bottom right."
ASK = {"model": VLM_MODEL_NAME, "temperature": 1.0, "max_tokens": 8, "seed": 3}


def screen_message(image: Any, text: str) -> dict[str, Any]:
    """A user message with a screen and words about it, as examples/gui_agent.py sends."""
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def episode(proxy: ProxyServer) -> tuple[str, list[dict[str, Any]]]:
    """Two steps on the form, the second corrected; returns the session and its turns."""
    app = FormApp()
    session = Session(base_url=proxy.base_url)
    client = session.client()
    messages = [{"role": "system", "content": "Answer with click(x, y) or type(\"text\")."},
                screen_message(app.reset(), app.task)]
    for step in range(2):
        reply = client.chat.completions.create(messages=messages, **ASK)  # type: ignore[call-overload]
        messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                     screen_message(app.screenshot(), f"The screen after step {step}.")]
    session.feedback(-1, hint=HINT)  # the agent's own verdict on its last step
    session.next_state([messages[-1]], done=True)
    deadline = time.monotonic() + 20
    while True:
        turns = sorted(proxy.turns(2, session_id=session.id), key=lambda t: t["turn_index"])
        if len(turns) == 2 and all(t["next_state"] for t in turns) and turns[1]["feedback"] \
                or time.monotonic() > deadline:
            return session.id, turns
        time.sleep(0.05)


async def test_a_corrected_gui_turn_is_scored_with_its_screens_trained_and_served(
    vlm: VLLMProcess, vlm_dir: Path, start_proxy: Any, tmp_path: Path,
) -> None:
    proxy = start_proxy(vlm.url, policy=VLM_MODEL_NAME, adapter_poll_seconds=0.1)
    _, turns = episode(proxy)
    assert [t["untrainable"] for t in turns] == [None, None]  # images train now
    corrected = turns[1]
    trainer = replace(TrainerConfig(), batch_turns=2, lora_rank=8, lora_alpha=16)
    learner = Learner(LearnerConfig(
        store_url=proxy.settings.resolved_store_url(), backends=(vlm.url,),
        base_model=VLM_MODEL_NAME, model_dir=vlm_dir, adapters_dir=tmp_path / "adapters",
        training=TrainingConfig(trainer=trainer, unload_grace=0.0)))
    vllm = VLLMClient(vlm.url, timeout=120)
    try:
        for _ in range(4):
            if learner.store.adapters.current(VLM_MODEL_NAME) is not None:
                break
            await learner.step()
        judged = learner.store.judgments.get(corrected["turn_id"])
        current = learner.store.adapters.current(VLM_MODEL_NAME)
        assert judged is not None and learner.training is not None
        assert learner.training.trainer is not None
        assert judged["hints"] == [HINT]  # the agent's; its observation is no correction
        [teacher] = judged["teacher_logprobs"]
        image_token = image_token_id(vlm_dir)
        assert image_token is not None
        request = learner.store.turns.images.inline(corrected["request"])
        # The teacher scored the recorded reply under the hint, with the screens.
        hinted = await score_with_images(vllm, VLM_MODEL_NAME,
                                         with_hint(request["messages"], HINT),
                                         corrected["completion_token_ids"], image_token)
        assert teacher == pytest.approx(hinted, abs=1e-4)
        assert len(teacher) == len(corrected["completion_token_ids"])
        # The step trained on both turns and was published; vLLM has the adapter.
        assert current is not None and judged["trained_version"] == current["version"]
        assert current["name"] in await vllm.models()
        # vLLM scores the corrected turn through the new adapter as the trainer does: what
        # was trained on the recorded ids and pixels is what serves images.
        served = await score_with_images(vllm, current["name"], request["messages"],
                                         corrected["completion_token_ids"], image_token)
        item = to_item({**corrected, "id": corrected["turn_id"], "score": -1},
                       images=image_urls(request["messages"]))
        [trained] = learner.training.trainer.logprobs([item])
        assert served == pytest.approx(trained.tolist(), abs=2e-3)
        assert served != pytest.approx(corrected["logprobs"], abs=1e-3)  # it moved
    finally:
        await vllm.aclose()
        await learner.close()
    # The proxy serves the policy's image requests through the adapter and records it.
    time.sleep(0.5)
    app = FormApp()
    answer = httpx.post(f"{proxy.base_url}/chat/completions", timeout=120, json={
        **ASK, "messages": [screen_message(app.reset(), app.task)]})
    assert answer.status_code == 200 and answer.json()["model"] == VLM_MODEL_NAME
    newest = max(proxy.turns(3), key=lambda t: t["created_at"])
    assert newest["served_model"] == current["name"]

