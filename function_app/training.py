"""Training: the orchestrator that fans out one compute job per group, and its activities.

plan (groups of mini-batch files) -> one job per group, each followed on durable timers by its own
``group_orchestrator``, started by ``group_chunk_orchestrator`` sub-orchestrations of at most
``max_groups`` groups -> register the run's models -> one promotion message.
Activities do one thing each and raise on failure; orchestrators retry them by hand on durable
timers (:func:`function_app.orchestration.call_with_retry`).
"""

from __future__ import annotations

from typing import Any, Generator

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog, orchestration_log
from function_app.messages import promotion_message
from function_app.orchestration import (
    CHUNK_ORCHESTRATOR,
    GROUP_ORCHESTRATOR,
    Progress,
    call_with_retry,
    chunk_steps,
    fan_out,
    group_steps,
    produced_output,
    summarize,
)
from function_app.runtime import lake_writer, load_settings, open_workspace
from shared.runs import pipeline
from shared.settings import SERVICEBUS_CONNECTION

bp = df.Blueprint()

PLAN_ACTIVITY = "plan_training_run"
GLOBAL_ACTIVITY = "train_global_model"
REGISTER_ACTIVITY = "register_trained_run"
PROMOTION_MESSAGE_ACTIVITY = "send_promotion_message"


def training_steps(
    context: Any,
    dataset_id: str | None,
    partition_ids: list[str] | None,
    options: dict[str, Any],
    log: RunLog,
) -> Generator[Any, Any, dict[str, Any]]:
    """Plan, fan out, register, send the promotion message; shared by training and ingestion runs."""
    config = options.get("config") or {}
    plan = yield from call_with_retry(
        context,
        PLAN_ACTIVITY,
        {
            "dataset_id": dataset_id,
            "partition_ids": partition_ids,
            "group_size": options["group_size"],
            "config": config,
            "full": bool(options.get("full", False)),
            "instance": context.instance_id,
        },
        options,
    )
    run_id = plan["run_id"]
    log = log.bind(run_id=run_id, dataset_id=plan["dataset_id"])
    # the run's global model fits (when the config asks for them) before any group trains: every
    # group's entry script gets them, as in the local pipeline's train()
    yield from call_with_retry(context, GLOBAL_ACTIVITY, {"run_id": run_id, "config": config}, options)
    progress = Progress(stage="training", run_id=run_id, groups_total=len(plan["groups"]))
    context.set_custom_status(progress.to_dict())
    log.info("training planned", groups=len(plan["groups"]), partitions=plan.get("partitions"))

    results = yield from fan_out(context, "train", run_id, plan["groups"], options, progress, log)
    outcome = summarize(results)
    if plan["groups"] and not any(produced_output(r) for r in results):  # none: every partition carried
        reasons = "; ".join(f"group {f['group_index']}: {f['reason']}" for f in outcome["failed_groups"][:3])
        raise RuntimeError(
            f"run {run_id}: no group produced models ({outcome['groups_failed']} failed): {reasons}"
        )

    progress.stage = "registering"
    context.set_custom_status(progress.to_dict())
    registered = yield from call_with_retry(
        context, REGISTER_ACTIVITY, {"run_id": run_id, "config": config, "instance": context.instance_id},
        options,
    )
    message = yield from call_with_retry(
        context,
        PROMOTION_MESSAGE_ACTIVITY,
        {"run_id": run_id, "min_accuracy": options.get("min_accuracy"), "origin": context.instance_id},
        options,
    )
    progress.stage = "promotion-queued"
    context.set_custom_status(progress.to_dict())
    log.info(
        "training finished", registered=registered.get("registered"), groups_failed=outcome["groups_failed"]
    )
    return {
        "run_id": run_id,
        "dataset_id": plan["dataset_id"],
        "partitions": plan.get("partitions"),
        **outcome,
        "registered": registered,
        "promotion_message": message,
    }


@bp.orchestration_trigger(context_name="context")
def train_orchestrator(context: df.DurableOrchestrationContext):
    """Train a dataset's partitions (all or some), one compute job per group, then queue promotion."""
    payload = context.get_input()
    log = orchestration_log(context, orchestrator="train_orchestrator")
    result = yield from training_steps(
        context, payload.get("dataset_id"), payload.get("partition_ids"), payload["options"], log
    )
    return result


