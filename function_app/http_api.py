"""HTTP: start training, promotion and batch-scoring runs, and read a run's status.

All routes need a function key (``AuthLevel.FUNCTION``). A start validates its JSON body and
answers 400 naming the bad field, else 202 (started) or 200 (the same request already has an
instance: it is returned, nothing new starts) with the instance id and the status URL. The status
endpoint returns the Durable status, whose ``customStatus`` is the run's live progress. The
helpers at the bottom are shared with the serving routes (real-time scoring).

Only our own status route is returned, never the Durable extension's management URLs
(``get_client_response_links`` / ``create_check_status_response``): those carry the extension's
system key (``code=...``), which would hand every holder of a function key the power to
terminate, rewind or purge any instance of the task hub.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog
from function_app.messages import (
    MessageError,
    check_instance_id,
    load_json_object,
    parse_promote_request,
    parse_score_request,
    parse_train_request,
)
from function_app.raw_files import NotReady
from function_app.runtime import StartOutcome
from function_app.starts import start_promotion, start_scoring, start_training
from shared.serving.errors import redact

bp = df.Blueprint()


@bp.route(route="train", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def start_training_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    """POST /api/train {dataset | dataset_id, partitions, options, request_id}: start a training run."""
    log = RunLog({"route": "train"})
    try:
        request = parse_train_request(load_json_object(req.get_body()))
        outcome = await start_training(client, request, log)
    except MessageError as exc:
        return bad_request(exc, log)
    except NotReady as exc:  # a copy into the raw file is still running: the same request will succeed
        log.warning("raw file not complete yet", reason=str(exc))
        return json_response(503, {"error": f"{exc}; retry later", "field": "dataset"}, {"Retry-After": "30"})
    return accepted(req, client, outcome)


@bp.route(route="promote", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def start_promotion_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    """POST /api/promote {run_id, min_accuracy, request_id}: apply the promotion rules to a run."""
    log = RunLog({"route": "promote"})
    try:
        request = parse_promote_request(load_json_object(req.get_body()))
        outcome = await start_promotion(client, request, log)
    except MessageError as exc:
        return bad_request(exc, log)
    return accepted(req, client, outcome)


@bp.route(route="score", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def start_scoring_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    """POST /api/score {data, horizon, dataset_id, options, request_id}: start a batch-scoring run."""
    log = RunLog({"route": "score"})
    try:
        request = parse_score_request(load_json_object(req.get_body()))
        outcome = await start_scoring(client, request, log)
    except MessageError as exc:
        return bad_request(exc, log)
    return accepted(req, client, outcome)


@bp.route(route="status/{instance_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def get_run_status(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    """GET /api/status/{instance_id}: the Durable status of a run, with its live progress."""
    try:
        instance_id = check_instance_id(req.route_params.get("instance_id", ""))
    except MessageError as exc:
        return bad_request(exc, RunLog({"route": "status"}))
    status = await client.get_status(instance_id)
    if not status:
        return json_response(
            404, {"error": f"no orchestration instance {instance_id!r}", "field": "instance_id"}
        )
    return json_response(
        200,
        {
            "instanceId": status.instance_id,
            "name": status.name,
            "runtimeStatus": status.runtime_status.value if status.runtime_status else None,
            "customStatus": status.custom_status,
            "output": status.output,
            "createdTime": _iso(status.created_time),
            "lastUpdatedTime": _iso(status.last_updated_time),
        },
    )


# -- shared response helpers -------------------------------------------------------------------------
def json_response(status_code: int, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    """A JSON answer; an error's body never shows the server's absolute paths."""
    if status_code >= 400:
        body = redact(body)
    return func.HttpResponse(
        json.dumps(body, default=str),
        status_code=status_code,
        mimetype="application/json",
        headers=headers or {},
    )


def bad_request(exc: MessageError, log: RunLog) -> func.HttpResponse:
    log.warning("request rejected", field=exc.field, reason=exc.reason)
    return json_response(400, {"error": str(exc), "field": exc.field})


def status_url(req: func.HttpRequest, instance_id: str) -> str:
    parts = urlsplit(req.url)
    return f"{parts.scheme}://{parts.netloc}/api/status/{instance_id}"


def accepted(req: func.HttpRequest, client: Any, outcome: StartOutcome) -> func.HttpResponse:
    """202 for a new instance, 200 for an existing one; both say where to watch it (our route only)."""
    url = status_url(req, outcome.instance_id)
    body = {
        "id": outcome.instance_id,
        "started": outcome.started,
        "runtimeStatus": outcome.runtime_status,
        "statusUri": url,
    }
    return json_response(202 if outcome.started else 200, body, {"Location": url})


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
