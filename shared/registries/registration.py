"""Registration's row mapping: a training run's result rows into registry records and SQL rows.

The entry script returns one JSON row per partition (``TrainResult.to_row()``: status, keys,
metrics, backtest points); registration turns each into a registry record with its tags, a
``model_metrics`` row and ``backtests`` rows, without opening a model bundle. The run's global model
becomes one registry entry of its own (partition id ``_global``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from shared import layout
from shared.models.artifact_format import dump_artifact, load_artifact
from shared.config import ProjectConfig
from shared.models.global_model import GLOBAL_ID
from shared.keys import PARTITION_ID
from shared.lake import Lake
from shared.trust import check_digest, digest_path, sha256_bytes
from shared.models.metrics import evaluate
from shared.registries.registry import ArtifactRange
from shared.data.timegrid import PERIOD, from_periods


def result_rows(lake: Lake, prefix: str) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path in lake.list(prefix):
        if not path.endswith(".jsonl"):
            continue
        for line in lake.read_bytes(path).decode("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row[PARTITION_ID]] = row
    return list(rows.values())


class ManifestLookup:
    """A dataset manifest's per-partition values as plain dicts, read once: registration and
    promotion look up every partition's keys, history and fingerprint, and a pandas ``.loc`` per
    lookup cost more than the rest of a partition's record (tens of seconds at 100,000)."""

    def __init__(self, manifest: pd.DataFrame) -> None:
        """``manifest`` indexed by partition id."""
        self.rows: dict[str, dict[str, Any]] = manifest.to_dict("index")

    def get(self, pid: str) -> dict[str, Any] | None:
        return self.rows.get(pid)


def _manifest_row(manifest: pd.DataFrame | ManifestLookup, pid: str) -> Mapping[str, Any] | None:
    if isinstance(manifest, ManifestLookup):
        return manifest.get(pid)
    return manifest.loc[pid] if pid in manifest.index else None


def record_for(row: dict[str, Any], run_id: str, manifest: pd.DataFrame | ManifestLookup,
               keys: list[str]) -> dict[str, Any]:
    pid = row[PARTITION_ID]
    info = _manifest_row(manifest, pid)
    key_values = row.get("keys") or ({k: str(info[k]) for k in keys} if info is not None else {})
    n_observed = int(info["n_observed"]) if info is not None else row.get("n_observed", 0)
    fingerprint = str(info["fingerprint"]) if info is not None else ""
    # the last period the model saw: a champion older than the newest data is stale (scoring.stale)
    seen = ({"last_period": int(info["last_period"])}
            if info is not None and "last_period" in info else {})
    return {
        PARTITION_ID: pid,
        "keys": {k: str(v) for k, v in key_values.items()},
        "model_type": row.get("model_name") or "baseline",
        "run_id": run_id,
        "fingerprint": fingerprint,
        "metrics": {**(row.get("metrics") or {}), "n_observed": n_observed,
                    "baseline_wape": (row.get("baseline_metrics") or {}).get("wape"), **seen},
        "tags": {
            **{k: str(v) for k, v in key_values.items()},
            "partition_id": pid,
            "run_id": run_id,
            "model_type": str(row.get("model_name") or "baseline"),
            "fingerprint": fingerprint,
            "status": str(row.get("status")),
            "n_observed": str(n_observed),
        },
        "status": row.get("status"),
        "sha256": str(row.get("sha256") or ""),  # of the artifact, recorded by the worker that wrote it
    }


def metrics_row(row: dict[str, Any], run_id: str, manifest: pd.DataFrame | ManifestLookup, keys: list[str],
                version_of: Mapping[str, int]) -> dict[str, Any]:
    pid = row[PARTITION_ID]
    metrics = row.get("metrics") or {}
    baseline = row.get("baseline_metrics") or {}
    return {
        PARTITION_ID: pid,
        **(row.get("keys") or keys_of(manifest, pid, keys)),
        "run_id": run_id,
        "model": row.get("model_name"),
        "model_version": version_of.get(pid),
        "status": row.get("status"),
        "reason": row.get("reason") or "",
        "wape": metrics.get("wape"),
        "mape": metrics.get("mape"),
        "rmse": metrics.get("rmse"),
        "accuracy": metrics.get("accuracy"),
        "baseline_wape": baseline.get("wape"),
        "n_observed": row.get("n_observed"),
        "fit_seconds": row.get("fit_seconds"),
        "registry": "dev",
    }


