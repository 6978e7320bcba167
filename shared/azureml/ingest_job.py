"""Ingestion on Azure ML: one command job reads a raw file from the lake and writes the dataset.

The Functions app never holds the data: its activity writes the project config to the lake,
submits this job (holding only the source's lake path) and returns a handle; the orchestrator
polls it with durable timers like the training groups' jobs. The job runs
``python -m shared.entry.ingest`` from the same code snapshot and in the same environment as the
training jobs, on the same compute cluster, as the cluster's managed identity (the identity the
lake's datastores are accessed with):

=============  ==========================================================  ==================
name           lake path (datastore ``<prefix><container>``)               mode
=============  ==========================================================  ==================
``source``     the raw file (``uri_file``) or Parquet folder (``uri_folder``)  ``ro_mount``
``config``     ``runs/<ingest id>/config/manymodels.toml``                 ``download``
``prepared``   the ``prepared`` container's root (output)                  ``rw_mount``
``result``     ``runs/<ingest id>/results/<job name>/`` (output)           ``rw_mount``
=============  ==========================================================  ==================

The source is mounted, not downloaded: the streaming code reads it once, in order, a record batch
at a time, so a file larger than the node's disk still ingests, within ``ingest.memory_mb``. The
dataset is written where a local ingestion writes it (``prepared/<dataset id>/...`` and
``prepared/LATEST``), so training jobs find it at the usual paths.

**Idempotent.** The ingest id is derived from the source, the config and the caller's key (the
orchestration instance id, itself derived from the file version), and the job is named
``ingest-<ingest id>``: a redelivered submit finds the job it already made. Only a failed or
canceled job gets a new attempt (``-a2``, ``-a3`` ...). The dataset id is content-derived and a
complete dataset is returned as it is, so even a second job over the same data writes nothing new.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import layout
from shared.azureml.client import AzureMLError, AzureMLSettings, call_with_retry
from shared.azureml.jobs import WORKER_ENV, _get_job, _status_text, build_environment, map_job_state, \
    next_attempt, stage_code
from shared.runs.compute import JobHandle

INGEST_KIND = "ingest"
INGEST_ENTRY = "shared.entry.ingest"
RESULT_FILE = "ingest.json"  # shared.entry.ingest.RESULT_FILE (the entry module imports pandas)
_INGEST_ID = re.compile(r"^i[0-9a-f]{16}$")
_JOB_NAME = re.compile(r"^ingest-(i[0-9a-f]{16})(?:-a\d+)?$")


def ingest_id_for(source: str, config: dict[str, Any], key: str | None) -> str:
    """``i`` + 16 hex digits of the source, the effective config and the caller's key."""
    text = json.dumps([source, config, key or ""], sort_keys=True, default=str)
    return "i" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def job_name_for(ingest_id: str) -> str:
    return f"{INGEST_KIND}-{ingest_id}"


def result_folder(ingest_id: str, job_name: str) -> str:
    """Lake folder of one job's ``ingest.json`` (one per attempt: a retry never reads a stale one)."""
    return f"{layout.run_results(ingest_id)}/{job_name}"


def result_path(ingest_id: str, job_name: str) -> str:
    return f"{result_folder(ingest_id, job_name)}/{RESULT_FILE}"


@dataclass
class IngestPlan:
    """Everything that defines one ingestion job, before it becomes SDK objects."""

    ingest_id: str
    name: str  # the Azure ML job name (an attempt of ingest-<ingest id>)
    source: str  # lake path of the raw file or folder
    source_type: str  # uri_file | uri_folder
    config_path: str  # lake path of the config the job reads

    @property
    def result(self) -> str:
        return result_folder(self.ingest_id, self.name)

    @property
    def command(self) -> str:
        return (f"python -m {INGEST_ENTRY} --source ${{{{inputs.source}}}} --source-name {self.source} "
                "--config ${{inputs.config}} --prepared ${{outputs.prepared}} --result ${{outputs.result}}")


def source_type(lake: Any, source: str) -> str:
    """``uri_file`` for a file in the lake, ``uri_folder`` for a folder of Parquet files."""
    if not layout.is_source(source):
        raise AzureMLError(f"ingestion reads lake sources ({'/, '.join(layout.SOURCE_CONTAINERS)}/...), "
                           f"not {source!r}")
    if lake.exists(source):
        return "uri_file"
    if lake.list(source):
        return "uri_folder"
    raise AzureMLError(f"no such source in the lake: {source}")


def plan_ingest(source: str, kind: str, ingest_id: str, name: str | None = None) -> IngestPlan:
    if not _INGEST_ID.match(ingest_id):
        raise AzureMLError(f"invalid ingest id {ingest_id!r}")
    if kind not in ("uri_file", "uri_folder"):
        raise AzureMLError(f"unknown source type {kind!r}")
    if any(c.isspace() for c in source):
        # the path is on the job's command line (as --source-name) and names a datastore path
        raise AzureMLError(f"source path {source!r} contains white space")
    return IngestPlan(ingest_id=ingest_id, name=name or job_name_for(ingest_id), source=source,
                      source_type=kind, config_path=layout.run_config(ingest_id))


