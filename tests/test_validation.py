"""The data contract: every bad-input case is refused with a precise message or repaired and counted."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from shared.config import ProjectConfig
from shared.keys import partition_id
from shared.lake import LocalLake
from shared.data.partitioning import prepare_dataset
from shared.data.synthetic import generate_panel
from shared.data.validation import DataValidationError, ValidationReport, validate

CFG = ProjectConfig().with_overrides({"data.covariates": ["price", "promo"]})  # the panel's, named


def policy(**kw) -> ProjectConfig:
    return CFG.with_overrides({f"validation.{k}": v for k, v in kw.items()})


@pytest.fixture()
def raw() -> pd.DataFrame:
    """A clean generated panel with no gaps: 6 partitions x 20 weeks."""
    frame = pd.concat(generate_panel(partitions=40, periods=20, seed=1), ignore_index=True)
    sizes = frame.groupby(["store", "item"])["sales"].transform("size")
    return frame[sizes == 20].groupby(["store", "item"]).head(20).iloc[: 6 * 20].reset_index(drop=True)


def lake_snapshot(lake: LocalLake) -> dict[str, str]:
    return {p: hashlib.sha256(lake.read_bytes(p)).hexdigest() for p in lake.list("prepared")}


def ingest(lake: LocalLake, frame: pd.DataFrame, cfg: ProjectConfig = CFG):
    """The pipeline's order: validate, then prepare. A rejected frame never reaches the lake."""
    validated, report = validate(frame, cfg)
    return prepare_dataset(lake, validated, cfg, report)


def rejected(
    raw: pd.DataFrame, tmp_path, frame: pd.DataFrame, cfg: ProjectConfig = CFG
) -> DataValidationError:
    """Ingest a good frame, then the bad one: the error is returned and the lake is unchanged."""
    lake = LocalLake(tmp_path / "lake")
    ingest(lake, raw)
    before = lake_snapshot(lake)
    with pytest.raises(DataValidationError) as caught:
        ingest(lake, frame, cfg)
    assert lake_snapshot(lake) == before
    return caught.value


# -- fatal problems -----------------------------------------------------------------------------


def test_empty_input_is_refused(raw, tmp_path):
    err = rejected(raw, tmp_path, raw.iloc[0:0])
    assert "empty input: 0 rows" in str(err) and err.rule.startswith("empty input")
    with pytest.raises(DataValidationError, match="empty input: 0 rows, 0 columns"):
        validate(pd.DataFrame(), CFG)


def test_missing_columns_are_named_with_their_role_and_the_available_columns_listed(raw, tmp_path):
    err = rejected(raw, tmp_path, raw.drop(columns=["price", "store"]))
    message = str(err)
    assert "'store' (key)" in message and "'price' (covariate)" in message
    assert "available columns: ['item', 'date', 'sales', 'promo']" in message
    assert err.column == ["store", "price"]


def test_unparseable_dates_name_the_column_rule_and_example_rows(raw, tmp_path):
    bad = raw.astype({"date": "str"})
    bad.loc[[3, 7], "date"] = ["next tuesday", "2023-13-45"]
    err = rejected(raw, tmp_path, bad)
    message = str(err)
    assert err.column == "date" and "not a date" in message and "(2 rows)" in message
    assert "next tuesday" in message and "2023-13-45" in message
    assert list(err.examples.index) == [3, 7]  # rows by their position in the input


def test_numbers_are_not_dates_unless_freq_is_int(raw, tmp_path):
    bad = raw.assign(date=np.arange(len(raw)))
    err = rejected(raw, tmp_path, bad)
    assert err.column == "date" and "numbers are not dates" in str(err) and "freq='int'" in str(err)
    validated, _ = validate(bad, CFG.with_overrides({"data.freq": "int"}))
    assert validated["date"].dtype == np.int64


