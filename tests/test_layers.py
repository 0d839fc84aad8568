"""The import layers (DESIGN of issue 17): each package imports only the layers under it.

    core        stdlib, httpx, orjson, SQLAlchemy; nothing of nextstate above it
    proxy       core (+ starlette, uvicorn, httptools); never torch or the learner
    learner     core (+ torch, transformers, peft, litellm)
    adapters    core (framework client helpers)
    experiment  core, proxy, learner (it orchestrates the real stack)
    cli         everything

An AST walk over every module of each package, imports inside functions included (the
heavy imports of the CLI and the learner live there), relative imports resolved.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> (its package, the nextstate packages it may import besides itself)
LAYERS: dict[str, tuple[str, frozenset[str]]] = {
    "core": ("core", frozenset()),
    "proxy": ("proxy", frozenset({"core"})),
    "learner": ("learner", frozenset({"core"})),
    "adapters": ("adapters", frozenset({"core"})),
    "experiment": ("experiment", frozenset({"core", "proxy", "learner"})),
    "cli": ("cli", frozenset({"core", "proxy", "learner", "adapters", "experiment"})),
}
# The only third-party packages core may import: it is shared by the proxy (no torch,
# no starlette in the learner's way) and the learner (no web framework).
CORE_THIRD_PARTY = frozenset({"httpx", "orjson", "sqlalchemy"})
# What the proxy's own install never has (the base install: no torch, no model code).
NEVER_IN_PROXY = frozenset({"torch", "transformers", "peft", "safetensors", "tokenizers",
                            "litellm", "click", "matplotlib", "yaml", "wandb", "mlflow",
                            "tensorboard", "tensorboardX"})


def _imports(path: Path, package: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """Every module name ``path`` imports (line, dotted name), at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = ["nextstate", package, *path.relative_to(root / package).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    else:
        parts.pop()  # the module's own package
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _violations(folder: str) -> list[str]:
    package, allowed = LAYERS[folder]
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        where = path.relative_to(ROOT)
        for line, name in _imports(path, package):
            top, _, rest = name.partition(".")
            if top == "nextstate":
                layer = rest.partition(".")[0]
                if layer != package and layer not in allowed:
                    wrong.append(f"{where}:{line} imports {name}")
            elif top in sys.stdlib_module_names or top == "__future__":
                continue
            elif folder == "core" and top not in CORE_THIRD_PARTY:
                wrong.append(f"{where}:{line} imports {name} (core: only "
                             f"{', '.join(sorted(CORE_THIRD_PARTY))})")
            elif folder == "proxy" and top in NEVER_IN_PROXY:
                wrong.append(f"{where}:{line} imports {name} (not in the proxy's install)")
    return wrong


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_each_package_imports_only_the_layers_under_it(folder: str) -> None:
    assert (ROOT / folder).is_dir()
    assert _violations(folder) == []


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    """The check itself: a learner module reaching into the proxy from inside a function,
    or through a relative import, is found."""
    folder = tmp_path / "learner" / "sub"
    folder.mkdir(parents=True)
    module = folder / "m.py"
    module.write_text("def f():\n    from nextstate.proxy import app\n"
                      "from ...proxy.relay import stream\n")
    names = {name for _, name in _imports(module, "learner", root=tmp_path)}
    assert names == {"nextstate.proxy", "nextstate.proxy.relay"}



def _status_literals(source: str) -> list[tuple[int, str]]:
    """Adapter statuses spelled as strings and compared with a status (``row["status"]
    == "current"``, ``adapters.c.status == "failed"``, ``status in ("staged", ...)``)."""
    from nextstate.core.lora import AdapterStatus

    names = {s.value for s in AdapterStatus}

    def is_status(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "status") or (
            isinstance(node, ast.Name) and node.id == "status") or (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value == "status")

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(
                is_status(side) for side in (node.left, *node.comparators)):
            for side in ast.walk(node):
                if isinstance(side, ast.Constant) and side.value in names:
                    found.append((node.lineno, side.value))
    return found


def test_adapter_statuses_are_spelled_only_by_their_owner() -> None:
    """core/lora.py owns the adapter lifecycle: everyone else compares with
    ``AdapterStatus``, so a status can't drift between modules."""
    spelled = {str(path.relative_to(ROOT)): found for folder in LAYERS
               for path in sorted((ROOT / folder).rglob("*.py"))
               if path != ROOT / "core" / "lora.py"
               and (found := _status_literals(path.read_text()))}
    assert spelled == {}
    # The check itself finds such a spelling.
    assert sorted(_status_literals('old = [r for r in rows if r["status"] == "previous"]\n'
                                   'if status in ("staged", "x"): pass')) == [
        (1, "previous"), (2, "staged")]