def keys_of(manifest: pd.DataFrame | ManifestLookup, pid: str, keys: list[str]) -> dict[str, str]:
    row = _manifest_row(manifest, pid)
    return {} if row is None else {k: str(row[k]) for k in keys}


def global_record(lake: Lake, run_id: str, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes] | None:
    """The run's global model as a registry entry of its own (the ``final`` fit, pooled test metrics)."""
    path = layout.global_model(run_id)
    if not lake.exists(path):
        return None
    models = load_lake_pickle(lake, path, f"the global model of run {run_id}")
    final = models.fits.get("final")
    if final is None:
        return None
    actual, pred = [], []
    for row in rows:
        for point in row.get("backtest") or []:
            if point.get("actual") is not None and point.get("global") is not None:
                actual.append(point["actual"])
                pred.append(point["global"])
    metrics = evaluate(actual, pred) if actual else {}
    metrics = {k: (None if v is None or v != v else float(v)) for k, v in metrics.items()}
    record = {
        PARTITION_ID: GLOBAL_ID, "keys": {}, "model_type": "global", "run_id": run_id, "fingerprint": "",
        "metrics": {**metrics, "rows": {k: int(v) for k, v in models.rows.items()}.get("final", 0),
                    "fit_seconds": round(models.seconds, 3)},
        "tags": {"partition_id": GLOBAL_ID, "run_id": run_id, "model_type": "global", "status": "trained",
                 "scope": "global"},
        "status": "trained",
    }
    return record, dump_artifact(final)


def dump_lake_pickle(lake: Lake, path: str, obj: Any) -> str:
    """Write ``obj`` to the lake at ``path`` as an artifact (:func:`~shared.models.artifact_format.dump_artifact`),
    then record its SHA-256 beside it (the writer's digest, :func:`load_lake_pickle` checks it);
    returns the digest."""
    data = dump_artifact(obj)
    digest = sha256_bytes(data)
    lake.write_bytes(path, data)
    lake.write_bytes(digest_path(path), digest.encode("ascii"))
    return digest


def lake_digest(lake: Lake, path: str) -> str | None:
    """The SHA-256 the writer of ``path`` recorded, or None (written before digests)."""
    sidecar = digest_path(path)
    return lake.read_bytes(sidecar).decode("ascii").strip() if lake.exists(sidecar) else None


def load_lake_pickle(lake: Lake, path: str, what: str) -> Any:
    """A lake artifact, read by the one loader once its bytes match the digest its writer recorded."""
    data = lake.read_bytes(path)
    check_digest(data, lake_digest(lake, path), what)
    return load_artifact(data, what)


def artifact_source(lake: Lake, lake_path: str) -> Path | bytes:
    local = lake.local_path(lake_path)
    return local if local is not None else lake.read_bytes(lake_path)


class RunArtifacts:
    """Where each trained partition's bytes are in a run's output: its range of the chunk's pack
    (read when registered: a local file is opened at registration, a remote pack is fetched once
    for the rows that follow it), or the whole ``<partition>.pkl`` of runs made before packs."""

    def __init__(self, lake: Lake, run_id: str) -> None:
        self.lake = lake
        self.folder = layout.run_models(run_id)
        self.run_id = run_id
        self._known: dict[str, bool] = {}
        self._pack: tuple[str, bytes] | None = None  # the remote pack last fetched

    def exists(self, row: Mapping[str, Any]) -> bool:
        path = self._path(row)
        if path not in self._known:
            self._known[path] = self.lake.exists(path)
        return self._known[path]

    def source(self, row: Mapping[str, Any]) -> Path | bytes | ArtifactRange:
        path = self._path(row)
        if row.get("byte_length") is None:
            return artifact_source(self.lake, path)
        offset, length = int(row["byte_offset"]), int(row["byte_length"])
        local = self.lake.local_path(path)
        if local is not None:
            return ArtifactRange(local, offset, length)
        if self._pack is None or self._pack[0] != path:
            self._pack = (path, self.lake.read_bytes(path))
        return self._pack[1][offset:offset + length]

    def _path(self, row: Mapping[str, Any]) -> str:
        if row.get("byte_length") is None:  # a run of an earlier release: a file per partition
            return layout.model_artifact(self.run_id, row[PARTITION_ID])
        return f"{self.folder}/{check_name(str(row['artifact']))}"


