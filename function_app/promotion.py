"""Promotion: a Service Bus queue-triggered function, and an orchestration for HTTP-started promotions.

Why a Service Bus queue (not a Storage queue): the upstream messages already use Service Bus, so one
namespace, one identity-based connection and one pair of roles serve both; its dead-letter queue
keeps a failed message with its delivery count and the broker's reason (the function logs ours,
with the run id, before raising); and lock renewal (``maxAutoLockRenewalDuration`` in host.json)
covers a promotion that copies thousands of models. Promotion itself is idempotent (a model
already in production is ``unchanged``), so a redelivered message does no harm.
"""

from __future__ import annotations

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog, orchestration_log
from function_app.messages import MessageError, parse_promotion_message
from function_app.orchestration import call_with_retry
from function_app.runtime import lake_writer, open_workspace
from shared.runs import pipeline
from shared.locking import WorkdirLockedError
from shared.settings import SERVICEBUS_CONNECTION

bp = df.Blueprint()

PROMOTE_ACTIVITY = "promote_run"


@bp.service_bus_queue_trigger(
    arg_name="message", connection=SERVICEBUS_CONNECTION, queue_name="%MM_PROMOTION_QUEUE%"
)
def on_promotion_message(message: func.ServiceBusMessage) -> None:
    """Promote a finished run; raise on failure so the message is retried, then dead-lettered."""
    log = RunLog({"message_id": message.message_id, "delivery_count": message.delivery_count})
    try:
        request = parse_promotion_message(message.get_body())
    except MessageError as exc:
        log.error("promotion message rejected", field=exc.field, reason=exc.reason)
        raise
    log = log.bind(run_id=request.run_id, origin=request.origin)
    try:
        ws = open_workspace()
        with lake_writer(ws, f"on_promotion_message for run {request.run_id}", request.origin):
            summary = pipeline.promote(ws, request.run_id, min_accuracy=request.min_accuracy)
    except (pipeline.PipelineError, WorkdirLockedError) as exc:  # the lake busy: redelivered later
        log.error("promotion failed", reason=str(exc))
        raise
    log.info(
        "run promoted", promoted=summary.promoted, rejected=summary.rejected, unchanged=summary.unchanged
    )


@bp.orchestration_trigger(context_name="context")
def promote_orchestrator(context: df.DurableOrchestrationContext):
    """Promote one run (HTTP start): the promotion rules as one retried activity."""
    payload = context.get_input()
    options = payload["options"]
    orchestration_log(context, run_id=payload.get("run_id")).info("promotion started")
    context.set_custom_status({"stage": "promoting", "run_id": payload.get("run_id")})
    summary = yield from call_with_retry(
        context,
        PROMOTE_ACTIVITY,
        {
            "run_id": payload.get("run_id"),
            "min_accuracy": options.get("min_accuracy"),
            "config": options.get("config") or {},
            "instance": context.instance_id,
        },
        options,
    )
    context.set_custom_status({"stage": "done", "run_id": summary["run_id"]})
    return summary


@bp.activity_trigger(input_name="payload")
def promote_run(payload: dict) -> dict:
    """Apply the promotion rules and copy eligible models to the production registry, holding the
    lake's writer lease."""
    ws = open_workspace(payload.get("config"))
    with lake_writer(ws, PROMOTE_ACTIVITY, payload.get("instance")):
        summary = pipeline.promote(ws, payload.get("run_id"), min_accuracy=payload.get("min_accuracy"))
    RunLog({"run_id": summary.run_id}).info(
        "run promoted", promoted=summary.promoted, rejected=summary.rejected
    )
    return summary.to_dict()
