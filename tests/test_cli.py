"""The `manymodels` command: one-line errors, JSON output, remembered config, unchanged data on failure."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from shared.cli import main
from shared.data.synthetic import write_panel


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "sales.csv"
    write_panel(path, partitions=6, periods=80, freq="W", seed=1)
    return path


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_the_default_columns(tmp_path, capsys):
    code, out, _ = _run(capsys, "generate", "--partitions", "3", "--periods", "20", "--out",
                        str(tmp_path / "g.parquet"), "--json")
    assert code == 0
    frame = pd.read_parquet(tmp_path / "g.parquet")
    assert {"store", "item", "date", "sales", "price", "promo"} <= set(frame.columns)
    assert json.loads(out.strip().splitlines()[-1])["path"].endswith("g.parquet")


def test_ingest_json_is_the_last_line_and_the_workdir_remembers_its_config(small_csv, tmp_path, capsys):
    work = tmp_path / "w"
    code, out, _ = _run(capsys, "ingest", "--data", str(small_csv), "--workdir", str(work),
                        "--horizon", "6", "--test-periods", "6", "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["partitions"] == 6
    remembered = (work / "manymodels.toml").read_text()
    assert "horizon = 6" in remembered
    code, out, _ = _run(capsys, "train", "--workdir", str(work), "--no-progress", "--json")
    assert code == 0, out
    trained = json.loads(out.strip().splitlines()[-1])
    assert trained["trained"] + trained["baseline_only"] + trained["failed"] + trained["skipped"] == 6


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda f: f.drop(columns=["sales"]), "sales"),
        (lambda f: f.assign(date="not a date"), "date"),
        (lambda f: f.assign(price="cheap"), "price"),
        (lambda f: f.iloc[0:0], "empty"),
    ],
    ids=["missing-target", "unparseable-time", "non-numeric-covariate", "empty"],
)
def test_bad_input_is_one_line_naming_the_problem_and_changes_nothing(
    small_csv, tmp_path, capsys, mutate, expected
):
    work = tmp_path / "w"
    assert main(["ingest", "--data", str(small_csv), "--workdir", str(work), "--covariates", "price,promo"]) == 0
    capsys.readouterr()
    before = _digest(work)
    bad = tmp_path / "bad.csv"
    mutate(pd.read_csv(small_csv)).to_csv(bad, index=False)
    code, out, err = _run(capsys, "ingest", "--data", str(bad), "--workdir", str(work))
    assert code == 2
    assert err.startswith("error: ") and expected in err.lower()
    assert "Traceback" not in err
    assert _digest(work) == before


def test_a_missing_file_and_an_unknown_run_are_clear_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "ingest", "--data", str(tmp_path / "nope.csv"), "--workdir", str(tmp_path / "w"))
    assert code == 2 and "nope.csv" in err
    code, _, err = _run(capsys, "promote", "--workdir", str(tmp_path / "w"), "--run-id", "r123")
    assert code == 2 and "r123" in err


def test_bad_flags_name_the_field(tmp_path, capsys):
    code, _, err = _run(capsys, "ingest", "--data", "x.csv", "--workdir", str(tmp_path), "--freq", "fortnightly")
    assert code == 2 and "data.freq" in err


def test_models_list_filters_by_tags_and_show_finds_a_partition_by_its_keys(small_csv, tmp_path, capsys):
    work = str(tmp_path / "w")
    assert main(["ingest", "--data", str(small_csv), "--workdir", work, "--horizon", "6",
                 "--test-periods", "6", "--validation-periods", "6"]) == 0
    assert main(["train", "--workdir", work, "--no-progress"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "models", "list", "--workdir", work, "--tag", "store=S001", "--json")
    assert code == 0
    listed = json.loads(out.strip().splitlines()[-1])
    assert listed["count"] >= 1 and all(m["tags"]["store"] == "S001" for m in listed["models"])
    item = listed["models"][0]["tags"]["item"]
    code, out, _ = _run(capsys, "models", "show", "--workdir", work, "--tag", "store=S001", "--tag", f"item={item}",
                        "--json")
    shown = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and shown["partition_id"] == listed["models"][0]["partition_id"]
    code, _, err = _run(capsys, "models", "show", "--workdir", work, "--tag", "store=S001")
    assert code == 2 and "partitions match, not one; add item" in err and f"store=S001, item={item}" in err


def test_models_show_takes_the_partitions_key_values_and_names_what_exists(small_csv, tmp_path, capsys):
    """`models show store=S001,item=I0001`: the keys a user knows, not the hashed id; values that
    name several partitions, a key column that does not exist and values no model has are refused,
    each error naming what exists."""
    work = str(tmp_path / "w")
    assert main(["ingest", "--data", str(small_csv), "--workdir", work, "--horizon", "6", "--test-periods", "6",
                 "--validation-periods", "6"]) == 0
    assert main(["train", "--workdir", work, "--no-progress"]) == 0
    capsys.readouterr()
    listed = json.loads(_run(capsys, "models", "list", "--workdir", work, "--json")[1].strip().splitlines()[-1])
    first = listed["models"][0]
    store, item = first["tags"]["store"], first["tags"]["item"]
    for argv in ([f"store={store},item={item}"], [f"item={item}", f"store={store}"], [first["partition_id"]]):
        code, out, err = _run(capsys, "models", "show", *argv, "--workdir", work, "--json")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["partition_id"] == first["partition_id"]
    code, out, _ = _run(capsys, "models", "list", f"store={store}", "--workdir", work, "--json")
    assert code == 0 and all(m["tags"]["store"] == store for m in json.loads(out.strip().splitlines()[-1])["models"])

    code, _, err = _run(capsys, "models", "show", f"store={store}", "--workdir", work)  # ambiguous
    assert code == 2 and "not one; add item" in err and f"store={store}, item={item}" in err
    code, _, err = _run(capsys, "models", "show", f"shop={store},item={item}", "--workdir", work)
    assert code == 2 and "unknown key column(s) ['shop']" in err and "['store', 'item']" in err
    code, _, err = _run(capsys, "models", "show", f"store=S999,item={item}", "--workdir", work)
    assert code == 2 and "no model has store=S999" in err and store in err
    stores = sorted({m["tags"]["store"] for m in listed["models"]})
    other = next((s for s in stores if s != store), None)
    items_of_other = {m["tags"]["item"] for m in listed["models"] if m["tags"]["store"] == other}
    if other is not None and item not in items_of_other:  # both values exist, never together
        code, _, err = _run(capsys, "models", "show", f"store={other},item={item}", "--workdir", work)
        assert code == 2 and "not together" in err
    code, _, err = _run(capsys, "models", "show", "store", "--workdir", work)  # no '=': read as an id
    assert code == 2 and "no model for partition store" in err
    code, _, err = _run(capsys, "models", "show", "--workdir", work)
    assert code == 2 and "store=...,item=..." in err


def _raising(exc: BaseException):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("error", [
    "shared.results.result_store:StoreError",
    "shared.registries.registry:RegistryError",
    "shared.runs.runner:RunnerError",
    "shared.runs.pipeline:PipelineError",
    "shared.serving:PartitionNotFound",
    "shared.errors:ManyModelsError",
])
def test_an_error_meant_for_users_exits_2_with_one_line(error, tmp_path, capsys, monkeypatch):
    module, name = error.split(":")
    cls = getattr(__import__(module, fromlist=[name]), name)
    monkeypatch.setattr("shared.cli.cmd_report", _raising(cls("the store at x is read-only\nsecond line")))
    code, out, err = _run(capsys, "report", "--workdir", str(tmp_path))
    assert code == 2
    assert err == "error: the store at x is read-only | second line\n"
    assert out == ""


@pytest.mark.parametrize("exc", [KeyError("k"), RuntimeError("boom"), ValueError("not ours")],
                         ids=["KeyError", "RuntimeError", "ValueError"])
def test_anything_else_is_unexpected_exit_1_with_the_debug_hint(exc, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shared.cli.cmd_report", _raising(exc))
    code, _, err = _run(capsys, "report", "--workdir", str(tmp_path))
    assert code == 1
    assert err.startswith(f"error: {type(exc).__name__}: ") and "--debug" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(type(exc)):
        main(["report", "--workdir", str(tmp_path), "--debug"])


def test_a_real_registry_error_exits_2(tmp_path, capsys):
    from shared.registries.registry import ModelRegistry

    work = tmp_path / "w"
    ModelRegistry(work / "registry" / "prod", "dev").close()  # a dev registry where prod belongs
    code, _, err = _run(capsys, "models", "list", "--workdir", str(work), "--registry", "prod")
    assert code == 2
    assert err.startswith("error: ") and "'dev', not 'prod'" in err and len(err.strip().splitlines()) == 1


# -- issue 18 (11): errors name their cause ----------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--workers", "1", "--horizon", "4", "--test-periods", "4"]


def _cli(*argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, small_csv) -> Path:
    """A workdir after a whole run (every model promoted), copied by the tests that change it."""
    work = tmp_path_factory.mktemp("cli-ran") / "w"
    assert main(["run", "--data", str(small_csv), "--workdir", str(work), "--min-accuracy", "0", *FAST]) == 0
    return work


@pytest.fixture
def copy(ran, tmp_path) -> Path:
    shutil.copytree(ran, tmp_path / "w")
    return tmp_path / "w"


def test_sigterm_stops_a_command_with_a_message_and_exit_143(copy, tmp_path):
    marker = tmp_path / "paused"
    proc = _cli("train", "--workdir", str(copy), "--no-progress", "--full",
                env={"MM_FAULT": "train.start:pause", "MM_FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "SIGTERM" in err and "rerun" in err, (proc.returncode, err)


@pytest.mark.parametrize("name", ["results.sqlite", "registry/prod/index.sqlite", "registry/dev/index.sqlite"])
def test_a_damaged_sqlite_file_is_named_with_the_fix(copy, capsys, name):
    target = copy / name
    for extra in target.parent.glob(target.name + "-*"):
        extra.unlink()  # the WAL and shared memory: what is left is the damaged file alone
    data = bytearray(target.read_bytes())
    data[:16] = b"not a database!!"  # the header a real SQLite file starts with, overwritten
    target.write_bytes(bytes(data))
    code, _, err = _run(capsys, "score", "--workdir", str(copy), "--horizon", "3", "--no-progress")
    assert code == 2 and str(target) in err and "damaged" in err and "mv " in err, err
    assert "--debug" not in err


def test_train_full_retrains_even_when_the_run_exists(copy, capsys):
    code, out, _ = _run(capsys, "train", "--workdir", str(copy), "--full", "--no-progress", "--json")
    first = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and first["trained"] + first["baseline_only"] == 6 and first["registered"] == 6, first
    dev = sqlite3.connect(copy / "registry" / "dev" / "index.sqlite")
    assert dev.execute("SELECT COUNT(DISTINCT run_id) FROM models WHERE partition_id <> '_global'").fetchone()[0] == 2
    code, _, err = _run(capsys, "train", "--workdir", str(copy), "--full", "--run-id", first["run_id"])
    assert code == 2 and first["run_id"] in err and "--full" in err, err


def test_duplicate_column_names_in_a_csv_are_refused_naming_the_column(tmp_path, small_csv, capsys):
    text = small_csv.read_text().splitlines()
    header = [name.strip('"') for name in text[0].split(",")]
    assert "price" in header
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("\n".join([",".join(header + ["price"])] + [line + ",1.5" for line in text[1:]]) + "\n")
    code, _, err = _run(capsys, "ingest", "--data", str(doubled), "--workdir", str(tmp_path / "w"), "--no-progress")
    assert code == 2 and "'price'" in err and "more than once" in err, err


def test_a_memory_limit_is_named_as_one(copy):
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (700 * 2**20, resource.RLIM_INFINITY))

    proc = _cli("train", "--workdir", str(copy), "--full", "--no-progress", "--workers", "1", preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "out of memory" in err and "ulimit -v" in err, (proc.returncode, err)
    assert "SystemError" not in err.split("(")[0]


def test_a_full_disk_is_named_with_the_path(ran, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    used = sum(p.stat().st_size for p in ran.rglob("*") if p.is_file())
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used // 1024 + 1024}k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode()[:200]}")
    try:
        work = mount / "w"
        shutil.copytree(ran, work)
        free = os.statvfs(mount)
        (mount / "filler").write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - 4096))  # one page left
        proc = _cli("train", "--workdir", str(work), "--full", *FAST)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "disk full" in err and str(mount) in err, err
        assert "cannot rollback" not in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_run_summary_compares_with_the_baseline_in_sensible_words():
    """Issue 18 item 1: one outlier made the summary print '(-72555972662 % lower error)'."""
    from shared.cli_commands import versus_baseline

    assert versus_baseline(0.118, 0.318) == "63 % lower error"
    worse = versus_baseline(9.2e8, 0.30)
    assert "-" not in worse and worse == "over a million times the baseline's error"
    assert versus_baseline(0.45, 0.30) == "1.5 times the baseline's error"
    assert versus_baseline(float("nan"), 0.3).startswith("no comparison")


def test_a_reader_that_stops_early_is_not_an_error(ran):
    """`manymodels models list | head -1`: the reader went away before our output; exit 0, no traceback
    (the read end is closed before the command writes, so the write always fails)."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "models", "list", "--workdir", str(ran)],
                            cwd=REPO, text=True, stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err