def test_integer_periods_must_be_whole_numbers(raw, tmp_path):
    cfg = CFG.with_overrides({"data.freq": "int"})
    bad = raw.assign(date=np.arange(len(raw)).astype(object))
    bad.loc[5, "date"] = "week 5"
    bad.loc[9, "date"] = 2.5
    err = rejected(raw, tmp_path, bad, cfg)
    assert err.column == "date" and "not an integer period (freq='int')" in str(err)
    assert "week 5" in str(err) and list(err.examples.index) == [5, 9]


def test_missing_time_values_are_refused(raw, tmp_path):
    bad = raw.copy()
    bad.loc[4, "date"] = pd.NaT
    err = rejected(raw, tmp_path, bad)
    assert err.column == "date" and "time value is missing" in str(err) and list(err.examples.index) == [4]


def test_non_numeric_target_names_the_column_and_shows_the_values(raw, tmp_path):
    bad = raw.astype({"sales": "object"})
    bad.loc[2, "sales"] = "twelve"
    err = rejected(raw, tmp_path, bad)
    assert err.column == "sales" and "target is not numeric" in str(err) and "twelve" in str(err)


def test_infinite_target_is_refused(raw, tmp_path):
    bad = raw.copy()
    bad.loc[1, "sales"] = np.inf
    err = rejected(raw, tmp_path, bad)
    assert err.column == "sales" and "target is infinite" in str(err)


def test_non_numeric_covariates_name_the_column_and_examples_but_booleans_and_flags_pass(raw, tmp_path):
    bad = raw.astype({"price": "object"})
    bad.loc[[0, 11], "price"] = ["cheap", "n/a"]
    err = rejected(raw, tmp_path, bad)
    message = str(err)
    assert err.column == "price" and "covariate is not numeric (numbers, booleans or 0/1 expected)" in message
    assert "cheap" in message and "n/a" in message
    flags = raw.assign(promo=raw["promo"].astype(bool))
    assert validate(flags, CFG)[0]["promo"].sum() == raw["promo"].sum()
    text_flags = raw.assign(promo=np.where(raw["promo"] == 1, "True", "false"))
    assert validate(text_flags, CFG)[0]["promo"].sum() == raw["promo"].sum()


# -- null keys ----------------------------------------------------------------------------------


def test_null_keys_are_refused_by_default(raw, tmp_path):
    bad = raw.copy()
    bad.loc[6, "item"] = None
    err = rejected(raw, tmp_path, bad)
    assert err.column == "item" and "partition key is null (validation.null_keys=error)" in str(err)
    assert list(err.examples.index) == [6]


def test_null_keys_can_be_dropped_and_are_counted(raw):
    bad = raw.copy()
    bad.loc[[6, 8], "store"] = None
    out, report = validate(bad, policy(null_keys="drop"))
    assert report.counts["dropped_null_keys"] == 2
    assert report.examples["dropped_null_keys"][0]["row"] == 6
    # the two dropped rows leave gaps, counted too: kept by the default gap policy (the generated
    # series record no zeros, so an absent row there is unknown, not a zero sale), filled with "zero"
    assert report.counts["kept_gaps"] == 2 and not out["_filled"].any()
    out, report = validate(bad, policy(null_keys="drop", gaps="zero"))
    assert report.counts["filled_gaps"] == 2 and out["_filled"].sum() == 2


# -- target policies ----------------------------------------------------------------------------


def test_null_target_is_dropped_zeroed_or_refused_by_policy(raw, tmp_path):
    bad = raw.copy()
    bad.loc[[21, 45], "sales"] = np.nan
    out, report = validate(bad, policy(null_target="drop", gaps="keep"))
    assert report.counts["dropped_null_target"] == 2 and len(out) == len(raw) - 2
    out, report = validate(bad, policy(null_target="zero"))
    assert (
        report.counts["zeroed_null_target"] == 2 and (out["sales"] == 0).sum() >= 2 and len(out) == len(raw)
    )
    err = rejected(raw, tmp_path, bad, policy(null_target="error"))
    assert err.column == "sales" and "target is null (validation.null_target=error)" in str(err)
    assert list(err.examples.index) == [21, 45]


