"""The pipeline's stages over one workspace: what the CLI and the Functions app both call.

Each stage is idempotent and keyed by content: the same data gives the same dataset id, the same
dataset and training config give the same run id, the same inputs and production models give the
same score id. Rerunning a stage after a crash finishes the work without duplicates.

The training stage's planning, global model and registration are in :mod:`shared.runs.train_stage`,
what the stages share (latest pointers, run.json, ids, the runs record) in
:mod:`shared.runs.stage_state`; the stages a caller runs are all here.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager

import pandas as pd

from shared import faults, layout
from shared.runs.compute import JobHandle
from shared.data.ingest import read_source
from shared.keys import PARTITION_ID
from shared.lake import read_parquet, write_parquet
from shared.registries.promotion import decision_of, promote_run
from shared.registries.registration import ManifestLookup, keys_of, result_rows
from shared.results.report import write_report
from shared.forecasts.scoring import prepare_scoring
from shared.runs.stage_state import (
    PipelineError,
    _digest,
    _load_dataset,
    _now,
    _record_stage,
    _run_meta,
    latest_dataset_id,
    latest_run_id,
)
from shared.results.summaries import (GroupSummary, LoadSummary, PromotionSummary, RegisterSummary,
                              ScoringPlan, TrainingPlan)
from shared.runs.train_stage import plan_training, register_run, train_global, wants_global
from shared.data.validation import ValidationReport
from shared.data.ingestion import ingest, resolve_source
from shared.runs.local_compute import run_group
from shared.runs.workspace import Workspace

LAKE_SOURCE_CONTAINERS = layout.SOURCE_CONTAINERS
PLAN_ATTEMPTS = 3  # a scoring plan cut again when a promotion lands while it is cut
PROBLEM_EXAMPLES = 5  # failed or degraded partitions a summary names (the counts say how many)


# -- running groups (training and scoring); training -------------------------------------------
def submit_group(
    ws: Workspace, kind: str, run_id: str, group_index: int, batch_paths: list[str]
) -> JobHandle:
    """Submit one group to the workspace's compute backend (local: runs it now)."""
    return ws.compute.submit(ws, kind, run_id, group_index, batch_paths)


def job_status(ws: Workspace, job_id: str, run_id: str | None = None) -> JobHandle:
    """The state of a submitted job: local jobs from their record, Azure ML jobs from the service."""
    return ws.compute.status(ws, job_id, run_id)


def train_group(
    ws: Workspace, run_id: str, batch_paths: list[str], group_index: int = 0, progress: bool | None = None
) -> GroupSummary:
    """Train every partition of some batch files (:func:`run_group`)."""
    return run_group(ws, "train", run_id, batch_paths, group_index, progress)


def score_group(
    ws: Workspace, score_id: str, batch_paths: list[str], group_index: int = 0, progress: bool | None = None
) -> GroupSummary:
    """Score some scoring-input files (:func:`run_group`)."""
    return run_group(ws, "score", score_id, batch_paths, group_index, progress)


def train(
    ws: Workspace, dataset_id: str | None = None, run_id: str | None = None, progress: bool | None = None,
    full: bool = False,
) -> tuple[TrainingPlan, list[GroupSummary], RegisterSummary]:
    """Plan, train every group locally, and register: the local equivalent of the orchestrator.
    Incremental unless ``full`` (see :func:`plan_training`)."""
    started = time.perf_counter()
    plan = plan_training(ws, dataset_id, run_id=run_id, full=full)
    if wants_global(ws.config):
        train_global(ws, plan.run_id)
    faults.point("train.start")
    groups = [train_group(ws, plan.run_id, g, i, progress=progress) for i, g in enumerate(plan.groups)]
    lost = [f for g in groups for f in g.failed_batches]
    if lost and not any(g.partitions for g in groups) and not plan.carried:
        raise PipelineError(f"run {plan.run_id}: every mini-batch failed ({len(lost)}), nothing was trained: "
                            f"{str(lost[0].get('error', ''))[:400]}")
    registered = register_run(ws, plan.run_id)
    _record_stage(ws, plan.run_id, "train", started, registered.to_dict())
    return plan, groups, registered


