"""Compute backends: where a group of mini-batch files is trained or scored.

Both backends run the same entry scripts (``shared.entry.train`` / ``shared.entry.score``) with
the Azure ML parallel job contract. The local backend runs a group on a process pool inside
``submit`` and records the outcome, so the Durable monitor sees a terminal state on its first
poll; the Azure ML backend (``shared.azureml``) submits a parallel job and is polled.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import ManyModelsError

TERMINAL_STATES = ("completed", "failed", "canceled")
JOB_STATES = ("queued", "running", *TERMINAL_STATES)


@dataclass
class JobHandle:
    """A submitted compute job, small enough to travel in a Durable payload."""

    job_id: str
    kind: str  # train | score
    run_id: str
    group_index: int
    state: str = "queued"
    detail: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "JobHandle":
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def job_id_for(kind: str, run_id: str, group_index: int) -> str:
    """Deterministic job ids make a replayed or redelivered submit find the job it already made."""
    return f"{kind}-{run_id}-g{group_index:05d}"


JOB_KINDS = ("train", "score")  # what a group job does


class BackendError(ManyModelsError, ValueError):
    """A backend cannot be opened or asked: unknown job kind, unknown job, missing settings."""


def check_kind(kind: str) -> None:
    if kind not in JOB_KINDS:
        raise BackendError(f"unknown job kind {kind!r}; one of {list(JOB_KINDS)}")
