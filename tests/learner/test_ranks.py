"""Rank 0 drives, the other ranks follow (gloo, CPU): a learner's sequence of trainer
calls made through `Leader` on two processes ends with the same adapter on both ranks as
the same calls on one process."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nextstate.learner import ranks
from nextstate.learner.trainer import Trainer
from tests.learner.test_distributed import CONFIG, batch, train


def _rank(rank: int, world: int, model: str, shard: bool, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    ranks.join("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 0:
            trainer = ranks.make_trainer(Path(model), replace(CONFIG, shard=shard))
            assert isinstance(trainer, ranks.Leader)
            train(trainer, Path(out))  # type: ignore[arg-type]
            ranks.stop()
            trainer.trainer.full_lora()  # sharded, the gather below takes both ranks
        else:
            follower = ranks.follow()
            assert follower is not None
            # What this rank holds: its whole copy, or its shard gathered.
            torch.save({k.replace(".default", ""): v
                        for k, v in follower.full_lora().items()}, Path(out) / "rank1.pt")
    finally:
        ranks.leave()


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp"])
def test_the_other_ranks_make_rank_0s_calls(toy_model, tmp_path, shard):
    single = Trainer(toy_model, CONFIG)
    train(single, tmp_path / "single")

    (tmp_path / "two").mkdir()
    mp.spawn(_rank, args=(2, str(toy_model), shard, str(tmp_path / "init"),
                          str(tmp_path / "two")), nprocs=2, join=True)
    expected = load_file(tmp_path / "single" / "two" / "adapter_model.safetensors")
    published = load_file(tmp_path / "two" / "two" / "adapter_model.safetensors")
    follower = torch.load(tmp_path / "two" / "rank1.pt")
    for key in expected:  # tolerance: see test_distributed
        torch.testing.assert_close(published[key], expected[key], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(follower[key], published[key], atol=1e-6, rtol=0)


def test_alone_the_learner_has_a_plain_trainer(toy_model):
    assert ranks.start() is None  # no WORLD_SIZE: not launched as one of several
    assert type(ranks.make_trainer(toy_model, CONFIG)) is Trainer


def _mismatch(rank: int, world: int, model: str, init_file: str, wrong: str,
              out: str) -> None:
    """Rank 0 loads an adapter of the wrong LoRA rank (refused on every rank alike), then
    goes on training."""
    torch.set_num_threads(1)
    ranks.join("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 0:
            trainer = ranks.make_trainer(Path(model), CONFIG)
            with pytest.raises(ValueError, match="LoRA rank"):
                trainer.load(Path(wrong))
            trainer.step(batch())
            trainer.save(Path(out))
            ranks.stop()
        else:
            follower = ranks.follow()
            assert follower is not None
            torch.save(follower.full_lora(), Path(out) / "rank1.pt")
    finally:
        ranks.leave()


def test_an_error_every_rank_meets_alike_is_raised_and_the_ranks_go_on(toy_model, tmp_path):
    wrong = Trainer(toy_model, replace(CONFIG, lora_rank=4)).save(tmp_path / "rank4")
    mp.spawn(_mismatch, args=(2, str(toy_model), str(tmp_path / "init"), str(wrong),
                              str(tmp_path)), nprocs=2, join=True)
    published = load_file(tmp_path / "adapter_model.safetensors")
    follower = torch.load(tmp_path / "rank1.pt")
    for key, value in follower.items():  # still in step
        torch.testing.assert_close(published[key.replace(".default", "")], value,
                                   atol=1e-6, rtol=0)


def _one_fails(rank: int, world: int, model: str, init_file: str) -> None:
    torch.set_num_threads(1)
    ranks.join("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 0:
        trainer = ranks.make_trainer(Path(model), CONFIG)
        trainer.mark("fresh")
        trainer.step(batch())  # waits for rank 1 in vain, until stopped (as torchrun does)
        raise AssertionError("rank 0 went on alone")

    def out_of_memory(self: Trainer, name: str) -> None:
        raise RuntimeError("CUDA out of memory (on this rank only)")

    Trainer.mark = out_of_memory  # type: ignore[method-assign]
    ranks.follow()
    raise AssertionError("rank 1 went on after failing")


def test_a_rank_that_fails_otherwise_ends_its_process(toy_model, tmp_path):
    """Rather than go on out of step with the others; its launcher then stops them."""
    with pytest.raises(mp.ProcessExitedException) as ended:
        mp.spawn(_one_fails, args=(2, str(toy_model), str(tmp_path / "init")), nprocs=2,
                 join=True)
    assert ended.value.error_index == 1 and ended.value.exit_code == 1


def test_status_says_how_many_processes_train():
    from nextstate.cli.learn import render_status

    report = {"state": "idle", "counts": {}, "method": "combined"}
    assert "processes" not in render_status({**report, "ranks": 1})
    assert "training on 2 processes (FSDP)" in render_status(
        {**report, "ranks": 2, "sharded": True})
    assert ranks.world_size() == 1  # alone


def test_the_launched_learner_runs_a_round_and_every_rank_exits_cleanly(tmp_path):
    """The README's launch line, on two CPU processes: a round of work (nothing to do
    here), then rank 0 lets its follower go and both leave the group with exit code 0."""
    import subprocess
    import sys

    nextstate = str(Path(sys.executable).parent / "nextstate")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "--no-python", nextstate, "learn", "--backend", "http://127.0.0.1:9",
         "--store", f"sqlite:///{tmp_path}/s.db", "--no-train", "--once"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0 of 2" in done.stderr and "rank 1 of 2" in done.stderr


def _leave(rank: int, world: int, tmp: str) -> None:
    """Twice: both ranks leave (rank 1 1.5 s late), then rank 1 never comes."""
    import json
    import os
    import time

    ranks.LEAVE_TIMEOUT = datetime.timedelta(seconds=2)
    for case in ("together", "one-never-comes"):
        ranks.join("gloo", init_method=f"file://{tmp}/init-{case}", rank=rank, world_size=world)
        dist.broadcast_object_list(["a call"], src=0)  # in flight as rank 0 leaves
        left = Path(tmp) / f"{case}.json"
        if rank == 1 and case == "together":
            time.sleep(1.5)
            ranks.leave()
        elif rank == 1:  # exits (without leaving) only once rank 0 has left
            while not left.exists():
                time.sleep(0.05)
            os._exit(0)
        else:
            start = time.monotonic()
            ranks.leave()
            left.write_text(json.dumps({"seconds": time.monotonic() - start,
                                        "initialized": dist.is_initialized()}))


def test_the_ranks_leave_together_and_a_missing_one_costs_the_timeout(tmp_path):
    """Leaving waits for every rank (so none closes a connection under another's last
    message), and for a rank that never comes only `LEAVE_TIMEOUT`, not forever."""
    import json

    mp.spawn(_leave, args=(2, str(tmp_path)), nprocs=2, join=True)
    together = json.loads((tmp_path / "together.json").read_text())
    assert together["seconds"] > 1.0 and not together["initialized"]  # waited for rank 1
    alone = json.loads((tmp_path / "one-never-comes.json").read_text())
    assert 1.5 < alone["seconds"] < 20 and not alone["initialized"]  # the timeout (2 s)


def _gloo_threads() -> list[str]:
    """The names of this process's threads that belong to gloo (Linux names them)."""
    tasks = Path("/proc/self/task")
    return [name for task in tasks.iterdir()
            if "gloo" in (name := (task / "comm").read_text().strip())]


def _leave_frees(rank: int, world: int, model: str, shard: bool, tmp: str) -> None:
    import json

    torch.set_num_threads(1)
    ranks.join("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    during = _gloo_threads()
    # Loading the model imports torch.distributed.nn (transformers, through
    # torch._dynamo), and FSDP makes a device mesh: both would hold on to the group.
    trainer = Trainer(Path(model), replace(CONFIG, shard=shard))
    trainer.step(batch())
    del trainer
    ranks.leave()
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(
        {"during": during, "after": _gloo_threads()}))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                    reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp"])
def test_leaving_frees_the_group_so_no_gloo_thread_outlives_it(toy_model, tmp_path, shard):
    """After `leave`, the process group is gone, its threads with it: none is left for
    the interpreter to tear down at exit (which now and then aborted the process)."""
    import json

    mp.spawn(_leave_frees, args=(2, str(toy_model), shard, str(tmp_path)), nprocs=2,
             join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["during"]  # the check can see gloo's threads...
        assert seen["after"] == []  # ...and after leaving there are none