# -- promotion ---------------------------------------------------------------------------------
def promote(ws: Workspace, run_id: str | None = None, min_accuracy: float | None = None) -> PromotionSummary:
    """Apply the promotion rules to a run's models; copy the eligible ones to production."""
    started = time.perf_counter()
    run_id = run_id or latest_run_id(ws)
    meta = _run_meta(ws, run_id)
    rules = ws.config.promotion
    if min_accuracy is not None:
        if not 0.0 <= float(min_accuracy) <= 1.0:
            raise PipelineError(f"min_accuracy must be between 0 and 1, got {min_accuracy}")
        rules = replace(rules, metric="accuracy", min_value=float(min_accuracy), higher_is_better=True)
    manifest = _load_dataset(ws, meta["dataset_id"]).manifest
    history = dict(zip(manifest[PARTITION_ID], manifest["n_observed"].astype(int)))
    decisions = promote_run(ws.dev, ws.prod, run_id, rules, history)
    summary = PromotionSummary(run_id=run_id)
    keyed = ManifestLookup(manifest.set_index(PARTITION_ID))
    rows = []
    for d in decisions:
        setattr(summary, d.decision, getattr(summary, d.decision) + 1)
        if d.decision == "rejected":
            reason = d.code or "rejected"
            summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
        if d.decision != "unchanged":
            rows.append({**d.to_row(), **keys_of(keyed, d.partition_id, ws.config.data.keys)})
    summary.in_production = sum(1 for r in ws.prod.find(run_id=run_id))
    faults.point("promote.copied")
    with ws.store() as store:
        decided = {(r["run_id"], r[PARTITION_ID]) for r in rows}
        missing = [d for d in unrecorded_promotions(ws, store) if (d.run_id, d.partition_id) not in decided]
        summary.reconciled = len(missing)
        rows += [{**d.to_row(), **_record_keys(ws, d)} for d in missing]
        faults.point("promote.store")
        if rows:
            store.upsert_promotions(rows)
    _record_stage(ws, run_id, "promote", started, summary.to_dict())
    return summary


def unrecorded_promotions(ws: Workspace, store: Any) -> list[Any]:
    """Production models whose promotion has no row in the SQL store (a crash or a failed store write
    between the copy and the SQL write): their decisions, rebuilt from the production records."""
    recorded = store.query("SELECT partition_id, run_id FROM promotions WHERE decision = 'promoted'")
    known = set(zip(recorded["partition_id"], recorded["run_id"])) if len(recorded) else set()
    return [decision_of(r) for r in ws.prod.find()
            if r.tags.get("source_registry") and (r.partition_id, r.run_id) not in known]


def _record_keys(ws: Workspace, decision: Any) -> dict[str, Any]:
    """A reconciled decision's key values, from its production record (its run's dataset may be gone)."""
    record = ws.prod.get(decision.partition_id, decision.prod_version)
    keys = record.keys if record is not None else {}
    return {k: keys.get(k) for k in ws.config.data.keys if k in keys}


