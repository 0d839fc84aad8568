"""The persona's rating of a policy (experiment.traffic.evaluate): first replies to
held-out problems, asked with recording off, rated per reply and per preference."""

from __future__ import annotations

import json
import random

import httpx

from nextstate.core.sessions import MEMORY_HEADER
from nextstate.experiment.personas import load_personas
from nextstate.experiment.run import BenchConfig
from nextstate.experiment.styles import make_problem, make_reply
from nextstate.experiment.traffic import evaluate


async def test_a_rating_is_the_mean_score_and_how_often_each_preference_was_met() -> None:
    student = load_personas()["student"]  # casual, steps shown, detailed, encouragement
    rng = random.Random(0)
    problem = make_problem(rng)
    replies = [make_reply(problem, dict(student.prefers), rng),  # all four met
               make_reply(problem, {**student.prefers, "tone": "formal"}, rng)]  # three
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"choices": [
            {"index": i, "message": {"role": "assistant", "content": r}}
            for i, r in enumerate(replies)]})

    config = BenchConfig(eval_samples=2)
    async with httpx.AsyncClient(base_url="http://proxy/v1",
                                 transport=httpx.MockTransport(answer)) as client:
        score, met = await evaluate(client, "p", student, [problem] * 3, config)
        assert score == (1.0 + 0.75) / 2
        assert met == {"tone": 0.5, "steps": 1.0, "length": 1.0, "closing": 1.0}
        assert all(r.headers["X-NextState-Record"] == "off" for r in asked)
        assert not any(MEMORY_HEADER in r.headers for r in asked)
        assert not any("seed" in json.loads(r.content) for r in asked)

        asked.clear()
        await evaluate(client, "p", student, [problem] * 3, config, memory=False,
                       seeded=True)
        assert all(r.headers[MEMORY_HEADER] == "off" for r in asked)
        assert sorted(json.loads(r.content)["seed"] for r in asked) == [0, 1, 2]