def test_json_errors_are_json_on_stdout_too(tmp_path, capsys):
    code, out, err = _run(capsys, "score", "--workdir", str(tmp_path / "nothing"), "--json")
    assert code == 2 and err.startswith("error:")
    parsed = json.loads(out.strip().splitlines()[-1])
    assert parsed["exit_code"] == 2 and parsed["error"] in err


def test_the_help_states_the_configs_own_defaults_and_the_version(capsys):
    from shared.config import ForecastSpec

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"each fold (default {ForecastSpec().validation_periods})" in text
    assert "e.g. price,promo (default none; '' for none)" in text  # no covariates unless asked
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("manymodels ")


def test_a_failed_command_leaves_no_empty_workdir_behind(tmp_path, capsys):
    work = tmp_path / "new-workdir"
    code, _, err = _run(capsys, "ingest", "--data", str(tmp_path / "missing.csv"), "--workdir", str(work))
    assert code == 2 and "missing.csv" in err
    assert not work.exists()
    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    (kept / "notes" / "mine.txt").write_text("a user's file")
    assert _run(capsys, "ingest", "--data", str(tmp_path / "missing.csv"), "--workdir", str(kept))[0] == 2
    assert (kept / "notes" / "mine.txt").exists()  # a folder that existed is never removed


def test_a_report_that_cannot_be_drawn_leaves_the_run_partial_not_failed(small_csv, tmp_path, monkeypatch, capsys):
    """The predictions are in SQL by then: the run says the report is missing and why (exit 3),
    and `manymodels report` can write it later."""
    import shared.runs.pipeline as pipeline_module

    def broken(ws, path=None):
        raise ValueError("a chart could not be drawn")

    monkeypatch.setattr(pipeline_module, "report", broken)
    work = tmp_path / "w"
    code = main(["run", "--data", str(small_csv), "--workdir", str(work), "--min-accuracy", "0", *FAST])
    out, err = capsys.readouterr()
    assert code == 3 and "report was not written (ValueError: a chart could not be drawn)" in err
    assert "report:    not written" in out
    with sqlite3.connect(work / "results.sqlite") as conn:
        assert conn.execute("select count(*) from predictions").fetchone()[0] > 0
