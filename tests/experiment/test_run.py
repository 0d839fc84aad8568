"""The benchmark's simulated users on either API: a conversation over Anthropic Messages
(the official SDK, as Claude Code talks) is recorded like a chat one: one session, each
turn's next state the user's answer, the last one sent as the session's end (a fake
vLLM behind a real proxy)."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm_server import free_port
from nextstate.experiment.personas import SimulatedUser, load_personas
from nextstate.experiment.run import BenchConfig
from nextstate.experiment.styles import make_problem
from nextstate.experiment.traffic import conversation, speaker_for
from nextstate.proxy.server import BackgroundProxy
from nextstate.proxy.settings import ProxySettings
from tests.proxy.fake_vllm import FakeVLLM


@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_a_simulated_conversation_is_recorded_and_paired_on_either_api(tmp_path, api):
    fake = FakeVLLM()  # answers "Hello!": the student corrects it every time
    settings = ProxySettings(backends=("http://vllm",), store_url=f"sqlite:///{tmp_path}/s.db",
                             spool_dir=tmp_path / "spool")
    user = SimulatedUser(load_personas()["student"], random.Random(0))
    with BackgroundProxy(settings, free_port(), transport=httpx.MockTransport(fake)) as proxy:
        async with httpx.AsyncClient(base_url=proxy.base_url, timeout=30) as client:
            speaker = speaker_for(api, client, proxy.url)
            try:
                turns = await conversation(client, "toy", user, make_problem(random.Random(1)),
                                           BenchConfig(api=api),  # type: ignore[arg-type]
                                           speaker)
            finally:
                await speaker.aclose()
        rows = _recorded(settings.store_url, turns)
    assert turns == user.persona.max_turns
    assert {r["endpoint"] for r in rows} == {api}
    assert len({r["session_id"] for r in rows}) == 1
    assert all(r["next_state"] and r["next_state"][0]["role"] == "user" for r in rows)
    assert [len(r["request"]["messages"]) for r in rows] == [1 + 2 * i for i in range(turns)]


def _recorded(store_url: str, count: int, timeout: float = 15.0) -> list[dict]:
    store = Store(store_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = sorted(store.turns.iterate(), key=lambda r: r["created_at"])
            if len(rows) >= count and all(r["next_state"] for r in rows):
                return rows
            time.sleep(0.05)
        return rows
    finally:
        store.close()


def test_the_memory_arms_serve_lessons_as_many_as_asked():
    from nextstate.experiment.memory import arm
    from nextstate.experiment.run import memory_settings
    from nextstate.proxy.settings import MemorySettings

    assert not memory_settings(arm("combined"), BenchConfig()).enabled
    default = memory_settings(arm("memory+combined"), BenchConfig())
    assert default.enabled and default.lessons == MemorySettings().lessons
    assert memory_settings(arm("memory"), BenchConfig(memory_lessons=3)).lessons == 3


async def test_between_steps_a_memory_arm_checks_every_lesson_due():
    """Rounds of 8 checks until a round checks nothing: every lesson due is checked
    against the new adapter, as a deployed learner (a round a second) would."""
    from types import SimpleNamespace

    from nextstate.experiment.run import _check_every_lesson

    class Learner:
        def __init__(self, due: int) -> None:
            self.retirement = SimpleNamespace(checks=0)
            self.due, self.rounds = due, 0

        async def check_lessons(self) -> int:
            checked = min(8, self.due)
            self.due -= checked
            self.retirement.checks += checked
            self.rounds += 1
            return 0

    learner = Learner(due=20)
    await _check_every_lesson(learner)  # type: ignore[arg-type]
    assert (learner.due, learner.retirement.checks, learner.rounds) == (0, 20, 4)
    without = Learner(due=5)
    without.retirement = None  # type: ignore[assignment]
    await _check_every_lesson(without)  # type: ignore[arg-type]
    assert without.rounds == 0