def build_ingest_job(aml: AzureMLSettings, plan: IngestPlan, code: Path | str | None = None,
                     environment: Any = None):
    """The command job, built with the SDK's ``CommandJob``: the training jobs' code snapshot,
    environment, compute and identity. (``command()`` builds the same job as a pipeline node;
    ``jobs.create_or_update`` turns that into this.)"""
    from azure.ai.ml import Input, Output
    from azure.ai.ml.entities import CommandJob, JobResourceConfiguration, ManagedIdentityConfiguration

    folder = plan.source_type == "uri_folder"
    return CommandJob(
        name=plan.name,
        display_name=f"manymodels ingest {plan.source}",
        description=f"manymodels ingestion of {plan.source}: validate, partition, write the dataset",
        experiment_name=aml.experiment,
        tags={"manymodels": INGEST_KIND, "ingest_id": plan.ingest_id, "source": plan.source},
        code=str(code or stage_code()),
        command=plan.command,
        environment=environment or build_environment(aml, "parallel"),
        environment_variables=dict(WORKER_ENV),  # the streaming code's workers are processes
        compute=aml.compute,
        resources=JobResourceConfiguration(instance_count=1, instance_type=aml.instance_type),
        inputs={
            "source": Input(type=plan.source_type, path=aml.lake_uri(plan.source, folder=folder), mode="ro_mount"),
            "config": Input(type="uri_file", path=aml.lake_uri(plan.config_path), mode="download"),
        },
        outputs={
            "prepared": Output(type="uri_folder", path=aml.lake_uri(layout.PREPARED, folder=True),
                               mode="rw_mount"),
            "result": Output(type="uri_folder", path=aml.lake_uri(plan.result, folder=True), mode="rw_mount"),
        },
        # the compute cluster's user-assigned identity reads raw/ and writes prepared/ and runs/:
        # the datastores are identity-based (no stored credential), and a job without an identity
        # runs with an AML token that does not access the data as the cluster's identity
        identity=ManagedIdentityConfiguration(),
    )


def write_config(ws: Any, ingest_id: str) -> str:
    """The workspace's effective config as the job reads it; rewritten only when it differs."""
    path = layout.run_config(ingest_id)
    text = ws.config.to_toml().encode("utf-8")
    if not ws.lake.exists(path) or ws.lake.read_bytes(path) != text:
        ws.lake.write_bytes(path, text)
    return path


def submit_ingest_job(ws: Any, source: str, key: str | None = None) -> JobHandle:
    """Submit (or find) the ingestion job of ``source``; returns its handle, never data."""
    from shared.azureml.client import AzureMLBackend

    backend = AzureMLBackend.for_workspace(ws)
    client = backend.client("dev")
    kind = source_type(ws.lake, source)
    ingest_id = ingest_id_for(source, ws.config.to_dict(), key)
    name, existing = next_attempt(client, job_name_for(ingest_id), backend)
    if existing is not None:
        return _handle(ws, existing, ingest_id)
    write_config(ws, ingest_id)
    job = build_ingest_job(backend.aml, plan_ingest(source, kind, ingest_id, name), code=backend.code)
    created = call_with_retry(
        lambda: client.jobs.create_or_update(job, experiment_name=backend.aml.experiment),
        f"submit {name}", backend.retry)
    return _handle(ws, created, ingest_id)


def ingest_job_status(ws: Any, job_id: str) -> JobHandle:
    """Poll the job; a finished one carries its ``ingest.json`` (completed) or its reason (failed)."""
    from shared.azureml.client import AzureMLBackend

    match = _JOB_NAME.match(job_id or "")
    if match is None:
        raise AzureMLError(f"{job_id!r} is not a manymodels ingestion job name")
    backend = AzureMLBackend.for_workspace(ws)
    job = _get_job(backend.client("dev"), job_id, backend)
    if job is None:
        raise AzureMLError(f"no Azure ML job named {job_id} in workspace {backend.aml.workspace_dev}")
    return _handle(ws, job, match.group(1))


def _read_result(ws: Any, ingest_id: str, job_name: str) -> dict[str, Any] | None:
    path = result_path(ingest_id, job_name)
    if not ws.lake.exists(path):
        return None
    return json.loads(ws.lake.read_bytes(path))


def _handle(ws: Any, job: Any, ingest_id: str) -> JobHandle:
    status = getattr(job, "status", None)
    state = map_job_state(status)
    name = str(job.name)
    handle = JobHandle(job_id=name, kind=INGEST_KIND, run_id=ingest_id, group_index=0, state=state)
    url = getattr(job, "studio_url", None) or ""
    handle.detail = f"Azure ML {_status_text(status) or 'submitted'}" + (f": {url}" if url else "")
    if state in ("completed", "failed"):
        result = _read_result(ws, ingest_id, name)
        if state == "completed":
            if result is None or result.get("status") != "completed":
                handle.state = "failed"
                handle.detail = f"job {name} completed without {result_path(ingest_id, name)}"
            else:
                handle.summary = result
        elif result is not None and result.get("reason"):
            handle.detail = f"{result['reason']} ({handle.detail})"
    return handle
