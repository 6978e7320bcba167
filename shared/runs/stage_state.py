"""What the pipeline's stages share: where the latest dataset and run are, a run's ``run.json``, a
dataset by id, content-derived ids, the ``runs`` table record of a stage, and the stages' error.

Stages live in :mod:`shared.runs.pipeline` and :mod:`shared.runs.train_stage`; this module keeps them free of
import cycles.
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from shared import layout
from shared.errors import ManyModelsError
from shared.lake import LakeError
from shared.data.partitioning import load_dataset

if TYPE_CHECKING:  # pragma: no cover
    from shared.runs.workspace import Workspace


class PipelineError(ManyModelsError, RuntimeError):
    """A stage cannot run: a missing dataset, run or model; the message says which and what to do."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(*parts: Any, prefix: str) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return prefix + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def latest_dataset_id(ws: Workspace) -> str:
    if not ws.lake.exists(layout.LATEST_DATASET):
        raise PipelineError(f"no dataset in {ws.root}: run 'manymodels ingest --data FILE' first")
    return ws.lake.read_bytes(layout.LATEST_DATASET).decode().strip()


def _load_dataset(ws: Workspace, dataset_id: str):
    try:
        return load_dataset(ws.lake, dataset_id)
    except LakeError as exc:
        raise PipelineError(f"dataset {dataset_id} not found in the lake of {ws.root}") from exc


def _run_meta(ws: Workspace, run_id: str) -> dict[str, Any]:
    path = layout.run_meta(run_id)
    if not ws.lake.exists(path):
        raise PipelineError(f"run {run_id} not found in {ws.root}: plan or train it first")
    return json.loads(ws.lake.read_bytes(path))


def latest_run_id(ws: Workspace) -> str:
    if not ws.lake.exists(layout.LATEST_RUN):
        raise PipelineError(f"no training run in {ws.root}: run 'manymodels train' first")
    return ws.lake.read_bytes(layout.LATEST_RUN).decode().strip()


def _record_stage(ws: Workspace, run_id: str, stage: str, started: float, counts: dict[str, Any]) -> None:
    counts = {k: v for k, v in counts.items() if not isinstance(v, (list, dict))}
    seconds = time.perf_counter() - started
    started_at = datetime.fromtimestamp(time.time() - seconds, timezone.utc).isoformat(timespec="seconds")
    with ws.store() as store:
        store.record_run(run_id, stage, started_at, round(seconds, 3), counts)
