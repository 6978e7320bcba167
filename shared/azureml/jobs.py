"""Training and batch scoring on Azure ML: one parallel job (inside a pipeline job) per group.

The parallel step runs **the same entry scripts** as the local runner (``shared/entry/train.py``
and ``shared/entry/score.py``) with the same arguments; Azure ML mounts the lake and hands
``run(mini_batch)`` a list of local file paths, exactly what :func:`shared.runs.runner.run_parallel`
does on one machine. Outputs go back to the lake at the paths the local pipeline uses:
``runs/<run_id>/models/`` (artifacts and sidecars, written by the entry script),
``runs/<score_id>/predictions/``, and ``runs/<id>/results/g<group>/rows.jsonl`` (the lines
``run()`` returned, appended by the parallel runtime; ``register_run`` reads every ``.jsonl``
under ``results/``).

**Input: a uri_folder of mini-batch files, not an MLTable with ``partition_keys``.** Our lake
already holds the data partitioned as the engine wants it: Parquet files of whole partitions, about
``runner.rows_per_file`` rows each, so one ``run()`` call fits many small models in one process and
the per-call overhead of the parallel runtime (hundreds of ms) is paid per file, not per model.
``partition_keys`` would make Azure ML split a tabular MLTable by key at run time: one mini-batch
per partition (10,000 calls for 10,000 models), a DataFrame instead of files (a second entry-script
contract that the local runner does not have), and a full read-and-shuffle of the data on every
run although ingestion already partitioned it once. When a group is every file of its folder
(the usual case: one group per dataset, Azure ML spreading it over ``instance_count`` nodes) the
input is that folder; when it is a subset (the Durable orchestrator fans out several groups),
a file-list MLTable naming exactly the group's files is written next to the run and used as the
input: still a list of files for ``run()``, no key-based splitting. Both are mounted read-only
(``ro_mount``): the parallel job docs allow only ``ro_mount`` or ``download`` for a file-list MLTable
(``eval_mount`` is refused), and a mount fetches only the files a worker reads.

**Scoring reads only its group's models.** Before a scoring job is submitted, the group's partition
ids are read from its request files and each registry it needs (production; development for the
baseline fallback) is cut to a *slice* in the lake, ``runs/<score_id>/registry/g<i>/<name>/``: the
index with only those partitions' newest versions, and their artifacts. The job downloads that
slice (the entry script opens its SQLite index read-write, which a read-only mount refuses): a
group of 600 partitions moves about 600 artifacts, not every version of every model of both
registries (about 400 MB per node at 10,000 partitions). The group's inputs and registry slices are
built in :mod:`shared.azureml.group_inputs`.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.azureml.client import AzureMLError, AzureMLSettings, call_with_retry
from shared.azureml.group_inputs import (
    GroupInput, group_input, registry_slice_path, scoring_partitions, write_registry_slice,
)
from shared import layout
from shared.runs.compute import JobHandle, job_id_for
from shared.registries.registration import lake_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = "shared/entry/train.py"
SCORE_SCRIPT = "shared/entry/score.py"
RESULTS_FILE = "rows.jsonl"
# A registry folder is mounted, not downloaded: a job reads the few artifacts its slice names
REGISTRY_MODE = "ro_mount"
SLICE_WORKERS = 8  # parallel slice uploads (the blob client pools 10 connections)
# Packages only the Functions host needs; the cluster never imports them.
HOST_ONLY_PACKAGES = ("azure-functions", "azure-functions-durable")
# What the parallel runtime itself imports on the node (its driver uses azureml-core; mltable
# reads file-list MLTable inputs).
PARALLEL_RUNTIME_PACKAGES = ("azureml-core", "mltable")
SERVING_RUNTIME_PACKAGES = ("azureml-inference-server-http",)
PYTHON_VERSION = "3.11"
# One BLAS/OpenMP thread per worker process, as the local runner does: max_concurrency_per_instance
# processes x N threads would oversubscribe the node's cores.
# No PYTHONPATH: the parallel driver imports the entry script by its package path from the code
# snapshot's root (``shared/entry/score.py`` -> ``shared.entry.score``), and the scripts put that
# root on ``sys.path`` themselves when loaded by file path.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Azure ML job states -> the states the Durable monitor understands (shared.runs.compute.JOB_STATES).
STATE_MAP = {
    "NotStarted": "queued", "Queued": "queued", "Preparing": "queued", "Provisioning": "queued",
    "Starting": "queued", "Paused": "queued",
    "Running": "running", "Finalizing": "running",
    # not terminal yet: the job may still write outputs; the monitor keeps polling
    "CancelRequested": "running", "NotResponding": "running", "Unknown": "running",
    "Completed": "completed", "Failed": "failed", "Canceled": "canceled",
}
MAX_ATTEMPTS = 10


def map_job_state(status: str | None) -> str:
    """An Azure ML job status onto queued | running | completed | failed | canceled.

    Unrecognised or missing states count as running: the monitor's timeout, not a guess, ends a
    job whose state we cannot read.
    """
    text = _status_text(status)
    for name, state in STATE_MAP.items():
        if name.lower() == text.lower():
            return state
    return "running"


def _status_text(status: Any) -> str:
    """The SDK returns a str-valued enum (``JobStatus.RUNNING``) or a plain string."""
    return str(getattr(status, "value", status) or "")


# -- environment and code ----------------------------------------------------------------------
def read_requirements(path: Path | None = None) -> list[str]:
    """The project's requirement ranges (``requirements.in``; comments, blanks and options dropped).

    The Azure ML environments take the ranges, not the Function App's pins (requirements.txt): they
    add Azure ML's own packages (``azureml-core``, ``mltable``, the inference server), whose
    requirements the pins do not all meet (``mltable`` needs ``python-dateutil<3``; the pins have
    4.0), so pip solves them together within our ranges."""
    path = path or REPO_ROOT / "requirements.in"
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _package_name(requirement: str) -> str:
    for sep in ("[", "<", ">", "=", "!", "~", ";", " "):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def conda_spec(requirements: list[str], extra: tuple[str, ...]) -> dict[str, Any]:
    """A conda environment: our Python, and pip installing requirements.in plus runtime extras."""
    pip = [r for r in requirements if _package_name(r) not in HOST_ONLY_PACKAGES]
    pip += [e for e in extra if _package_name(e) not in {_package_name(r) for r in pip}]
    return {"name": "manymodels", "channels": ["conda-forge"],
            "dependencies": [f"python={PYTHON_VERSION}", "pip", {"pip": pip}]}


def build_environment(aml: AzureMLSettings, purpose: str = "parallel", requirements: Path | None = None):
    """The job (``purpose="parallel"``) or serving environment, built from requirements.in.

    The version is a hash of image and conda spec, so an unchanged environment is never rebuilt
    and a changed one never overwrites the version a running job uses.
    """
    from azure.ai.ml.entities import Environment

    if purpose not in ("parallel", "serving"):
        raise AzureMLError(f"unknown environment purpose {purpose!r}")
    extra = PARALLEL_RUNTIME_PACKAGES if purpose == "parallel" else SERVING_RUNTIME_PACKAGES
    conda = conda_spec(read_requirements(requirements), extra)
    digest = hashlib.sha256(json.dumps([aml.image, conda], sort_keys=True).encode()).hexdigest()[:16]
    return Environment(name=f"manymodels-{purpose}", version=digest, image=aml.image, conda_file=conda,
                       description=f"manymodels {purpose} environment from requirements.in")


def stage_code(dest: Path | None = None) -> Path:
    """A snapshot folder holding only the ``shared`` package (plus requirements.txt).

    Jobs upload this, not the repository: no tests, infra, node_modules or data. The SDK names
    the upload by its content hash, so an unchanged snapshot is uploaded once. The default folder
    is keyed by that content too, so repeated submissions reuse it.
    """
    sources = sorted(p for p in (REPO_ROOT / "shared").rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    requirements = REPO_ROOT / "requirements.txt"
    digest.update(requirements.read_bytes())
    target = dest or Path(tempfile.gettempdir()) / "manymodels-code" / digest.hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    work = Path(tempfile.mkdtemp(prefix=".stage-", dir=_ensure(target.parent)))
    try:
        for path in sources:
            out = work / path.relative_to(REPO_ROOT)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
        shutil.copyfile(requirements, work / "requirements.txt")
        (work / ".complete").write_text(digest.hexdigest(), encoding="utf-8")
        try:
            work.rename(target)  # atomic: a target folder is always a complete snapshot
        except OSError:
            if not (target / ".complete").is_file():  # not another process's identical snapshot
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- the jobs ----------------------------------------------------------------------------------
@dataclass
class JobPlan:
    """Everything that defines one group's job, before it becomes SDK objects."""

    kind: str  # train | score
    run_id: str
    group_index: int
    data: GroupInput
    files: dict[str, str]  # input name -> lake path of a single file (config, dataset meta)
    folders: dict[str, str]  # input name -> azureml:// folder uri (registries)
    outputs: dict[str, str]  # output name -> azureml:// folder uri
    arguments: str
    mini_batch_size: int
    max_retries: int

    @property
    def name(self) -> str:
        return job_id_for(self.kind, self.run_id, self.group_index)


