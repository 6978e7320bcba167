"""The metric vocabulary, defined once: every metric's name and which way is better.

Apart from :mod:`shared.models.metrics` (which computes the metrics and re-exports these names) because
the config checks metric names and must import without numpy and pandas (the CLI starts in 0.1 s).
"""
from __future__ import annotations

ERROR_METRICS = ("wape", "mape", "rmse")  # lower is better; the metrics a selection may rank on
# each accuracy is 1 - an error, clipped to [0, 1] (higher is better), and is derived from that error
ACCURACY_OF_ERROR = {"accuracy": "wape", "mape_accuracy": "mape"}
METRICS = (*ERROR_METRICS, *ACCURACY_OF_ERROR)


def lower_is_better(metric: str) -> bool:
    """Is a smaller value of ``metric`` better? Errors yes; accuracies (and any other name) no."""
    return metric in ERROR_METRICS