def test_negative_target_is_clipped_dropped_kept_or_refused_by_policy(raw, tmp_path):
    bad = raw.copy()
    bad.loc[13, "sales"] = -4.0
    pid = partition_id([bad.loc[13, "store"], bad.loc[13, "item"]])
    out, report = validate(bad, CFG)  # default: clip
    assert report.counts["clipped_negative_target"] == 1
    assert out.loc[(out["partition_id"] == pid) & (out["date"] == bad.loc[13, "date"]), "sales"].item() == 0.0
    out, report = validate(bad, policy(negative_target="drop", gaps="keep"))
    assert report.counts["dropped_negative_target"] == 1 and len(out) == len(raw) - 1
    out, report = validate(bad, policy(negative_target="keep"))
    assert report.counts["kept_negative_target"] == 1 and out["sales"].min() == -4.0
    err = rejected(raw, tmp_path, bad, policy(negative_target="error"))
    assert "target is negative (validation.negative_target=error)" in str(err) and "-4.0" in str(err)


# -- duplicates ---------------------------------------------------------------------------------


def with_same_week_duplicate(raw: pd.DataFrame) -> pd.DataFrame:
    """Row 30 again, dated the Wednesday before its Sunday: the same W period, so a duplicate."""
    extra = raw.iloc[[30]].assign(date=raw.loc[30, "date"] - pd.Timedelta(days=4), sales=10.0, price=99.0)
    return pd.concat([raw, extra], ignore_index=True)


def test_duplicates_within_a_period_are_summed_by_default(raw):
    dup = with_same_week_duplicate(raw)
    out, report = validate(dup, CFG)
    assert report.counts["merged_duplicates"] == 1 and len(out) == len(raw)
    pid = partition_id([raw.loc[30, "store"], raw.loc[30, "item"]])
    row = out[(out["partition_id"] == pid) & (out["date"] == raw.loc[30, "date"])]  # the week's usual Sunday
    assert row["sales"].item() == pytest.approx(raw.loc[30, "sales"] + 10.0)
    assert row["price"].item() == 99.0  # covariates of the last row in input order
    assert {e["row"] for e in report.examples["merged_duplicates"]} == {30, len(raw)}


def test_duplicates_keep_the_last_row_in_input_order_or_are_refused(raw, tmp_path):
    dup = with_same_week_duplicate(raw)
    out, report = validate(dup, policy(duplicates="last"))
    assert report.counts["merged_duplicates"] == 1
    pid = partition_id([raw.loc[30, "store"], raw.loc[30, "item"]])
    kept = out[
        (out["partition_id"] == pid) & (out["_period"] == out.loc[out["price"] == 99.0, "_period"].item())
    ]
    assert kept["sales"].item() == 10.0
    err = rejected(raw, tmp_path, dup, policy(duplicates="error"))
    assert err.column == "date" and "duplicate rows for the same partition (store, item) and period" in str(
        err
    )
    assert set(err.examples.index) == {30, len(raw)}


# -- covariates ---------------------------------------------------------------------------------


def test_null_covariates_are_filled_within_their_partition_forward_then_backward(raw):
    bad = raw.copy()
    bad.loc[[0, 1, 25], "price"] = np.nan  # rows 0-1 start partition 0 (backfilled), 25 mid-series
    out, report = validate(bad, CFG)
    assert report.counts["filled_null_covariates"] == 3
    first = out[out["partition_id"] == partition_id([raw.loc[0, "store"], raw.loc[0, "item"]])]
    assert first["price"].iloc[0] == first["price"].iloc[1] == raw.loc[2, "price"]
    mid = out[out["partition_id"] == partition_id([raw.loc[25, "store"], raw.loc[25, "item"]])]
    position = int((raw.loc[20:25, "store"] == raw.loc[25, "store"]).sum()) - 1
    assert mid["price"].iloc[position] == raw.loc[24, "price"]