def plan_train(aml: AzureMLSettings, cfg: Any, run_id: str, dataset_id: str, group_index: int,
               data: GroupInput, global_model: str | None = None, partitions: str | None = None,
               global_sha256: str | None = None) -> JobPlan:
    """The training job's arguments mirror ``pipeline.train_group``'s, flag for flag (the run's
    global model fits, ``global_model``, when the run has them; the list of partitions to train,
    ``partitions``, when the run is incremental)."""
    files = {"config": layout.run_config(run_id), "dataset_meta": layout.dataset_meta(dataset_id)}
    arguments = "--config ${{inputs.config}} --dataset-meta ${{inputs.dataset_meta}} "
    if global_model:
        files["global_model"] = global_model
        arguments += "--global-model ${{inputs.global_model}} "
        if global_sha256:  # the digest its writer recorded: the worker checks it before unpickling
            if not re.fullmatch(r"[0-9a-f]{64}", global_sha256):
                raise AzureMLError(f"the global model's recorded SHA-256 is not a digest: {global_sha256[:80]!r}")
            arguments += f"--global-model-sha256 {global_sha256} "
    if partitions:
        files["partitions"] = partitions
        arguments += "--partitions ${{inputs.partitions}} "
    return JobPlan(
        kind="train", run_id=run_id, group_index=group_index, data=data,
        files=files,
        folders={},
        outputs={"models": aml.lake_uri(layout.run_models(run_id), folder=True),
                 "results": aml.lake_uri(layout.group_results(run_id, group_index), folder=True)},
        arguments=(arguments + f"--output-dir ${{{{outputs.models}}}} --run-id {run_id} "
                   f"--append_row_file_name {RESULTS_FILE}"),
        mini_batch_size=aml.mini_batch_size or cfg.runner.mini_batch_size,
        max_retries=aml.max_retries if aml.max_retries is not None else cfg.runner.retries,
    )


