"""Ingestion: new files in the lake's raw container start ingestion and retraining.

Two ways in, one behaviour: an Event Grid trigger for ``Microsoft.Storage.BlobCreated`` (the
recommended wiring: the event carries the URL and ETag, the function reads only a sample), and a
blob trigger with ``source=EventGrid`` for users who wire it that way. Either one:

1. keeps only ``.csv`` / ``.parquet`` files under ``raw/`` (anything else: logged, ignored);
2. derives the orchestration instance id from the blob URL and ETag, so a duplicate delivery of
   the same file version starts nothing new;
3. checks a sample of the file with the core's own reader and validation (missing columns,
   unparseable times or targets...) and refuses a bad file with a logged reason — retrying cannot
   fix it, and a corrected upload is a new version with a new event;
4. starts ``ingest_orchestrator``: ingest (full validation, partitioning) then training.

A malformed event raises, so Event Grid retries and finally dead-letters it (kept as evidence).
"""

from __future__ import annotations

import hashlib
from typing import Any

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog, orchestration_log
from function_app.messages import Ignored, MessageError, RawFile, parse_blob_created, raw_lake_path
from function_app.orchestration import INGEST_ORCHESTRATOR, call_with_retry
from function_app.raw_files import Rejected
from function_app.runtime import StartOutcome, open_workspace
from function_app.starts import start_raw_file
from function_app.training import training_steps
from shared import pipeline
from shared.settings import LAKE_CONNECTION

bp = df.Blueprint()

INGEST_ACTIVITY = "ingest_dataset"


@bp.event_grid_trigger(arg_name="event")
@bp.durable_client_input(client_name="client")
async def on_lake_event(event: func.EventGridEvent, client: df.DurableOrchestrationClient) -> None:
    """BlobCreated in the raw container: check the file and start ingestion + retraining once."""
    log = RunLog({"event_id": event.id, "subject": event.subject})
    try:
        raw = parse_blob_created(event.event_type, event.subject, event.get_json())
    except Ignored as why:
        log.info("event ignored", reason=str(why))
        return
    except MessageError as exc:
        log.error("malformed event", field=exc.field, reason=exc.reason)
        raise
    await start_ingestion(client, raw, log)


@bp.blob_trigger(
    arg_name="blob", path="raw/{name}", connection=LAKE_CONNECTION, source=func.BlobSource.EVENT_GRID
)
@bp.durable_client_input(client_name="client")
async def on_raw_blob(blob: func.InputStream, client: df.DurableOrchestrationClient) -> None:
    """Blob trigger (Event Grid source) on raw/: same checks and the same instance id as on_lake_event."""
    log = RunLog({"blob": blob.name})
    try:
        path = raw_lake_path(blob.name or "")
    except Ignored as why:
        log.info("blob ignored", reason=str(why))
        return
    except MessageError as exc:
        log.error("blob rejected", reason=exc.reason)
        return
    etag = str((blob.blob_properties or {}).get("ETag") or "").strip('"')
    if not etag:  # no properties from the host: the content itself names the version
        etag = "sha256-" + hashlib.sha256(blob.read()).hexdigest()
    await start_ingestion(client, RawFile(path=path, url=blob.uri or path, etag=etag, size=blob.length), log)


async def start_ingestion(client: Any, raw: RawFile, log: RunLog) -> StartOutcome | None:
    """Start ingestion for a file version; a bad file is refused with a logged reason, not retried."""
    try:
        return await start_raw_file(client, raw, log)
    except Rejected as why:
        log.warning("file rejected", path=raw.path, reason=str(why))
        return None


@bp.orchestration_trigger(context_name="context")
def ingest_orchestrator(context: df.DurableOrchestrationContext):
    """Ingest one raw file (validate, partition), then train its dataset and queue promotion."""
    payload = context.get_input()
    options = payload["options"]
    log = orchestration_log(context, orchestrator=INGEST_ORCHESTRATOR, path=payload["source"])
    context.set_custom_status({"stage": "ingesting", "source": payload["source"]})
    ingested = yield from call_with_retry(
        context,
        INGEST_ACTIVITY,
        {"source": payload["source"], "config": options.get("config") or {}},
        options,
    )
    log.info("dataset ingested", dataset_id=ingested["dataset_id"], partitions=ingested["partitions"])
    training = yield from training_steps(
        context, ingested["dataset_id"], payload.get("partition_ids"), options, log
    )
    return {
        "source": payload["source"],
        "trigger": payload.get("trigger"),
        "ingested": ingested,
        "training": training,
    }


@bp.activity_trigger(input_name="payload")
def ingest_dataset(payload: dict) -> dict:
    """Read, validate and partition one source into the lake; returns the dataset summary."""
    ws = open_workspace(payload.get("config"))
    summary = pipeline.ingest(ws, payload["source"])
    RunLog({"path": payload["source"], "dataset_id": summary.dataset_id}).info(
        "dataset written", partitions=summary.partitions, rows=summary.rows, reused=summary.reused
    )
    return summary.to_dict()
