"""Time as integer periods, and future time stamps that line up with the input's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.timegrid import anchor_offset, from_periods, to_periods


@pytest.mark.parametrize("freq, alias", [("W", "W"), ("W-MON", "W-MON"), ("D", "D"), ("MS", "MS"),
                                         ("M", "ME"), ("Q", "QE"), ("h", "h")])
def test_next_periods_continue_the_input_time_stamps(freq, alias):
    times = pd.Series(pd.date_range("2023-01-01", periods=8, freq=alias))
    periods = to_periods(times, freq)
    assert np.all(np.diff(periods) == 1)
    anchor = anchor_offset(times.iloc[:6], freq)
    rebuilt = from_periods(periods[6:], freq, anchor)
    assert list(rebuilt) == list(times.iloc[6:])


def test_dates_inside_one_period_share_it():
    times = pd.Series(pd.to_datetime(["2024-01-01", "2024-01-03", "2024-01-07", "2024-01-08"]))
    periods = to_periods(times, "W")
    assert periods[0] == periods[1] == periods[2] != periods[3]


def test_integer_periods_are_used_as_they_are():
    periods = to_periods(pd.Series([3, 4, 10]), "int")
    assert list(periods) == [3, 4, 10]
    assert anchor_offset(pd.Series([1, 2]), "int") is None
    assert list(from_periods(np.array([11, 12]), "int", None)) == [11, 12]
