"""What validation hands back: the report of repairs, the error that refuses an input, and the
context a part of a larger input is validated with (:mod:`shared.data.streaming`).

:class:`ValidationReport` counts every dropped or repaired row by reason (:data:`REASONS`), with
up to :data:`MAX_EXAMPLES` example rows; :class:`DataValidationError` names the column, the rule
and example rows as read (:func:`example_rows` quotes them by input position).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shared.errors import ManyModelsError

MAX_EXAMPLES = 5
# A warning, not an error: this share of the input merged as duplicates suggests a wrong freq.
MERGED_WARNING_SHARE = 0.10


class _Unset:
    """A global fact a part of the input leaves to be computed from the part itself."""

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:  # pickled by reference: still ``is UNSET`` in a worker process
        return "UNSET"


UNSET: Any = _Unset()

REASONS = {
    "dropped_null_keys": "rows dropped: a partition key was null",
    "dropped_null_target": "rows dropped: the target was null",
    "zeroed_null_target": "rows repaired: a null target set to 0",
    "clipped_negative_target": "rows repaired: a negative target clipped to 0",
    "dropped_negative_target": "rows dropped: the target was negative",
    "kept_negative_target": "rows kept with a negative target (policy keep)",
    "dropped_exact_duplicates": "rows dropped as exact copies of earlier rows (validation.exact_duplicates)",
    "merged_duplicates": "rows merged into another row of the same partition and period",
    "filled_null_covariates": "covariate values filled from the same partition's neighbours",
    "median_filled_null_covariates": "covariate values set to the column median (null in a whole partition)",
    "zeroed_null_covariates": "covariate values set to 0",
    "filled_gaps": "rows added for missing periods inside a series",
    "kept_gaps": "missing periods inside a series left as gaps (policy keep)",
}


@dataclass
class PartContext:
    """Validating one part of a larger input (:mod:`shared.data.streaming`): what the part cannot see.

    Inputs are facts about the whole input, decided outside (``UNSET``: compute from the part as
    :func:`validate` does). Outputs are what the part observed, for the global checks that
    :func:`validate` makes over the whole frame: the anchor's statistics, whether the anchor or a
    covariate median was used, covariates null in the whole part, and the stage of each reason.
    The part's frame is indexed by input row positions.
    """

    anchor: Any = UNSET
    first_time: Any = UNSET  # the input's first time value, quoted by "not a date"
    time_format: str | None = None  # strptime format guessed from the input's first time value
    covariate_medians: dict[str, float] = field(default_factory=dict)
    collect_covariates: bool = False
    # observations
    stage: tuple = ()
    reason_stage: dict[str, tuple] = field(default_factory=dict)
    anchor_counts: Any = None
    used_anchor: bool = False
    tz_kinds: set = field(default_factory=set)  # "offset" / "naive": times with and without an offset
    needs_median: set = field(default_factory=set)
    non_null: dict[str, int] = field(default_factory=dict)
    all_null: dict[str, Any] = field(default_factory=dict)  # covariate -> (null rows, examples)
    covariate_values: dict[str, np.ndarray] = field(default_factory=dict)

    def enter(self, stage: tuple, report: "ValidationReport") -> None:
        """Start a stage; reasons that appeared since the last call belong to the previous one."""
        for reason in report.counts:
            self.reason_stage.setdefault(reason, self.stage)
        self.stage = stage



class DataValidationError(ManyModelsError, ValueError):
    """The input breaks the data contract; ``column``, ``rule`` and ``examples`` say where and how."""

    def __init__(
        self,
        column: str | list[str] | None,
        rule: str,
        examples: pd.DataFrame | None = None,
        rows: int | None = None,
    ) -> None:
        self.column = column
        self.rule = rule
        self.examples = examples if examples is not None else pd.DataFrame()
        self.rows = rows
        where = (
            f"column {column!r}: " if isinstance(column, str) else (f"columns {column}: " if column else "")
        )
        message = f"{where}{rule}"
        if rows is not None:
            message += f" ({rows} row{'s' if rows != 1 else ''})"
        if len(self.examples):
            shown = self.examples.head(MAX_EXAMPLES)
            message += ("\nexamples (row = position in the input from 0; in a CSV file with a header, "
                        f"line row + 2):\n{shown.to_string()}")
        super().__init__(message)


@dataclass
class ValidationReport:
    """What validation did: row counts in and out, and a count (with examples) per repair reason."""

    input_rows: int = 0
    output_rows: int = 0
    partitions: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    policy: dict[str, str] = field(default_factory=dict)
    anchor: str | None = None

    def add(self, reason: str, n: int, examples: pd.DataFrame | None = None) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + int(n)
        if examples is not None and reason not in self.examples:
            shown = examples.head(MAX_EXAMPLES).reset_index(drop=examples.index.name != "row")
            self.examples[reason] = json.loads(
                shown.to_json(orient="records", date_format="iso", default_handler=str)
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ValidationReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def repairs(self) -> dict[str, int]:
        """Rows dropped, repaired, merged or added, per kind (the reasons of REASONS)."""
        return {reason: int(n) for reason, n in self.counts.items() if n}

    def warnings(self, freq: str | None = None) -> list[str]:
        """Repairs so large that the configuration is likely wrong (the frequency, mostly)."""
        out = []
        freq_text = f" (freq={freq!r})" if freq else ""
        merged = int(self.counts.get("merged_duplicates", 0))
        if self.input_rows and merged >= MERGED_WARNING_SHARE * self.input_rows:
            out.append(f"{merged} of {self.input_rows} input rows were merged into another row of the "
                       f"same partition and period{freq_text}: if the data is finer than the "
                       "frequency, set data.freq (e.g. D); validation.duplicates chooses sum, last or error")
        filled = int(self.counts.get("filled_gaps", 0))
        if self.output_rows and filled > 0.5 * self.output_rows:
            out.append(f"{filled} of {self.output_rows} rows were added for missing periods{freq_text}: "
                       "if the data is coarser than the frequency, set data.freq; validation.gaps = "
                       "'keep' leaves gaps as they are")
        return out

    def summary_lines(self) -> list[str]:
        lines = [
            f"input rows: {self.input_rows}",
            f"output rows: {self.output_rows}",
            f"partitions: {self.partitions}",
        ]
        for reason, n in self.counts.items():
            lines.append(f"{reason}: {n} ({REASONS.get(reason, reason)})")
        if not self.counts:
            lines.append("no rows dropped or repaired")
        lines.extend(f"warning: {w}" for w in self.warnings())
        return lines



def example_rows(source: pd.DataFrame, positions: np.ndarray) -> pd.DataFrame:
    """Up to five rows of ``source`` by index label (its row position in the input)."""
    shown = source.loc[np.asarray(positions)[:MAX_EXAMPLES]]
    # a missing value reads the same whatever the column's type in this batch (NaN, None, <NA>)
    shown = shown.astype(object).where(shown.notna(), None)
    shown.index.name = "row"
    return shown
