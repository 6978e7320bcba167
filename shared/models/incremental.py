"""Incremental retraining: a run retrains only the partitions whose data or training config changed.

A partition's *fingerprint* (a digest of its rows, in the dataset manifest) and the digest of the
training config (data, forecast and training sections) are stored on every registered model. When
a new dataset arrives (a corrected extract, a new extract in which 500 of 10,000 partitions have new
rows), a
partition whose latest model was trained on the same fingerprint with the same config keeps that
model: it is *carried forward* into the new run (recorded as such in the SQL store, same registry
version), and only the others are trained. ``full=True`` (``manymodels train --full``) retrains
everything.

The run's global model, fitted over every partition, is costly at scale and changes little when 5 %
of the partitions change: an incremental run takes the latest run's global model (same training
config) as its own (``pipeline.train_global``, its writer's digest checked), and a full run fits
a new one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any, Iterable, Mapping

import pandas as pd

from shared import layout
from shared.keys import PARTITION_ID

CONFIG_TAG = "train_config"  # the registry tag holding the training config digest of a model
CARRIED = "carried"  # status of a carried-forward partition in a run's SQL records
CARRYABLE_STATUSES = ("trained", "baseline_only")


def training_config_digest(cfg: Any) -> str:
    """A digest of everything that changes what training produces from the same data."""
    text = json.dumps([asdict(cfg.data), asdict(cfg.forecast), asdict(cfg.training)], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def carried_forward(registry: Any, manifest: pd.DataFrame, config_digest: str) -> dict[str, Any]:
    """The partitions of a manifest whose latest model was trained on the same data and config:
    partition id -> its latest registry record."""
    fingerprints = dict(zip(manifest[PARTITION_ID].astype(str), manifest["fingerprint"].astype(str)))
    latest = registry.latest_many(fingerprints)
    out = {}
    for pid, record in latest.items():
        if (record.status in CARRYABLE_STATUSES and record.fingerprint == fingerprints.get(pid)
                and str(record.tags.get(CONFIG_TAG, "")) == config_digest):
            out[pid] = record
    return out


def write_partition_list(lake: Any, run_id: str, partition_ids: Iterable[str]) -> str:
    """The run's list of partitions to train (the entry script trains only those); its lake path."""
    path = layout.run_partitions(run_id)
    lake.write_bytes(path, json.dumps(sorted(partition_ids)).encode("utf-8"))
    return path


def read_partition_list(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        ids = json.load(fh)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: a run's partition list must be a JSON list of partition ids")
    return set(ids)


def carried_meta(carried: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What a run records of its carried partitions: the model it keeps (run and version)."""
    return {pid: {"version": int(r.version), "run_id": r.run_id, "model_type": r.model_type}
            for pid, r in sorted(carried.items())}


def reusable_global(lake: Any, base_run_id: str | None, config_digest: str) -> str | None:
    """The base run whose global model an incremental run can take: same training config, fitted."""
    if not base_run_id or not lake.exists(layout.global_model(base_run_id)):
        return None
    try:
        meta = json.loads(lake.read_bytes(layout.run_meta(base_run_id)))
    except Exception:  # noqa: BLE001 - no readable meta: fit a new one
        return None
    return base_run_id if meta.get("config_digest") == config_digest else None


def carried_rows(carried: Mapping[str, Mapping[str, Any]], registry: Any) -> list[dict[str, Any]]:
    """Result rows (as the entry script writes them) recording the carried partitions of a run:
    status ``carried``, the kept model's type, version and test metrics."""
    records = registry.latest_many(carried)
    rows = []
    for pid, kept in carried.items():
        record = records.get(pid)
        metrics = dict(record.metrics) if record is not None else {}
        rows.append({
            PARTITION_ID: pid,
            "keys": None,  # from the manifest
            "model_name": kept.get("model_type"),
            "status": CARRIED,
            "reason": f"data and training config unchanged: v{kept['version']} of run {kept['run_id']} carried forward",
            "metrics": metrics,
            "baseline_metrics": {"wape": metrics.get("baseline_wape")},
            "n_observed": metrics.get("n_observed"),
            "fit_seconds": 0.0,
        })
    return rows
