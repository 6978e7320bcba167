"""The training stage's steps besides running groups: planning a run (incremental by default),
fitting its global model, and registering its results (the dev registry and the SQL store).

:func:`shared.runs.pipeline.train` chains them with the groups; every name here is also importable
from :mod:`shared.runs.pipeline`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Iterator

import pandas as pd

from shared import faults, layout
from shared.models.candidate_kinds import pooled_candidates
from shared.config import ProjectConfig
from shared.models.features import build_features
from shared.models.global_model import GLOBAL_ID, fit_global, global_sample
from shared.models.incremental import (CONFIG_TAG, carried_forward, carried_meta, carried_rows,
                                reusable_global, training_config_digest, write_partition_list)
from shared.keys import PARTITION_ID
from shared.lake import read_parquet
from shared.registries.registration import (ManifestLookup, RunArtifacts, aggregate_wape, backtests_frame, dump_lake_pickle, effects_rows,
                                 global_record, lake_digest, load_lake_pickle, metrics_row, record_for, result_rows)
from shared.runs.stage_state import PipelineError, _digest, _load_dataset, _now, _run_meta, latest_dataset_id
from shared.results.summaries import RegisterSummary, TrainingPlan
from shared.models.selection import global_cuts
from shared.runs.workspace import Workspace


def plan_training(
    ws: Workspace,
    dataset_id: str | None = None,
    partition_ids: list[str] | None = None,
    run_id: str | None = None,
    group_size: int | None = None,
    full: bool = False,
) -> TrainingPlan:
    """Split a dataset's batch files into groups, one compute job each; writes run.json.

    Incremental unless ``full`` (:mod:`shared.models.incremental`): partitions whose latest model was
    trained on the same data and training config are carried forward, the others trained; only
    the batch files holding those are scheduled, and the entry script trains just those.
    """
    dataset_id = dataset_id or latest_dataset_id(ws)
    dataset = _load_dataset(ws, dataset_id)
    manifest = dataset.manifest
    if partition_ids:
        unknown = sorted(set(partition_ids) - set(manifest[PARTITION_ID]))
        if unknown:
            raise PipelineError(f"unknown partition id(s) for dataset {dataset_id}: {unknown[:5]}")
        manifest = manifest[manifest[PARTITION_ID].isin(partition_ids)]
    cfg = ws.config
    digest = training_config_digest(cfg)
    marker = layout.dataset_run(dataset_id, digest)
    if not full and not partition_ids and run_id is None and ws.lake.exists(marker):
        # this dataset was planned with this config before: the same run (reruns are idempotent)
        return _replan(ws, ws.lake.read_bytes(marker).decode().strip(), manifest, group_size)
    carried = {} if full else carried_forward(ws.dev, manifest, digest)
    to_train = manifest[~manifest[PARTITION_ID].astype(str).isin(set(carried))]
    subset = bool(partition_ids) or bool(carried)
    if full and run_id is not None and ws.lake.exists(layout.run_meta(run_id)):
        raise PipelineError(f"run {run_id} already exists: --full retrains under a new run id; "
                            "leave out --run-id (or give one not used before)")
    if run_id is None:
        parts = [dataset_id, asdict(cfg.forecast), asdict(cfg.training), sorted(partition_ids or []),
                 ["carried", sorted(to_train[PARTITION_ID].astype(str))] if carried else []]
        run_id = _digest(*parts, prefix="r")
        if full and ws.lake.exists(layout.run_meta(run_id)):
            # --full asks to retrain: a new run even when this data and config were trained before
            run_id = _digest(*parts, ["full", _now()], prefix="r")
    batches = sorted(to_train["batch"].unique())
    paths = [layout.batch(dataset_id, b) for b in batches]
    size = group_size or max(1, len(paths))
    groups = [paths[i : i + size] for i in range(0, len(paths), size)]
    base_run = ws.lake.read_bytes(layout.LATEST_RUN).decode().strip() if ws.lake.exists(layout.LATEST_RUN) else None
    run_meta = {
        "run_id": run_id,
        "dataset_id": dataset_id,
        "kind": "train",
        "created_at": _now(),
        "config": cfg.to_dict(),
        "config_digest": digest,
        "partition_ids": sorted(partition_ids) if partition_ids else None,
        "groups": len(groups),
        "incremental": not full,
        "carried": carried_meta(carried),
        "global_from": reusable_global(ws.lake, base_run, digest) if carried else None,
        "partitions_file": layout.run_partitions(run_id) if subset else None,
    }
    if not ws.lake.exists(layout.run_meta(run_id)):
        if subset:
            write_partition_list(ws.lake, run_id, to_train[PARTITION_ID].astype(str))
        ws.lake.write_bytes(layout.run_meta(run_id), json.dumps(run_meta, indent=2).encode())
    if not partition_ids:
        ws.lake.write_bytes(marker, run_id.encode())
    ws.lake.write_bytes(layout.LATEST_RUN, run_id.encode())
    return TrainingPlan(run_id=run_id, dataset_id=dataset_id, groups=groups, partitions=int(len(to_train)),
                        carried=len(carried))


def _replan(ws: Workspace, run_id: str, manifest: pd.DataFrame, group_size: int | None) -> TrainingPlan:
    """The plan of an existing run, from its run.json (and its partition list when incremental)."""
    meta = _run_meta(ws, run_id)
    if meta.get("partitions_file"):
        wanted = set(json.loads(ws.lake.read_bytes(meta["partitions_file"])))
        manifest = manifest[manifest[PARTITION_ID].astype(str).isin(wanted)]
    paths = [layout.batch(meta["dataset_id"], b) for b in sorted(manifest["batch"].unique())]
    size = group_size or max(1, len(paths))
    groups = [paths[i : i + size] for i in range(0, len(paths), size)]
    ws.lake.write_bytes(layout.LATEST_RUN, run_id.encode())
    return TrainingPlan(run_id=run_id, dataset_id=meta["dataset_id"], groups=groups,
                        partitions=int(len(manifest)), carried=len(meta.get("carried") or {}))


def global_model_path(run_id: str) -> str:
    """The lake path of a run's global model fits (:func:`shared.layout.global_model`)."""
    return layout.global_model(run_id)