def plan_score(aml: AzureMLSettings, cfg: Any, score_id: str, dataset_id: str, group_index: int,
               data: GroupInput) -> JobPlan:
    """The scoring job's arguments mirror ``pipeline.score_group``'s. Each registry it reads is two
    inputs: the group's slice of the index (:func:`write_registry_slice`, downloaded: ``ModelRegistry``
    opens its SQLite index read-write, which a read-only mount refuses) and the registry folder,
    mounted read-only, of which the job reads only the artifacts its slice names."""
    files = {"config": layout.run_config(score_id), "dataset_meta": layout.dataset_meta(dataset_id),
             "prod_index": layout.registry_slice_index(score_id, group_index, "prod")}
    folders = {"prod_registry": aml.lake_uri(layout.registry_dir("prod"), folder=True,
                                             datastore=aml.registry_datastore)}
    arguments = "--config ${{inputs.config}} --dataset-meta ${{inputs.dataset_meta}} " \
                "--prod-registry ${{inputs.prod_registry}} --prod-index ${{inputs.prod_index}} "
    if cfg.scoring_reads_dev:  # the chain's other sources read the development registry
        files["dev_index"] = layout.registry_slice_index(score_id, group_index, "dev")
        folders["dev_registry"] = aml.lake_uri(layout.registry_dir("dev"), folder=True)
        arguments += "--dev-registry ${{inputs.dev_registry}} --dev-index ${{inputs.dev_index}} "
    arguments += f"--output-dir ${{{{outputs.predictions}}}} --score-id {score_id} " \
                 f"--append_row_file_name {RESULTS_FILE}"
    return JobPlan(
        kind="score", run_id=score_id, group_index=group_index, data=data,
        files=files,
        folders=folders,
        outputs={"predictions": aml.lake_uri(layout.run_predictions(score_id), folder=True),
                 "results": aml.lake_uri(layout.group_results(score_id, group_index), folder=True)},
        arguments=arguments,
        mini_batch_size=aml.mini_batch_size or cfg.runner.mini_batch_size,
        max_retries=aml.max_retries if aml.max_retries is not None else cfg.runner.retries,
    )


