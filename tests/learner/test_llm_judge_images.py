"""The LLM judge on a GUI agent's turn: the before and after screens reach the judge model
as image parts, through the real litellm, to a fake OpenAI-compatible server
(learner.llm_judge); a turn still holding store references is refused clearly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.gui_session import data_url, gui_turn, screenshot
from nextstate.learner.judgment import JudgeError
from nextstate.learner.llm_judge import HINT_SYSTEM, LLMJudge, evaluative_prompt, screens


class FakeVisionModel(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: remembers each body, answers +1 (and a hint)."""

    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).bodies.append(body)
        hint = body["messages"][0]["content"] == HINT_SYSTEM
        text = ("\\boxed{1}\n[HINT_START]Click the toggle, not its label.[HINT_END]" if hint
                else "The toggle is on in the second screen. \\boxed{1}")
        reply = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def vision_model() -> Iterator[str]:
    FakeVisionModel.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVisionModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def gui_judged_turn(shots: list[bytes], next_state: list[dict[str, Any]]) -> dict[str, Any]:
    """Step 1 of a GUI session, as the judging stage hands it over (images inline)."""
    record = gui_turn(1, shots)
    return {"turn_id": record.turn_id, "endpoint": "chat", "status": "ok",
            "request": record.request, "response": record.response,
            "next_state": next_state, "next_state_kind": "user",
            "next_state_status": "paired", "feedback": []}


def image_parts(body: dict[str, Any]) -> list[str]:
    content = body["messages"][1]["content"]
    return [p["image_url"]["url"] for p in content if p["type"] == "image_url"]


async def test_the_judge_model_gets_the_screens_before_and_after_the_reply(vision_model):
    shots = [screenshot(0), screenshot(1), screenshot(2)]
    after = {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": data_url(shots[2])}}]}
    judge = LLMJudge("openai/gpt-4o-mini", api_base=vision_model, api_key="sk-test",
                     votes=2, backoff=0.0)
    judgment = await judge.judge(gui_judged_turn(shots, [after]))
    assert judgment.score == 1 and judgment.hints == ("Click the toggle, not its label.",)
    assert len(FakeVisionModel.bodies) == 4  # 2 evaluative votes, 2 hint votes
    for body in FakeVisionModel.bodies:
        # the last screen the agent saw (step 1's), then the next state's
        assert image_parts(body) == [data_url(shots[1]), data_url(shots[2])]
        labels = [p["text"] for p in body["messages"][1]["content"] if p["type"] == "text"]
        assert "## Next state" in labels[0]
        assert labels[1].startswith("The screen before") and labels[2].startswith(
            "The screen after")


async def test_a_remote_screenshot_url_is_passed_on_as_it_is(vision_model):
    shots = [screenshot(0), screenshot(1)]
    remote = "https://example.com/after.png"
    after = {"role": "user", "content": [{"type": "text", "text": "Done?"},
                                         {"type": "image_url", "image_url": {"url": remote}}]}
    judge = LLMJudge("openai/gpt-4o-mini", api_base=vision_model, api_key="sk-test",
                     votes=1, backoff=0.0)
    await judge.judge(gui_judged_turn(shots, [after]))
    assert image_parts(FakeVisionModel.bodies[0]) == [data_url(shots[1]), remote]


def test_a_text_turn_keeps_its_text_prompt():
    turn = {"request": {"messages": [{"role": "user", "content": "hi"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
            "next_state": [{"role": "user", "content": "thanks"}]}
    assert screens(turn) == (None, None)
    assert isinstance(evaluative_prompt(turn)[1]["content"], str)


def test_a_turn_with_store_references_is_refused_with_a_clear_error():
    turn = gui_judged_turn([screenshot(0), screenshot(1)], [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "nextstate-image:sha256:" + "a" * 64}}]}])
    with pytest.raises(JudgeError, match="store references, not inline"):
        evaluative_prompt(turn)