@bp.orchestration_trigger(context_name="context")
def group_chunk_orchestrator(context: df.DurableOrchestrationContext):
    """Sub-orchestrator of a fan-out: starts one group orchestrator per group of its chunk, waits for them."""
    result = yield from chunk_steps(context, orchestration_log(context, orchestrator=CHUNK_ORCHESTRATOR))
    return result


@bp.orchestration_trigger(context_name="context")
def group_orchestrator(context: df.DurableOrchestrationContext):
    """Sub-orchestrator of a chunk: submits one group's job and follows it (continues as new)."""
    result = yield from group_steps(context, orchestration_log(context, orchestrator=GROUP_ORCHESTRATOR))
    return result


@bp.activity_trigger(input_name="payload")
def plan_training_run(payload: dict) -> dict:
    """Split the dataset's mini-batch files into groups and write run.json and ``runs/LATEST``; returns
    the plan. Holds the lake's writer lease (it reads the dev registry and writes shared pointers)."""
    ws = open_workspace(payload.get("config"))
    with lake_writer(ws, PLAN_ACTIVITY, payload.get("instance")):
        plan = pipeline.plan_training(
            ws,
            payload.get("dataset_id"),
            partition_ids=payload.get("partition_ids"),
            group_size=payload.get("group_size"),
            full=bool(payload.get("full", False)),  # incremental by default (shared.models.incremental)
        )
    RunLog({"run_id": plan.run_id}).info("plan written", groups=len(plan.groups))
    return plan.to_dict()


@bp.activity_trigger(input_name="payload")
def train_global_model(payload: dict) -> dict:
    """Fit the run's global model (when the project config wants one) before its groups train."""
    ws = open_workspace(payload.get("config"))
    if not pipeline.wants_global(ws.config):
        return {"run_id": payload["run_id"], "global": False}
    summary = pipeline.train_global(ws, payload["run_id"])
    RunLog({"run_id": payload["run_id"]}).info("global model trained")
    return {"run_id": payload["run_id"], "global": True, **{k: v for k, v in summary.items() if k != "run_id"}}


@bp.activity_trigger(input_name="payload")
def submit_group_job(payload: dict) -> dict:
    """Submit one group's compute job (the local backend runs it to the end); returns its handle."""
    ws = open_workspace(payload.get("config"))
    handle = pipeline.submit_group(
        ws, payload["kind"], payload["run_id"], int(payload["group_index"]), list(payload["batch_paths"])
    )
    RunLog({"run_id": payload["run_id"], "group": payload["group_index"]}).info(
        "job submitted", job_id=handle.job_id, state=handle.state
    )
    return handle.to_dict()


@bp.activity_trigger(input_name="payload")
def get_job_status(payload: dict) -> dict:
    """The current state of a submitted job."""
    ws = open_workspace(payload.get("config"))
    return pipeline.job_status(ws, payload["job_id"], run_id=payload.get("run_id")).to_dict()


@bp.activity_trigger(input_name="payload")
def register_trained_run(payload: dict) -> dict:
    """Register the run's trained models in the dev registry and load their metrics into SQL, holding
    the lake's writer lease."""
    ws = open_workspace(payload.get("config"))
    with lake_writer(ws, REGISTER_ACTIVITY, payload.get("instance")):
        summary = pipeline.register_run(ws, payload["run_id"])
    RunLog({"run_id": payload["run_id"]}).info(
        "run registered", registered=summary.registered, trained=summary.trained, failed=summary.failed
    )
    return summary.to_dict()


@bp.activity_trigger(input_name="payload")
@bp.service_bus_queue_output(
    arg_name="message", connection=SERVICEBUS_CONNECTION, queue_name="%MM_PROMOTION_QUEUE%"
)
def send_promotion_message(payload: dict, message: func.Out[str]) -> dict:
    """Queue the run's promotion message (sent when the activity succeeds; promotion is idempotent)."""
    body = promotion_message(payload["run_id"], payload.get("min_accuracy"), payload["origin"])
    message.set(body)
    RunLog({"run_id": payload["run_id"], "origin": payload["origin"]}).info("promotion message queued")
    return {"queue": load_settings().promotion_queue, "body": body}