def build_pipeline_job(aml: AzureMLSettings, plan: JobPlan, code: Path | str | None = None,
                       environment: Any = None):
    """The pipeline job holding one ``parallel_run_function`` step, built with the SDK's classes."""
    from azure.ai.ml import Input, Output, dsl
    from azure.ai.ml.entities import RetrySettings
    from azure.ai.ml.parallel import RunFunction, parallel_run_function

    code = str(code or stage_code())
    environment = environment or build_environment(aml, "parallel")
    script = TRAIN_SCRIPT if plan.kind == "train" else SCORE_SCRIPT
    component_inputs = {"data": Input(type=plan.data.kind, mode=plan.data.to_input().mode)}
    component_inputs.update({n: Input(type="uri_file", mode="download") for n in plan.files})
    component_inputs.update({n: Input(type="uri_folder", mode=REGISTRY_MODE) for n in plan.folders})
    step = parallel_run_function(
        name=f"manymodels_{plan.kind}",
        display_name=f"{plan.kind} {plan.run_id} g{plan.group_index:05d}",
        description=f"manymodels {plan.kind}: init()/run(mini_batch) of {script} over mini-batch files",
        inputs=component_inputs,
        outputs={n: Output(type="uri_folder", mode="rw_mount") for n in plan.outputs},
        input_data="${{inputs.data}}",
        instance_count=aml.instance_count,
        instance_type=aml.instance_type,
        max_concurrency_per_instance=aml.max_concurrency,
        mini_batch_size=str(plan.mini_batch_size),
        mini_batch_error_threshold=aml.mini_batch_error_threshold,
        error_threshold=aml.error_threshold,
        retry_settings=RetrySettings(max_retries=plan.max_retries, timeout=aml.mini_batch_timeout),
        logging_level=aml.logging_level,
        environment_variables=dict(WORKER_ENV),
        # Never reuse an earlier job's outputs: ours go to fixed lake paths, and the entry scripts'
        # sidecars already make a rerun skip finished partitions.
        is_deterministic=False,
        task=RunFunction(code=code, entry_script=script, environment=environment,
                         program_arguments=plan.arguments, append_row_to="${{outputs.results}}"),
    )
    job_inputs = {"data": plan.data.to_input()}
    job_inputs.update({n: Input(type="uri_file", path=aml.lake_uri(p), mode="download")
                       for n, p in plan.files.items()})
    job_inputs.update({n: Input(type="uri_folder", path=uri, mode=REGISTRY_MODE)
                       for n, uri in plan.folders.items()})

    def wire(node: Any) -> dict[str, Any]:
        node.compute = aml.compute
        for name, uri in plan.outputs.items():
            setattr(node.outputs, name, Output(type="uri_folder", path=uri, mode="rw_mount"))
        return {}

    # dsl.pipeline reads the inputs from the function's signature (no **kwargs, no annotations),
    # hence one small function per input set.
    def train(data, config, dataset_meta):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta))

    def train_with_global(data, config, dataset_meta, global_model):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta, global_model=global_model))

    def train_some(data, config, dataset_meta, partitions):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta, partitions=partitions))

    def train_some_with_global(data, config, dataset_meta, global_model, partitions):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta, global_model=global_model,
                         partitions=partitions))

    def score(data, config, dataset_meta, prod_index, prod_registry):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta, prod_index=prod_index,
                         prod_registry=prod_registry))

    def score_with_fallback(data, config, dataset_meta, prod_index, dev_index, prod_registry, dev_registry):
        return wire(step(data=data, config=config, dataset_meta=dataset_meta, prod_index=prod_index,
                         dev_index=dev_index, prod_registry=prod_registry, dev_registry=dev_registry))

    if plan.kind == "train":
        body = {(False, False): train, (True, False): train_with_global, (False, True): train_some,
                (True, True): train_some_with_global}["global_model" in plan.files, "partitions" in plan.files]
    else:
        body = score_with_fallback if "dev_registry" in plan.folders else score
    manymodels_pipeline = dsl.pipeline(
        name=f"manymodels_{plan.kind}", compute=aml.compute,
        description=f"manymodels {plan.kind} of {plan.run_id}, group {plan.group_index}")(body)
    job = manymodels_pipeline(**job_inputs)
    job.name = plan.name
    job.display_name = f"manymodels {plan.kind} {plan.run_id} g{plan.group_index:05d}"
    job.experiment_name = aml.experiment
    job.tags = {"manymodels": plan.kind, "run_id": plan.run_id, "group": str(plan.group_index),
                "files": str(len(plan.data.files)), "input": plan.data.kind}
    job.settings.default_compute = aml.compute
    job.settings.continue_on_step_failure = False
    return job


