"""Fault injection at every stage (issue 12): the real CLI killed at a known point, then rerun.

`manymodels run` runs as a real process in its own session with ``MM_FAULT=<point>:pause``: when it
reaches the point (ingest, a training worker, registration, promotion after the production copy,
a scoring worker, the SQL load) it writes a marker and waits; the test then kills the parent alone
(SIGKILL: its workers must die with it) or the whole process group. No process of that group may
survive 10 s, and the rerun's outputs — both registries' indexes, the SQL tables, the pointers —
must equal those of an uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.data.synthetic import write_panel

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--no-progress", "--workers", "2", "--horizon", "4", "--test-periods", "6", "--min-accuracy", "0.3"]
POINTS = ["ingest.latest", "worker.train", "register.store", "promote.copied", "worker.score", "score.load"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "sales.csv"
    write_panel(path, partitions=6, periods=70, freq="W", seed=3)
    return path


def _run(panel: Path, work: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--data", str(panel), "--workdir",
                             str(work), *FLAGS], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, panel) -> dict:
    """The outputs of an uninterrupted run."""
    work = tmp_path_factory.mktemp("faults-ref") / "w"
    _finish(_run(panel, work))
    return outputs(work)


def outputs(work: Path) -> dict:
    def rows(db: Path, sql: str) -> list[tuple]:
        with sqlite3.connect(db) as conn:
            return conn.execute(sql).fetchall()

    registry = "SELECT partition_id, version, run_id, model_type, status FROM models ORDER BY 1, 2"
    store = work / "results.sqlite"
    lake = work / "lake"
    return {
        "dev": rows(work / "registry" / "dev" / "index.sqlite", registry),
        "prod": rows(work / "registry" / "prod" / "index.sqlite", registry),
        "metrics": rows(store, "SELECT partition_id, run_id, status, model, model_version FROM model_metrics "
                               "ORDER BY 1, 2"),
        "promotions": rows(store, "SELECT partition_id, run_id, decision, prod_version, reason FROM promotions "
                                  "ORDER BY 1, 2"),
        "predictions": rows(store, "SELECT partition_id, date, round(prediction, 6), source, model_version "
                                   "FROM predictions ORDER BY 1, 2"),
        "latest": [(lake / "prepared" / "LATEST").read_text(), (lake / "runs" / "LATEST").read_text()],
    }


def _group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded), from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(entry.name))
    return alive


# the parent alone at every point; the whole process group where workers or a half-done copy are
CASES = [(point, "parent") for point in POINTS] + [("worker.train", "group"), ("promote.copied", "group")]


@pytest.mark.parametrize("point, kill", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_a_run_killed_at_any_stage_reruns_to_the_same_outputs_and_leaves_no_orphan(
        panel, reference, tmp_path, point, kill):
    work = tmp_path / "w"
    marker = tmp_path / "marker"
    proc = _run(panel, work, {"MM_FAULT": f"{point}:pause", "MM_FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{point} was never reached"
        time.sleep(0.05)
    assert marker.read_text().split()[0] == point
    if kill == "parent":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while _group(proc.pid):
        assert time.monotonic() < deadline, f"orphans after 10 s: {_group(proc.pid)}"
        time.sleep(0.1)
    rerun = _finish(_run(panel, work))
    assert "Traceback" not in rerun
    assert outputs(work) == reference
