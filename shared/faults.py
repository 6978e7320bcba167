"""Fault-injection points: named places in each stage where a test pauses, slows or fails the process.

The reliability tests (``tests/test_faults.py``) kill the real CLI at a known point of every stage
(ingest, train, register, promote, score, SQL load) and rerun it; a real process needs a real place
to stop. ``MM_FAULT`` names the points and what happens there, comma-separated::

    MM_FAULT="promote.copied:pause"      write the marker file, then wait to be killed (600 s at most)
    MM_FAULT="promote.store:fail"        raise FaultInjected there
    MM_FAULT="serve.forecast:sleep:3"    sleep 3 s there, then go on

``pause`` writes ``<point> <pid>`` to the file ``MM_FAULT_MARKER`` (when set) so the test knows the
process got there. Unset (always, outside tests), :func:`point` is one environment lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "MM_FAULT"
MARKER_ENV = "MM_FAULT_MARKER"
PAUSE_SECONDS = 600.0


class FaultInjected(RuntimeError):
    """Raised at a point MM_FAULT says to fail (a stand-in for a crash, a full disk, a lost server)."""


def point(name: str) -> None:
    """Do what ``MM_FAULT`` asks at ``name`` (nothing when it does not name it)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, rest = item.strip().partition(":")
        if where != name:
            continue
        action, _, arg = rest.partition(":")
        if action == "fail":
            raise FaultInjected(f"fault injected at {name}")
        if action == "sleep":
            time.sleep(float(arg or 1.0))
        elif action == "pause":
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).write_text(f"{name} {os.getpid()}\n", encoding="utf-8")
            time.sleep(float(arg or PAUSE_SECONDS))
