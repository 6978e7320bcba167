"""Ingestion: new files in the lake's raw container start ingestion and retraining.

One way in: an Event Grid trigger for ``Microsoft.Storage.BlobCreated`` (the event carries the URL
and ETag; the function reads only a sample). Both delivery schemas are accepted: the Event Grid
schema (``func.EventGridEvent``) and CloudEvents 1.0 (``func.CloudEvent``, azure-functions >= 1.26).
The function:

1. keeps only ``.csv`` / ``.parquet`` files under ``raw/`` (other containers, other files, other
   event types, and ADLS ``CreateFile`` events, which precede the data: logged, ignored);
2. derives the orchestration instance id from the storage account, container, blob and ETag, so a
   duplicate delivery of the same file version — through either the ``blob`` or the ``dfs``
   endpoint, or an HTTP / Service Bus start naming the same file — starts nothing new;
3. checks a sample of the file with the core's own reader and validation (missing columns,
   unparseable times or targets...) and refuses a bad file with a logged reason;
4. starts ``ingest_orchestrator``: ingest (full validation, partitioning) then training.

What can never succeed — a malformed event, a hostile or unsupported path, a bad file — is logged
and the function returns: an exception would make Event Grid redeliver it for up to 24 hours. Only
transient failures (the lake or the Durable extension unreachable) raise, so Event Grid retries
them. There is no blob trigger: a ``func.InputStream`` binding makes the host read the whole blob
and ship it over gRPC before the function runs, which the Event Grid trigger never needs.
"""

from __future__ import annotations

from typing import Any

import azure.durable_functions as df
import azure.functions as func

from function_app.logging_context import RunLog, orchestration_log
from function_app.messages import Ignored, MessageError, RawFile, lake_event, parse_blob_created
from function_app.orchestration import INGEST_ORCHESTRATOR, call_with_retry
from function_app.raw_files import Rejected
from function_app.runtime import StartOutcome, open_workspace
from function_app.starts import start_raw_file
from function_app.training import training_steps
from shared import pipeline

bp = df.Blueprint()

INGEST_ACTIVITY = "ingest_dataset"


@bp.event_grid_trigger(arg_name="event")
@bp.durable_client_input(client_name="client")
async def on_lake_event(event: func.EventGridEvent, client: df.DurableOrchestrationClient) -> None:
    """BlobCreated in the raw container (either schema): check the file and start ingestion once."""
    log = RunLog({"event_id": getattr(event, "id", None), "subject": getattr(event, "subject", None)})
    try:
        received = lake_event(event)
        log = log.bind(schema=received.schema)
        raw = parse_blob_created(received.type, received.subject, received.data)
    except Ignored as why:
        log.info("event ignored", reason=str(why))
        return
    except MessageError as exc:  # permanent: a redelivery would fail the same way for 24 hours
        log.error("malformed event dropped", field=exc.field, reason=exc.reason)
        return
    await start_ingestion(client, raw, log)


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
