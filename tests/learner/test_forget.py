"""Forgetting a user's personal adapters on the learner's side: erased from disk and from
every vLLM, never loaded again, never trained on from, even when the user is forgotten
while the learner trains their adapter (toy model on CPU, a fake vLLM)."""

from __future__ import annotations

import httpx

from nextstate.core.lora import erase
from nextstate.core.store import Store
from nextstate.core.vllm import VLLMClient
from nextstate.learner.process import Learner, LearnerConfig
from nextstate.learner.trainer import Trainer, TrainerConfig
from nextstate.learner.training import TrainingConfig
from tests.learner.test_personal import judged
from tests.proxy.fake_vllm import FakeVLLM


def down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_erase_deletes_directories_and_unloads_from_every_backend_it_reaches(tmp_path):
    gone, odd = tmp_path / "p~alice@000002", tmp_path / "elsewhere"
    gone.mkdir()
    odd.mkdir()
    rows = [{"name": "p~alice@000002", "path": str(gone)},
            {"name": "p~alice@000003", "path": str(odd)}]  # not its own directory: kept
    fake, other = FakeVLLM(), FakeVLLM()
    fake.loaded = {"p~alice@000002", "p~alice@000003", "p@000001"}
    vllms = [fake.client(), other.client("http://other"),
             VLLMClient("http://down", retries=0, http=httpx.AsyncClient(
                 transport=httpx.MockTransport(down)))]
    erased = await erase(rows, vllms)
    for vllm in vllms:
        await vllm.aclose()
    assert erased.directories == [str(gone)]
    assert not gone.exists() and odd.exists()
    assert erased.unloaded == {"http://vllm": ["p~alice@000002", "p~alice@000003"]}
    assert fake.loaded == {"p@000001"} and other.admin == []
    assert list(erased.unreachable) == ["http://down"] and not erased.complete


async def test_a_forgotten_users_adapters_go_and_they_start_again_from_the_shared_one(
        tmp_path, toy_model, fake, monkeypatch):
    loads = []
    real_load, real_step = Trainer.load, Trainer.step
    monkeypatch.setattr(Trainer, "load", lambda self, d: (loads.append(d.name),
                                                          real_load(self, d)))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    learner = Learner(LearnerConfig(
        store_url=url, backends=("http://vllm",), base_model="p", model_dir=toy_model,
        adapters_dir=tmp_path / "adapters", backend_api_key="k",
        training=TrainingConfig(trainer=TrainerConfig(method="binary", batch_turns=2),
                                personal_min_turns=2, unload_grace=0.0)))
    store, admin = learner.store, Store(url)

    def names() -> dict[str, str]:
        return {a["name"]: a["status"] for a in store.adapters.versions()}

    try:
        judged(store, [None, None])
        await learner.step()
        judged(store, ["alice", "alice"], start=2)
        await learner.step()
        assert names() == {"p@000001": "current", "p~alice@000002": "current"}
        assert fake.loaded == {"p@000001", "p~alice@000002"}

        # Forgotten with no backend at hand (the store alone, as the proxy's admin
        # endpoint or `nextstate forget` without --backend do it): the learner erases it
        # and its housekeeping never loads it again.
        assert [a["name"] for a in admin.retention.forget(user="alice").adapters] == [
            "p~alice@000002"]
        await learner.step()
        await learner.step()
        assert fake.loaded == {"p@000001"}
        assert not (tmp_path / "adapters" / "p~alice@000002").exists()
        assert [b["lora_name"] for p, b in fake.admin if p.endswith("/load_lora_adapter")] \
            == ["p@000001", "p~alice@000002"]

        # Alice comes back, and is forgotten again while her new adapter trains.
        def forgetting_step(self, items, lr_scale=1.0):
            stats = real_step(self, items, lr_scale)
            admin.retention.forget(user="alice")
            return stats

        monkeypatch.setattr(Trainer, "step", forgetting_step)
        judged(store, ["alice", "alice"], start=4)
        await learner.step()
        monkeypatch.setattr(Trainer, "step", real_step)
        assert names()["p~alice@000003"] == "forgotten"  # loaded into vLLM, never current
        assert "step discarded" in learner.status()["totals"]["recent_errors"][-1]
        await learner.step()
        assert fake.loaded == {"p@000001"}
        assert not (tmp_path / "adapters" / "p~alice@000003").exists()

        # Back once more: one turn trains the shared adapter, a second gives her a lane
        # again, starting from the shared weights (not from the trainer's discarded ones).
        judged(store, ["alice"], start=6)
        assert await learner.step() == 0
        judged(store, ["alice"], start=7)
        await learner.step()
        assert learner.status()["personal"] == {"alice": "p~alice@000004"}
        assert loads == ["p@000001", "p@000001", "p@000001"]
    finally:
        admin.close()
        await learner.close()
