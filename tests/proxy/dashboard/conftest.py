"""A proxy with two tenants and an admin in front of a vLLM-shaped fake, with traffic,
judgments and adapter versions in its store (what the dashboard's endpoints read)."""

from __future__ import annotations

import pytest

from nextstate.core.store import Store
from tests.core.store.test_funnel import Verdict
from tests.proxy.fake_vllm import FakeVLLM
from tests.proxy.test_app import ALICE, BOB, KEYS, open_client, records


def ask(client, headers: dict, session: str, *messages: str, done: bool = False) -> None:
    history = []
    for i, text in enumerate(messages):
        history.append({"role": "user", "content": text})
        last = done and i == len(messages) - 1
        answer = client.post("/v1/chat/completions", json={"model": "toy", "messages": history},
                             headers={**headers, "X-Session-Id": session,
                                      **({"X-Session-Done": "1"} if last else {})})
        assert answer.status_code == 200
        history.append(answer.json()["choices"][0]["message"])


@pytest.fixture
def dash(tmp_path):
    """(client, store): alice has a session of two turns (the first judged -1 with a
    hint), bob one of one turn; the policy has versions 1 and 3, and alice's user
    "al" a personal version 2; bob (his tenant, as his user) a personal version 4."""
    with open_client(tmp_path, FakeVLLM(), policy="toy", adapter_poll_seconds=0.02,
                     **KEYS) as client:
        ask(client, {**ALICE, "X-NextState-User": "al"}, "a-1", "What is 2+2?",
            "No, just the number.", done=True)
        ask(client, BOB, "b-1", "Secret plans of bob", done=True)
        turns = records(client, 3)
        store = Store(f"sqlite:///{tmp_path}/s.db")
        first = next(t for t in turns if t["session_id"] == "a-1" and t["turn_index"] == 0)
        store.judgments.save(first["turn_id"], Verdict(-1, hints=("Answer with the number.",),
                                                       votes=(-1, -1, 0)),
                             teacher_logprobs=[[-0.1, -0.2, -0.3]])
        for version, policy in ((1, "toy"), (2, "toy~alice:al"), (3, "toy"), (4, "toy~bob")):
            name = f"{policy}@{version:06d}"
            store.adapters.stage(version, name, policy, f"/adapters/{name}",
                                 {"loss": 1.0 / version, "kl": 0.01, "turns": 4})
            store.adapters.publish(version, [], policy)
        yield client, store
        store.close()
