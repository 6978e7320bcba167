"""Batch scoring: the same fan-out as training, then the predictions go into the SQL store."""

from __future__ import annotations

from typing import Any

import azure.durable_functions as df

from function_app.logging_context import RunLog, orchestration_log
from function_app.orchestration import Progress, call_with_retry, fan_out, produced_output, summarize
from function_app.runtime import lake_writer, open_workspace
from shared.runs import pipeline

bp = df.Blueprint()

PLAN_ACTIVITY = "plan_scoring_run"
LOAD_ACTIVITY = "load_scored_predictions"


@bp.orchestration_trigger(context_name="context")
def score_orchestrator(context: df.DurableOrchestrationContext):
    """Score every partition (a scoring file's rows, or the next horizon), then load SQL."""
    payload = context.get_input()
    options: dict[str, Any] = payload["options"]
    config = options.get("config") or {}
    log = orchestration_log(context, orchestrator="score_orchestrator")
    plan = yield from call_with_retry(
        context,
        PLAN_ACTIVITY,
        {
            "data": payload.get("data"),
            "horizon": payload.get("horizon"),
            "dataset_id": payload.get("dataset_id"),
            "group_size": options["group_size"],
            "config": config,
            "instance": context.instance_id,
        },
        options,
    )
    score_id = plan["score_id"]
    log = log.bind(run_id=score_id)
    progress = Progress(stage="scoring", run_id=score_id, groups_total=len(plan["groups"]))
    context.set_custom_status(progress.to_dict())
    results = yield from fan_out(context, "score", score_id, plan["groups"], options, progress, log)
    outcome = summarize(results)
    if not any(produced_output(r) for r in results):
        reasons = "; ".join(f"group {f['group_index']}: {f['reason']}" for f in outcome["failed_groups"][:3])
        raise RuntimeError(f"scoring {score_id}: no group produced predictions: {reasons}")
    progress.stage = "loading"
    context.set_custom_status(progress.to_dict())
    loaded = yield from call_with_retry(
        context, LOAD_ACTIVITY, {"score_id": score_id, "config": config, "instance": context.instance_id},
        options,
    )
    progress.stage = "loaded"
    context.set_custom_status(progress.to_dict())
    log.info("scoring finished", rows=loaded.get("rows"), groups_failed=outcome["groups_failed"])
    return {
        "score_id": score_id,
        "horizon": plan.get("horizon"),
        "source": plan.get("source"),
        **outcome,
        "loaded": loaded,
    }


@bp.activity_trigger(input_name="payload")
def plan_scoring_run(payload: dict) -> dict:
    """Write the scoring inputs and the registry slices, then publish the plan; returns it. The
    inputs and slices are the run's own and prepared without the lake's writer lease; the lease is
    held only to publish (check the registries did not move, write run.json), so a promotion is
    never kept waiting by a plan, nor a plan cut from a registry mid-promotion."""
    ws = open_workspace(payload.get("config"))
    plan = pipeline.plan_scoring(
        ws,
        data=payload.get("data"),
        horizon=payload.get("horizon"),
        dataset_id=payload.get("dataset_id"),
        group_size=payload.get("group_size"),
        writer=lambda: lake_writer(ws, PLAN_ACTIVITY, payload.get("instance")),
    )
    RunLog({"run_id": plan.score_id}).info("scoring planned", groups=len(plan.groups))
    return plan.to_dict()


@bp.activity_trigger(input_name="payload")
def load_scored_predictions(payload: dict) -> dict:
    """Upsert the scoring run's predictions into the SQL store, holding the lake's writer lease."""
    ws = open_workspace(payload.get("config"))
    with lake_writer(ws, LOAD_ACTIVITY, payload.get("instance")):
        summary = pipeline.load_predictions(ws, payload["score_id"])
    RunLog({"run_id": payload["score_id"]}).info("predictions loaded", rows=summary.rows)
    return summary.to_dict()
