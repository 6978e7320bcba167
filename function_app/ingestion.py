"""Ingestion: new files in the lake's raw container start ingestion and retraining.

One way in: an Event Grid trigger for ``Microsoft.Storage.BlobCreated`` (the event carries the URL
and ETag; the function reads only a sample) and, on ADLS Gen2, ``Microsoft.Storage.BlobRenamed`` for
a file renamed into ``raw/`` (Spark and Data Factory write elsewhere, then rename; the event has no
ETag, so the file's current ETag is read first). Both delivery schemas are accepted: the Event Grid
schema (``func.EventGridEvent``) and CloudEvents 1.0 (``func.CloudEvent``, azure-functions >= 1.26).
The function:

1. keeps only ``.csv`` / ``.parquet`` files under ``raw/`` (other containers, other files, other
   event types, hidden or temporary paths such as Spark's ``_temporary/``, renamed folders, and
   ADLS ``CreateFile`` events, which precede the data: logged, ignored);
2. derives the orchestration instance id from the storage account, container, blob and ETag, so a
   duplicate delivery of the same file version — through either the ``blob`` or the ``dfs``
   endpoint, or an HTTP / Service Bus start naming the same file — starts nothing new;
3. checks a sample of the file with the core's own reader and validation (missing columns,
   unparseable times or targets...) and refuses a bad file with a logged reason;
4. starts ``ingest_orchestrator``: ingest (full validation, partitioning) then training.

Ingestion runs on the compute backend, like training: the ``ingest_dataset`` activity holds only
the source's lake path and the run's options. With the local backend it runs the pipeline's
streaming ingestion in the activity and returns the finished result; with Azure ML it submits a
command job (:mod:`shared.azureml.ingest_job`) that runs the same code on the cluster over the
lake's mounts, and the orchestrator polls it with durable timers (``get_ingest_job_status``, one
task at a time, continuing as new after ``history_tasks`` tasks) until the job has written the
dataset and its small result (dataset id, partitions, rows, the report's path and counts). Only
that result travels through Durable, never rows.

What can never succeed — a malformed event, a hostile or unsupported path, a bad file — is logged
and the function returns: an exception would make Event Grid redeliver it for up to 24 hours. Only
transient failures (the lake or the Durable extension unreachable) raise, so Event Grid retries
them. There is no blob trigger: a ``func.InputStream`` binding makes the host read the whole blob
and ship it over gRPC before the function runs, which the Event Grid trigger never needs.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog, orchestration_log
from function_app.messages import Ignored, MessageError, RawFile, lake_event, parse_lake_file_event
from function_app.orchestration import (
    HISTORY_TASKS,
    INGEST_ORCHESTRATOR,
    TERMINAL_STATES as TERMINAL,
    call_with_retry,
    follow_job,
)
from function_app.raw_files import NotReady, Rejected
from function_app.runtime import StartOutcome, lake_writer, load_settings, open_workspace
from function_app.starts import check_own_account, start_raw_file
from function_app.training import training_steps
from shared.runs import backends

bp = df.Blueprint()

INGEST_ACTIVITY = "ingest_dataset"
INGEST_STATUS_ACTIVITY = "get_ingest_job_status"


@bp.event_grid_trigger(arg_name="event")
@bp.durable_client_input(client_name="client")
async def on_lake_event(event: func.EventGridEvent, client: df.DurableOrchestrationClient) -> None:
    """A new file in the raw container (BlobCreated, or a file BlobRenamed into it; either schema):
    check it and start its ingestion once."""
    log = RunLog({"event_id": getattr(event, "id", None), "subject": getattr(event, "subject", None)})
    try:
        received = lake_event(event)
        log = log.bind(schema=received.schema)
        markers = (await asyncio.to_thread(load_settings)).folder_markers  # settings read off the loop
        raw = parse_lake_file_event(received.type, received.subject, received.data, markers)
        await asyncio.to_thread(check_own_account, raw)
    except Ignored as why:
        log.info("event ignored", reason=str(why))
        return
    except MessageError as exc:  # permanent: a redelivery would fail the same way for 24 hours
        log.error("malformed event dropped", field=exc.field, reason=exc.reason)
        return
    await start_ingestion(client, raw, log)


async def start_ingestion(client: Any, raw: RawFile, log: RunLog) -> StartOutcome | None:
    """Start ingestion for a file version; a bad file is refused with a logged reason, not retried;
    a file still being copied raises, so Event Grid delivers the event again later."""
    try:
        return await start_raw_file(client, raw, log)
    except Rejected as why:
        log.warning("file rejected", path=raw.path, reason=str(why))
        return None
    except NotReady as why:
        log.warning("file not complete yet; Event Grid will deliver the event again", path=raw.path,
                    reason=str(why))
        raise


@bp.orchestration_trigger(context_name="context")
def ingest_orchestrator(context: df.DurableOrchestrationContext):
    """Ingest one raw file (validate, partition) on the compute backend, then train its dataset."""
    payload = context.get_input()
    options = payload["options"]
    log = orchestration_log(context, orchestrator=INGEST_ORCHESTRATOR, path=payload["source"])
    job = yield from ingest_steps(context, payload, log)
    if job is None:
        return None  # continued as new: the next generation keeps polling the job
    ingested = job["summary"]
    log.info("dataset ingested", dataset_id=ingested["dataset_id"], partitions=ingested["partitions"],
             job_id=job["job_id"])
    training = yield from training_steps(
        context, ingested["dataset_id"], payload.get("partition_ids"), options, log
    )
    return {
        "source": payload["source"],
        "trigger": payload.get("trigger"),
        "ingested": ingested,
        "training": training,
    }


def ingest_steps(context: Any, payload: dict[str, Any], log: RunLog):
    """Submit the ingestion (local: it runs in the activity) and follow its job to the end.

    Returns the job's last handle (its ``summary`` is the ingestion's result), or None after
    scheduling ``continue_as_new`` with the handle (``payload["ingest_job"]``) when the job outlives
    one generation's task budget. A failed or canceled job fails the orchestration with its reason.
    """
    options = payload["options"]
    config = options.get("config") or {}
    carried = payload.get("ingest_job")
    status = {"stage": "ingesting", "source": payload["source"]}
    if carried is None:
        context.set_custom_status(status)
        handle = yield from call_with_retry(
            context,
            INGEST_ACTIVITY,
            {"source": payload["source"], "config": config, "key": context.instance_id},
            options,
        )
        deadline = context.current_utc_datetime + timedelta(seconds=int(options["timeout_seconds"]))
        generation = 0
        if handle["state"] not in TERMINAL:
            log.info("ingestion job submitted", job_id=handle["job_id"], state=handle["state"])
    else:
        handle, deadline = carried["handle"], datetime.fromisoformat(carried["deadline"])
        generation = int(carried["generation"])
    context.set_custom_status({**status, "job_id": handle["job_id"], "job_state": handle["state"],
                               "generation": generation})
    budget = int(options.get("history_tasks") or HISTORY_TASKS)
    final, finished = yield from follow_job(
        context, handle, INGEST_STATUS_ACTIVITY, {"config": config}, deadline, options, budget
    )
    if not finished:
        log.info("history budget reached; continuing as new", job_id=final["job_id"], generation=generation)
        context.continue_as_new({**payload, "ingest_job": {
            "handle": final, "deadline": deadline.isoformat(), "generation": generation + 1}})
        return None
    if final["state"] != "completed":
        raise RuntimeError(
            f"ingestion of {payload['source']} {final['state']}: job {final['job_id']}: {final.get('detail') or ''}"
        )
    return final


@bp.activity_trigger(input_name="payload")
def ingest_dataset(payload: dict) -> dict:
    """Ingest one lake source on the compute backend: run it here (local) or submit its Azure ML
    job; returns the job's handle (a completed local one carries the result), never data.

    An ingestion run here writes ``prepared/LATEST``, so it holds the lake's writer lease; a submit
    to Azure ML writes only the job's own record and takes none (the job writes its content-addressed
    dataset and the pointer from the cluster)."""
    ws = open_workspace(payload.get("config"))
    if backends.compute_backend(ws.settings) == backends.AZUREML:
        handle = backends.submit_ingest(ws, payload["source"], payload.get("key"))
    else:
        with lake_writer(ws, INGEST_ACTIVITY, payload.get("key")):
            handle = backends.submit_ingest(ws, payload["source"], payload.get("key"))
    summary = handle.summary or {}
    RunLog({"path": payload["source"], "job_id": handle.job_id}).info(
        "dataset written" if handle.state == "completed" else "ingestion job submitted",
        state=handle.state, dataset_id=summary.get("dataset_id"), partitions=summary.get("partitions"),
        rows=summary.get("rows"), reused=summary.get("reused"),
    )
    return handle.to_dict()


@bp.activity_trigger(input_name="payload")
def get_ingest_job_status(payload: dict) -> dict:
    """The current state of an ingestion job; a completed one carries its small result."""
    ws = open_workspace(payload.get("config"))
    return backends.ingest_status(ws, payload["job_id"]).to_dict()
