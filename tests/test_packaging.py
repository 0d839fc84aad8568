"""Packaging: the ``nextstate.*`` names install from the short folders, and the proxy's
own install never brings torch in."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


HEAVY = ("torch", "transformers", "wandb", "mlflow", "tensorboard")


def test_importing_the_proxy_does_not_import_torch_nor_the_trackers():
    code = ("import sys, nextstate.proxy.app, nextstate.cli, nextstate.adapters; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.packaging
def test_plain_install_into_a_fresh_venv_imports_without_torch(tmp_path):
    """``pip install .`` (not editable) of the base package: the three packages import
    under ``nextstate.*``, the CLI runs, torch is not installed, and the dashboard's
    files are in the package."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT)], check=True,
                   capture_output=True, text=True)
    check = ("import importlib.util, nextstate.proxy.app, nextstate.learner, "
             "nextstate.adapters, nextstate.core.store; "
             "assert importlib.util.find_spec('torch') is None; "
             "assert importlib.util.find_spec('proxy') is None; "
             "from nextstate.proxy.dashboard import page; "
             "assert set(page.load()) == set(page.FILES); print('ok')")
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
    cli = subprocess.run([env_dir / "bin" / "nextstate", "--help"], capture_output=True,
                         text=True)
    assert "export" in cli.stdout and cli.returncode == 0
    learn = subprocess.run([env_dir / "bin" / "nextstate", "learn", "--backend",
                            "http://127.0.0.1:9/v1"], capture_output=True, text=True)
    assert learn.returncode == 1 and "Traceback" not in learn.stderr
    assert "pip install 'nextstate[learner]'" in learn.stderr
