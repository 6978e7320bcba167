"""What each pipeline stage returns: small JSON-able summaries that travel through Durable Functions.

Orchestrators pass these between activities (``to_dict`` / ``from_dict``): lake paths and counts,
never data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from shared.runs.runner import RunnerOutcome


@dataclass
class _Payload:
    """JSON round-trip for summaries that travel through Durable Functions."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]):
        return cls(**raw)


@dataclass
class IngestSummary(_Payload):
    dataset_id: str
    partitions: int
    rows: int
    report: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    rewrote: str = ""  # an earlier copy of this dataset was broken: what, and that it was written again


@dataclass
class TrainingPlan(_Payload):
    run_id: str
    dataset_id: str
    groups: list[list[str]]
    partitions: int = 0  # partitions to train (incremental runs: the changed ones)
    carried: int = 0  # partitions whose model is carried forward unchanged


@dataclass
class GroupSummary(_Payload):
    run_id: str
    group_index: int
    partitions: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failed_batches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def of(cls, run_id: str, group_index: int, outcome: RunnerOutcome) -> "GroupSummary":
        """Counts by status of the rows a group's entry script returned."""
        statuses: dict[str, int] = {}
        for row in outcome.rows:
            status = row.get("status", "unknown")
            statuses[status] = statuses.get(status, 0) + 1
        return cls(run_id=run_id, group_index=group_index, partitions=len(outcome.rows), statuses=statuses,
                   failed_batches=[dict(f) for f in outcome.failed_batches], seconds=round(outcome.seconds, 3))


@dataclass
class RegisterSummary(_Payload):
    run_id: str
    trained: int = 0
    baseline_only: int = 0
    failed: int = 0
    skipped: int = 0
    registered: int = 0
    carried: int = 0
    missing: int = 0
    model_wape: float | None = None
    baseline_wape: float | None = None
    failures: list[dict[str, str]] = field(default_factory=list)


@dataclass
class PromotionSummary(_Payload):
    run_id: str
    promoted: int = 0
    rejected: int = 0
    unchanged: int = 0
    in_production: int = 0
    reconciled: int = 0  # production models whose missing SQL promotion record this run wrote
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class ScoringPlan(_Payload):
    score_id: str
    groups: list[list[str]]
    horizon: int | None = None
    source: str | None = None


@dataclass
class LoadSummary(_Payload):
    score_id: str
    rows: int = 0
    partitions: int = 0
    fallback_partitions: int = 0
    no_model: int = 0
    failed: int = 0
    degraded: int = 0  # answered by a fallback because an artifact they needed could not be used
    problems: list[str] = field(default_factory=list)  # the first failed / degraded partitions and why