def write_scoring_slices(ws: Any, score_id: str, group_index: int, batch_paths: list[str], cfg: Any) -> bool:
    """One group's registry slices, unless they exist: a group submitted without them (a plan made
    before slices were pinned at planning) gets them now, from the registries as they are now.
    Returns whether it wrote them."""
    ws.prod.refresh(force=True)
    if cfg.scoring_reads_dev:
        ws.dev.refresh(force=True)
    return pin_scoring(ws, score_id, {group_index: batch_paths}, cfg) > 0


def pin_scoring(ws: Any, score_id: str, groups: list[list[str]] | dict[int, list[str]], cfg: Any) -> int:
    """Slice the registries for every group of a scoring run at once, as they are when it is planned,
    so a promotion that lands while the groups run reaches none of them rather than some.

    The registries are read as the caller last pulled them (:func:`shared.runs.pipeline.plan_scoring`
    refreshes both before it computes the score id). Requests: one listing of the run's slices, one
    read of the plan's partitions file, then one upload per slice (in parallel): O(groups), whatever
    the number of models, since the artifacts are not copied (:func:`write_registry_slice`).
    Returns how many groups got slices; a replanned run keeps the ones it has."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = dict(enumerate(groups)) if isinstance(groups, list) else dict(groups)
    names = ("prod", "dev") if cfg.scoring_reads_dev else ("prod",)
    have = set(ws.lake.list(layout.run_registry_slices(score_id)))
    todo = [(g, name) for g in sorted(wanted) for name in names
            if layout.registry_slice_index(score_id, g, name) not in have]
    if not todo:
        return 0
    registries = {"prod": ws.prod, "dev": ws.dev}
    order = sorted({g for g, _ in todo})
    pids = dict(zip(order, scoring_partitions(ws.lake, score_id, [wanted[g] for g in order])))

    def write(task: tuple[int, str]) -> None:
        g, name = task
        write_registry_slice(ws.lake, registries[name], name, pids[g], registry_slice_path(score_id, g, name))

    with ThreadPoolExecutor(max_workers=max(1, min(SLICE_WORKERS, len(todo)))) as pool:
        list(pool.map(write, todo))  # re-raises the first failure
    return len(order)


# -- submit and poll ------------------------------------------------------------------------------
def submit_parallel_job(ws: Any, kind: str, run_id: str, group_index: int,
                        batch_paths: list[str]) -> JobHandle:
    """Submit one group as an Azure ML pipeline job; idempotent by job name.

    A redelivered submit finds the job it already made (queued, running or completed) and returns
    it. Only when that job failed or was canceled is a new attempt submitted, named
    ``<job id>-a<n>``: a Durable retry of a failed group gets a fresh job, never a duplicate of a
    live one.
    """
    from shared.azureml.client import AzureMLBackend

    if kind not in ("train", "score"):
        raise AzureMLError(f"unknown job kind {kind!r}")
    backend = AzureMLBackend.for_workspace(ws)
    client = backend.client("dev")
    name, existing = next_attempt(client, job_id_for(kind, run_id, group_index), backend)
    if existing is not None:
        return _handle(ws, existing, kind, run_id, group_index)
    job = build_job_for_group(ws, backend.aml, kind, run_id, group_index, batch_paths, code=backend.code)
    job.name = name
    created = call_with_retry(
        lambda: client.jobs.create_or_update(job, experiment_name=backend.aml.experiment),
        f"submit {name}", backend.retry)
    return _handle(ws, created, kind, run_id, group_index)


def next_attempt(client: Any, base: str, backend: Any) -> tuple[str, Any | None]:
    """The job to return or the name to submit: ``(name, live job)`` when an attempt of ``base`` is
    queued, running or completed; ``(free name, None)`` when every attempt so far failed or was
    canceled (``base``, then ``base-a2`` ...). Raises after ``MAX_ATTEMPTS`` failed attempts."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        name = base if attempt == 1 else f"{base}-a{attempt}"
        existing = _get_job(client, name, backend)
        if existing is None:
            return name, None
        if map_job_state(existing.status) not in ("failed", "canceled"):
            return name, existing
    raise AzureMLError(f"{base}: {MAX_ATTEMPTS} attempts failed or were canceled; not submitting another")


