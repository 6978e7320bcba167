"""The one table of bounds: every number from a file, a message or a request is finite and bounded,
with the same range wherever it is given (project file, CLI flags, messages, HTTP bodies)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from shared import bounds
from shared.bounds import BOUNDS, BoundsError, check, check_length, worker_count
from shared.cli import main
from shared.config import MESSAGE_OVERRIDES, ProjectConfig
from shared.errors import ManyModelsError
from shared.data.synthetic import write_panel


@pytest.mark.parametrize("value, words", [
    (float("nan"), "nan is not a finite number"),
    (float("inf"), "inf is not a finite number"),
    (-float("inf"), "-inf is not a finite number"),
    (0, "0 is out of bounds"),
    (21, "21 is out of bounds"),
    (2.5, "got 2.5"),
    (True, "got True"),
    ("3", "got '3'"),
    (None, "got None"),
])
def test_check_refuses_what_is_not_a_finite_number_in_bounds_naming_where_value_and_bound(value, words):
    with pytest.raises(BoundsError) as caught:
        check("training.folds", value, "--folds")
    message = str(caught.value)
    assert message.startswith("--folds: ") and words in message
    assert "a whole number from 1 to 20 (validation windows per candidate)" in message
    assert isinstance(caught.value, ManyModelsError) and isinstance(caught.value, ValueError)


def test_check_returns_values_in_bounds_and_lengths_are_bounded_without_quoting_the_whole_text():
    assert check("training.folds", 3) == 3 and check("promotion.min_value", -0.5) == -0.5
    assert check("min_accuracy", 1) == 1
    assert check_length("key_length", "S01", "store") == "S01"
    with pytest.raises(BoundsError) as caught:
        check_length("key_length", "x" * 5000, "column 'store'")
    message = str(caught.value)
    assert message.startswith("column 'store': 5,000 characters") and "0 to 1,024" in message
    assert len(message) < 200  # the value is quoted by its start only


def test_every_number_of_the_project_config_has_a_bound():
    cfg = ProjectConfig()
    numbers = []
    for section in dataclasses.fields(cfg):
        spec = getattr(cfg, section.name)
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if (isinstance(value, (int, float)) and not isinstance(value, bool)) or f.name == "season_length":
                numbers.append(f"{section.name}.{f.name}")
    assert numbers and [n for n in numbers if n not in BOUNDS] == []
    ProjectConfig().validate()  # the defaults are within their bounds


def test_message_options_take_their_ranges_from_the_same_table():
    numeric = {k: r for k, r in MESSAGE_OVERRIDES.items() if r.kind in ("int", "float")}
    assert numeric
    for key, rule in numeric.items():
        bound = BOUNDS[key]
        assert (rule.low, rule.high, rule.kind == "int") == (bound.low, bound.high, bound.integer), key


def test_worker_processes_are_capped_at_a_multiple_of_the_cpus():
    assert worker_count(100_000, cpus=2) == bounds.WORKERS_PER_CPU * 2
    assert worker_count(0, cpus=2) == 2 and worker_count(3, cpus=2) == 3 and worker_count(1, cpus=64) == 1


def test_the_table_itself_is_sane():
    for name, bound in BOUNDS.items():
        assert math.isfinite(bound.low) and math.isfinite(bound.high) and bound.low <= bound.high, name
        assert bound.what, name


# -- the CLI: flags and project files go through the same table ---------------------------------
@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bounds") / "sales.csv"
    write_panel(path, partitions=3, periods=60, freq="W", seed=3)
    return path


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses a flag's value with exit status 2
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("toml, field", [
    ("[promotion]\nmin_value = nan\n", "promotion.min_value"),
    ("[training]\nfolds = 1000000\n", "training.folds"),
    ("[runner]\nworkers = 100000\n", "runner.workers"),
])
def test_a_project_file_out_of_bounds_is_exit_2_naming_the_setting_and_nothing_is_written(
    tmp_path, capsys, panel, toml, field
):
    config = tmp_path / "mm.toml"
    config.write_text(toml, encoding="utf-8")
    work = tmp_path / "ws"
    code, err = _run(capsys, "ingest", "--data", str(panel), "--workdir", str(work), "--config", str(config))
    assert code == 2 and f"error: {field}: " in err and "Traceback" not in err
    assert not (work / "lake").exists() and not (work / "manymodels.toml").exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--workers", "100000", "runner.workers"),
    ("--horizon", "1000000000000", "forecast.horizon"),
    ("--min-accuracy", "nan", "min_accuracy"),
    ("--min-accuracy", "inf", "min_accuracy"),
])
def test_cli_flags_out_of_bounds_are_refused_naming_them(tmp_path, capsys, panel, flag, value, words):
    command = "promote" if flag == "--min-accuracy" else "ingest"
    argv = [command, "--workdir", str(tmp_path / "ws"), flag, value]
    if command == "ingest":
        argv += ["--data", str(panel)]
    code, err = _run(capsys, *argv)
    assert code == 2 and words in err and "Traceback" not in err
    assert "out of bounds" in err or "not a finite number" in err
    assert not (tmp_path / "ws" / "lake").exists()


def test_the_documented_table_is_the_table():
    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, bound in BOUNDS.items():
        row = f"| `{name}` | {bounds._num(bound.low)} | {bounds._num(bound.high)} |"
        assert row in text, f"docs/configuration.md lacks or misstates the bound of {name}: {row}"
