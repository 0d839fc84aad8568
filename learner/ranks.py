"""Several training processes for one learner (learner -> trainer, on every rank).

``torchrun --nproc-per-node N --no-python nextstate learn ...`` (any launcher that sets
torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts N copies
of the learner. Rank 0 is the
learner proper: it reads the store, judges, asks the teacher, publishes. The other ranks
only train: each holds a `Trainer` and makes the calls rank 0's trainer makes, in the
same order, with the same arguments. Rank 0 broadcasts each call before making it
(`Leader`), the others wait for the next one (`follow`), and the collective operations
inside the calls (the gradient sum, FSDP's gathers) meet.

A call is small (a batch's token ids, a directory name), so the broadcast costs nothing
next to the step. The adapter directories must be visible to every rank (one node, or a
shared file system).

Failures: a call that fails the same way on every rank before any communication (a
`ValueError`: an adapter that does not fit) is raised on rank 0 and logged on the others,
and all go on. Any other failure (out of memory on one GPU, say) would leave the ranks out
of step, waiting in different collectives, so the rank that meets it exits at once;
torchrun then stops the others (``--max-restarts`` starts them all again) and nothing is
lost: the learner's state is in the store. Between calls rank 0 says it is alive
(`keep_alive`, every learner round), so an idle learner does not time its followers out.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nextstate.learner import sharding
from nextstate.learner.items import TrainItem
from nextstate.learner.trainer import StepStats, Trainer, TrainerConfig

log = logging.getLogger("nextstate.learner.ranks")
T = TypeVar("T")
# How long a rank waits in a collective before giving up: longer than a learner round
# (judging a backlog) can take, while the followers wait for rank 0's next call.
TIMEOUT = datetime.timedelta(hours=1)
# How long leaving waits for the other ranks to come to leave too.
LEAVE_TIMEOUT = datetime.timedelta(seconds=30)


def start() -> int | None:
    """Join the process group when launched as one of several (WORLD_SIZE > 1); returns
    this process's rank, or None when it runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        join()
    rank = dist.get_rank()
    log.info("rank %d of %d (%s)%s", rank, dist.get_world_size(), dist.get_backend(),
             "" if rank else ": the learner; the other ranks follow its trainer")
    return rank


def join(backend: str | None = None, **init: Any) -> None:
    """Join the process group: ``dist.init_process_group`` with ``init`` (torchrun's
    variables when there is none), NCCL on GPUs and gloo on CPUs unless ``backend`` says.

    `torch.distributed.nn` is imported first, on purpose. Its functions take
    ``group=group.WORLD`` as a default argument, evaluated when the module is imported.
    Imported after joining (transformers imports it, through torch._dynamo, as the
    trainer loads the model), those defaults hold the joined group for the rest of the
    process: `leave` could not free it, its gloo threads outlived it, and the
    interpreter tore them down at exit, which now and then aborted the process (SIGABRT,
    "terminate called without an active exception", about one full test run in ten)."""
    import torch.distributed.nn  # noqa: F401  (before joining: see above)

    # A rank killed by a signal (an abort in a communication thread) prints where every
    # thread of it was, so the log of a launcher that restarts it says what happened.
    faulthandler.enable()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, **init)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def several() -> bool:
    return world_size() > 1


def make_trainer(model_dir: Path, config: TrainerConfig) -> Trainer | Leader:
    """The learner's trainer: a plain `Trainer`, or rank 0's `Leader` of several."""
    return Leader(model_dir, config) if several() else Trainer(model_dir, config)


def keep_alive() -> None:
    """Rank 0, between calls: the followers' wait for the next call starts again."""
    if several():
        _send("alive")


class Leader:
    """Rank 0's trainer: each call is sent to the other ranks, then made here."""

    def __init__(self, model_dir: Path, config: TrainerConfig) -> None:
        _send("init", model_dir, config)
        self.trainer = _guarded("init", Trainer, model_dir, config)
        self.config = config

    def step(self, items: Sequence[TrainItem], lr_scale: float = 1.0) -> StepStats:
        _send("step", list(items), lr_scale)
        return _guarded("step", self.trainer.step, items, lr_scale)

    def save(self, directory: Path, stats: StepStats | None = None) -> Path:
        _send("save", directory)  # every rank gathers its part; rank 0 writes
        return _guarded("save", self.trainer.save, directory, stats)

    def load(self, directory: Path) -> None:
        _send("load", directory)
        _guarded("load", self.trainer.load, directory)

    def mark(self, name: str) -> None:
        _send("mark", name)
        _guarded("mark", self.trainer.mark, name)

    def rewind(self, name: str) -> None:
        _send("rewind", name)
        _guarded("rewind", self.trainer.rewind, name)


def follow() -> Trainer | None:
    """A rank other than 0: make rank 0's trainer calls until it says stop; returns the
    trainer as the calls left it."""
    trainer: Trainer | None = None
    while True:
        call, args = _receive()
        if call == "stop":
            return trainer
        if call == "alive":
            continue
        if call == "init":
            trainer = _guarded(call, Trainer, *args)
            continue
        assert trainer is not None, f"{call} before init"
        try:
            _guarded(call, getattr(trainer, call), *args)
        except ValueError:  # rank 0 met the same error (same call, same data) and goes on
            log.exception("rank %d: %s failed", dist.get_rank(), call)


def stop() -> None:
    """Rank 0, leaving: let the other ranks return."""
    if several():
        _send("stop")


def leave() -> None:
    """Every rank, last: leave the process group together.

    A process that exits still in the group can abort as its communication threads are
    torn down at exit (see `join`). The ranks first meet at a barrier, which every
    message sent before it has passed, so that none closes a connection under a message
    still in flight, and only then close. With gloo a rank that never comes costs
    `LEAVE_TIMEOUT`, not a hang (NCCL has no such barrier: it waits up to `TIMEOUT`,
    unless torchrun, seeing a rank fail, stops the others first, as it does)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=LEAVE_TIMEOUT)
        else:
            dist.barrier()
    except Exception as error:  # a rank gone already: leave anyway
        log.warning("rank %d: the other ranks did not all come to leave (%s); leaving",
                    dist.get_rank(), error)
    dist.destroy_process_group()
    sharding.release_groups()  # so that the group is freed now, not at exit


def _guarded(call: str, make: Callable[..., T], *args: Any) -> T:
    """``make(*args)``; a failure other than a `ValueError` ends the process (see above)."""
    try:
        return make(*args)
    except ValueError:
        raise
    except Exception:
        log.critical("rank %d: %s failed; ending this process, so that torchrun stops the "
                     "other ranks, which would otherwise wait for it", dist.get_rank(), call,
                     exc_info=True)
        logging.shutdown()
        os._exit(1)


def _send(call: str, *args: Any) -> None:
    dist.broadcast_object_list([(call, args)], src=0)


def _receive() -> tuple[str, tuple[Any, ...]]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    call, args = box[0]
    return str(call), tuple(args)