def build_job_for_group(ws: Any, aml: AzureMLSettings, kind: str, run_id: str, group_index: int,
                        batch_paths: list[str], code: Path | str | None = None):
    """Write the group's config (and MLTable, if needed) to the lake and build its pipeline job."""
    meta = json.loads(ws.lake.read_bytes(layout.run_meta(run_id)))
    if kind == "train":
        cfg = ws.config
    else:
        from shared.config import ProjectConfig

        cfg = ProjectConfig.from_dict(meta["config"])
    config_path = layout.run_config(run_id)
    text = cfg.to_toml().encode("utf-8")
    if not ws.lake.exists(config_path) or ws.lake.read_bytes(config_path) != text:
        ws.lake.write_bytes(config_path, text)
    data = group_input(aml, ws.lake, run_id, group_index, batch_paths)
    if kind == "score":
        write_scoring_slices(ws, run_id, group_index, batch_paths, cfg)
    if kind == "train":
        global_model = layout.global_model(run_id)
        has_global = ws.lake.exists(global_model)
        plan = plan_train(aml, cfg, run_id, meta["dataset_id"], group_index, data,
                          global_model if has_global else None, meta.get("partitions_file"),
                          lake_digest(ws.lake, global_model) if has_global else None)
    else:
        plan = plan_score(aml, cfg, run_id, meta["dataset_id"], group_index, data)
    return build_pipeline_job(aml, plan, code=code)


def parallel_job_status(ws: Any, job_id: str) -> JobHandle:
    """Poll one job and map its state; a finished group's result rows are summarised."""
    from shared.azureml.client import AzureMLBackend

    backend = AzureMLBackend.for_workspace(ws)
    job = _get_job(backend.client("dev"), job_id, backend)
    if job is None:
        raise AzureMLError(f"no Azure ML job named {job_id} in workspace {backend.aml.workspace_dev}")
    kind, run_id, group_index = _identity(job)
    return _handle(ws, job, kind, run_id, group_index)


def _get_job(client: Any, name: str, backend: Any) -> Any | None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return call_with_retry(lambda: client.jobs.get(name), f"get job {name}", backend.retry)
    except ResourceNotFoundError:
        return None


_JOB_NAME = re.compile(r"^(train|score)-(.+)-g(\d+)(?:-a\d+)?$")


def _identity(job: Any) -> tuple[str, str, int]:
    """kind, run id and group from the job's tags (set at submission), else from its name."""
    tags = dict(getattr(job, "tags", None) or {})
    if tags.get("manymodels") and tags.get("run_id") and tags.get("group") is not None:
        return tags["manymodels"], tags["run_id"], int(tags["group"])
    match = _JOB_NAME.match(str(job.name))
    if match is None:
        raise AzureMLError(f"job {job.name} is not a manymodels job (no tags, unknown name)")
    return match.group(1), match.group(2), int(match.group(3))


def _handle(ws: Any, job: Any, kind: str, run_id: str, group_index: int) -> JobHandle:
    status = getattr(job, "status", None)
    state = map_job_state(status)
    handle = JobHandle(job_id=str(job.name), kind=kind, run_id=run_id, group_index=group_index, state=state)
    url = getattr(job, "studio_url", None) or ""
    handle.detail = f"Azure ML {_status_text(status) or 'submitted'}" + (f": {url}" if url else "")
    if state == "completed":
        handle.summary = _summary(ws, run_id, group_index)
    return handle


def _summary(ws: Any, run_id: str, group_index: int) -> dict[str, Any]:
    """Counts by status from the rows the parallel runtime appended for this group."""
    prefix = layout.group_results(run_id, group_index)
    statuses: dict[str, int] = {}
    rows = 0
    for path in ws.lake.list(prefix):
        if not path.endswith(".jsonl"):
            continue
        for line in ws.lake.read_bytes(path).decode("utf-8").splitlines():
            if line.strip():
                status = str(json.loads(line).get("status", "unknown"))
                rows += 1
                statuses[status] = statuses.get(status, 0) + 1
    return {"run_id": run_id, "group_index": group_index, "partitions": rows, "statuses": statuses}
