"""Adapter directories on disk (learner -> publish): a version's directory is deleted
only when it is past the newest ``keep``, is not loaded anywhere, and lies in the
adapters folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextstate.core.lora import AdapterStatus
from nextstate.learner.publish import install, prune


def versions(adapters_dir: Path, statuses: list[AdapterStatus]) -> list[dict[str, Any]]:
    rows = []
    for version, status in enumerate(statuses, start=1):
        name = f"p@{version:06d}"
        (adapters_dir / name).mkdir(parents=True)
        rows.append({"version": version, "name": name, "status": status,
                     "path": str(adapters_dir / name)})
    return rows


def test_prune_keeps_the_newest_and_every_loaded_version(tmp_path: Path) -> None:
    S = AdapterStatus
    rows = versions(tmp_path, [S.PREVIOUS, S.UNLOADED, S.UNLOADED, S.FAILED, S.UNLOADED,
                               S.PREVIOUS, S.CURRENT])
    deleted = prune(tmp_path, rows, keep=3)
    # The newest three stay; of the older ones, those still loaded (previous) stay too.
    assert deleted == ["p@000004", "p@000003", "p@000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p@000001", "p@000005", "p@000006", "p@000007"]
    assert prune(tmp_path, rows, keep=3) == []  # nothing left to delete: no error


def test_prune_never_deletes_outside_the_adapters_folder(tmp_path: Path) -> None:
    adapters_dir, elsewhere = tmp_path / "adapters", tmp_path / "elsewhere"
    rows = versions(adapters_dir, [AdapterStatus.UNLOADED, AdapterStatus.CURRENT])
    (elsewhere / "p@000001").mkdir(parents=True)
    (elsewhere / "p@000001" / "adapter_model.safetensors").write_bytes(b"weights")
    rows[0]["path"] = str(elsewhere / "p@000001")  # e.g. a store moved between machines
    assert prune(adapters_dir, rows, keep=1) == []
    assert (elsewhere / "p@000001" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (adapters_dir / "p@000001").is_dir()  # not the row's path: left alone too


def test_install_moves_the_staged_directory_into_place_replacing_a_leftover(
        tmp_path: Path) -> None:
    staged = tmp_path / ".staging-p@000002"
    staged.mkdir()
    (staged / "w").write_text("new")
    (tmp_path / "p@000002").mkdir()
    (tmp_path / "p@000002" / "w").write_text("left by a killed learner")
    final = install(staged, tmp_path, "p@000002")
    assert final == tmp_path / "p@000002" and (final / "w").read_text() == "new"
    assert not staged.exists()