def wants_global(cfg: ProjectConfig) -> bool:
    """The global model is fitted when it is a candidate or a source of the scoring chain."""
    return bool(set(pooled_candidates()) & set(cfg.training.candidates)) or "global" in cfg.scoring_chain


def train_global(ws: Workspace, run_id: str) -> dict[str, Any]:
    """Fit the run's global model over every partition (see :mod:`shared.models.global_model`).

    Reads the dataset's mini-batch files one at a time, keeps a seeded sample of whole periods
    (``training.global_max_rows``), and writes ``runs/<run>/global/global.pkl`` atomically.
    Idempotent: a run that has its global model keeps it.
    """
    path = layout.global_model(run_id)
    if ws.lake.exists(path) and lake_digest(ws.lake, path):  # without its digest: a torn write, refit
        return {"run_id": run_id, "skipped": True}
    meta = _run_meta(ws, run_id)
    if meta.get("global_from"):  # an incremental run: the latest run's fits, under this run's id
        # (shared.models.incremental.adopt_global, with the writer's digest checked before unpickling and
        # recorded for the copy)
        base = meta["global_from"]
        models = load_lake_pickle(ws.lake, layout.global_model(base), f"the global model of run {base}")
        models.run_id = run_id
        dump_lake_pickle(ws.lake, path, models)
        return {"run_id": run_id, "from_run": base, "rows": dict(models.rows), "seconds": 0.0}
    dataset = _load_dataset(ws, meta["dataset_id"])
    cfg = ws.config
    manifest = dataset.manifest
    chosen, keep_share = global_sample(manifest[PARTITION_ID], manifest["n_rows"], cfg.training.global_max_rows,
                                       seed=int(cfg.training.seed))
    if chosen is not None:
        manifest = manifest[manifest[PARTITION_ID].astype(str).isin(chosen)]

    def batches() -> Iterator[tuple[Any, dict[str, Any]]]:
        """One batch file's features at a time (only the sampled partitions'), with their cut-offs."""
        for name in sorted(manifest["batch"].unique()):
            frame = read_parquet(ws.lake, layout.batch(meta["dataset_id"], name))
            if chosen is not None:
                frame = frame[frame[PARTITION_ID].astype(str).isin(chosen)].reset_index(drop=True)
            ff = build_features(frame, cfg)
            yield ff, global_cuts(ff, cfg)

    models = fit_global(batches(), None, run_id, cfg.training.global_max_rows, seed=int(cfg.training.seed),
                        keep_share=keep_share, autoregressive="global_ar" in cfg.training.candidates)
    dump_lake_pickle(ws.lake, path, models)  # the pickle, then the writer's digest beside it
    return {"run_id": run_id, "rows": models.rows, "seconds": round(models.seconds, 3)}


