"""The training entry script under the Azure ML parallel job contract: init() parses arguments,
run(mini_batch) trains whole partitions, writes artifact then sidecar, and resumes after a kill.

Models are trained for real on the synthetic panel; the kill is a real SIGKILL of a real run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pickle
import pandas as pd
import pytest

from shared.config import ProjectConfig, RunnerSpec
from shared.entry import train as entry
from shared.keys import PARTITION_ID
from shared.lake import LocalLake
from shared.data.partitioning import prepare_dataset
from shared.runs.runner import run_parallel
from shared.data.synthetic import generate_panel
from shared.models.training import ForecastBundle
from shared.data.validation import validate

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PARTITIONS = 8


def config(marker: Path, max_mean: float, sleep: float = 0.0) -> ProjectConfig:
    """Fast candidates plus 'picky', which fails the partition with the huge target while the
    marker file exists."""
    return ProjectConfig().with_overrides({
        "forecast.horizon": 3, "forecast.test_periods": 6, "forecast.validation_periods": 6,
        "forecast.min_train_periods": 20, "runner.rows_per_file": 130,
        "training.candidates": ["baseline", "loglinear", "picky"],
        "training.estimator_packages": ["sklearn", "entry_fixture"],  # the test regressor's module is allowed
        "training.extra_candidates": [{"name": "picky", "estimator": "entry_fixture.PickyRegressor",
                                       "params": {"max_mean": max_mean, "marker": str(marker),
                                                  "sleep": sleep}}],
    })


@pytest.fixture(autouse=True)
def _fixture_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # the 'picky' candidate lives in tests/entry_fixture.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared dataset of 8 partitions in ~4 batch files; one partition's sales x1000."""
    sys.path.insert(0, str(TESTS))
    root = tmp_path_factory.mktemp("train-entry")
    panel = pd.concat(generate_panel(partitions=PARTITIONS, periods=60, seed=3), ignore_index=True)
    first = panel.iloc[0]
    big = (panel["store"] == first["store"]) & (panel["item"] == first["item"])
    panel.loc[big, "sales"] *= 1000.0
    max_mean = float(panel.loc[~big].groupby(["store", "item"])["sales"].mean().max()) * 10
    marker = root / "make-picky-fail"
    cfg = config(marker, max_mean)
    validated, report = validate(panel, cfg)
    lake = LocalLake(root / "lake")
    ds = prepare_dataset(lake, validated, cfg, report)
    config_file = root / "manymodels.toml"
    cfg.save(config_file)
    big_pid = validated.loc[validated["sales"] == validated["sales"].max(), PARTITION_ID].iloc[0]
    return {"root": root, "cfg": cfg, "marker": marker, "max_mean": max_mean, "config_file": config_file,
            "meta_file": lake.local_path(f"{ds.root}/dataset.json"), "big": big_pid,
            "files": [str(lake.local_path(p)) for p in ds.batch_paths], "manifest": ds.manifest}


def args_for(world, out: Path, run_id: str = "r1", config_file: Path | None = None) -> list[str]:
    return ["--config", str(config_file or world["config_file"]), "--dataset-meta", str(world["meta_file"]),
            "--output-dir", str(out), "--run-id", run_id]


def start(world, out: Path, monkeypatch, run_id: str = "r1") -> None:
    # Azure ML appends arguments of its own: parse_known_args lets them through
    monkeypatch.setattr(sys, "argv", ["train.py", *args_for(world, out, run_id), "--logging_level", "INFO"])
    entry.init()


def stored_rows(out) -> dict[str, dict]:
    """Every row of the sidecars in an output folder, by partition (a success over a failed try)."""
    found: dict[str, dict] = {}
    for sidecar in sorted(out.glob("*.jsonl")):
        for row in (json.loads(line) for line in sidecar.read_text().splitlines() if line.strip()):
            if row[PARTITION_ID] not in found or found[row[PARTITION_ID]]["status"] == "failed":
                found[row[PARTITION_ID]] = row
    return found


def model_bytes(out, row: dict) -> bytes:
    return (out / row["artifact"]).read_bytes()[row["byte_offset"]:row["byte_offset"] + row["byte_length"]]