def test_a_covariate_null_in_a_whole_partition_gets_the_column_median_and_is_counted(raw):
    bad = raw.copy()
    bad.loc[0:19, "price"] = np.nan  # all of partition 0
    out, report = validate(bad, CFG)
    assert report.counts["median_filled_null_covariates"] == 20
    assert out["price"].isna().sum() == 0


def test_null_covariates_zeroed_or_refused_by_policy(raw, tmp_path):
    bad = raw.copy()
    bad.loc[[3, 4], "promo"] = np.nan
    out, report = validate(bad, policy(null_covariates="zero"))
    assert report.counts["zeroed_null_covariates"] == 2
    err = rejected(raw, tmp_path, bad, policy(null_covariates="error"))
    assert err.column == "promo" and "covariate is null (validation.null_covariates=error)" in str(err)


# -- gaps ---------------------------------------------------------------------------------------


def test_gaps_are_filled_with_zero_marked_and_get_forward_filled_covariates(raw):
    gappy = raw.drop(index=[22, 23]).reset_index(drop=True)
    out, report = validate(gappy, policy(gaps="zero"))
    assert report.counts["filled_gaps"] == 2 and len(out) == len(raw)
    filled = out[out["_filled"]]
    assert list(filled["date"]) == [raw.loc[22, "date"], raw.loc[23, "date"]]  # Sundays, as the input's
    assert (filled["sales"] == 0).all()
    assert (filled["price"] == raw.loc[21, "price"]).all() and (filled["store"] == raw.loc[21, "store"]).all()


def test_gaps_can_be_interpolated_or_kept(raw):
    gappy = raw.drop(index=[22]).reset_index(drop=True)
    out, report = validate(gappy, policy(gaps="interpolate"))
    value = out.loc[out["_filled"], "sales"].item()
    assert value == pytest.approx((raw.loc[21, "sales"] + raw.loc[23, "sales"]) / 2)
    out, report = validate(gappy, policy(gaps="keep"))
    assert report.counts["kept_gaps"] == 1 and len(out) == len(raw) - 1 and not out["_filled"].any()


def test_the_default_fills_zeros_only_where_a_series_records_zeros_and_never_for_a_null_target(raw):
    """Issue 17 item 6: an absent row is a zero sale only for a series whose source writes zeros."""
    zeros = raw.copy()
    first = zeros.groupby(["store", "item"]).ngroup()
    zeros.loc[(first == 0) & (zeros.index % 3 == 0), "sales"] = 0.0  # series 0 records zeros
    series0 = zeros.index[first == 0]
    series1 = zeros.index[first == 1]
    gappy = zeros.drop(index=[series0[7], series1[7]]).reset_index(drop=True)
    out, report = validate(gappy, CFG)
    assert report.counts == {"filled_gaps": 1, "kept_gaps": 1}
    filled = out[out["_filled"]]
    assert len(filled) == 1 and (filled["sales"] == 0).all()
    assert filled[["store", "item"]].iloc[0].tolist() == zeros.loc[series0[0], ["store", "item"]].tolist()
    assert out[["partition_id", "_period"]].equals(
        out[["partition_id", "_period"]].sort_values(["partition_id", "_period"], ignore_index=True))
    # a null target in the zero-recording series leaves its gap unknown, never a zero
    nulls = zeros.copy()
    nulls.loc[series0[9], "sales"] = np.nan
    out, report = validate(nulls, CFG)
    assert report.counts["dropped_null_target"] == 1 and "filled_gaps" not in report.counts
    assert report.counts["kept_gaps"] == 1 and not out["_filled"].any()


