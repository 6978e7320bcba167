"""Ingestion in bounded memory: read, validate, repair and partition an input of any size.

:func:`ingest_source` is what the pipeline calls. A small input (its estimated in-memory peak
fits ``ingest.memory_mb``) goes the in-memory way: ``read_source`` -> ``validate`` ->
``prepare_dataset``. A larger one streams, with the same results (the same batch files byte for
byte, manifest, dataset id and validation report):

1. **Scan and bucket.** The source is read in record batches (``pyarrow.dataset`` scanner; CSV
   through pandas' own parser in chunks). Each row gets its partition id (hashed once per key
   combination) and is appended, with its input position, to one of ``F`` bucket files (Arrow
   IPC) chosen by the id's leading hex digits: a bucket is a *range* of partition ids, so the
   buckets in order are the partitions in the order ``validate`` sorts them. Rows with a null
   key are counted (and refused or dropped) here; the columns check fails on the first batch.
2. **Validate parts.** Consecutive buckets are grouped into parts that fit the memory setting;
   worker processes run the existing :func:`shared.data.validation.validate` on each part with a
   :class:`~shared.data.validation.PartContext` carrying the facts a part cannot see (the input's
   anchor, first time value and date format), fingerprint it, and spill the validated rows.
   What needs the whole input is decided here from the parts' observations: report counts are
   summed and their examples merged in ``validate``'s order; a refused input raises the error
   ``validate`` would (earliest check, rows summed over parts, first examples); the anchor is the
   mode over all parts; a covariate null in a whole partition takes the whole input's median
   (an exact selection over sorted spills). A part that used a provisional value is redone.
3. **Write.** Partitions are packed into mini-batch files exactly as ``prepare_dataset`` packs
   them (the total row count is known now), written in parallel from the spills, and moved into
   the lake; the manifest and ``dataset.json`` come last.

Memory: the scan holds one record batch; a worker holds one part; parts are sized from the
spilled bytes per row and a measured peak factor, so the peak follows ``ingest.memory_mb``,
not the input. One partition is never split: a single partition larger than the setting is
processed whole. ODBC sources are read in memory.

This module holds the entry point, the plan and pass 1 (the scan); passes 2 and 3 (the parts'
validation in worker processes, the merge of their observations, the writing from the spills)
are in :mod:`shared.data.stream_parts`.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from shared import bounds
from shared.config import ProjectConfig
from shared.data.ingest import (
    ODBC_PREFIX,
    csv_options,
    estimate_rows,
    file_kind,
    iter_batches,
    read_source,
    table_to_pandas,
)
from shared.keys import partition_id
from shared.lake import Lake
from shared.data.partitioning import PreparedDataset, prepare_dataset
from shared.data.stream_parts import (
    ROW,
    Scan,
    _return_freed_memory,
    _typed,
    validate_parts,
    write_parts,
)
from shared.data.validation_report import MAX_EXAMPLES
from shared.data.validation import (
    UNSET,
    DataValidationError,
    PartContext,
    ValidationReport,
    anchor_offset,
    check_arrow_types,
    example_rows,
    parse_time,
    validate,
    _check_columns,
)

MB = 1 << 20
# Measured (benchmarks/ingest_scale.py): a part's peak in a worker is about PEAK_FACTOR times its
# spilled bytes; the in-memory path peaks at about IN_MEMORY_FACTOR times the input's raw bytes.
PEAK_FACTOR = 12.0
IN_MEMORY_FACTOR = 9.0
BASE_MB = 200  # an interpreter with pandas and pyarrow imported, per process
SCAN_MB = 250  # the scanning process above its base: a record batch, its bucketed copy, readahead


@dataclass
class StreamPlan:
    """How a streamed ingest is cut: scan batch, bucket count, rows per part, worker processes."""

    batch_rows: int
    buckets: int
    part_rows: int | None  # None: from the memory setting once the spill's bytes per row are known
    workers: int
    worker_mb: float


def ingest_source(
    lake: Lake,
    source: str | Path,
    cfg: ProjectConfig,
    query: str | None = None,
    tmp_root: Path | None = None,
    stream: bool | None = None,
    plan: StreamPlan | None = None,
) -> tuple[PreparedDataset, ValidationReport]:
    """Read, validate and partition ``source`` into the lake within ``ingest.memory_mb``.

    ``stream`` forces a path (None: streaming when the in-memory peak would not fit); ``plan``
    overrides how the streaming path is cut (tests use it to force many small parts).
    """
    is_odbc = isinstance(source, str) and source.lower().startswith(ODBC_PREFIX)
    if stream is None:
        stream = not is_odbc and query is None and not fits_in_memory(source, cfg)
    if not stream or is_odbc:
        frame = read_source(source, cfg, query=query)
        validated, report = validate(frame, cfg)
        del frame
        return prepare_dataset(lake, validated, cfg, report), report
    path, kind = file_kind(source)
    if query is not None:
        read_source(source, cfg, query=query)  # raises read_source's error for a query without odbc:
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=tmp_root))
    try:
        return _Streamer(lake, path, kind, cfg, work, plan or default_plan(path, kind, cfg)).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory_settings(cfg: ProjectConfig) -> tuple[int, int]:
    """``(memory_mb, workers)`` from ``[ingest]`` (defaults when the config predates the section)."""
    spec = getattr(cfg, "ingest", None)
    memory_mb = int(getattr(spec, "memory_mb", 2048))
    workers = bounds.worker_count(int(getattr(spec, "workers", 0)))  # at most WORKERS_PER_CPU per CPU
    return memory_mb, workers


def fits_in_memory(source: str | Path, cfg: ProjectConfig) -> bool:
    memory_mb, _ = memory_settings(cfg)
    path, kind = file_kind(source)
    rows, row_bytes = estimate_rows(path, kind), _row_bytes(path, kind, cfg)
    return BASE_MB + rows * row_bytes * IN_MEMORY_FACTOR / MB <= memory_mb


def default_plan(path: Path, kind: str, cfg: ProjectConfig) -> StreamPlan:
    memory_mb, workers = memory_settings(cfg)
    rows = max(1, estimate_rows(path, kind))
    row_bytes = _row_bytes(path, kind, cfg)
    workers = max(1, min(workers, int((memory_mb - BASE_MB - SCAN_MB) // (2 * BASE_MB)) or 1))
    # what a worker may use for its part, above its own interpreter
    worker_mb = max(32.0, (memory_mb - BASE_MB - SCAN_MB) / workers - BASE_MB)
    part_rows = worker_mb * MB / (PEAK_FACTOR * row_bytes)
    buckets = 1 << max(4, min(12, math.ceil(math.log2(max(1.0, 4 * rows / part_rows)))))
    batch_rows = int(min(250_000, max(16_384, SCAN_MB * MB / (8 * row_bytes))))
    return StreamPlan(batch_rows=batch_rows, buckets=buckets, part_rows=None, workers=workers, worker_mb=worker_mb)


def _row_bytes(path: Path, kind: str, cfg: ProjectConfig) -> float:
    """Bytes per row once read (Arrow; CSV: pandas), from a sample of the first rows."""
    try:
        if kind == "csv":
            sample = pd.read_csv(path, nrows=20_000, **csv_options(path, cfg))
            return max(16.0, sample.memory_usage(deep=True, index=False).sum() / max(1, len(sample)))
        from shared.data.ingest import _parquet_dataset

        head = _parquet_dataset(path, kind).head(65_536)
        return max(16.0, head.nbytes / max(1, head.num_rows))
    except (pa.ArrowException, OSError, ValueError, pd.errors.ParserError):
        return 64.0


# -- the streaming path ------------------------------------------------------------------------


class _Streamer:
    def __init__(self, lake: Lake, path: Path, kind: str, cfg: ProjectConfig, work: Path, plan: StreamPlan):
        self.lake, self.path, self.kind, self.cfg, self.work, self.plan = lake, path, kind, cfg, work, plan
        self.spec = cfg.data

    def run(self) -> tuple[PreparedDataset, ValidationReport]:
        _return_freed_memory()
        with _pool(self.plan.workers) as pool:
            scan = self._scan()
            parts = self._parts(scan)
            results, report, anchor = validate_parts(
                pool, self.cfg, self.work, scan, parts, self._dtypes(scan), lambda: self._null_examples(scan)
            )
            return write_parts(pool, self.lake, self.cfg, self.work, self.plan.workers, results, report, anchor)

    # -- pass 1 ------------------------------------------------------------------------------
    def _scan(self) -> Scan:
        spec, policy = self.spec, self.cfg.validation
        scan = Scan()
        n_buckets = self.plan.buckets
        scan.bucket_rows = np.zeros(n_buckets, dtype=np.int64)
        writers: dict[int, tuple[pa.Schema, Any, Any]] = {}
        bucket_of_keys: dict[tuple, int] = {}
        checked = False
        try:
            for batch in iter_batches(self.path, self.kind, self.cfg, self.plan.batch_rows):
                if isinstance(batch, pd.DataFrame):  # CSV: pandas' parser, types per chunk
                    for name, dtype in batch.dtypes.items():
                        scan.dtypes.setdefault(str(name), set()).add(dtype)
                    table = _arrow(batch)
                else:
                    table = batch
                    for name, dtype in _pandas_dtypes(table).items():
                        scan.dtypes.setdefault(name, set()).add(dtype)
                if not scan.columns:
                    scan.columns = list(table.column_names)
                if table.num_rows == 0:
                    continue
                if not checked:
                    _check_columns(pd.DataFrame(columns=table.column_names), spec)
                    check_arrow_types(table.schema, spec)
                    checked = True
                self._bucket(table, scan, writers, bucket_of_keys)
        finally:
            for _, writer, sink in writers.values():
                writer.close()
                sink.close()
            pa.default_memory_pool().release_unused()
        if scan.rows == 0:
            columns = scan.columns or _columns_of(self.path, self.kind, self.cfg)
            raise DataValidationError(None, f"empty input: 0 rows, {len(columns)} columns")
        scan.bucket_bytes = np.zeros(n_buckets, dtype=np.int64)
        for b, paths in scan.pieces.items():
            scan.bucket_bytes[b] = sum(os.path.getsize(p) for p in paths)
        if scan.null_rows and policy.null_keys == "error":
            column = next(k for k in spec.keys if k in scan.null_key_columns)
            raise DataValidationError(
                column,
                "partition key is null (validation.null_keys=error)",
                self._null_examples(scan),
                scan.null_rows,
            )
        return scan

    def _bucket(self, table: pa.Table, scan: Scan, writers: dict, cache: dict) -> None:
        spec = self.spec
        n = table.num_rows
        rows = np.arange(scan.rows, scan.rows + n, dtype=np.int64)
        scan.rows += n
        null = np.zeros(n, dtype=bool)
        for k in spec.keys:
            col_null = pc.is_null(table.column(k), nan_is_null=True).to_numpy(zero_copy_only=False)
            if col_null.any():
                scan.null_key_columns.add(k)
                null |= col_null
        if null.any():
            scan.null_rows += int(null.sum())
            have = sum(t.num_rows for t in scan.null_examples)
            if have < MAX_EXAMPLES:
                at = np.flatnonzero(null)[: MAX_EXAMPLES - have]
                scan.null_examples.append(
                    table.take(pa.array(at)).append_column(ROW, pa.array(rows[at]))
                )
        keep = np.flatnonzero(~null)
        if len(keep) == 0:
            return
        if scan.first_time is UNSET:
            self._time_facts(table.take(pa.array(keep[:100_000])), scan)

        # one code per key combination: dictionary codes per key, combined, made dense
        code = np.zeros(len(keep), dtype=np.int64)
        kept = table.take(pa.array(keep)) if len(keep) < n else table
        for k in spec.keys:
            encoded = pc.dictionary_encode(kept.column(k)).combine_chunks()
            idx = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            code = code * (len(encoded.dictionary) + 1) + idx
            code = np.unique(code, return_inverse=True)[1].reshape(-1)
        uniq, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        values = table_to_pandas(kept.select(spec.keys).take(pa.array(first)))
        bucket_of_group = np.empty(len(uniq), dtype=np.int64)
        n_buckets = self.plan.buckets
        for g, key in enumerate(values.itertuples(index=False, name=None)):
            b = cache.get(key)
            if b is None:
                if len(cache) > 2_000_000:
                    cache.clear()
                b = cache[key] = int(partition_id(key)[1:9], 16) * n_buckets >> 32
            bucket_of_group[g] = b
        bucket = bucket_of_group[inverse.reshape(-1)]
        order = np.argsort(bucket, kind="stable")  # stable: input order within a bucket
        counts = np.bincount(bucket, minlength=n_buckets)
        scan.bucket_rows += counts
        spilled = kept.append_column(ROW, pa.array(rows[keep])).take(pa.array(order))
        offset = 0
        for b in np.flatnonzero(counts).tolist():
            piece = spilled.slice(offset, int(counts[b]))
            offset += int(counts[b])
            schema, writer, sink = writers.get(b, (None, None, None))
            if schema is None or not piece.schema.equals(schema, check_metadata=True):
                if writer is not None:  # a CSV chunk typed differently: a new piece file
                    writer.close()
                    sink.close()
                name = str(self.work / f"bucket-{b:05d}-{len(scan.pieces.get(b, [])):03d}.arrow")
                sink = pa.OSFile(name, "wb")
                writer = ipc.new_stream(sink, piece.schema)
                writers[b] = (piece.schema, writer, sink)
                scan.pieces.setdefault(b, []).append(name)
            writer.write_table(piece)

    def _time_facts(self, head: pa.Table, scan: Scan) -> None:
        """The first time value (quoted by 'not a date'), the input's date format, a provisional anchor."""
        spec = self.spec
        times = table_to_pandas(head.select([spec.time]))[spec.time]
        scan.first_time = times.iloc[0]
        if spec.time_format:  # the configured format, not a guess
            scan.time_format = spec.time_format
        elif times.dtype == object or pd.api.types.is_string_dtype(times.dtype):
            try:
                from pandas.core.tools.datetimes import _guess_datetime_format_for_array

                scan.time_format = _guess_datetime_format_for_array(
                    np.asarray(times.dropna().head(1000).astype(object), dtype=object), dayfirst=spec.dayfirst
                )
            except (ImportError, TypeError, ValueError):
                scan.time_format = None
        if spec.freq == "int":
            scan.anchor = None
            return
        probe = PartContext(first_time=scan.first_time, time_format=scan.time_format)
        try:
            with np.errstate(all="ignore"):
                parsed = parse_time(times, times.to_frame(), spec, part=probe)
            scan.anchor = anchor_offset(parsed, spec.freq)
        except (DataValidationError, ValueError, TypeError):
            scan.anchor = UNSET  # each part finds its own; checked against the whole input's later

    def _null_examples(self, scan: Scan) -> pd.DataFrame:
        # the same column may have been read as numbers in one batch and text in another: pandas
        # unifies what Arrow cannot (as _read_part does for the parts)
        frame = pd.concat([table_to_pandas(t) for t in scan.null_examples])
        frame = _typed(frame, self._dtypes(scan))
        frame.index = pd.Index(frame.pop(ROW).to_numpy(), name="row")
        return example_rows(frame, frame.index.to_numpy())

    def _dtypes(self, scan: Scan) -> dict[str, Any]:
        """The dtype each column has when the whole input is read at once (pandas' common type)."""
        from pandas.core.dtypes.cast import find_common_type

        return {name: find_common_type(list(types)) for name, types in scan.dtypes.items() if len(types)}

    def _parts(self, scan: Scan) -> list[list[int]]:
        """Consecutive non-empty buckets grouped to at most ``part_rows`` rows (one bucket at least)."""
        part_rows = self.plan.part_rows
        if part_rows is None:
            row_bytes = scan.bucket_bytes.sum() / max(1, scan.rows)
            part_rows = max(1, int(self.plan.worker_mb * MB / (PEAK_FACTOR * row_bytes)))
        parts: list[list[int]] = []
        rows = 0
        for b in np.flatnonzero(scan.bucket_rows).tolist():
            if parts and rows + scan.bucket_rows[b] <= part_rows:
                parts[-1].append(b)
                rows += int(scan.bucket_rows[b])
            else:
                parts.append([b])
                rows = int(scan.bucket_rows[b])
        return parts




