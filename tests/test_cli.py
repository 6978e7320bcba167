"""The `manymodels` command: one-line errors, JSON output, remembered config, unchanged data on failure."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from shared.cli import main
from shared.synthetic import write_panel


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
    assert main(["ingest", "--data", str(small_csv), "--workdir", str(work)]) == 0
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
    assert code == 2 and "key column" in err


def _raising(exc: BaseException):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("error", [
    "shared.result_store:StoreError",
    "shared.registry:RegistryError",
    "shared.runner:RunnerError",
    "shared.pipeline:PipelineError",
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
    from shared.registry import ModelRegistry

    work = tmp_path / "w"
    ModelRegistry(work / "registry" / "prod", "dev").close()  # a dev registry where prod belongs
    code, _, err = _run(capsys, "models", "list", "--workdir", str(work), "--registry", "prod")
    assert code == 2
    assert err.startswith("error: ") and "'dev', not 'prod'" in err and len(err.strip().splitlines()) == 1
