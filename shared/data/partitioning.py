"""Store a validated frame in the lake as a prepared dataset: mini-batch files, a manifest, metadata.

Layout (``prepared/<dataset_id>/``): ``batches/batch-00000.parquet`` ... hold whole partitions,
greedily packed to about ``runner.rows_per_file`` rows (10,000 tiny files would make the parallel
runner's per-file overhead dominate); ``manifest.parquet`` has one row per partition (id, key
values as text, sizes, periods, fingerprint, batch file); ``dataset.json`` is written last and
marks the dataset complete.

The dataset id is derived from content (the config's data section plus every partition's
fingerprint), so ingesting the same data twice is a no-op that returns the existing dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared import layout
from shared.config import MANIFEST_COLUMNS, ConfigError, ProjectConfig
from shared.keys import PARTITION_ID, canonical_value
from shared.lake import Lake, LakeError, read_parquet, write_parquet
from shared.data.timegrid import PERIOD, anchor_offset
from shared.data.validation import FILLED, ValidationReport

PREPARED = layout.PREPARED
_DATASET_ID = re.compile(r"^d[0-9a-f]{16}$")


@dataclass
class PreparedDataset:
    """A prepared dataset as stored in the lake; ``reused`` says prepare found it already there."""

    dataset_id: str
    manifest: pd.DataFrame
    batch_paths: list[str]
    anchor: str | None
    config: dict[str, Any]
    validation: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    n_rows: int = 0
    reused: bool = False
    rewrote: str = ""  # why an earlier copy of this dataset was found broken and written again

    @property
    def root(self) -> str:
        return dataset_root(self.dataset_id)

    @property
    def n_partitions(self) -> int:
        return len(self.manifest)


def dataset_root(dataset_id: str) -> str:
    return layout.dataset_dir(dataset_id)


def fingerprint(frame: pd.DataFrame, cfg: ProjectConfig) -> pd.Series:
    """sha256 (16 hex) of each partition's rows, indexed by partition id, in frame order.

    Rows are hashed once over the whole frame (``hash_pandas_object``), then each partition's row
    hashes are digested together. Key columns are represented by the partition id, and times by
    their int64 value at nanosecond resolution, so the same data read from CSV or Parquet (whose
    key and time dtypes may differ) gives the same fingerprint.
    """
    spec = cfg.data
    times = frame[spec.time]
    if pd.api.types.is_datetime64_any_dtype(times):
        times = times.astype("datetime64[ns]").astype("int64")
    hashed = pd.DataFrame(
        {
            PARTITION_ID: frame[PARTITION_ID].astype("str"),
            spec.time: times,
            PERIOD: frame[PERIOD],
            spec.target: frame[spec.target],
            **{c: frame[c].astype("float64") for c in spec.covariates},
            FILLED: frame[FILLED] if FILLED in frame else False,
        }
    )
    row_hashes = pd.util.hash_pandas_object(hashed, index=False).to_numpy()
    ids = frame[PARTITION_ID].to_numpy()
    starts = _starts(ids)
    bounds = np.r_[starts, len(ids)]
    digests = [
        hashlib.sha256(row_hashes[a:b].tobytes()).hexdigest()[:16] for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return pd.Series(digests, index=pd.Index(ids[starts], name=PARTITION_ID), name="fingerprint")


def dataset_id_for(cfg: ProjectConfig, fingerprints: pd.Series) -> str:
    """ "d" + sha256(config data section + all partition fingerprints)[:16]."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict()["data"], sort_keys=True).encode("utf-8"))
    for pid, fp in sorted(fingerprints.items()):
        digest.update(f"\n{pid}:{fp}".encode("utf-8"))
    return "d" + digest.hexdigest()[:16]