def test_run_trains_each_partition_and_writes_its_artifact_then_its_sidecar(world, tmp_path, monkeypatch):
    world["marker"].touch()
    try:
        out = tmp_path / "models"
        start(world, out, monkeypatch)
        assert len(world["files"]) >= 3
        rows = [json.loads(line) for line in entry.run(world["files"])]
    finally:
        world["marker"].unlink()

    assert sorted(r[PARTITION_ID] for r in rows) == sorted(world["manifest"][PARTITION_ID])
    assert all(r["run_id"] == "r1" for r in rows)
    by_pid = {r[PARTITION_ID]: r for r in rows}
    failed = by_pid[world["big"]]
    assert failed["status"] == "failed" and "picky: mean target" in failed["reason"]
    assert failed["artifact"] is None and "byte_length" not in failed
    stored = stored_rows(out)
    assert stored[world["big"]] == failed  # its failure is recorded, no bytes: the next run tries again
    # a pack and a sidecar per chunk of partitions, not a file per partition
    packs, sidecars = sorted(out.glob("*.pack")), sorted(out.glob("*.jsonl"))
    assert len(sidecars) == len(world["files"]) and len(packs) <= len(sidecars) < len(by_pid)
    for pid, row in by_pid.items():
        if pid == world["big"]:
            continue
        assert row["status"] in ("trained", "baseline_only") and row["artifact"].endswith(".pack")
        assert stored[pid] == row
        data = model_bytes(out, row)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        bundle = pickle.loads(data)
        assert isinstance(bundle, ForecastBundle) and bundle.partition_id == pid
        assert len(bundle.predict(horizon=3)) == 3
        assert row["keys"] == bundle.keys
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_rerun_returns_stored_rows_and_retrains_only_the_failed_partition(world, tmp_path, monkeypatch):
    out = tmp_path / "models"
    world["marker"].touch()
    try:
        start(world, out, monkeypatch)
        first = {json.loads(line)[PARTITION_ID]: json.loads(line) for line in entry.run(world["files"])}
    finally:
        world["marker"].unlink()
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}

    start(world, out, monkeypatch)  # the marker is gone: 'picky' now accepts the big partition
    second = {json.loads(line)[PARTITION_ID]: json.loads(line) for line in entry.run(world["files"])}

    assert first[world["big"]]["status"] == "failed"
    assert second[world["big"]]["status"] == "trained" and model_bytes(out, second[world["big"]])
    assert len(stored_rows(out)) == len(first) and stored_rows(out)[world["big"]] == second[world["big"]]
    for pid, row in first.items():
        if pid != world["big"]:
            assert second[pid] == row  # the stored row, fit_seconds included: not retrained
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.name in stamps}
    assert after == stamps


def test_sidecars_of_another_run_are_not_taken_as_done(world, tmp_path, monkeypatch):
    out = tmp_path / "models"
    start(world, out, monkeypatch, run_id="r1")
    entry.run(world["files"][:1])
    start(world, out, monkeypatch, run_id="r2")
    rows = [json.loads(line) for line in entry.run(world["files"][:1])]
    assert rows and {r["run_id"] for r in rows} == {"r2"}
    runs = [json.loads(line)["run_id"] for p in out.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(set(runs)) == ["r1", "r2"] and runs.count("r2") == len(rows)  # r1's rows were not reused


def test_run_before_init_is_an_error(monkeypatch):
    monkeypatch.setattr(entry, "_state", None)
    with pytest.raises(RuntimeError, match="before init"):
        entry.run(["batch-00000.parquet"])


def test_missing_arguments_are_reported_by_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "x.toml"])
    with pytest.raises(SystemExit):
        entry.init()
    assert "--dataset-meta" in capsys.readouterr().err


def test_the_config_may_be_toml_or_json(world, tmp_path):
    as_json = tmp_path / "config.json"
    as_json.write_text(json.dumps(world["cfg"].to_dict()))
    assert entry.read_config(as_json) == entry.read_config(world["config_file"]) == world["cfg"]
    as_meta = tmp_path / "dataset.json"  # a dataset.json holds the config under "config"
    as_meta.write_text(json.dumps({"dataset_id": "d0", "config": world["cfg"].to_dict()}))
    assert entry.read_config(as_meta) == world["cfg"]


KILLABLE_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from shared.config import RunnerSpec
    from shared.runs.runner import run_parallel
    files, args, results = sys.argv[1].split(","), sys.argv[2].split(" "), Path(sys.argv[3])
    run_parallel("shared.entry.train", files, args, RunnerSpec(workers=2, retries=0, progress=False), results)
""")


def summary(rows: list[dict]) -> dict[str, tuple]:
    return {r[PARTITION_ID]: (r["status"], r["model_name"], r["metrics"]) for r in rows}


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None) or math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in a)


def test_a_run_killed_part_way_resumes_to_the_same_result_as_an_uninterrupted_run(world, tmp_path):
    slow_config = tmp_path / "slow.toml"
    config(world["marker"], world["max_mean"], sleep=0.05).save(slow_config)
    killed = tmp_path / "killed"
    args = [*args_for(world, killed / "models", config_file=slow_config), "--chunk-partitions", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, ",".join(world["files"]), " ".join(args),
                             str(killed / "results")], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list((killed / "models").glob("*.jsonl"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run produced no sidecar in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, mid-run
    proc.wait()
    proc.stderr.close()
    done_before = {p.name: p.stat().st_mtime_ns for p in (killed / "models").glob("*.jsonl")}
    assert 2 <= len(done_before) < PARTITIONS, "the kill should land part-way"

    spec = RunnerSpec(workers=2, retries=0, progress=False)
    resumed = run_parallel("shared.entry.train", world["files"], args, spec, killed / "results")
    fresh = run_parallel("shared.entry.train", world["files"], args_for(world, tmp_path / "fresh" / "models"),
                         spec, tmp_path / "fresh" / "results")

    assert resumed.ok and fresh.ok
    assert len(resumed.rows) == len({r[PARTITION_ID] for r in resumed.rows}) == PARTITIONS
    got, want = summary(resumed.rows), summary(fresh.rows)
    assert got.keys() == want.keys()
    for pid in want:
        assert got[pid][:2] == want[pid][:2], pid
        assert same_metrics(got[pid][2], want[pid][2]), pid
    # partitions finished before the kill were not trained again
    assert {n: (killed / "models" / n).stat().st_mtime_ns for n in done_before} == done_before
    stored = stored_rows(killed / "models")
    assert sorted(pid for pid, row in stored.items() if row.get("byte_length") is not None) == sorted(
        pid for pid, s in got.items() if s[0] != "skipped")
    assert all(pickle.loads(model_bytes(killed / "models", stored[pid])).partition_id == pid
               for pid, s in got.items() if s[0] != "skipped")
