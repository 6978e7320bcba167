"""The per-part work of a streamed ingest (passes 2 and 3 of :mod:`shared.data.streaming`).

Pass 2 runs :func:`shared.data.validation.validate` on each part (consecutive buckets of partitions)
in worker processes and merges what the parts observed into what ``validate`` would have found
on the whole input: the first error, the report, the anchor, covariate medians (redoing parts
that used a provisional value). Pass 3 packs the validated partitions into mini-batch files as
``prepare_dataset`` would and writes them in parallel from the parts' spills.

The worker functions are module level: they run in the pool's processes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from shared import layout
from shared.config import ProjectConfig
from shared.data.ingest import table_to_pandas
from shared.lake import Lake
from shared.data.partitioning import (
    PreparedDataset,
    batch_names,
    batch_table,
    dataset_id_for,
    file_rows,
    finish_dataset,
    fingerprint,
    manifest_rows,
    pack_batches,
    stored_dataset,
    write_batch,
)
from shared.data.validation_report import MAX_EXAMPLES, REASONS
from shared.data.validation import (
    MIXED_OFFSETS,
    UNSET,
    DataValidationError,
    PartContext,
    ValidationReport,
    anchor_from_counts,
    validate,
)

@dataclass
class Scan:
    """What pass 1 of a streamed ingest learned about the whole input (filled by :mod:`shared.data.streaming`)."""

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


ROW = "__row"  # input position of a spilled row
SPILL_CHUNK = 65_536  # rows per record batch of a validated spill: pass 3 reads only what it needs
INPUT_ORDER = {  # reasons whose examples validate lists in input order (the others: partition order)
    "dropped_null_keys",
    "dropped_null_target",
    "zeroed_null_target",
    "clipped_negative_target",
    "dropped_negative_target",
    "kept_negative_target",
}


# -- pass 2: validate the parts ------------------------------------------------------------------


def validate_parts(
    pool,
    cfg: ProjectConfig,
    work: Path,
    scan: Scan,
    parts: list[list[int]],
    dtypes: dict[str, Any],
    null_examples: Callable[[], pd.DataFrame],
) -> tuple[list[dict], ValidationReport, Any]:
    """Validate every part in ``pool``; returns the parts' results, the merged report and the anchor.

    ``dtypes`` are the columns' types when the whole input is read at once; ``null_examples``
    gives the rows with a null key the scan set aside (called only when there were some).
    """
    ctx = {
        "anchor": scan.anchor,
        "first_time": scan.first_time,
        "time_format": scan.time_format,
        "covariate_medians": {},
    }
    freq = cfg.data.freq
    task = [
        _Task(i, [p for b in buckets for p in scan.pieces[b]], str(work / f"part-{i:05d}.arrow"))
        for i, buckets in enumerate(parts)
    ]
    results = _run_parts(pool, cfg, work, task, range(len(task)), ctx, dtypes)
    for _round in range(4):
        _raise_first_error(results)
        if {"naive", "offset"} <= set().union(*(r["tz_kinds"] for r in results)):
            raise DataValidationError(cfg.data.time, MIXED_OFFSETS)  # each part had one kind only
        redo: set[int] = set()
        anchor = _merged_anchor(results, freq)
        if ctx["anchor"] is UNSET or ctx["anchor"] != anchor:
            ctx["anchor"] = anchor
            redo |= {i for i, r in enumerate(results) if r["used_anchor"] and r["anchor"] != anchor}
        needs = set().union(*(r["needs_median"] for r in results)) - set(ctx["covariate_medians"])
        if needs:
            _check_all_null(cfg, results)
            ctx["covariate_medians"].update(_medians(pool, cfg, work, task, ctx, dtypes, sorted(needs)))
            redo |= {i for i, r in enumerate(results) if r["needs_median"]}
        if not redo:
            break
        redone = _run_parts(pool, cfg, work, task, sorted(redo), ctx, dtypes)
        for i, r in zip(sorted(redo), redone):
            results[i] = r
    _raise_first_error(results)
    if sum(r["n_out"] for r in results) == 0:
        report = _merged_report(results, scan, cfg, null_examples() if scan.null_rows else None)
        raise DataValidationError(None, f"no rows left after validation: {report.counts}")
    _check_all_null(cfg, results)
    anchor = _merged_anchor(results, freq)
    report = _merged_report(results, scan, cfg, null_examples() if scan.null_rows else None)
    report.anchor = anchor
    return results, report, anchor


def _run_parts(pool, cfg: ProjectConfig, work: Path, tasks, which: Iterable[int], ctx, dtypes,
               collect: list[str] | None = None):
    jobs = [
        (cfg.to_dict(), tasks[i], ctx, dtypes, collect, str(work / f"values-{i:05d}"))
        for i in which
    ]
    return list(pool.map(_validate_part, jobs))


def _check_all_null(cfg: ProjectConfig, results: list[dict]) -> None:
    """'covariate is null in every row', over the whole input (a part may have no value at all)."""
    for name in cfg.data.covariates:
        if sum(r["non_null"].get(name, 0) for r in results) == 0:
            seen = [r["all_null"][name] for r in results if name in r["all_null"]]
            if seen:
                examples = pd.concat([e for _, e in seen]).head(MAX_EXAMPLES)
                raise DataValidationError(
                    name, "covariate is null in every row", examples, sum(n for n, _ in seen)
                )


def _medians(pool, cfg: ProjectConfig, work: Path, tasks, ctx, dtypes, names: list[str]) -> dict[str, float]:
    """The whole input's median of each covariate (after merges), as ``np.nanmedian`` gives it:
    every part spills its values sorted, and a selection over the sorted files finds the middle."""
    results = _run_parts(pool, cfg, work, tasks, range(len(tasks)), ctx, dtypes, collect=names)
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


# -- pass 3: write the batch files ---------------------------------------------------------------


def write_parts(
    pool,
    lake: Lake,
    cfg: ProjectConfig,
    work: Path,
    workers: int,
    results: list[dict],
    report: ValidationReport,
    anchor,
) -> tuple[PreparedDataset, ValidationReport]:
    """Pack the validated partitions into mini-batch files (as ``prepare_dataset`` packs them),
    write them from the spills with ``workers`` processes, and finish the dataset in the lake."""
    done = [r for r in results if r["n_out"]]
    manifest = pd.concat([r["manifest"] for r in done], ignore_index=True)
    prints = pd.concat([r["prints"] for r in done])
    dataset_id = dataset_id_for(cfg, prints)
    found, broken = stored_dataset(lake, dataset_id)
    if found is not None:
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
    staging = work / "batches"
    staging.mkdir()
    workers = max(1, workers)
    rows_of = np.bincount(batch_of_part, weights=sizes, minlength=len(names))
    cuts = np.searchsorted(np.cumsum(rows_of), np.linspace(0, rows_of.sum(), workers + 1)[1:-1])
    ranges = np.split(np.arange(len(names)), cuts)
    jobs = [
        ([(names[b], segments[b]) for b in r.tolist()], spills, str(staging)) for r in ranges if len(r)
    ]
    list(pool.map(_write_batches, jobs))
    for name in names:
        _move_into(lake, staging / name, layout.batch(dataset_id, name))
    finished = finish_dataset(lake, cfg, dataset_id, manifest, names, report, anchor)
    finished.rewrote = broken
    return finished, report


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
    results: list[dict], scan: Scan, cfg: ProjectConfig, null_examples: pd.DataFrame | None
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


def _return_freed_memory() -> None:
    """Arrow's allocator gives freed memory back at once instead of keeping it for reuse: the
    process's resident size then follows what it holds, which is what the memory bound is about."""
    try:
        pa.jemalloc_set_decay_ms(0)
    except (NotImplementedError, pa.ArrowException):  # built without jemalloc
        pass

