"""One set of runtime versions everywhere: requirements.in (what the code supports) and
requirements.txt (what runs, pinned) agree, the lock is closed, and this environment runs it."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]


def pins() -> dict[str, str]:
    out = {}
    for line in _lines(ROOT / "requirements.txt"):
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version
    return out


def runtime_requirements() -> list[Requirement]:
    return [Requirement(line) for line in _lines(ROOT / "requirements.in") if line and not line.startswith("-")]


def test_every_install_takes_the_pinned_file():
    assert "-r requirements.txt" in _lines(ROOT / "requirements-dev.txt")  # CI: make install
    assert "requirements.txt" not in _lines(ROOT / ".funcignore")  # the Functions remote build installs it
    assert 'dependencies = { file = ["requirements.in"] }' in (ROOT / "pyproject.toml").read_text()


def test_every_runtime_requirement_is_pinned_inside_its_range():
    locked = pins()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in requirements.in but not pinned: rerun scripts/lock-requirements.py"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"{req.name}=={locked[name]} is outside requirements.in's {req.specifier}"


def test_the_lock_is_closed_and_this_environment_runs_it():
    """Each pinned package's own requirements are pinned too, at versions it accepts; installed = pinned."""
    locked = pins()
    for name, version in locked.items():
        installed = metadata.version(name)
        assert installed == version, f"{name}: {installed} installed, {version} pinned (install with the lock)"
        for text in metadata.distribution(name).requires or ():
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in locked, f"{name} needs {req.name}, which requirements.txt does not pin"
            assert req.specifier.contains(locked[dep], prereleases=True), f"{name} needs {req}, pinned {locked[dep]}"


def test_the_lock_script_writes_the_committed_file_from_this_environment(tmp_path):
    out = tmp_path / "requirements.txt"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "lock-requirements.py"), str(out)], check=True,
                   capture_output=True)
    assert out.read_text(encoding="utf-8") == (ROOT / "requirements.txt").read_text(encoding="utf-8")
