"""Experiment tracking writes real runs, read back with each library's own reader: a W&B
offline run (its .wandb file, record by record), an MLflow file store (MlflowClient),
TensorBoard event files (TensorBoard's EventAccumulator)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from nextstate.learner.tracking import make_tracker, step_metrics

REPORT = {"counts": {"ready": 2, "trained": 8}, "rewards": {"mean": -0.25}}
STEPS = [
    {"version": 1, "name": "p@000001", "policy": "p", "outcome": "published", "loss": 0.9,
     "kl": 0.05, "clip_fraction": 0.1, "tokens_per_second": 800.0, "turns": 4, "user": None,
     "at": 1.0, "extra": {"lr_scale": 1.0}},
    {"version": None, "name": None, "policy": "p", "outcome": "refused", "loss": 0.7,
     "kl": 3.0, "clip_fraction": 0.4, "tokens_per_second": 700.0, "turns": 4, "user": None,
     "at": 2.0, "extra": {"lr_scale": 0.25}},
    {"version": 3, "name": "p@000003", "policy": "p", "outcome": "published", "loss": 0.5,
     "kl": 0.04, "clip_fraction": 0.2, "tokens_per_second": 900.0, "turns": 4, "user": None,
     "at": 3.0, "extra": {"lr_scale": 0.5}},
]
CONFIG = {"policy": "p", "method": "combined", "batch_turns": 4}


def track(kind: str, directory: Path) -> None:
    tracker = make_tracker(kind, directory, "p-test", CONFIG)  # type: ignore[arg-type]
    for step in STEPS:
        tracker.step(step, REPORT)
        tracker.round(REPORT)
    tracker.close()


def test_a_step_logs_its_numbers_where_the_turns_are_and_the_reward():
    logged = step_metrics(STEPS[0], REPORT)
    assert logged["step/loss"] == 0.9 and logged["step/kl"] == 0.05
    assert logged["step/lr_scale"] == 1.0 and logged["step/published"] == 1.0
    assert logged["turns/trained"] == 8.0 and logged["reward/mean"] == -0.25
    assert "step/version" not in logged and "step/at" not in logged
    assert step_metrics(STEPS[1], {})["step/published"] == 0.0


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (LevelDB's log format: 32 KiB blocks of records,
    each a 7-byte header, checksum, length and type, split across blocks when long)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # padding to the end of the block
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(directory: Path, timeout: float = 30.0) -> tuple[list[dict], dict]:
    """(each logged row, the run's config) of the one offline run under ``directory``.
    wandb-core writes the file in a process of its own, and ``finish()`` can return
    before the last records are on disk (seen once: no history yet): read it once the
    run's exit record is there."""
    [path] = directory.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
        except Exception:  # a record half written: read again
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rows, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return rows, config


def test_wandb_writes_an_offline_run_with_every_step_and_the_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    track("wandb", tmp_path)
    rows, config = wandb_history(tmp_path)
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert [row["step/loss"] for row in rows] == [0.9, 0.7, 0.5]
    assert [row.get("version_name") for row in rows] == ["p@000001", None, "p@000003"]
    assert rows[2]["turns/trained"] == 8 and config["method"] == "combined"


def test_mlflow_writes_a_run_to_a_local_file_store(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")  # (so that what the tracker sets is undone after)
        monkeypatch.delenv(name)
    track("mlflow", tmp_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("nextstate").experiment_id])
    assert run.info.run_name == "p-test" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step/kl")
            ] == [(1, 0.05), (2, 3.0), (3, 0.04)]
    assert run.data.params["batch_turns"] == "4"
    assert {k: v for k, v in run.data.tags.items() if k.startswith("version")} == {
        "version.0001": "p@000001", "version.0003": "p@000003", "version": "p@000003"}


def test_tensorboard_writes_event_files_tensorboard_reads(tmp_path):
    track("tensorboard", tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "p-test"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [
        (1, pytest.approx(0.9)), (2, pytest.approx(0.7)), (3, pytest.approx(0.5))]
    assert [(e.step, e.tensor_proto.string_val[0].decode())
            for e in events.Tensors("version/text_summary")] == [(1, "p@000001"),
                                                                 (3, "p@000003")]
