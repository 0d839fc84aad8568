"""Personal adapters on the learner's side: lanes, one trainer swapping adapters, publish
and housekeeping per policy (toy model on CPU, a fake vLLM)."""

from __future__ import annotations

import httpx
import pytest

from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.learner.judgment import Judgment
from nextstate.learner.personal import Lane, full_lanes, personal_adapters
from nextstate.learner.trainer import Trainer, TrainerConfig
from nextstate.learner.training import TrainingConfig, TrainingStage
from tests.learner.test_store import turn
from tests.proxy.fake_vllm import FakeVLLM


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def judged(store: Store, users: list[str | None], start: int = 0) -> list[str]:
    turns = [turn(start + i) for i in range(len(users))]
    for t, user in zip(turns, users, strict=True):
        t.user = user
    store.turns.write(turns)
    for t in turns:
        store.judgments.save(t.turn_id, Judgment(score=-1))
    return [t.turn_id for t in turns]


def test_without_personal_adapters_there_is_one_lane(store):
    judged(store, ["alice"] * 3 + [None])
    assert full_lanes(store.judgments, "p", "binary", 4, None) == [Lane("p")]
    assert full_lanes(store.judgments, "p", "binary", 5, None) == []


def test_lanes_with_a_full_batch_come_most_waiting_first(store):
    judged(store, ["alice"] * 3 + ["bob"] * 4 + ["carol", None])
    # alice and bob have their own lane; carol (one turn) and nobody share.
    assert full_lanes(store.judgments, "p", "binary", 2, 3) == [
        Lane("p~bob", "bob"), Lane("p~alice", "alice"), Lane("p")]
    assert full_lanes(store.judgments, "p", "binary", 4, 3) == [Lane("p~bob", "bob")]


async def test_each_lane_trains_its_own_adapter_with_one_trainer(store, toy_model, tmp_path,
                                                                 monkeypatch):
    built, loads = [], []
    real_init, real_load = Trainer.__init__, Trainer.load

    def init(self, *args, **kwargs):
        built.append(args)
        real_init(self, *args, **kwargs)

    def load(self, directory):
        loads.append(directory.name)
        real_load(self, directory)

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(Trainer, "load", load)
    fake = FakeVLLM()
    admin = VLLMClient("http://vllm", http=httpx.AsyncClient(
        transport=httpx.MockTransport(fake)))
    config = TrainingConfig(trainer=TrainerConfig(method="binary", batch_turns=2),
                            personal_min_turns=3, keep=1, unload_grace=0.0)
    stage = TrainingStage(store, toy_model, "p", [admin], tmp_path / "adapters", config)
    ids = judged(store, ["alice", None, "alice", "bob", "alice", "alice"])

    results = []
    while (result := await stage.maybe_step()) is not None:
        results.append(result)
        await stage.housekeeping()
    await admin.aclose()

    names = [r.name for r in results]
    assert [r.outcome for r in results] == ["published"] * 3
    # alice's 4 turns wait most: her lane goes first, starting from a fresh LoRA as no
    # shared adapter exists yet; then the shared lane (nobody's and bob's turns).
    assert names == ["p~alice@000001", "p@000002", "p~alice@000003"]
    assert len(built) == 1  # one trainer for every lane
    assert loads == ["p~alice@000001"]  # swapped back in for alice's second step
    trained = {t: store.judgments.get(t)["trained_version"] for t in ids}
    assert trained == {"t0": 1, "t1": 2, "t2": 1, "t3": 2, "t4": 3, "t5": 3}
    assert personal_adapters(store.adapters, "p") == {"alice": "p~alice@000003"}
    assert {n: s for n, s in ((a["name"], a["status"]) for a in store.adapters.versions())} == {
        "p~alice@000001": "unloaded", "p@000002": "current", "p~alice@000003": "current"}
    # housekeeping keeps `keep` directories per policy, never the current ones
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        "p@000002", "p~alice@000003"]
    assert {"p@000002", "p~alice@000003"} <= fake.loaded


async def test_a_users_first_adapter_starts_from_the_shared_one(store, toy_model, tmp_path,
                                                               monkeypatch):
    loads = []
    real_load = Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self, d: (loads.append(d.name),
                                                          real_load(self, d)))
    fake = FakeVLLM()
    admin = VLLMClient("http://vllm", http=httpx.AsyncClient(
        transport=httpx.MockTransport(fake)))
    config = TrainingConfig(trainer=TrainerConfig(method="binary", batch_turns=2),
                            personal_min_turns=2)
    stage = TrainingStage(store, toy_model, "p", [admin], tmp_path / "adapters", config)
    judged(store, [None, None])
    shared = await stage.maybe_step()
    judged(store, ["alice", "alice"], start=2)
    mine = await stage.maybe_step()
    await admin.aclose()
    assert (shared.name, mine.name) == ("p@000001", "p~alice@000002")
    assert loads == ["p@000001"]  # alice's lane began from the shared weights


def test_status_lists_each_users_adapter():
    from nextstate.cli.learn import render_status

    report = {"state": "idle", "counts": {}, "personal_after": 16,
              "personal": {"alice": "p~alice@000003", "bob": "p~bob@000004"}}
    assert ("personal  2 users with their own adapter (after 16 judged turns): "
            "alice (p~alice@000003), bob (p~bob@000004)") in render_status(report)
    assert "personal" not in render_status({"state": "idle", "counts": {}})