def check_name(name: str) -> str:
    """A pack's file name as a result row gives it: a plain name inside the run's models folder."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or not name.endswith(".pack"):
        raise ValueError(f"result row names an artifact {name!r} that is not a pack of the run's models folder")
    return name


def aggregate_wape(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Pooled WAPE over every test window: the chosen models' and the baseline's, side by side."""
    err = base = actual = 0.0
    for row in rows:
        for point in row.get("backtest") or []:
            if point.get("actual") is None or point.get("prediction") is None:
                continue
            err += abs(point["prediction"] - point["actual"])
            base += abs((point.get("baseline") if point.get("baseline") is not None else point["prediction"])
                        - point["actual"])
            actual += abs(point["actual"])
    if actual <= 0:
        return None, None
    return round(err / actual, 4), round(base / actual, 4)


def backtests_frame(cfg: ProjectConfig, run_id: str, rows: list[dict[str, Any]], manifest: pd.DataFrame,
                    keys: list[str], anchor: Any, field: str = "backtest") -> pd.DataFrame | None:
    """Every partition's test window (or, with ``field="history"``, the observed season before it) in
    one frame, built in bulk: one frame from every point at once, the partitions' ids, keys and
    anchors repeated by their point counts, periods turned into time stamps in one call per anchor.

    Why in bulk: a frame per partition cost about 2 ms each, 200 s of a 100,000-partition run.
    """
    points: list[dict[str, Any]] = []
    owners: list[dict[str, Any]] = []
    counts: list[int] = []
    for row in rows:
        bt = row.get(field)
        if not bt:
            continue
        points.extend(bt)
        owners.append(row)
        counts.append(len(bt))
    if not points:
        return None
    out = pd.DataFrame.from_records(points).rename(columns={"global": "global_forecast"})
    repeat = np.asarray(counts, dtype=np.intp)
    out[PARTITION_ID] = np.repeat(np.array([r[PARTITION_ID] for r in owners], dtype=object), repeat)
    own_keys = [r.get("keys") or keys_of(manifest, r[PARTITION_ID], keys) for r in owners]
    for k in dict.fromkeys(k for kv in own_keys for k in kv):
        out[k] = np.repeat(np.array([kv.get(k) for kv in own_keys], dtype=object), repeat)
    # each partition's own anchor (a Wednesday series in a Friday panel), else the dataset's
    own = np.repeat(np.array([r.get("anchor") or anchor for r in owners], dtype=object), repeat)
    times = np.empty(len(out), dtype=np.int64 if cfg.data.freq == "int" else "datetime64[ns]")
    periods = out[PERIOD].to_numpy()
    for value in pd.unique(own):  # one vectorised call per anchor (mostly one)
        at = own == value
        times[at] = from_periods(periods[at], cfg.data.freq, value).to_numpy()
    out[cfg.data.time] = times
    out["run_id"] = run_id
    return out.drop(columns=[PERIOD])


def effects_rows(rows: list[dict[str, Any]], run_id: str, manifest: pd.DataFrame,
                 keys: list[str]) -> list[dict[str, Any]]:
    """The covariate effects the workers measured (shared.models.effects), one row per partition and measure."""
    out = []
    for row in rows:
        for effect in row.get("effects") or ():
            pid = row[PARTITION_ID]
            out.append({PARTITION_ID: pid, "keys": row.get("keys") or keys_of(manifest, pid, keys),
                        "run_id": run_id, "model": row.get("model_name"), **effect})
    return out