def test_gap_filling_works_for_integer_periods(raw):
    ints = (
        raw.assign(date=raw.groupby(["store", "item"]).cumcount() + 1).drop(index=[5]).reset_index(drop=True)
    )
    out, report = validate(ints, CFG.with_overrides({"data.freq": "int", "validation.gaps": "zero"}))
    assert report.counts["filled_gaps"] == 1
    assert out.loc[out["_filled"], "date"].item() == 6 and out.loc[out["_filled"], "_period"].item() == 6


# -- the validated frame and the report ---------------------------------------------------------


def test_validated_frame_follows_the_format_contract(raw):
    shuffled = raw.sample(frac=1.0, random_state=0)
    out, report = validate(shuffled, CFG)
    assert list(out.columns) == [
        "partition_id",
        "store",
        "item",
        "date",
        "_period",
        "sales",
        "price",
        "promo",
        "_filled",
    ]
    assert out["sales"].dtype == out["price"].dtype == out["promo"].dtype == np.float64
    assert out["_period"].dtype == np.int64 and out["_filled"].dtype == bool
    assert out[["partition_id", "_period"]].equals(
        out[["partition_id", "_period"]].sort_values(["partition_id", "_period"], ignore_index=True)
    )
    assert not out.duplicated(["partition_id", "_period"]).any()
    expected = [partition_id([s, i]) for s, i in zip(out["store"], out["item"])]
    assert out["partition_id"].tolist() == expected
    assert report.partitions == 6 and report.output_rows == len(out) == len(raw) and report.counts == {}
    assert report.anchor == "start:518400"  # Sundays: 6 days after the Monday a W period starts


def test_report_accounts_for_every_row_and_serialises(raw):
    bad = raw.copy()
    bad.loc[[2, 3], "sales"] = np.nan  # dropped, then refilled as gaps
    bad.loc[50, "sales"] = -1.0  # clipped
    bad = with_same_week_duplicate(bad)  # merged
    out, report = validate(bad, policy(gaps="zero"))
    c = report.counts
    assert c == {
        "dropped_null_target": 2,
        "clipped_negative_target": 1,
        "merged_duplicates": 1,
        "filled_gaps": 2,
    }
    assert (
        report.output_rows
        == report.input_rows - c["dropped_null_target"] - c["merged_duplicates"] + c["filled_gaps"]
    )
    again = ValidationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    lines = report.summary_lines()
    assert lines[0] == f"input rows: {len(bad)}"
    assert any(
        line.startswith("dropped_null_target: 2 (rows dropped: the target was null)") for line in lines
    )


def test_validate_does_not_modify_its_input(raw):
    bad = raw.copy()
    bad.loc[3, "sales"] = -2.0
    before = bad.copy()
    validate(bad, CFG)
    pd.testing.assert_frame_equal(bad, before)


def test_odd_key_values_and_time_zones_are_handled(raw):
    odd = raw.copy()
    odd["store"] = np.where(
        odd.index < 40, "a/b", np.where(odd.index < 80, "x'; DROP TABLE sales;--", "Café ☕")
    )
    odd["date"] = odd["date"].dt.strftime("%Y-%m-%dT00:00:00+02:00")
    out, report = validate(odd, CFG)
    assert report.partitions == 6
    assert out["partition_id"].str.fullmatch(r"p[0-9a-f]{20}").all()
    assert set(out["store"]) == {"a/b", "x'; DROP TABLE sales;--", "Café ☕"}
    assert (out["date"].dt.day_name() == "Sunday").all()  # wall time kept when the zone is dropped


# -- a repair must not create a value the checks refuse (issue 18) ---------------------------------


