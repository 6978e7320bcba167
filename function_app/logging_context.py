"""Structured logs that let Application Insights follow one run from event to promotion.

Every line carries ``key=value`` fields (run id, Durable instance id, group, message id...) twice:
in the text, which the Functions host always ships to Application Insights (query it with
``parse``/``extract`` in KQL), and as record attributes, which become ``customDimensions`` when the
app runs with OpenTelemetry (``azure-monitor-opentelemetry``). Orchestrator logs stay quiet while
the orchestrator replays, so each line is written once per run, not once per replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

LOGGER_NAME = "manymodels.functions"
_RESERVED = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


@dataclass(frozen=True)
class RunLog:
    """A logger bound to some fields; ``bind`` adds more. ``muted`` silences it (orchestrator replay)."""

    fields: dict[str, Any] = field(default_factory=dict)
    muted: Callable[[], bool] = lambda: False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))

    def bind(self, **more: Any) -> "RunLog":
        return RunLog({**self.fields, **more}, self.muted, self.logger)

    def info(self, message: str, **more: Any) -> None:
        self._log(logging.INFO, message, more)

    def warning(self, message: str, **more: Any) -> None:
        self._log(logging.WARNING, message, more)

    def error(self, message: str, **more: Any) -> None:
        self._log(logging.ERROR, message, more)

    def _log(self, level: int, message: str, more: dict[str, Any]) -> None:
        if self.muted():
            return
        values = {k: v for k, v in {**self.fields, **more}.items() if v is not None}
        text = " ".join(f"{k}={_text(v)}" for k, v in values.items())
        extra = {(k if k not in _RESERVED else f"mm_{k}"): v for k, v in values.items()}
        self.logger.log(level, "%s | %s", message, text, extra=extra)


def orchestration_log(context: Any, **fields: Any) -> RunLog:
    """A RunLog for an orchestrator: bound to its instance id, silent while replaying."""
    return RunLog({"instance_id": context.instance_id, **fields}, muted=lambda: bool(context.is_replaying))


def _text(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text
