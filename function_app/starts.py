"""Starting runs from any entry (HTTP, Service Bus, lake events): check, pin, name, start once.

Each start checks what can be checked before anything runs (the raw file's sample, that the
dataset / run / scoring file exists, the config overrides, the partition keys) and raises
:class:`MessageError` naming the field, so HTTP answers 400 and a Service Bus message is
dead-lettered with a logged reason. It then pins the inputs a replay must not re-resolve (the
latest dataset or run becomes an explicit id) and derives the instance id from the request's
content, so a duplicate delivery finds the instance the first one started.

The worker runs ``async def`` functions on one event loop, so the blocking part of each start
(settings, the workspace and its config, lake reads, the sample check: file and network I/O plus
pandas) runs in a worker thread (``asyncio.to_thread``), and only the Durable client's own HTTP
calls are awaited on the loop: a slow blob read never stalls the other invocations of the process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from function_app.logging_context import RunLog
from function_app.messages import (
    MessageError,
    PromoteRequest,
    RawFile,
    RunOptions,
    ScoreRequest,
    TrainRequest,
    check_lake_account,
    instance_id,
    normalise_etag,
    normalise_url,
)
from function_app.orchestration import (
    INGEST_ORCHESTRATOR,
    PROMOTE_ORCHESTRATOR,
    SCORE_ORCHESTRATOR,
    TRAIN_ORCHESTRATOR,
)
from function_app.raw_files import Rejected, check_raw_file, check_raw_folder, file_version
from function_app.runtime import (
    StartOutcome,
    check_config,
    existing_run,
    load_settings,
    open_workspace,
    orchestration_options,
    resolve_partitions,
    start_once,
)
from shared import layout
from shared.runs import backends, pipeline
from shared.keys import PARTITION_ID
from shared.data.partitioning import load_dataset


@dataclass(frozen=True)
class Start:
    """A checked start: which orchestrator, under which content-derived instance id, with what input."""

    orchestrator: str
    instance_id: str
    payload: dict[str, Any]
    fields: dict[str, Any]  # log fields


async def start_raw_file(
    client: Any,
    raw: RawFile,
    log: RunLog,
    options: RunOptions | None = None,
    partitions: tuple[Any, ...] | None = None,
) -> StartOutcome:
    """Ingest and retrain one version of a raw file; Rejected if its sample fails validation.

    A file whose event carries no version (a rename) gets the lake's current ETag first, so it has
    the identity an HTTP or Service Bus start of the same file version would have."""
    if raw.etag is None:
        log = log.bind(renamed_from=raw.renamed_from)
        raw = await asyncio.to_thread(with_current_version, raw)
    # a full retrain of a file version is another run than the incremental one its event started
    iid = instance_id("ingest", raw.identity, *(["full"] if options is not None and options.full else []))
    log = log.bind(path=raw.path, etag=raw.etag)
    status = await existing_run(client, iid)
    if status is not None:
        log.info("duplicate delivery ignored", instance_id=iid, runtime_status=status)
        return StartOutcome(iid, False, status)
    start = await asyncio.to_thread(prepare_raw_file, raw, iid, options, partitions)
    return await start_once(client, start.orchestrator, start.instance_id, start.payload, log)


def with_current_version(raw: RawFile) -> RawFile:
    """Blocking: the raw file with the lake's current version of it (Rejected if it is gone)."""
    ws = open_workspace(settings=load_settings())
    return replace(raw, etag=normalise_etag(file_version(ws.lake, raw.version_path)))


def check_own_account(raw: RawFile) -> None:
    """Blocking: Ignored unless the event's file is in the lake's own storage account."""
    check_lake_account(raw.url, backends.open_lake(load_settings()).uri)


def prepare_raw_file(
    raw: RawFile, iid: str, options: RunOptions | None, partitions: tuple[Any, ...] | None
) -> Start:
    """Blocking: check a sample of the file and build the ingestion's input."""
    settings = load_settings()
    options = options or RunOptions()
    ws = open_workspace(options.config, settings=settings)
    if raw.is_folder:
        check_raw_folder(ws.lake, raw.path, ws.config)
    else:
        check_raw_file(ws.lake, raw.path, ws.config, raw.size)
    payload = {
        "source": raw.path,
        "trigger": {"url": normalise_url(raw.url), "etag": raw.etag},
        "partition_ids": resolve_partitions(ws, partitions),
        "options": orchestration_options(settings, options),
    }
    return Start(INGEST_ORCHESTRATOR, iid, payload, {})