def register_run(ws: Workspace, run_id: str) -> RegisterSummary:
    """Register a run's trained models in the dev registry and load its metrics into SQL."""
    meta = _run_meta(ws, run_id)
    rows = result_rows(ws.lake, layout.run_results(run_id))
    carried = meta.get("carried") or {}
    if not rows and not carried:
        raise PipelineError(f"run {run_id} has no results yet: train it first")
    dataset = _load_dataset(ws, meta["dataset_id"])
    keys = ws.config.data.keys
    manifest = ManifestLookup(dataset.manifest.set_index(PARTITION_ID))
    summary = RegisterSummary(run_id=run_id)
    to_register = []
    artifacts = RunArtifacts(ws.lake, run_id)
    for row in rows:
        status = row.get("status")
        if status in ("trained", "baseline_only"):
            if not artifacts.exists(row):
                summary.missing += 1
                continue
            record = record_for(row, run_id, manifest, keys)
            record["tags"][CONFIG_TAG] = str(meta.get("config_digest") or "")
            to_register.append((record, artifacts.source(row)))
        if status in ("trained", "baseline_only", "failed", "skipped"):
            setattr(summary, status, getattr(summary, status) + 1)
        if status == "failed":
            summary.failures.append({PARTITION_ID: row[PARTITION_ID], "reason": str(row.get("reason", ""))})
    faults.point("register.index")
    global_item = global_record(ws.lake, run_id, rows)
    if global_item is not None:
        to_register.append(global_item)
    registered = [r for r in ws.dev.register_many(to_register) if r.partition_id != GLOBAL_ID]
    summary.registered = len(registered)
    version_of = {r.partition_id: r.version for r in registered}
    summary.model_wape, summary.baseline_wape = aggregate_wape(rows)
    backtests = backtests_frame(ws.config, run_id, rows, manifest, keys, dataset.anchor)
    kept = carried_rows(carried, ws.dev)  # recorded in this run's SQL rows with the version they keep
    summary.carried = len(kept)
    version_of.update({pid: int(c["version"]) for pid, c in carried.items()})
    rows = rows + kept
    faults.point("register.store")
    with ws.store() as store:
        store.upsert_metrics([metrics_row(row, run_id, manifest, keys, version_of) for row in rows])
        if backtests is not None and len(backtests):
            store.upsert_backtests(backtests)
        history = backtests_frame(ws.config, run_id, rows, manifest, keys, dataset.anchor, field="history")
        if history is not None and len(history):
            store.upsert_actuals(history)
        store.upsert_effects(effects_rows(rows, run_id, manifest, keys))
    summary.failures = summary.failures[:50]
    return summary
