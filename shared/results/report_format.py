"""Small formatters the report's HTML shares: escaping, percentages, counts, durations, pills."""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from shared.results.report_data import _num


def _pill(text: Any) -> str:
    return f"<span class='pill {_e(text)}'>{_e(text)}</span>"


def _text(value: Any) -> str:
    """Text of a stored value; SQL NULL (None or NaN once in a frame) is empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _int(value: Any) -> str:
    v = _num(value)
    return "" if v is None else f"{int(v):,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))