def test_summing_duplicates_to_infinity_is_refused_naming_the_partition_and_period(tmp_path):
    """Two finite rows of 1.5e308 sum to inf after the infinity check: refused through the CLI (exit 2)
    with the partition and the period named, never a partition that fails later in training."""
    import subprocess
    import sys
    from pathlib import Path

    frame = pd.DataFrame({"store": ["S1"] * 3 + ["S2"] * 2, "item": "I1",
                          "date": ["2024-01-01", "2024-01-02", "2024-01-02", "2024-01-01", "2024-01-02"],
                          "sales": [1.0, 1.5e308, 1.4e308, 2.0, 3.0]})  # two sales, not one row twice
    path = tmp_path / "huge.csv"
    frame.to_csv(path, index=False)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "ingest", "--workdir", str(tmp_path / "w"), "--data", str(path),
         "--freq", "D", "--covariates", "", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(repo), "PATH": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    message = done.stdout + done.stderr
    assert "store=S1" in message and "item=I1" in message and "2024-01-02" in message
    assert "infinite" in message and "validation.duplicates" in message
    assert not list((tmp_path / "w").rglob("batch-*.parquet"))  # nothing reached the lake


def test_summing_duplicates_to_infinity_is_refused_in_streamed_parts_too(tmp_path):
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame = pd.DataFrame({"store": "S1", "item": "I1", "date": ["2024-01-01", "2024-01-01"],
                          "sales": [-1.5e308, -1.4e308]})
    path = tmp_path / "huge.parquet"
    frame.to_parquet(path, index=False)
    cfg = CFG.with_overrides({"data.freq": "D", "data.covariates": [], "validation.negative_target": "keep"})
    plan = StreamPlan(batch_rows=1, buckets=2, part_rows=1, workers=1, worker_mb=64)
    with pytest.raises(DataValidationError, match="infinite") as caught:
        ingest_source(LocalLake(tmp_path / "lake"), path, cfg, stream=True, plan=plan, tmp_root=tmp_path)
    assert caught.value.column == "sales" and len(caught.value.examples) == 2


def test_a_missing_column_names_the_flag_that_names_it():
    """Covariates named but absent: the error says how to name others, or none."""
    frame = pd.DataFrame({"store": ["S1"], "item": ["I1"], "date": ["2024-01-07"], "sales": [3.0]})
    with pytest.raises(DataValidationError) as caught:
        validate(frame, CFG)
    assert "--covariates '' for none" in str(caught.value)
    with pytest.raises(DataValidationError, match=r"--target \(config data.target\)"):
        validate(frame.rename(columns={"sales": "units"}).assign(price=1.0, promo=0), ProjectConfig())


def test_example_rows_say_which_line_of_a_csv_they_are():
    frame = pd.DataFrame({"store": ["S1", "S1"], "item": ["I1", "I1"], "date": ["2024-01-07", "not a date"],
                          "sales": [3.0, 4.0], "price": [1.0, 1.0], "promo": [0, 0]})
    with pytest.raises(DataValidationError, match=r"line row \+ 2"):
        validate(frame, ProjectConfig())


def test_a_row_loaded_twice_is_refused_by_default_naming_the_fix(raw):
    twice = pd.concat([raw, raw.iloc[[30]]], ignore_index=True)
    with pytest.raises(DataValidationError, match="exact_duplicates = 'drop'") as caught:
        validate(twice, CFG)
    assert caught.value.rows == 1 and list(caught.value.examples.index) == [len(raw)]
    out, report = validate(twice, CFG.with_overrides({"validation.exact_duplicates": "drop"}))
    assert report.counts["dropped_exact_duplicates"] == 1 and len(out) == len(raw)
    pid = partition_id([raw.loc[30, "store"], raw.loc[30, "item"]])
    row = out[(out["partition_id"] == pid) & (out["date"] == raw.loc[30, "date"])]
    assert row["sales"].item() == pytest.approx(raw.loc[30, "sales"])  # not doubled
    out, report = validate(twice, CFG.with_overrides({"validation.exact_duplicates": "merge"}))
    row = out[(out["partition_id"] == pid) & (out["date"] == raw.loc[30, "date"])]
    assert row["sales"].item() == pytest.approx(2 * raw.loc[30, "sales"])  # summed, as asked
