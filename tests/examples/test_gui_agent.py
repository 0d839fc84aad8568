"""The GUI example runs as a user would run it: the real proxy in front of the real vLLM
serving the vision-language toy (the session's ``vlm`` fixture), the real OpenAI SDK."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from examples.gui_env import FormApp, png_bytes
from nextstate.core.store.images import reference
from nextstate.core.store.schema import sessions
from nextstate.core.vllm_server import VLLMProcess
from tests.conftest import VLM_MODEL_NAME, ProxyServer
from tests.examples.test_examples import run_example

pytestmark = pytest.mark.integration
IMAGE_TOKENS = 80  # a wide screen: 2x2 tiles + the global view (docs/vlm-on-cpu.md)


def settled(proxy: ProxyServer, session: str, count: int) -> list[dict[str, Any]]:
    """The session's turns once all ``count`` have their next state (written apart)."""
    deadline = time.monotonic() + 20
    while True:
        turns = sorted(proxy.turns(count, session_id=session), key=lambda t: t["turn_index"])
        if (len(turns) == count and all(t["next_state"] for t in turns)
                or time.monotonic() > deadline):
            return turns
        time.sleep(0.05)


def outcome(proxy: ProxyServer, session: str) -> int | None:
    """The session's outcome once recorded (feedback is written apart), else None."""
    deadline = time.monotonic() + 20
    store = proxy.store()
    try:
        while True:
            with store.db.connect() as conn:
                value = conn.execute(select(sessions.c.outcome)
                                     .where(sessions.c.id == session)).scalar()
            if value is not None or time.monotonic() > deadline:
                return None if value is None else int(value)
            time.sleep(0.05)
    finally:
        store.close()


def screen_of(message: dict[str, Any]) -> str:
    """The URL of a user message's screenshot."""
    [part] = [p for p in message["content"] if p["type"] == "image_url"]
    return str(part["image_url"]["url"])


def png_of(url: str) -> bytes:
    prefix, _, data = url.partition(",")
    assert prefix == "data:image/png;base64"
    return base64.b64decode(data)


def test_a_gui_episode_records_image_turns_with_each_next_screen_as_next_state(
    vlm: VLLMProcess, vlm_dir: Path, start_proxy: Callable[..., ProxyServer],
) -> None:
    proxy = start_proxy(vlm.url)
    out = run_example(proxy, "gui_agent.py", "--model", VLM_MODEL_NAME, "--steps", "3",
                      "--temperature", "0", "--max-tokens", "8")
    session = out.split("session: ")[1].split()[0]
    steps = sum(line.startswith("step ") for line in out.splitlines())
    assert 1 <= steps <= 3
    turns = settled(proxy, session, steps)
    assert [t["turn_index"] for t in turns] == list(range(steps))
    image_token = json.loads((vlm_dir / "config.json").read_text())["image_token_id"]

    app = FormApp()  # replays the model's recorded actions: the same screens must follow
    app.reset()
    errors = []  # whether each step opened the error dialog (the agent's -1 with a hint)
    for k, turn in enumerate(turns):
        error_before = app.state.dialog == "error"
        # Trainable: the learner trains on the ids and the screens (test_vlm_learning.py).
        assert turn["status"] == "ok" and turn["untrainable"] is None
        # Every screen so far is in the prompt, as the placeholder tokens vLLM expanded.
        assert turn["prompt_token_ids"].count(image_token) == IMAGE_TOKENS * (k + 1)
        assert turn["completion_token_ids"]
        [next_message] = turn["next_state"]
        assert next_message["role"] == "user" and turn["next_state_kind"] == "user"
        observation, _, _ = app.act(turn["response"]["choices"][0]["message"]["content"])
        errors.append(app.state.dialog == "error" and not error_before)
        [text] = [p["text"] for p in next_message["content"] if p["type"] == "text"]
        if isinstance(observation, str):  # no action: the valid ones, and the same screen
            assert text == observation
            observation = app.screenshot()
        # The store keeps the screen once, by its hash; the turn holds a reference.
        assert screen_of(next_message) == reference(hashlib.sha256(
            png_bytes(observation)).hexdigest())
        if k + 1 < steps:  # ... and it is the next request's last message
            assert turn["next_turn_id"] == turns[k + 1]["turn_id"]
            assert turns[k + 1]["request"]["messages"][-1] == next_message
        else:  # the last screen came with the session's end
            assert turn["next_state_status"] == "paired" and turn["next_turn_id"] is None
    store = proxy.store()
    try:  # restored exactly as sent, and each distinct screen stored once
        restored = list(store.turns.iterate(session_id=session, with_images=True))
        screens = {screen_of(m) for t in turns for m in t["request"]["messages"]
                   + t["next_state"] if m["role"] == "user"}
        assert store.turns.images.usage()[0] == len(screens)
    finally:
        store.close()
    replay = FormApp()
    replay.reset()
    for turn in sorted(restored, key=lambda t: t["turn_index"]):
        observation, _, _ = replay.act(turn["response"]["choices"][0]["message"]["content"])
        if isinstance(observation, str):
            observation = replay.screenshot()
        assert png_of(screen_of(turn["next_state"][0])) == png_bytes(observation)
    score = 1 if "success: True" in out else -1
    assert outcome(proxy, session) == score
    # The outcome is also feedback on the session's last turn; it was sent last, so by
    # now every step's own feedback (sent earlier, written in order) is in the store too.
    expected = [[(-1, True)] if error else [] for error in errors]
    expected[-1].append((score, False))
    given = [[(f["score"], bool(f["hint"])) for f in turn["feedback"]]
             for turn in settled(proxy, session, steps)]
    assert given == expected
