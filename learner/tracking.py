"""Experiment tracking: every training step's numbers and each version's name, logged to
Weights & Biases, MLflow or TensorBoard (store -> learner -> trainer -> publish;
learner -> tracker, ``nextstate learn --track``).

Each tracker is an observer (`observers.Observer`) holding one run for the learner's
lifetime: at each step it logs the step's numbers (``step/loss``, ``step/kl``,
``step/clip_fraction``, ``step/tokens_per_second``, ``step/reward_mean``, ...), where the
turns are (``turns/ready``, ``turns/trained``, ...) and the mean reward of judged turns,
at the step's index (1, 2, ...); a published step also logs its version's name. The run
is named after the policy and the time, and carries the learner's settings as its
config. The libraries are optional (``pip install 'nextstate[track]'``) and imported
only here, when a tracker is made: the proxy never imports them.

    wandb        a W&B run (online with a W&B login; WANDB_MODE=offline writes it under
                 DIR/wandb, for ``wandb sync`` later); the name is the ``version_name``
                 column of the run's history
    mlflow       a run in the experiment "nextstate" at MLFLOW_TRACKING_URI, else in a
                 local file store, DIR/mlruns (``mlflow ui --backend-store-uri ...``);
                 names are tags ``version.0001``, ... and ``version``
    tensorboard  event files under DIR/tensorboard/<run> (``tensorboard --logdir``);
                 names are the text summary ``version``
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

from nextstate.learner.observers import Report, Step

TrackKind = Literal["wandb", "mlflow", "tensorboard"]
PROJECT = "nextstate"
_NOT_NUMBERS = frozenset({"version", "user", "at"})


class TrackingUnavailable(RuntimeError):
    """The tracker's library is not installed."""


def step_metrics(step: Step, report: Report) -> dict[str, float]:
    """What a step logs: its numbers (``step/...``), where the turns are (``turns/...``),
    and the judged turns' mean reward."""
    out: dict[str, float] = {"step/published": 1.0 if step.get("outcome") == "published"
                             else 0.0}
    numbers = {k: v for k, v in step.items() if k not in _NOT_NUMBERS}
    numbers.update(step.get("extra") or {})
    for key, value in numbers.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f"step/{key}"] = float(value)
    for key, value in (report.get("counts") or {}).items():
        out[f"turns/{key}"] = float(value)
    mean = (report.get("rewards") or {}).get("mean")
    if mean is not None:
        out["reward/mean"] = float(mean)
    return out


def _missing(library: str) -> TrackingUnavailable:
    return TrackingUnavailable(f"{library} is not installed: pip install 'nextstate[track]'")


class WandbTracker:
    def __init__(self, directory: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb") from exc
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT),
                              dir=str(directory), name=run_name, config=config,
                              reinit="create_new",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.steps = 0

    def step(self, step: Step, report: Report) -> None:
        self.steps += 1
        data: dict[str, Any] = dict(step_metrics(step, report))
        if step.get("outcome") == "published" and step.get("name"):
            data["version_name"] = step["name"]
            self.run.summary["version_name"] = step["name"]
        self.run.log(data, step=self.steps)

    def round(self, report: Report) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, directory: Path, run_name: str, config: dict[str, Any]) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store in "maintenance mode" and refuses it unless
            # told; a local run needs no database server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            (directory / "mlruns").mkdir(parents=True, exist_ok=True)
            uri = (directory / "mlruns").resolve().as_uri()
        try:
            from mlflow import entities
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow") from exc
        self.entities = entities
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(PROJECT))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.log_batch(self.run_id, params=[
            self.entities.Param(key, str(value)) for key, value in config.items()])
        self.steps = 0

    def step(self, step: Step, report: Report) -> None:
        self.steps += 1
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.entities.Metric(key, value, now, self.steps)
            for key, value in step_metrics(step, report).items()])
        if step.get("outcome") == "published" and step.get("name"):
            self.client.set_tag(self.run_id, f"version.{self.steps:04d}", step["name"])
            self.client.set_tag(self.run_id, "version", step["name"])

    def round(self, report: Report) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TensorBoardTracker:
    def __init__(self, directory: Path, run_name: str, config: dict[str, Any]) -> None:
        try:
            import tensorboard  # noqa: F401 (torch's writer needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard") from exc

        self.writer = SummaryWriter(log_dir=str(directory / "tensorboard" / run_name))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
        self.steps = 0

    def step(self, step: Step, report: Report) -> None:
        self.steps += 1
        for key, value in step_metrics(step, report).items():
            self.writer.add_scalar(key, value, self.steps)
        if step.get("outcome") == "published" and step.get("name"):
            self.writer.add_text("version", str(step["name"]), self.steps)
        self.writer.flush()

    def round(self, report: Report) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}


def make_tracker(kind: TrackKind, directory: Path, run_name: str,
                 config: dict[str, Any]) -> WandbTracker | MlflowTracker | TensorBoardTracker:
    """A tracker of ``kind`` writing under ``directory`` (a run named ``run_name``);
    `TrackingUnavailable` when its library is missing."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r} (wandb, mlflow or tensorboard)")
    return TRACKERS[kind](directory, run_name, config)  # type: ignore[return-value]


def run_name(policy: str) -> str:
    return f"{policy}-{time.strftime('%Y%m%d-%H%M%S')}"