class _Inline:
    """A pool of one: the work runs in this process (one worker, or a memory setting that small)."""

    def map(self, fn, jobs):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _Inline()
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    list(pool.map(int, range(workers)))  # start the workers now, while this process is small
    return pool


def _arrow(frame: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed Python objects: kept as text
        fixed = frame.copy()
        for name in fixed.columns:
            if fixed[name].dtype == object:
                fixed[name] = fixed[name].astype("str")
        return pa.Table.from_pandas(fixed, preserve_index=False)


_DTYPE_CACHE: dict[pa.Schema, dict[str, Any]] = {}


def _pandas_dtypes(table: pa.Table) -> dict[str, Any]:
    """The dtype ``to_pandas`` gives each column of this batch (integers with nulls become floats,
    booleans with nulls objects), so parts convert like the whole input would."""
    base = _DTYPE_CACHE.get(table.schema)
    if base is None:
        base = dict(table_to_pandas(table.slice(0, 0)).dtypes.items())
        _DTYPE_CACHE[table.schema] = base
    out = {}
    for name, dtype in base.items():
        col = table.column(name)
        if col.null_count and isinstance(dtype, np.dtype) and dtype.kind in "iu":
            dtype = np.dtype("float64")
        elif col.null_count and isinstance(dtype, np.dtype) and dtype.kind == "b":
            dtype = np.dtype("object")
        out[str(name)] = dtype
    return out


def _columns_of(path: Path, kind: str, cfg: ProjectConfig) -> list[str]:
    if kind == "csv":
        return list(pd.read_csv(path, nrows=0, **csv_options(path, cfg)).columns)
    from shared.data.ingest import _parquet_dataset

    return list(_parquet_dataset(path, kind).schema.names)