def prepare_dataset(
    lake: Lake, frame: pd.DataFrame, cfg: ProjectConfig, report: ValidationReport
) -> PreparedDataset:
    """Write the validated ``frame`` as a prepared dataset, or return the identical one already stored."""
    spec = cfg.data
    needed = [PARTITION_ID, *spec.keys, spec.time, PERIOD, spec.target, *spec.covariates]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(
            f"prepare_dataset needs a validated frame (shared.data.validation.validate); missing {missing}"
        )
    clash = sorted(set(spec.keys) & set(MANIFEST_COLUMNS))
    if clash:  # ProjectConfig.validate refuses these names first
        raise ConfigError(f"data.keys: key column name(s) {clash} clash with manifest columns {list(MANIFEST_COLUMNS)}")
    if len(frame) == 0:
        raise ValueError("prepare_dataset: the validated frame is empty")
    ids = frame[PARTITION_ID].to_numpy()
    if (ids[1:] < ids[:-1]).any():
        raise ValueError(
            "prepare_dataset: the frame must be sorted by partition_id, _period (as validate returns it)"
        )

    prints = fingerprint(frame, cfg)
    dataset_id = dataset_id_for(cfg, prints)
    found, broken = stored_dataset(lake, dataset_id)
    if found is not None:
        return found

    starts = _starts(ids)
    sizes = np.diff(np.r_[starts, len(ids)])
    batch_of_part = pack_batches(sizes, file_rows(int(sizes.sum()), cfg))
    names = batch_names(batch_of_part)
    bounds = np.r_[starts, len(ids)]
    part_bounds = np.r_[np.flatnonzero(np.r_[True, batch_of_part[1:] != batch_of_part[:-1]]), len(starts)]
    table = batch_table(frame)  # one conversion, then zero-copy slices: the same bytes as per slice
    for b, name in enumerate(names):
        lo, hi = bounds[part_bounds[b]], bounds[part_bounds[b + 1]]
        write_batch(lake, layout.batch(dataset_id, name), table.slice(lo, hi - lo))
    del table

    manifest = _manifest(frame, cfg, starts, sizes, prints, [names[b] for b in batch_of_part])
    anchor = report.anchor
    if anchor is None and spec.freq != "int":
        observed = frame[spec.time] if FILLED not in frame else frame.loc[~frame[FILLED], spec.time]
        anchor = anchor_offset(observed, spec.freq)
    done = finish_dataset(lake, cfg, dataset_id, manifest, names, report, anchor)
    done.rewrote = broken
    return done


def stored_dataset(lake: Lake, dataset_id: str) -> tuple[PreparedDataset | None, str]:
    """The complete, intact stored copy of a dataset (``reused``), or None and why it cannot be
    reused: ``""`` when there is none, else what is broken, having removed its ``dataset.json`` so
    nothing reads it while it is written again.

    Cheap: the manifest, then each mini-batch file's Parquet footer (a truncated or half-written
    file has none) and its row count against the manifest's; no data page is read.
    """
    meta_path = layout.dataset_meta(dataset_id)
    if not lake.exists(meta_path):
        return None, ""
    problem, current = "", layout.MANIFEST_FILE
    try:
        found = load_dataset(lake, dataset_id)
        expected = found.manifest.groupby("batch")["n_rows"].sum() if "batch" in found.manifest else {}
        for path in found.batch_paths:
            current = path.rsplit("/", 1)[-1]
            if not lake.exists(path):
                problem = f"{current} is missing"
                break
            local = lake.local_path(path)
            rows = pq.read_metadata(local if local is not None else io.BytesIO(lake.read_bytes(path))).num_rows
            if current in expected and int(expected[current]) != rows:
                problem = f"{current} holds {rows} rows, its manifest says {int(expected[current])}"
                break
    except (OSError, pa.ArrowException, ValueError, KeyError, LakeError) as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        problem = f"{current} cannot be read: {text}"
    if not problem:
        found.reused = True
        return found, ""
    lake.delete(meta_path)
    return None, f"the stored dataset {dataset_id} was broken ({problem}): rewrote it"


def batch_names(batch_of_part: np.ndarray) -> list[str]:
    return [f"batch-{b:05d}.parquet" for b in range(int(batch_of_part.max()) + 1)] if len(batch_of_part) else []


def batch_table(frame: pd.DataFrame) -> pa.Table:
    """A validated frame as the Arrow table its mini-batch files are slices of."""
    return pa.Table.from_pandas(frame, preserve_index=False)


def write_batch(lake: Lake, path: str, table: pa.Table) -> None:
    """One mini-batch file; chunks are combined first, so the bytes do not depend on how the rows
    were assembled (one frame in memory, or slices of several streamed buckets)."""
    sink = io.BytesIO()
    pq.write_table(table.combine_chunks(), sink, compression="zstd")
    lake.write_bytes(path, sink.getvalue())


def finish_dataset(
    lake: Lake,
    cfg: ProjectConfig,
    dataset_id: str,
    manifest: pd.DataFrame,
    names: list[str],
    report: ValidationReport,
    anchor: str | None,
) -> PreparedDataset:
    """Write the manifest, then ``dataset.json`` (last: it marks the dataset complete)."""
    write_parquet(lake, layout.dataset_manifest(dataset_id), manifest)
    meta = {
        "dataset_id": dataset_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": cfg.to_dict(),
        "anchor": anchor,
        "n_partitions": int(len(manifest)),
        "n_rows": int(manifest["n_rows"].sum()),
        "batches": names,
        "validation": report.to_dict(),
    }
    lake.write_bytes(layout.dataset_meta(dataset_id), json.dumps(meta, indent=2, default=str).encode("utf-8"))
    return _from_meta(meta, manifest)


