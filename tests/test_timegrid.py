"""Time as integer periods, and future time stamps that line up with the input's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.data.timegrid import anchor_offset, from_periods, partition_anchors, to_periods


@pytest.mark.parametrize("freq, alias", [("W", "W"), ("W-MON", "W-MON"), ("D", "D"), ("MS", "MS"),
                                         ("M", "ME"), ("Q", "QE"), ("h", "h")])
def test_next_periods_continue_the_input_time_stamps(freq, alias):
    times = pd.Series(pd.date_range("2023-01-01", periods=8, freq=alias))
    periods = to_periods(times, freq)
    assert np.all(np.diff(periods) == 1)
    anchor = anchor_offset(times.iloc[:6], freq)
    rebuilt = from_periods(periods[6:], freq, anchor)
    assert list(rebuilt) == list(times.iloc[6:])


def test_each_partition_keeps_its_own_place_in_the_period():
    """M4's weekly series: most on Fridays, one on Wednesdays; month-end and month-start series together."""
    fridays = pd.date_range("2024-01-05", periods=6, freq="W-FRI")
    wednesdays = pd.date_range("2024-01-03", periods=4, freq="W-WED")
    times = pd.Series(np.concatenate([fridays, wednesdays]))
    assert partition_anchors(times, np.array([0, 6, 10]), "W") == \
        [anchor_offset(times.iloc[:6], "W"), anchor_offset(times.iloc[6:], "W")]
    own = partition_anchors(times, np.array([0, 6, 10]), "W")
    assert list(from_periods(to_periods(times.iloc[6:], "W"), "W", own[1])) == list(wednesdays)
    ends, starts = pd.date_range("2023-01-31", periods=5, freq="ME"), pd.date_range("2023-01-01", periods=5, freq="MS")
    monthly = pd.Series(np.concatenate([ends, starts]))
    assert partition_anchors(monthly, np.array([0, 5, 10]), "MS") == ["end:0", "start:0"]
    filled = np.array([True] * 3 + [False] * 3 + [True] * 4)  # only observed rows vote; none: no anchor
    assert partition_anchors(times, np.array([0, 6, 10]), "W", observed=~filled)[1] is None


def test_dates_inside_one_period_share_it():
    times = pd.Series(pd.to_datetime(["2024-01-01", "2024-01-03", "2024-01-07", "2024-01-08"]))
    periods = to_periods(times, "W")
    assert periods[0] == periods[1] == periods[2] != periods[3]


def test_integer_periods_are_used_as_they_are():
    periods = to_periods(pd.Series([3, 4, 10]), "int")
    assert list(periods) == [3, 4, 10]
    assert anchor_offset(pd.Series([1, 2]), "int") is None
    assert list(from_periods(np.array([11, 12]), "int", None)) == [11, 12]


# -- the hours of a daylight-saving change (issue 18) ----------------------------------------------
# Sub-daily data with offsets lives on a UTC grid: the spring hour that does not exist on the wall
# clock is not invented (a gap filled with 0), and the autumn hour that the wall clock shows twice is
# two periods, not one summed duplicate. The same rule for CSV text and Parquet tz-aware timestamps.

NEW_YORK_SPRING = pd.date_range("2024-03-10 00:00", "2024-03-10 05:00", freq="h", tz="America/New_York")
NEW_YORK_AUTUMN = pd.date_range("2024-11-03 04:00", "2024-11-03 08:00", freq="h", tz="UTC").tz_convert(
    "America/New_York")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("hours", [NEW_YORK_SPRING, NEW_YORK_AUTUMN], ids=["spring", "autumn"])
def test_hourly_data_with_offsets_keeps_every_real_hour_across_a_dst_change(tmp_path, fmt, stream, hours):
    from shared.config import ProjectConfig
    from shared.lake import LocalLake
    from shared.data.streaming import StreamPlan, ingest_source

    frame = pd.DataFrame({"store": "S1", "item": "I1", "date": pd.Series(hours),
                          "sales": np.arange(1.0, len(hours) + 1.0)})
    assert frame["date"].dt.strftime("%z").nunique() == 2
    path = tmp_path / f"hourly.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    cfg = ProjectConfig().with_overrides({"data.freq": "h", "data.covariates": []})
    plan = StreamPlan(batch_rows=2, buckets=4, part_rows=2, workers=1, worker_mb=64) if stream else None
    lake = tmp_path / "lake"
    _, report = ingest_source(LocalLake(lake), path, cfg, stream=stream, plan=plan, tmp_root=tmp_path)
    out = pd.concat(pd.read_parquet(p) for p in lake.rglob("batch-*.parquet")).sort_values("date")
    assert report.counts == {}  # no filled gap, no merged duplicate
    assert out["sales"].tolist() == frame["sales"].tolist()
    utc = pd.Series(hours).dt.tz_convert("UTC").dt.tz_localize(None)
    assert out["date"].tolist() == utc.tolist()  # the instants, on the UTC clock
    assert np.all(np.diff(out["_period"].to_numpy()) == 1)
