"""One table of bounds for every number that comes from a file, a message or a request.

The project file, the CLI's flags, Service Bus messages, HTTP starts and the serving requests all
check their numbers here, so a setting has one range wherever it is given, and no input can ask
for unbounded work (a million folds, a hundred thousand workers, a 50 MB key) or slip a NaN past a
comparison (``0.00 >= nan`` is false, but so is ``0.00 < nan``: a NaN threshold decides nothing).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from shared.errors import ManyModelsError


class BoundsError(ManyModelsError, ValueError):
    """A number out of its bounds (or not a finite number); ``where`` names the setting or field."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class Bound:
    """The inclusive range of one number, whether it must be whole, and what it counts."""

    low: float
    high: float
    what: str
    integer: bool = True

    def describe(self) -> str:
        word = "a whole number" if self.integer else "a finite number"
        return f"{word} from {_num(self.low)} to {_num(self.high)} ({self.what})"


WORKERS_PER_CPU = 4  # processes a pool starts per CPU at most, whatever a setting asks for
MAX_KEY_LENGTH = 1024  # characters of one partition key value

# name -> bound. Config settings by their dotted name in the project file; the other inputs by the
# name their adapters use. docs/configuration.md lists this table; keep the two together.
BOUNDS: dict[str, Bound] = {
    "forecast.horizon": Bound(1, 10_000, "periods to forecast"),
    "forecast.test_periods": Bound(1, 10_000, "periods of the test window"),
    "forecast.validation_periods": Bound(1, 10_000, "periods of each validation window"),
    "forecast.season_length": Bound(1, 10_000, "periods per season"),
    "forecast.min_train_periods": Bound(0, 100_000, "observed periods before validation"),
    "forecast.min_periods": Bound(1, 100_000, "observed periods in all"),
    "forecast.interval_level": Bound(0.01, 0.99, "share of the prediction interval", integer=False),
    "training.seed": Bound(0, 2**32 - 1, "random seed"),
    "training.folds": Bound(1, 20, "validation windows per candidate"),
    "training.selection_margin": Bound(0.0, 1.0, "share a partition's own candidate must win by", integer=False),
    "training.global_max_rows": Bound(1000, 10_000_000, "rows the global model is fitted on"),
    "training.history_periods": Bound(0, 520, "observed periods before the test window stored per partition"),
    "runner.workers": Bound(0, 256, "worker processes, 0 = one per CPU; at most "
                                    f"{WORKERS_PER_CPU} per CPU start"),
    "runner.mini_batch_size": Bound(1, 10_000, "files per run(mini_batch) call"),
    "runner.rows_per_file": Bound(1, 10_000_000, "rows per mini-batch file"),
    "runner.retries": Bound(0, 10, "retries of a failed mini-batch"),
    "ingest.memory_mb": Bound(64, 1_048_576, "MB of memory ingestion may use"),
    "ingest.workers": Bound(0, 256, "ingestion processes, 0 = one per CPU"),
    "promotion.min_value": Bound(-1e12, 1e12, "the promotion metric's threshold", integer=False),
    "promotion.min_history": Bound(0, 100_000, "observed periods before promotion"),
    "scoring.max_distance": Bound(1, 100_000, "periods past the end of training"),
    "min_accuracy": Bound(0.0, 1.0, "accuracy threshold of a promotion", integer=False),
    "group_size": Bound(1, 100_000, "partition files per compute job"),
    "generate.partitions": Bound(1, 1_000_000, "partitions of a synthetic panel"),
    "generate.periods": Bound(1, 100_000, "periods of a synthetic panel"),
    "key_length": Bound(0, MAX_KEY_LENGTH, "characters of a partition key value"),
    "lake_path_length": Bound(1, 1024, "characters of a lake path (Azure's blob name limit)"),
    "lake_segment_length": Bound(1, 255, "characters of one folder or file name of a lake path"),
    "covariate_magnitude": Bound(0.0, 1e15, "magnitude (absolute value) of a covariate", integer=False),
}


def limit(name: str) -> Bound:
    """The bound of ``name`` (a KeyError for a name the table lacks: a bug, not an input)."""
    return BOUNDS[name]


def check(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` if it is a finite number within the bound of ``name``, else :class:`BoundsError`
    naming ``where`` (default: ``name``), the value and the bound. Booleans and text are refused:
    a number from a file or a message must already be a number."""
    bound = BOUNDS[name]
    where = where or name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BoundsError(where, f"must be {bound.describe()}, got {shorten(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BoundsError(where, f"{value!r} is not a finite number; must be {bound.describe()}")
    if bound.integer and isinstance(value, float) and not value.is_integer():
        raise BoundsError(where, f"must be {bound.describe()}, got {value!r}")
    if not bound.low <= value <= bound.high:
        raise BoundsError(where, f"{shorten(value)} is out of bounds: must be {bound.describe()}")
    return value


def check_length(name: str, text: str, where: str) -> str:
    """``text`` if its length is within the bound of ``name``; the error quotes only its start."""
    bound = BOUNDS[name]
    if not bound.low <= len(text) <= bound.high:
        raise BoundsError(where, f"{len(text):,} characters ({shorten(text)}); must be "
                                 f"{_num(bound.low)} to {_num(bound.high)} {bound.what}")
    return text


def worker_count(requested: int, cpus: int | None = None) -> int:
    """The processes a pool starts for a setting of ``requested`` (0 = one per CPU): never more than
    :data:`WORKERS_PER_CPU` per CPU, so a setting made on a large machine cannot swamp a small one."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(int(requested) or cpus, WORKERS_PER_CPU * cpus))


def _num(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:g}"


def shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