def file_rows(total_rows: int, cfg: ProjectConfig) -> int:
    """Rows per mini-batch file: at most ``runner.rows_per_file``, and small enough that a data set
    makes about 16 files per worker (the last file to finish leaves the others idle for half a
    file's time at most: ~3 % of the run), but not below 1,000 rows (a file's fixed cost, a few
    milliseconds, stays negligible next to fitting its partitions)."""
    workers = cfg.runner.workers or os.cpu_count() or 1
    balanced = max(1_000, -(-total_rows // (16 * workers)))
    return max(1, min(cfg.runner.rows_per_file, balanced))


def pack_batches(sizes: np.ndarray, rows_per_file: int) -> np.ndarray:
    """Batch number per partition, in order: a file is closed once adding the next partition would
    take it past ``rows_per_file`` (a partition larger than that gets a file of its own)."""
    batch = np.empty(len(sizes), dtype=np.int64)
    current, filled = 0, 0
    for i, size in enumerate(sizes.tolist()):
        if filled and filled + size > rows_per_file:
            current, filled = current + 1, 0
        batch[i] = current
        filled += size
    return batch


def load_dataset(lake: Lake, dataset_id: str) -> PreparedDataset:
    if not _DATASET_ID.match(dataset_id or ""):
        raise LakeError(f"invalid dataset id {dataset_id!r} (expected 'd' + 16 hex digits)")
    path = layout.dataset_meta(dataset_id)
    if not lake.exists(path):
        raise LakeError(f"no prepared dataset {dataset_id} in the lake ({path} not found)")
    meta = json.loads(lake.read_bytes(path).decode("utf-8"))
    manifest = read_parquet(lake, layout.dataset_manifest(dataset_id))
    return _from_meta(meta, manifest)


def latest_dataset(lake: Lake) -> str | None:
    """The most recently created complete dataset (by ``created_at`` in its dataset.json), or None."""
    best: tuple[str, str] | None = None
    for path in lake.list(PREPARED):
        parts = path.split("/")
        if len(parts) != 3 or parts[2] != layout.DATASET_META_FILE or not _DATASET_ID.match(parts[1]):
            continue
        created = json.loads(lake.read_bytes(path).decode("utf-8")).get("created_at", "")
        if best is None or (created, parts[1]) > best:
            best = (created, parts[1])
    return best[1] if best else None


def _from_meta(meta: dict[str, Any], manifest: pd.DataFrame) -> PreparedDataset:
    return PreparedDataset(
        dataset_id=meta["dataset_id"],
        manifest=manifest,
        batch_paths=[layout.batch(meta["dataset_id"], name) for name in meta["batches"]],
        anchor=meta.get("anchor"),
        config=meta["config"],
        validation=meta.get("validation", {}),
        created_at=meta.get("created_at", ""),
        n_rows=int(meta.get("n_rows", 0)),
    )


def _starts(ids: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])


def manifest_rows(frame: pd.DataFrame, cfg: ProjectConfig, prints: pd.Series) -> pd.DataFrame:
    """The manifest of a validated frame (sorted by partition id), its ``batch`` column still empty."""
    ids = frame[PARTITION_ID].to_numpy()
    starts = _starts(ids)
    sizes = np.diff(np.r_[starts, len(ids)])
    return _manifest(frame, cfg, starts, sizes, prints, [""] * len(starts))


def _manifest(
    frame: pd.DataFrame,
    cfg: ProjectConfig,
    starts: np.ndarray,
    sizes: np.ndarray,
    prints: pd.Series,
    batches: list[str],
) -> pd.DataFrame:
    spec = cfg.data
    ends = np.r_[starts[1:], len(frame)] - 1
    filled = frame[FILLED].to_numpy() if FILLED in frame else np.zeros(len(frame), dtype=bool)
    n_filled = np.add.reduceat(filled.astype(np.int64), starts)
    periods = frame[PERIOD].to_numpy()
    firsts = frame.iloc[starts]
    return pd.DataFrame(
        {
            PARTITION_ID: firsts[PARTITION_ID].to_numpy(),
            **{k: [canonical_value(v) for v in firsts[k].tolist()] for k in spec.keys},
            "n_rows": sizes.astype(np.int64),
            "n_observed": (sizes - n_filled).astype(np.int64),
            "first_period": periods[starts].astype(np.int64),
            "last_period": periods[ends].astype(np.int64),
            "last_time": frame[spec.time].to_numpy()[ends],
            "fingerprint": prints.to_numpy(),
            "batch": batches,
        }
    )