# -- scoring -----------------------------------------------------------------------------------
def plan_scoring(
    ws: Workspace,
    data: str | Path | None = None,
    horizon: int | None = None,
    score_id: str | None = None,
    dataset_id: str | None = None,
    group_size: int | None = None,
    writer: Callable[[], ContextManager[Any]] | None = None,
) -> ScoringPlan:
    """Write the scoring inputs (a scoring file's rows, or one horizon request per partition).

    Everything a plan writes is the run's own (request files, registry slices under its score
    id), so it is prepared without the lake's writer lease; ``writer`` (the lease, in the
    Functions app) is taken only to publish the plan: check that neither registry moved since the
    plan read them, then write ``run.json``. A promotion that landed meanwhile (it holds the lease
    while it writes) makes the plan start again, with the new registries and so a new score id:
    a plan is published with the registries it was cut from. The CLI holds the workdir lock for
    its whole command, so it passes no ``writer``.
    """
    dataset_id = dataset_id or latest_dataset_id(ws)
    dataset = _load_dataset(ws, dataset_id)
    cfg = ws.config if horizon is None else ws.config.with_overrides({"forecast.horizon": int(horizon)})
    frame = None
    source_id: Any = None
    if data is not None:
        frame = read_source(resolve_source(ws, data), cfg)
        source_id = int(pd.util.hash_pandas_object(frame, index=False).sum() % (1 << 63))
    for _attempt in range(PLAN_ATTEMPTS):
        versions = _registry_versions(ws)
        planned_id = score_id or _digest(
            dataset_id, source_id, cfg.forecast.horizon, versions[0], cfg.scoring_chain, versions[1], prefix="s",
        )
        paths = prepare_scoring(ws.lake, cfg, dataset, frame, planned_id, cfg.runner.rows_per_file)
        size = group_size or max(1, len(paths))
        groups = [paths[i : i + size] for i in range(0, len(paths), size)]
        ws.compute.pin_scoring(ws, planned_id, groups, cfg)  # Azure ML: every group's registry slices now
        with (writer or nullcontext)():
            if score_id is None and _registry_versions(ws) != versions:
                continue  # a promotion landed while this plan was cut: cut it again
            if not ws.lake.exists(layout.run_meta(planned_id)):
                meta = {"score_id": planned_id, "dataset_id": dataset_id, "kind": "score", "created_at": _now(),
                        "horizon": cfg.forecast.horizon, "source": str(data) if data else None,
                        "registry_versions": {"prod": versions[0], "dev": versions[1]}, "config": cfg.to_dict()}
                ws.lake.write_bytes(layout.run_meta(planned_id), json.dumps(meta, indent=2).encode())
        return ScoringPlan(score_id=planned_id, groups=groups, horizon=cfg.forecast.horizon,
                           source=str(data) if data else None)
    raise PipelineError(f"the registries changed {PLAN_ATTEMPTS} times while a scoring run was planned "
                        "(promotions landing one after another): plan it again when they are done")


def _registry_versions(ws: Workspace) -> tuple[int, int]:
    """Production's and development's index versions as the lake has them now (pulled if they moved)."""
    ws.prod.refresh(force=True)
    ws.dev.refresh(force=True)
    return ws.prod.index_version(), ws.dev.index_version()


def load_predictions(ws: Workspace, score_id: str) -> LoadSummary:
    """Upsert a scoring run's prediction files into the SQL store (reruns never duplicate)."""
    files = [p for p in ws.lake.list(layout.run_predictions(score_id)) if p.endswith(".parquet")]
    summary = LoadSummary(score_id=score_id)
    frames = [read_parquet(ws.lake, p) for p in files]
    frames = [f for f in frames if len(f)]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(predictions):
        predictions["score_id"] = score_id
        out = layout.predictions(score_id)
        write_parquet(ws.lake, out, predictions)
        faults.point("score.load")
        with ws.store() as store:
            store.upsert_predictions(predictions)
        summary.rows = int(len(predictions))
        summary.partitions = int(predictions[PARTITION_ID].nunique())
        summary.fallback_partitions = int(predictions.loc[predictions["is_fallback"] == 1, PARTITION_ID].nunique())
    for row in result_rows(ws.lake, layout.run_results(score_id)):
        status, reason = row.get("status"), str(row.get("reason") or "")
        if status == "no_model":
            summary.no_model += 1
        elif status == "failed":
            summary.failed += 1
        elif status == "fallback" and reason:  # a source before the one that answered raised
            summary.degraded += 1
        else:
            continue
        if status != "no_model" and len(summary.problems) < PROBLEM_EXAMPLES:
            summary.problems.append(f"partition {row.get(PARTITION_ID)} {status}: {reason[:400]}")
    return summary


