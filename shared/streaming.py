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
   worker processes run the existing :func:`shared.validation.validate` on each part with a
   :class:`~shared.validation.PartContext` carrying the facts a part cannot see (the input's
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
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from shared.config import ProjectConfig
from shared.ingest import (
    ODBC_PREFIX,
    estimate_rows,
    file_kind,
    iter_batches,
    read_source,
    table_to_pandas,
)
from shared.keys import partition_id
from shared.lake import Lake
from shared.partitioning import (
    PreparedDataset,
    batch_names,
    batch_table,
    dataset_id_for,
    dataset_root,
    file_rows,
    finish_dataset,
    fingerprint,
    load_dataset,
    manifest_rows,
    pack_batches,
    prepare_dataset,
    write_batch,
)
from shared.validation import (
    MAX_EXAMPLES,
    REASONS,
    UNSET,
    DataValidationError,
    PartContext,
    ValidationReport,
    anchor_from_counts,
    anchor_offset,
    check_arrow_types,
    example_rows,
    parse_time,
    validate,
    _check_columns,
)

ROW = "__row"  # input position of a spilled row
MB = 1 << 20
# Measured (benchmarks/ingest_scale.py): a part's peak in a worker is about PEAK_FACTOR times its
# spilled bytes; the in-memory path peaks at about IN_MEMORY_FACTOR times the input's raw bytes.
PEAK_FACTOR = 12.0
IN_MEMORY_FACTOR = 9.0
BASE_MB = 200  # an interpreter with pandas and pyarrow imported, per process
SCAN_MB = 250  # the scanning process above its base: a record batch, its bucketed copy, readahead
SPILL_CHUNK = 65_536  # rows per record batch of a validated spill: pass 3 reads only what it needs
INPUT_ORDER = {  # reasons whose examples validate lists in input order (the others: partition order)
    "dropped_null_keys",
    "dropped_null_target",
    "zeroed_null_target",
    "clipped_negative_target",
    "dropped_negative_target",
    "kept_negative_target",
}


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
    workers = int(getattr(spec, "workers", 0)) or os.cpu_count() or 1
    return memory_mb, workers


def fits_in_memory(source: str | Path, cfg: ProjectConfig) -> bool:
    memory_mb, _ = memory_settings(cfg)
    path, kind = file_kind(source)
    rows, row_bytes = estimate_rows(path, kind), _row_bytes(path, kind)
    return BASE_MB + rows * row_bytes * IN_MEMORY_FACTOR / MB <= memory_mb


def default_plan(path: Path, kind: str, cfg: ProjectConfig) -> StreamPlan:
    memory_mb, workers = memory_settings(cfg)
    rows = max(1, estimate_rows(path, kind))
    row_bytes = _row_bytes(path, kind)
    workers = max(1, min(workers, int((memory_mb - BASE_MB - SCAN_MB) // (2 * BASE_MB)) or 1))
    # what a worker may use for its part, above its own interpreter
    worker_mb = max(32.0, (memory_mb - BASE_MB - SCAN_MB) / workers - BASE_MB)
    part_rows = worker_mb * MB / (PEAK_FACTOR * row_bytes)
    buckets = 1 << max(4, min(12, math.ceil(math.log2(max(1.0, 4 * rows / part_rows)))))
    batch_rows = int(min(250_000, max(16_384, SCAN_MB * MB / (8 * row_bytes))))
    return StreamPlan(batch_rows=batch_rows, buckets=buckets, part_rows=None, workers=workers, worker_mb=worker_mb)


def _row_bytes(path: Path, kind: str) -> float:
    """Bytes per row once read (Arrow; CSV: pandas), from a sample of the first rows."""
    try:
        if kind == "csv":
            sample = pd.read_csv(path, nrows=20_000)
            return max(16.0, sample.memory_usage(deep=True, index=False).sum() / max(1, len(sample)))
        from shared.ingest import _parquet_dataset

        head = _parquet_dataset(path, kind).head(65_536)
        return max(16.0, head.nbytes / max(1, head.num_rows))
    except (pa.ArrowException, OSError, ValueError, pd.errors.ParserError):
        return 64.0


# -- the streaming path ------------------------------------------------------------------------


@dataclass
class _Scan:
    """What pass 1 learned about the whole input."""

    rows: int = 0
    columns: list[str] = field(default_factory=list)
    dtypes: dict[str, set] = field(default_factory=dict)
    bucket_rows: np.ndarray | None = None
    bucket_bytes: np.ndarray | None = None
    pieces: dict[int, list[str]] = field(default_factory=dict)
    null_rows: int = 0
    null_key_columns: set = field(default_factory=set)
    null_examples: list[pa.Table] = field(default_factory=list)
    first_time: Any = UNSET
    time_format: str | None = None
    anchor: Any = UNSET


class _Streamer:
    def __init__(self, lake: Lake, path: Path, kind: str, cfg: ProjectConfig, work: Path, plan: StreamPlan):
        self.lake, self.path, self.kind, self.cfg, self.work, self.plan = lake, path, kind, cfg, work, plan
        self.spec = cfg.data

    def run(self) -> tuple[PreparedDataset, ValidationReport]:
        _return_freed_memory()
        with _pool(self.plan.workers) as pool:
            scan = self._scan()
            parts = self._parts(scan)
            results, report, anchor = self._validate(pool, scan, parts)
            return self._write(pool, results, report, anchor)

    # -- pass 1 ------------------------------------------------------------------------------
    def _scan(self) -> _Scan:
        spec, policy = self.spec, self.cfg.validation
        scan = _Scan()
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
            columns = scan.columns or _columns_of(self.path, self.kind)
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

    def _bucket(self, table: pa.Table, scan: _Scan, writers: dict, cache: dict) -> None:
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

    def _time_facts(self, head: pa.Table, scan: _Scan) -> None:
        """The first time value (quoted by 'not a date'), the input's date format, a provisional anchor."""
        spec = self.spec
        times = table_to_pandas(head.select([spec.time]))[spec.time]
        scan.first_time = times.iloc[0]
        if times.dtype == object or pd.api.types.is_string_dtype(times.dtype):
            try:
                from pandas.core.tools.datetimes import _guess_datetime_format_for_array

                scan.time_format = _guess_datetime_format_for_array(
                    np.asarray(times.dropna().head(1000).astype(object), dtype=object)
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

    def _null_examples(self, scan: _Scan) -> pd.DataFrame:
        # the same column may have been read as numbers in one batch and text in another: pandas
        # unifies what Arrow cannot (as _read_part does for the parts)
        frame = pd.concat([table_to_pandas(t) for t in scan.null_examples])
        frame = _typed(frame, self._dtypes(scan))
        frame.index = pd.Index(frame.pop(ROW).to_numpy(), name="row")
        return example_rows(frame, frame.index.to_numpy())

    def _dtypes(self, scan: _Scan) -> dict[str, Any]:
        """The dtype each column has when the whole input is read at once (pandas' common type)."""
        from pandas.core.dtypes.cast import find_common_type

        return {name: find_common_type(list(types)) for name, types in scan.dtypes.items() if len(types)}

    # -- pass 2 ------------------------------------------------------------------------------
    def _parts(self, scan: _Scan) -> list[list[int]]:
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

    def _validate(self, pool, scan: _Scan, parts: list[list[int]]):
        ctx = {
            "anchor": scan.anchor,
            "first_time": scan.first_time,
            "time_format": scan.time_format,
            "time_utc": None,
            "covariate_medians": {},
        }
        dtypes = self._dtypes(scan)
        task = [
            _Task(i, [p for b in buckets for p in scan.pieces[b]], str(self.work / f"part-{i:05d}.arrow"))
            for i, buckets in enumerate(parts)
        ]
        results = self._run_parts(pool, task, range(len(task)), ctx, dtypes)
        for _round in range(4):
            _raise_first_error(results)
            redo: set[int] = set()
            kinds = set().union(*(r["tz_kinds"] for r in results))
            if ctx["time_utc"] is None and ("utc" in kinds or len(kinds) > 1):
                ctx["time_utc"] = True  # validate would have parsed the whole column in UTC
                redo = set(range(len(task)))
            else:
                anchor = _merged_anchor(results, self.spec.freq)
                if ctx["anchor"] is UNSET or ctx["anchor"] != anchor:
                    ctx["anchor"] = anchor
                    redo |= {i for i, r in enumerate(results) if r["used_anchor"] and r["anchor"] != anchor}
                needs = set().union(*(r["needs_median"] for r in results)) - set(ctx["covariate_medians"])
                if needs:
                    self._check_all_null(results)
                    ctx["covariate_medians"].update(self._medians(pool, task, ctx, dtypes, sorted(needs)))
                    redo |= {i for i, r in enumerate(results) if r["needs_median"]}
            if not redo:
                break
            redone = self._run_parts(pool, task, sorted(redo), ctx, dtypes)
            for i, r in zip(sorted(redo), redone):
                results[i] = r
        _raise_first_error(results)
        if sum(r["n_out"] for r in results) == 0:
            report = _merged_report(results, scan, self.cfg, self._null_examples(scan) if scan.null_rows else None)
            raise DataValidationError(None, f"no rows left after validation: {report.counts}")
        self._check_all_null(results)
        anchor = _merged_anchor(results, self.spec.freq)
        report = _merged_report(results, scan, self.cfg, self._null_examples(scan) if scan.null_rows else None)
        report.anchor = anchor
        return results, report, anchor

    def _run_parts(self, pool, tasks, which: Iterable[int], ctx, dtypes, collect: list[str] | None = None):
        jobs = [
            (self.cfg.to_dict(), tasks[i], ctx, dtypes, collect, str(self.work / f"values-{i:05d}"))
            for i in which
        ]
        return list(pool.map(_validate_part, jobs))

    def _check_all_null(self, results: list[dict]) -> None:
        """'covariate is null in every row', over the whole input (a part may have no value at all)."""
        for name in self.spec.covariates:
            if sum(r["non_null"].get(name, 0) for r in results) == 0:
                seen = [r["all_null"][name] for r in results if name in r["all_null"]]
                if seen:
                    examples = pd.concat([e for _, e in seen]).head(MAX_EXAMPLES)
                    raise DataValidationError(
                        name, "covariate is null in every row", examples, sum(n for n, _ in seen)
                    )

    def _medians(self, pool, tasks, ctx, dtypes, names: list[str]) -> dict[str, float]:
        """The whole input's median of each covariate (after merges), as ``np.nanmedian`` gives it:
        every part spills its values sorted, and a selection over the sorted files finds the middle."""
        results = self._run_parts(pool, tasks, range(len(tasks)), ctx, dtypes, collect=names)
        out = {}
        for name in names:
            arrays = [np.load(r["values"][name], mmap_mode="r") for r in results if name in r["values"]]
            arrays = [a for a in arrays if len(a)]
            total = sum(len(a) for a in arrays)
            if total == 0:
                out[name] = float("nan")
                continue
            mid = _kth(arrays, total // 2)
            out[name] = mid if total % 2 else float(np.mean(np.array([_kth(arrays, total // 2 - 1), mid])))
        return out

    # -- pass 3 ------------------------------------------------------------------------------
    def _write(self, pool, results: list[dict], report: ValidationReport, anchor):
        cfg = self.cfg
        done = [r for r in results if r["n_out"]]
        manifest = pd.concat([r["manifest"] for r in done], ignore_index=True)
        prints = pd.concat([r["prints"] for r in done])
        dataset_id = dataset_id_for(cfg, prints)
        if self.lake.exists(f"{dataset_root(dataset_id)}/dataset.json"):
            found = load_dataset(self.lake, dataset_id)
            found.reused = True
            return found, report
        sizes = manifest["n_rows"].to_numpy()
        batch_of_part = pack_batches(sizes, file_rows(int(sizes.sum()), cfg))
        names = batch_names(batch_of_part)
        manifest["batch"] = [names[b] for b in batch_of_part]

        # each batch as segments (spill, first row, end row): a batch may span two parts
        part_of = np.repeat(np.arange(len(done)), [len(r["manifest"]) for r in done])
        local_start = np.concatenate([np.r_[0, np.cumsum(r["manifest"]["n_rows"].to_numpy())[:-1]] for r in done])
        segments: list[list[tuple[int, int, int]]] = [[] for _ in names]
        for j in range(len(sizes)):
            seg = segments[batch_of_part[j]]
            p, lo = int(part_of[j]), int(local_start[j])
            if seg and seg[-1][0] == p and seg[-1][2] == lo:
                seg[-1] = (p, seg[-1][1], lo + int(sizes[j]))
            else:
                seg.append((p, lo, lo + int(sizes[j])))
        spills = [(r["spill"], r["chunks"]) for r in done]
        staging = self.work / "batches"
        staging.mkdir()
        workers = max(1, self.plan.workers)
        rows_of = np.bincount(batch_of_part, weights=sizes, minlength=len(names))
        cuts = np.searchsorted(np.cumsum(rows_of), np.linspace(0, rows_of.sum(), workers + 1)[1:-1])
        ranges = np.split(np.arange(len(names)), cuts)
        jobs = [
            ([(names[b], segments[b]) for b in r.tolist()], spills, str(staging)) for r in ranges if len(r)
        ]
        list(pool.map(_write_batches, jobs))
        root = dataset_root(dataset_id)
        for name in names:
            _move_into(self.lake, staging / name, f"{root}/batches/{name}")
        return finish_dataset(self.lake, cfg, dataset_id, manifest, names, report, anchor), report


# -- worker functions (module level: they run in the pool's processes) --------------------------


@dataclass
class _Task:
    index: int
    pieces: list[str]
    spill: str


def _validate_part(job) -> dict[str, Any]:
    _return_freed_memory()
    cfg_dict, task, ctx, dtypes, collect, values_prefix = job
    cfg = ProjectConfig.from_dict(cfg_dict)
    frame = _read_part(task.pieces, dtypes)
    part = PartContext(
        anchor=ctx["anchor"],
        first_time=ctx["first_time"],
        time_format=ctx["time_format"],
        time_utc=ctx["time_utc"],
        covariate_medians=dict(ctx["covariate_medians"]),
        collect_covariates=bool(collect),
    )
    result: dict[str, Any] = {"n_out": 0, "error": None, "values": {}}
    try:
        out, report = validate(frame, cfg, part)
    except DataValidationError as exc:
        result.update(error=(part.stage, _rule_rank(exc), exc.column, exc.rule, exc.examples, exc.rows))
        out, report = pd.DataFrame(), ValidationReport()
    del frame
    used = part.anchor if part.anchor is not UNSET else anchor_from_counts(part.anchor_counts, cfg.data.freq)
    result.update(
        report=report.to_dict(),
        reason_stage=dict(part.reason_stage),
        anchor_counts=part.anchor_counts,
        anchor=used,
        used_anchor=part.used_anchor,
        tz_kinds=set(part.tz_kinds),
        needs_median=set(part.needs_median),
        non_null=dict(part.non_null),
        all_null=dict(part.all_null),
    )
    if collect:
        for name in collect:
            values = part.covariate_values.get(name)
            if values is not None:
                path = f"{values_prefix}-{collect.index(name)}.npy"
                np.save(path, np.sort(values[~np.isnan(values)]))
                result["values"][name] = path
        return result  # a median pass: the validated rows are not kept
    if result["error"] is not None or len(out) == 0:
        return result
    prints = fingerprint(out, cfg)
    result.update(n_out=len(out), prints=prints, manifest=manifest_rows(out, cfg, prints))
    table = batch_table(out)
    del out
    batches = table.to_batches(max_chunksize=SPILL_CHUNK)
    with pa.OSFile(task.spill, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        for b in batches:
            writer.write_batch(b)
    result.update(spill=task.spill, chunks=[b.num_rows for b in batches])
    return result


def _write_batches(job) -> int:
    """Write the given mini-batch files from the validated spills, reading only the chunks needed."""
    batches, spills, staging = job
    readers: dict[int, _SpillReader] = {}
    for name, segments in batches:
        pieces = []
        for p, lo, hi in segments:
            if p not in readers:
                for old in [q for q in readers if q < p]:
                    readers.pop(old).close()
                readers[p] = _SpillReader(*spills[p])
            pieces.append(readers[p].rows(lo, hi))
        table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
        write_batch(_StagingLake(Path(staging)), name, table)
    for reader in readers.values():
        reader.close()
    return len(batches)


class _SpillReader:
    def __init__(self, path: str, chunks: list[int]) -> None:
        self.file = pa.OSFile(path, "rb")
        self.reader = ipc.open_file(self.file)
        self.starts = np.r_[0, np.cumsum(chunks)]
        self.cache: dict[int, pa.RecordBatch] = {}

    def rows(self, lo: int, hi: int) -> pa.Table:
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = int(np.searchsorted(self.starts, hi, side="left"))
        for i in [i for i in self.cache if i < first]:
            del self.cache[i]
        batches = []
        for i in range(first, last):
            if i not in self.cache:
                self.cache[i] = self.reader.get_batch(i)
            batches.append(self.cache[i])
        return pa.Table.from_batches(batches).slice(lo - int(self.starts[first]), hi - lo)

    def close(self) -> None:
        self.cache.clear()
        self.file.close()


class _StagingLake:
    """Just enough of a lake for ``write_batch`` to write a plain file in the staging folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write_bytes(self, path: str, data: bytes) -> None:
        (self.root / path).write_bytes(data)


def _move_into(lake: Lake, staged: Path, path: str) -> None:
    local = lake.local_path(path)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, local)
            return
        except OSError:  # another file system: copy through the lake's atomic write
            pass
    lake.write_bytes(path, staged.read_bytes())


def _read_part(pieces: list[str], dtypes: dict[str, Any]) -> pd.DataFrame:
    frames = []
    for path in pieces:
        with pa.OSFile(path, "rb") as source:
            frames.append(table_to_pandas(ipc.open_stream(source).read_all()))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames)
    del frames
    frame = _typed(frame, dtypes)
    frame.index = pd.Index(frame.pop(ROW).to_numpy())
    return frame.sort_index() if len(pieces) > 1 else frame


def _typed(frame: pd.DataFrame, dtypes: dict[str, Any]) -> pd.DataFrame:
    for name, dtype in dtypes.items():
        if name in frame.columns and frame[name].dtype != dtype:
            frame[name] = frame[name].astype(dtype)
    return frame


# -- merging the parts' observations -------------------------------------------------------------


def _rule_rank(exc: DataValidationError) -> int:
    """Order of two errors raised in the same stage, as validate checks them."""
    rule = exc.rule
    if rule.startswith("time value is missing") or rule.startswith("target is null"):
        return 0
    if "is infinite" in rule or rule.startswith("target is negative"):
        return 2
    return 1


def _raise_first_error(results: list[dict]) -> None:
    """The error validate raises on the whole input: the earliest check any part failed, with its
    rows summed over the parts that failed it and the first examples in validate's order."""
    errors = [r["error"] for r in results if r["error"] is not None]
    if not errors:
        return
    stage, rank, column, rule, _, _ = min(errors, key=lambda e: (e[0], e[1]))
    same = [e for e in errors if e[:4] == (stage, rank, column, rule)]
    frames = [e[4] for e in same if e[4] is not None and len(e[4])]
    examples = pd.concat(frames) if frames else pd.DataFrame()
    if len(examples) and stage[0] == 1:  # parsing and target checks list rows in input order
        examples = examples.sort_index(kind="stable")
    counts = [e[5] for e in same if e[5] is not None]
    raise DataValidationError(column, rule, examples.head(MAX_EXAMPLES), sum(counts) if counts else None)


def _merged_anchor(results: list[dict], freq: str) -> str | None:
    counts = [r["anchor_counts"] for r in results if r["anchor_counts"] is not None]
    if not counts:
        return None
    total = tuple(pd.concat([c[i] for c in counts]).groupby(level=0).sum() for i in (0, 1))
    return anchor_from_counts(total, freq)


def _merged_report(
    results: list[dict], scan: _Scan, cfg: ProjectConfig, null_examples: pd.DataFrame | None
) -> ValidationReport:
    """The parts' reports as one: counts summed, reasons in validate's order, first examples."""
    report = ValidationReport(input_rows=scan.rows, policy=dataclasses.asdict(cfg.validation))
    if scan.null_rows:
        report.add("dropped_null_keys", scan.null_rows, null_examples)
    stages: dict[str, tuple] = {}
    for r in results:
        for reason, stage in r["reason_stage"].items():
            stages[reason] = min(stages.get(reason, stage), stage)
    order = list(REASONS)
    for reason in sorted(stages, key=lambda x: (stages[x], order.index(x) if x in order else len(order))):
        firsts = [r for r in results if r["reason_stage"].get(reason) == stages[reason]]
        examples = [e for r in firsts for e in r["report"]["examples"].get(reason, [])]
        if reason in INPUT_ORDER:
            examples.sort(key=lambda e: e.get("row", 0))
        report.counts[reason] = sum(r["report"]["counts"].get(reason, 0) for r in results)
        if examples:
            report.examples[reason] = examples[:MAX_EXAMPLES]
    report.output_rows = sum(r["report"]["output_rows"] for r in results)
    report.partitions = sum(r["report"]["partitions"] for r in results)
    return report


def _kth(arrays: list[np.ndarray], k: int) -> float:
    """The k-th smallest (0-based) value over sorted arrays, without loading them: a pivot from the
    arrays' live windows (weighted median of their middles) narrows every window each step."""
    lo = [0] * len(arrays)
    hi = [len(a) for a in arrays]
    while True:
        mids = [(float(a[(lo[i] + hi[i]) // 2]), hi[i] - lo[i]) for i, a in enumerate(arrays) if hi[i] > lo[i]]
        mids.sort()
        weights = np.cumsum([w for _, w in mids])
        pivot = mids[int(np.searchsorted(weights, weights[-1] / 2))][0]
        less = [int(np.searchsorted(a, pivot, side="left")) for a in arrays]
        upto = [int(np.searchsorted(a, pivot, side="right")) for a in arrays]
        if sum(less) <= k < sum(upto):
            return pivot
        if k < sum(less):
            hi = [min(h, x) for h, x in zip(hi, less)]
        else:
            lo = [max(l_, x) for l_, x in zip(lo, upto)]


# -- small helpers ------------------------------------------------------------------------------


def _return_freed_memory() -> None:
    """Arrow's allocator gives freed memory back at once instead of keeping it for reuse: the
    process's resident size then follows what it holds, which is what the memory bound is about."""
    try:
        pa.jemalloc_set_decay_ms(0)
    except (NotImplementedError, pa.ArrowException):  # built without jemalloc
        pass


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


def _columns_of(path: Path, kind: str) -> list[str]:
    if kind == "csv":
        return list(pd.read_csv(path, nrows=0).columns)
    from shared.ingest import _parquet_dataset

    return list(_parquet_dataset(path, kind).schema.names)
