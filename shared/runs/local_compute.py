"""The local compute backend: groups run on this machine's process pool, ingestion in process.

What the Azure ML backend (:mod:`shared.azureml.jobs`) does with parallel jobs and a command job,
this does with :func:`shared.runs.runner.run_parallel` and the same entry scripts, flag for flag. It sits
below the workspace and the stages (``ws`` is the workspace, typed only): the backend table
(:mod:`shared.runs.backends`) opens it without an import circle.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from shared import layout
from shared.runs.compute import BackendError, JobHandle, check_kind, job_id_for
from shared.config import ProjectConfig
from shared.keys import PARTITION_ID
from shared.lake import LocalLake
from shared.registries.registration import lake_digest
from shared.runs.runner import run_parallel
from shared.runs.stage_state import _load_dataset, _run_meta
from shared.results.summaries import GroupSummary

if TYPE_CHECKING:  # pragma: no cover
    from shared.runs.workspace import Workspace

TRAIN_ENTRY = "shared.entry.train"
SCORE_ENTRY = "shared.entry.score"
ENTRIES = {"train": TRAIN_ENTRY, "score": SCORE_ENTRY}
INGEST = "ingest"


class LocalCompute:
    """Runs a group on the local process pool inside ``submit`` and records the outcome in the lake,
    so a Durable monitor sees a terminal state on its first poll; ingests inside ``ingest``."""

    name = "local"

    def submit(self, ws: "Workspace", kind: str, run_id: str, group_index: int,
               batch_paths: list[str]) -> JobHandle:
        check_kind(kind)
        handle = JobHandle(job_id_for(kind, run_id, group_index), kind, run_id, group_index, state="running")
        summary = run_group(ws, kind, run_id, batch_paths, group_index)
        handle.summary = summary.to_dict()
        handle.state = "failed" if summary.failed_batches else "completed"
        handle.detail = "; ".join(str(f.get("error", ""))[:200] for f in summary.failed_batches)
        ws.lake.write_bytes(layout.job_record(run_id, handle.job_id), handle.to_json().encode())
        return handle

    def pin_scoring(self, ws: "Workspace", score_id: str, groups: list[list[str]], cfg: Any) -> None:
        """No slices locally: the groups read the registries directly. Under the CLI nothing can
        promote mid-run (the command holds the workdir lock from plan to load); in the Functions
        app with local compute, a group reads the registries as they are when it runs."""

    def status(self, ws: "Workspace", job_id: str, run_id: str | None = None) -> JobHandle:
        run = run_id or layout.run_of_job(job_id)
        path = layout.job_record(run, job_id)
        if not ws.lake.exists(path):
            raise BackendError(f"unknown job {job_id}")
        return JobHandle.from_dict(json.loads(ws.lake.read_bytes(path)))

    def ingest(self, ws: "Workspace", source: str, key: str | None = None) -> JobHandle:
        """The pipeline's own streaming ingestion, here, inside the call: the handle comes back
        completed with the small result (never rows)."""
        from shared.data.ingestion import ingest, result_of

        result = result_of(ingest(ws, source), str(source))
        return JobHandle(f"{INGEST}-local-{result['dataset_id']}", INGEST, result["dataset_id"], 0,
                         state="completed", detail="ingested in process", summary=result)

    def ingest_status(self, ws: "Workspace", job_id: str) -> JobHandle:
        raise BackendError(f"no ingestion job {job_id} to poll: local ingestion finishes when submitted")


def run_group(ws: Workspace, kind: str, run_id: str, batch_paths: list[str], group_index: int = 0,
              progress: bool | None = None) -> GroupSummary:
    """Train or score one group of mini-batch files with its entry script on the local process pool.

    Both kinds stage their files the same way (:class:`StagedRun`) and pass the
    parallel job contract's arguments, flag for flag as :mod:`shared.azureml.jobs` does; a training
    group reads the run's config and global model, a scoring group the config it was planned with and
    the registries.
    """
    check_kind(kind)
    meta = _run_meta(ws, run_id)
    dataset_meta = layout.dataset_meta(meta["dataset_id"])
    if kind == "train":
        cfg = ws.config
        global_path = layout.global_model(run_id)
        extra = [global_path] if ws.lake.exists(global_path) else []
        subset = meta.get("partitions_file")
        if subset:
            extra.append(subset)
        counted = {"total_items": _partitions_in(ws, meta["dataset_id"], batch_paths, subset)}
    else:
        cfg = ProjectConfig.from_dict(meta["config"])
        extra, counted = [], {}
    spec = cfg.runner if progress is None else replace(cfg.runner, progress=progress)
    with StagedRun(ws, run_id, batch_paths, [dataset_meta, *extra]) as staged:
        args = ["--config", str(staged.write_config(cfg)), "--dataset-meta", str(staged.input(dataset_meta))]
        if kind == "train":
            args += ["--output-dir", str(staged.output("models")), "--run-id", run_id]
            if ws.lake.exists(global_path):
                args += ["--global-model", str(staged.input(global_path))]
                digest = lake_digest(ws.lake, global_path)
                if digest:
                    args += ["--global-model-sha256", digest]
            if subset:
                args += ["--partitions", str(staged.input(subset))]
        else:
            prod_root, dev_root = ws.registry_roots()
            args += ["--prod-registry", str(prod_root), "--dev-registry", str(dev_root),
                     "--output-dir", str(staged.output("predictions")), "--score-id", run_id]
        outcome = run_parallel(ENTRIES[kind], [str(staged.input(p)) for p in batch_paths], args, spec,
                               staged.output("results"), desc=f"{kind} {run_id}", **counted)
    return GroupSummary.of(run_id, group_index, outcome)


def _partitions_in(ws: Workspace, dataset_id: str, batch_paths: list[str], subset: str | None = None) -> int:
    manifest = _load_dataset(ws, dataset_id).manifest
    names = {p.rsplit("/", 1)[-1] for p in batch_paths}
    inside = manifest["batch"].isin(names)
    if subset:
        inside &= manifest[PARTITION_ID].astype(str).isin(json.loads(ws.lake.read_bytes(subset)))
    return int(inside.sum())


class StagedRun:
    """Local paths for an entry script: the lake's own files when it is a local folder, else a cache.

    With a blob lake the inputs and the run's earlier outputs (what makes a rerun resume) are
    downloaded once, and only the files the group wrote are uploaded when it ends, so entry
    scripts always see a file system, as they do when Azure ML mounts a data asset.
    """

    def __init__(self, ws: "Workspace", run_id: str, inputs: Iterable[str], extra: Iterable[str] = ()) -> None:
        self.ws = ws
        self.run_prefix = layout.run_dir(run_id)
        self.inputs = [*inputs, *extra]
        self.local = isinstance(ws.lake, LocalLake)
        self.tmp: Path | None = None
        self.downloaded: dict[Path, int] = {}  # earlier outputs -> their mtime after download

    def __enter__(self) -> "StagedRun":
        if not self.local:
            self.tmp = Path(tempfile.mkdtemp(prefix="mm-stage-", dir=self.ws.local_dir(".cache")))
            for path in self.inputs:
                target = self.tmp / "in" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.ws.lake.read_bytes(path))
            for existing in self.ws.lake.list(self.run_prefix):
                target = self.tmp / "out" / existing
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.ws.lake.read_bytes(existing))
                self.downloaded[target] = target.stat().st_mtime_ns
        return self

    def input(self, path: str) -> Path:
        if self.local:
            return self.ws.lake.local_path(path)
        return self.tmp / "in" / path

    def output(self, name: str) -> Path:
        lake_path = f"{self.run_prefix}/{name}"
        folder = self.ws.lake.local_path(lake_path) if self.local else self.tmp / "out" / lake_path
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_config(self, cfg: ProjectConfig) -> Path:
        path = self.output("config") / layout.CONFIG_FILE
        cfg.save(path)
        return path

    def __exit__(self, *exc: object) -> None:
        if self.local or self.tmp is None:
            return
        try:
            out_root = self.tmp / "out"
            for file in out_root.rglob("*"):
                if not file.is_file() or file.name.startswith(".tmp-"):
                    continue
                if self.downloaded.get(file) == file.stat().st_mtime_ns:
                    continue  # an earlier output this group did not rewrite
                self.ws.lake.write_bytes(file.relative_to(out_root).as_posix(), file.read_bytes())
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