def score(
    ws: Workspace, data: str | Path | None = None, horizon: int | None = None, progress: bool | None = None,
    dataset_id: str | None = None,
) -> tuple[ScoringPlan, LoadSummary]:
    """Plan, score every group locally and load into SQL; the dataset is the one given (``run`` passes
    the one it ingested) or the latest, resolved once here and pinned in the plan."""
    started = time.perf_counter()
    plan = plan_scoring(ws, data=data, horizon=horizon, dataset_id=dataset_id)
    faults.point("score.start")
    for i, group in enumerate(plan.groups):
        result = score_group(ws, plan.score_id, group, i, progress=progress)
        if result.failed_batches:
            raise PipelineError(
                f"scoring {plan.score_id}: {len(result.failed_batches)} mini-batch(es) failed: "
                f"{result.failed_batches[0].get('error', '')[:300]}"
            )
    loaded = load_predictions(ws, plan.score_id)
    _record_stage(ws, plan.score_id, "score", started, loaded.to_dict())
    return plan, loaded


# -- report and the whole pipeline ------------------------------------------------------------
def report(ws: Workspace, path: Path | None = None) -> Path:
    with ws.store() as store:
        return write_report(store, path or ws.root / "report.html", min_accuracy=ws.config.promotion.min_value)


def run_all(
    ws: Workspace, source: str | Path, min_accuracy: float | None = None, progress: bool | None = None,
    scoring_data: str | Path | None = None, full: bool = False,
) -> dict[str, Any]:
    """Ingest -> partition -> train -> register -> promote -> score -> SQL -> report."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ingested = ingest(ws, source)
    timings["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    plan, groups, registered = train(ws, ingested.dataset_id, progress=progress, full=full)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    promoted = promote(ws, plan.run_id, min_accuracy=min_accuracy)
    timings["promote"] = time.perf_counter() - t
    t = time.perf_counter()
    scoring_plan, loaded = score(ws, data=scoring_data, progress=progress, dataset_id=ingested.dataset_id)
    timings["score"] = time.perf_counter() - t
    t = time.perf_counter()
    report_error = None
    try:  # the predictions are in SQL already: a report that cannot be drawn must not sink the run
        report_path: Path | None = report(ws)
    except Exception as exc:  # noqa: BLE001 (any failure of the dashboard, said in the summary)
        report_path, report_error = None, f"{type(exc).__name__}: {exc}"
    timings["report"] = time.perf_counter() - t
    failed_batches = sum(len(g.failed_batches) for g in groups)
    checked = ValidationReport.from_dict(ingested.report)
    return {
        "dataset_id": ingested.dataset_id,
        "run_id": plan.run_id,
        "score_id": scoring_plan.score_id,
        "rows": ingested.rows,
        "partitions": ingested.partitions,
        "trained": registered.trained + registered.baseline_only,
        "trained_ml": registered.trained,
        "baseline_only": registered.baseline_only,
        "failed": registered.failed,
        "failed_batches": failed_batches,
        "skipped": registered.skipped,
        "promoted": promoted.promoted + promoted.unchanged,
        "newly_promoted": promoted.promoted,
        "rejected": promoted.rejected,
        "rejection_reasons": promoted.reasons,
        "predictions": loaded.rows,
        "scored_partitions": loaded.partitions,
        "fallback_partitions": loaded.fallback_partitions,
        "scoring_failed": loaded.failed,
        "degraded": loaded.degraded,
        "scoring_problems": loaded.problems,
        "training_failures": registered.failures[:PROBLEM_EXAMPLES],
        "model_wape": registered.model_wape,
        "baseline_wape": registered.baseline_wape,
        "validation": {k: v for k, v in ingested.report.items() if isinstance(v, (int, float))},
        "repairs": checked.repairs(),
        "warnings": checked.warnings(ws.config.data.freq),
        "sql": ws.sql_location,
        "report": str(report_path) if report_path is not None else None,
        "report_error": report_error,
        "workdir": str(ws.root),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }

