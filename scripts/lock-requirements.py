"""Write requirements.txt: every runtime dependency (requirements.in and all it pulls in) pinned to
the version installed in this environment.

Why: requirements.in states ranges (what the code supports); the Function App (its remote build
installs requirements.txt), CI (``make install``) and the worker-bundle check must all run the one
set of versions the tests passed on. Rerun after changing requirements.in:

    .venv/bin/python scripts/lock-requirements.py [OUTPUT, default requirements.txt]

tests/test_dependency_lock.py fails when requirements.in and requirements.txt drift apart.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Every runtime dependency pinned: the Function App, CI and the worker-bundle check install this
# file. Written by scripts/lock-requirements.py from the environment the tests passed in (Python
# {python}, Linux). requirements.in says what the code supports; this file says what runs. Do not
# edit by hand: change requirements.in, reinstall, rerun the script. Why each: docs/dependencies.md.
"""


def requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a requirements file (options such as -c and comments skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Installed name -> version of the roots and everything they require here (markers evaluated)."""
    found: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[Requirement, tuple[str, ...]]] = [(r, ()) for r in roots]
    while todo:
        req, extras = todo.pop()  # extras: those of the requirement that pulled this one in
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
            continue
        name = canonicalize_name(req.name)
        if (name, tuple(sorted(req.extras))) in seen:
            continue
        seen.add((name, tuple(sorted(req.extras))))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required but not installed: install requirements.in first")
        found[name] = dist.version
        for text in dist.requires or ():
            todo.append((Requirement(text), tuple(req.extras)))
    return found


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "requirements.txt"
    pins = closure(requirements(ROOT / "requirements.in"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = [HEADER.format(python=python)] + [f"{name}=={version}\n" for name, version in sorted(pins.items())]
    out.write_text("".join(lines), encoding="utf-8")
    print(f"{out.name}: {len(pins)} packages pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
