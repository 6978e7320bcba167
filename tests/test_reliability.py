"""Issue 12, cases 5 to 8, written as the faults and misuses they are, through the real CLI.

One writer per workdir (a real paused `manymodels train` process holds the lock), promotions
recorded even when the SQL write fails, config saved only by successful project-defining commands,
key changes refused, bounded scoring rows, repairs printed.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from registry_tools import damage_model

from shared.cli import main
from shared.data.synthetic import write_panel
from shared.registries.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--no-progress", "--workers", "1", "--horizon", "6", "--test-periods", "6"]


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "sales.csv"
    write_panel(path, partitions=6, periods=80, freq="W", seed=2)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, panel) -> Path:
    """A workdir after ingest and train (nothing promoted yet), copied by each test that changes it."""
    work = tmp_path_factory.mktemp("rel-trained") / "w"
    assert main(["ingest", "--data", str(panel), "--workdir", str(work), *FLAGS]) == 0
    assert main(["train", "--workdir", str(work), "--no-progress", "--workers", "1"]) == 0
    return work


@pytest.fixture
def work(trained, tmp_path) -> Path:
    copy = tmp_path / "w"
    shutil.copytree(trained, copy)
    return copy


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _cli(*argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})}, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def _config(work: Path) -> dict:
    return tomllib.loads((work / "manymodels.toml").read_text())


# -- case 5: one writer per workdir --------------------------------------------------------------
def test_an_ingest_during_training_is_refused_naming_the_holder_and_readers_go_on(work, panel, tmp_path):
    marker = tmp_path / "paused"
    train = _cli("train", "--workdir", str(work), "--no-progress", "--run-id", "rpinned",
                 env={"MM_FAULT": "train.start:pause", "MM_FAULT_MARKER": str(marker)})
    try:
        _wait_for(marker, train)
        other = tmp_path / "other.csv"
        write_panel(other, partitions=3, periods=60, freq="W", seed=9)
        ingest = subprocess.run([sys.executable, "-m", "shared.cli", "ingest", "--data", str(other),
                                 "--workdir", str(work)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert ingest.returncode == 2, ingest.stderr
        assert "manymodels train" in ingest.stderr and f"pid {train.pid}" in ingest.stderr
        assert "Traceback" not in ingest.stderr
        listed = subprocess.run([sys.executable, "-m", "shared.cli", "models", "list", "--workdir", str(work)],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "model(s) in dev" in listed.stdout
    finally:
        os.killpg(train.pid, signal.SIGKILL)
        train.wait(10)
    # the kernel released the killed holder's lock: the next writer gets it at once
    assert main(["promote", "--workdir", str(work)]) == 0


def test_run_pins_the_dataset_it_ingested_for_scoring(work, panel, tmp_path, capsys):
    code, out, _ = _run(capsys, "run", "--data", str(panel), "--workdir", str(work), "--json", *FLAGS)
    assert code == 0
    import json

    summary = json.loads(out.strip().splitlines()[-1])
    meta = json.loads((work / "lake" / "runs" / summary["score_id"] / "run.json").read_text())
    assert meta["dataset_id"] == summary["dataset_id"]


# -- case 6: promotion records -------------------------------------------------------------------
def test_a_failed_store_write_after_the_copy_is_reconciled_by_the_rerun(work, capsys):
    store = work / "results.sqlite"
    saved = work / "results.saved"
    store.rename(saved)
    store.mkdir()  # a real fault: the SQL file cannot be opened when promotion records its decisions
    code, _, err = _run(capsys, "promote", "--workdir", str(work), "--min-accuracy", "0.3")
    assert code != 0 and "error:" in err
    prod = sqlite3.connect(work / "registry" / "prod" / "index.sqlite")
    copied = prod.execute("SELECT COUNT(*) FROM models WHERE partition_id <> '_global'").fetchone()[0]
    assert copied > 0  # the copies happened before the failure
    store.rmdir()
    saved.rename(store)
    code, out, _ = _run(capsys, "promote", "--workdir", str(work), "--min-accuracy", "0.3")
    assert code == 0 and f"recorded {copied} earlier promotion(s)" in out
    rows = sqlite3.connect(store).execute(
        "SELECT partition_id, decision, prod_version, reason, store, item FROM promotions "
        "WHERE decision = 'promoted'").fetchall()
    assert len(rows) == copied and all(r[2] >= 1 and r[3] and r[4] and r[5] for r in rows)
    assert all(">=" in r[3] for r in rows)  # the original reasons, from the production records' tags
    code, out, _ = _run(capsys, "promote", "--workdir", str(work), "--min-accuracy", "0.3")
    assert code == 0 and "earlier promotion" not in out and f"unchanged {copied}" in out


def test_a_damaged_candidate_is_rejected_alone_with_the_reason(work, capsys):
    dev = ModelRegistry(work / "registry" / "dev", "dev")
    record = sorted(dev.find(), key=lambda r: r.partition_id)[0]
    pid = record.partition_id
    damage_model(dev, record, b"\x80\x05not the model")  # its bytes in the pack, the others intact
    dev.close()
    code, out, _ = _run(capsys, "promote", "--workdir", str(work), "--min-accuracy", "0")
    assert code == 0 and "rejected (artifact): 1" in out
    reason = sqlite3.connect(work / "results.sqlite").execute(
        "SELECT reason FROM promotions WHERE partition_id = ?", (pid,)).fetchone()[0]
    assert "SHA-256" in reason
    code, out, err = _run(capsys, "models", "verify", "--workdir", str(work))
    assert code == 2 and pid in err and "fail verification" in err


# -- case 7: flags saved by failed or one-off commands --------------------------------------------
def test_a_failed_ingest_never_rewrites_the_config(work, tmp_path, capsys):
    before = (work / "manymodels.toml").read_text()
    code, _, err = _run(capsys, "ingest", "--data", str(tmp_path / "missing.csv"), "--keys", "foo",
                        "--workdir", str(work))
    assert code == 2 and "--reset" in err  # the key change is refused before the file is even read
    assert (work / "manymodels.toml").read_text() == before
    fresh = tmp_path / "fresh"
    code, _, err = _run(capsys, "ingest", "--data", str(tmp_path / "missing.csv"), "--keys", "foo",
                        "--workdir", str(fresh))
    assert code == 2 and "missing.csv" in err and not (fresh / "manymodels.toml").exists()
    assert _run(capsys, "score", "--workdir", str(work), "--no-progress")[0] == 0


def test_one_off_flags_are_never_saved(work, capsys):
    before = (work / "manymodels.toml").read_text()
    code, _, _ = _run(capsys, "score", "--workdir", str(work), "--horizon", "9", "--workers", "1", "--no-progress")
    assert code == 0
    code, _, err = _run(capsys, "score", "--workdir", str(work), "--horizon", "3000")
    assert code == 2 and "scoring.max_distance" in err
    assert (work / "manymodels.toml").read_text() == before
    assert _config(work)["forecast"]["horizon"] == 6
    runs = sorted(p.name for p in (work / "lake" / "runs").glob("r*"))
    assert _run(capsys, "train", "--workdir", str(work), "--no-progress")[0] == 0
    # the same run as before (its id derives from the saved config): nothing retrained
    assert sorted(p.name for p in (work / "lake" / "runs").glob("r*")) == runs


def test_changing_the_keys_of_a_workdir_with_data_is_refused_until_reset(work, panel, capsys):
    before = (work / "manymodels.toml").read_text()
    code, _, err = _run(capsys, "ingest", "--data", str(panel), "--keys", "store", "--workdir", str(work))
    assert code == 2 and "new --workdir" in err and "--reset" in err and "['store', 'item']" in err
    assert (work / "manymodels.toml").read_text() == before
    code, _, err = _run(capsys, "score", "--workdir", str(work), "--time", "week")
    assert code == 2 and "data.time" in err
    code, out, _ = _run(capsys, "ingest", "--data", str(panel), "--keys", "store", "--covariates", "",
                        "--workdir", str(work), "--reset", "--rows-per-file", "100")
    assert code == 0 and "reset" in out
    assert _config(work)["data"]["keys"] == ["store"]
    assert _config(work)["runner"]["rows_per_file"] != 100  # a one-off flag
    assert not (work / "registry").exists() and not (work / "results.sqlite").exists()


# -- case 8: the smaller ones -------------------------------------------------------------------
def test_ingest_prints_its_repairs_per_kind(tmp_path, panel, capsys):
    frame = pd.read_csv(panel)
    frame.loc[3, "sales"] = None
    frame = pd.concat([frame, frame.iloc[[10, 11]].assign(sales=lambda f: f["sales"] + 1)])  # same periods
    frame.to_csv(tmp_path / "dirty.csv", index=False)
    code, out, _ = _run(capsys, "ingest", "--data", str(tmp_path / "dirty.csv"), "--workdir", str(tmp_path / "w"))
    assert code == 0
    line = next(li for li in out.splitlines() if "repairs:" in li)
    assert "merged_duplicates 2" in line and "null_target" in line


@pytest.mark.parametrize("when, words", [("before", "after the end"), ("far", "scoring.max_distance=520")])
def test_a_scoring_row_outside_the_forecast_window_is_exit_2_naming_the_row(work, tmp_path, capsys, when, words):
    dataset = (work / "lake" / "prepared" / "LATEST").read_text().strip()
    manifest = pd.read_parquet(work / "lake" / "prepared" / dataset / "manifest.parquet")
    first = manifest.iloc[0]
    last = pd.Timestamp(first["last_time"])
    rows = pd.DataFrame({"store": [first["store"]] * 2, "item": [first["item"]] * 2,
                         "date": [last + pd.Timedelta(weeks=1),
                                  last - pd.Timedelta(weeks=3) if when == "before" else pd.Timestamp("2200-01-06")],
                         "price": [1.0, 1.0], "promo": [0, 0]})
    rows.to_csv(tmp_path / "future.csv", index=False)
    code, _, err = _run(capsys, "score", "--workdir", str(work), "--data", str(tmp_path / "future.csv"))
    assert code == 2 and words in err and "'date'" in err and "row" in err, err


def test_models_seal_and_verify(work, capsys):
    code, out, _ = _run(capsys, "models", "verify", "--workdir", str(work))
    assert code == 0 and "match their recorded SHA-256" in out
    code, out, _ = _run(capsys, "models", "seal", "--workdir", str(work))
    assert code == 0 and "sealed 0 model(s)" in out


# -- issue 18: blast radius of one bad file, exit status tells the truth ---------------------------
def _flip_global_byte(prod: Path) -> None:
    """Flip one byte in the middle of the production global model's bytes (its range of a pack)."""
    registry = ModelRegistry(prod, "prod")
    [record] = [r for r in registry.find(include_global=True) if r.partition_id == "_global"]
    registry.close()
    at = record.byte_offset + record.byte_length // 2
    with open(prod / record.artifact, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def promoted(work, capsys) -> Path:
    """The copied workdir with every model promoted (nothing scored yet)."""
    assert _run(capsys, "promote", "--workdir", str(work), "--min-accuracy", "0")[0] == 0
    return work


def _needs_global(prod: Path) -> set[str]:
    """Partitions whose production model itself forecasts with the global model."""
    import pickle

    from shared.models.global_model import needs_global

    registry = ModelRegistry(prod, "prod")
    try:
        return {r.partition_id for r in registry.find(latest_only=True)
                if needs_global(pickle.loads(registry.raw_bytes(r)).estimator)}
    finally:
        registry.close()


def _sources(work: Path) -> dict[str, tuple[str, int]]:
    rows = sqlite3.connect(work / "results.sqlite").execute(
        "SELECT partition_id, MAX(source), MAX(is_fallback) FROM predictions GROUP BY partition_id").fetchall()
    return {pid: (source, fallback) for pid, source, fallback in rows}


def test_a_corrupted_global_model_fails_only_what_needs_it_and_score_exits_3(promoted, tmp_path, capsys):
    import json

    intact = tmp_path / "intact"
    shutil.copytree(promoted, intact)
    assert _run(capsys, "score", "--workdir", str(intact), "--no-progress")[0] == 0
    before = _sources(intact)  # what answers each partition when nothing is broken
    prod = promoted / "registry" / "prod"
    dependent = _needs_global(prod)
    assert 0 < len(dependent) < 6  # the panel has both kinds
    _flip_global_byte(prod)
    code, out, err = _run(capsys, "score", "--workdir", str(promoted), "--no-progress", "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 3, (out, err)
    assert summary["exit_code"] == 3 and summary["partitions"] == 6 and summary["failed"] == 0
    assert summary["rows"] == 6 * 6  # every partition has its forecast
    assert summary["degraded"] == len(dependent)  # a fallback stood in only where the global model was needed
    assert any("_global" in p and "SHA-256" in p for p in summary["problems"]), summary["problems"]
    assert "incomplete" in err and "SHA-256" in err
    after = _sources(promoted)
    assert set(after) == set(before)
    for pid in after:  # what does not need the global model answers exactly as before
        if pid in dependent:
            assert after[pid] == ("baseline", 1) and before[pid][0] != "baseline", (pid, before[pid])
        else:
            assert after[pid] == before[pid], (pid, before[pid], after[pid])


def test_a_corrupted_global_model_leaves_serving_of_the_other_partitions_alone(promoted):
    from shared.serving import ServingOptions
    from shared.serving.predictor import open_predictor
    from shared.runs.workspace import Workspace

    prod = promoted / "registry" / "prod"
    dependent = _needs_global(prod)
    _flip_global_byte(prod)
    predictor = open_predictor(Workspace.open(promoted), ServingOptions(check_interval_ms=0))
    try:
        registry = ModelRegistry(prod, "prod")
        partitions = sorted(r.partition_id for r in registry.find(latest_only=True))
        registry.close()
        for pid in partitions:
            answer = predictor.handle({"partition_id": pid, "horizon": 3})
            if pid in dependent:  # its own model is the global model's: refused, naming why
                assert answer.status == 503 and "_global" in str(answer.body), answer.body
            else:
                assert answer.status == 200 and len(answer.body["predictions"]) == 3, answer.body
    finally:
        predictor.close()


def test_a_training_run_that_lost_partitions_exits_3_saying_what(panel, tmp_path, capsys, monkeypatch):
    import json

    work = tmp_path / "w"
    project = tmp_path / "project.toml"  # no global model: each mini-batch trains on its own
    project.write_text('[training]\ncandidates = ["baseline", "loglinear"]\n[scoring]\n'
                       'chain = ["production", "unpromoted", "baseline"]\n')
    flags = ["--workdir", str(work), "--no-progress", "--workers", "1"]
    assert main(["ingest", "--data", str(panel), "--rows-per-file", "100", "--config", str(project), *flags]) == 0
    dataset = (work / "lake" / "prepared" / "LATEST").read_text().strip()
    victim = sorted((work / "lake" / "prepared" / dataset / "batches").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # one truncated mini-batch file: its partitions fail
    capsys.readouterr()
    code, out, err = _run(capsys, "train", *flags, "--json")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 3 and summary["exit_code"] == 3, (out, err)
    assert 0 < summary["registered"] < 6 and summary["failed_batches"] == 1
    assert "incomplete (exit 3)" in err and victim.name in err, err
    monkeypatch.setenv("MM_FAULT", "worker.train:fail")  # now every mini-batch fails: an error, not "train it first"
    code, out, err = _run(capsys, "train", *flags, "--full", "--run-id", "rlost")
    assert code != 0 and "every mini-batch" in err and "fault injected at worker.train" in err, err