async def start_training(
    client: Any,
    request: TrainRequest,
    log: RunLog,
    dedupe: str | None = None,
    etag: str | None = None,
    path_field: str = "dataset",
) -> StartOutcome:
    """Train a dataset, or ingest a raw file first (named by its path and version, as lake events are).

    ``dedupe`` is the sender's message or request id; ``etag`` the file version a message reports.
    """
    prepared = await asyncio.to_thread(prepare_training, request, dedupe, etag, path_field)
    if isinstance(prepared, RawFile):
        try:
            return await start_raw_file(client, prepared, log, request.options, request.partitions)
        except Rejected as why:
            raise MessageError(path_field, str(why)) from why
    return await start_once(
        client, prepared.orchestrator, prepared.instance_id, prepared.payload, log.bind(**prepared.fields)
    )


def prepare_training(
    request: TrainRequest, dedupe: str | None, etag: str | None, path_field: str
) -> Start | RawFile:
    """Blocking: check a training request; a raw file comes back as the RawFile to ingest first."""
    settings = load_settings()
    ws = open_workspace(settings=settings)
    check_config(ws, request.options.config)
    if request.dataset is not None:
        try:
            return RawFile(
                path=request.dataset,
                url=f"{ws.lake.uri}/{request.dataset}",
                etag=etag or file_version(ws.lake, request.dataset),
            )
        except Rejected as why:
            raise MessageError(path_field, str(why)) from why
    dataset_id = request.dataset_id or _latest(pipeline.latest_dataset_id, ws, "dataset_id")
    if not ws.lake.exists(layout.dataset_meta(dataset_id)):
        raise MessageError("dataset_id", f"no dataset {dataset_id} in the lake")
    partition_ids = resolve_partitions(ws, request.partitions)
    if partition_ids:
        known = set(load_dataset(ws.lake, dataset_id).manifest[PARTITION_ID])
        unknown = [p for p in partition_ids if p not in known]
        if unknown:
            raise MessageError(
                "partitions", f"{len(unknown)} partition(s) not in dataset {dataset_id}, e.g. {unknown[:3]}"
            )
    payload = {
        "dataset_id": dataset_id,
        "partition_ids": partition_ids,
        "options": orchestration_options(settings, request.options),
    }
    iid = instance_id("train", payload, dedupe or request.request_id)
    return Start(TRAIN_ORCHESTRATOR, iid, payload, {"dataset_id": dataset_id})


async def start_scoring(
    client: Any, request: ScoreRequest, log: RunLog, dedupe: str | None = None, path_field: str = "data"
) -> StartOutcome:
    """Batch-score from a scoring file, or the next horizon of every partition."""
    start = await asyncio.to_thread(prepare_scoring, request, dedupe, path_field)
    return await start_once(client, start.orchestrator, start.instance_id, start.payload, log.bind(**start.fields))


def prepare_scoring(request: ScoreRequest, dedupe: str | None, path_field: str) -> Start:
    """Blocking: check a scoring request and pin its dataset."""
    settings = load_settings()
    ws = open_workspace(settings=settings)
    check_config(ws, request.options.config)
    if request.data is not None and not ws.lake.exists(request.data):
        raise MessageError(path_field, f"no such file in the lake: {request.data}")
    if request.horizon is not None and request.horizon > ws.config.scoring.max_distance:
        raise MessageError("horizon", f"{request.horizon} periods is beyond scoring.max_distance "
                                      f"{ws.config.scoring.max_distance} after the end of training (as the "
                                      "CLI refuses it); ask for fewer, or raise it in the project file")
    dataset_id = request.dataset_id or _latest(pipeline.latest_dataset_id, ws, "dataset_id")
    payload = {
        "data": request.data,
        "horizon": request.horizon,
        "dataset_id": dataset_id,
        "options": orchestration_options(settings, request.options),
    }
    iid = instance_id("score", payload, dedupe or request.request_id)
    return Start(SCORE_ORCHESTRATOR, iid, payload, {"dataset_id": dataset_id})


async def start_promotion(client: Any, request: PromoteRequest, log: RunLog) -> StartOutcome:
    """Promote a run (the latest when none is named) through the promotion orchestration."""
    start = await asyncio.to_thread(prepare_promotion, request)
    return await start_once(client, start.orchestrator, start.instance_id, start.payload, log.bind(**start.fields))


def prepare_promotion(request: PromoteRequest) -> Start:
    """Blocking: check a promotion request and pin its run."""
    settings = load_settings()
    ws = open_workspace(settings=settings)
    run_id = request.run_id or _latest(pipeline.latest_run_id, ws, "run_id")
    if not ws.lake.exists(layout.run_meta(run_id)):
        raise MessageError("run_id", f"no training run {run_id} in the lake")
    options = orchestration_options(settings, RunOptions(min_accuracy=request.min_accuracy))
    payload = {"run_id": run_id, "options": options}
    iid = instance_id("promote", payload, request.request_id)
    return Start(PROMOTE_ORCHESTRATOR, iid, payload, {"run_id": run_id})


def _latest(finder: Any, ws: Any, field: str) -> str:
    try:
        return finder(ws)
    except pipeline.PipelineError as exc:
        raise MessageError(field, str(exc)) from exc
