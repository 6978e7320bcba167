"""The training entry script: the same file an Azure ML parallel job runs, and our local runner.

Contract (Azure ML parallel job): ``init()`` once per worker, parsing the script's arguments from
``sys.argv``; ``run(mini_batch)`` per mini-batch of Parquet files (whole partitions each),
returning one JSON line per partition.

Arguments: ``--config`` (the project config, TOML or JSON), ``--dataset-meta`` (the prepared
dataset's ``dataset.json``), ``--output-dir`` (where model artifacts go), ``--run-id``, and
optionally ``--global-model`` (the run's global model fits: a candidate for every partition) and
``--partitions`` (a JSON list of partition ids: an incremental run trains only those of each file;
the others keep their models, see :mod:`shared.models.incremental`).

Per chunk of partitions trained together the script writes a pack, ``<output-dir>/<file
stem>.<token>.pack`` (the chunk's ForecastBundles one after the other), then its sidecar
``<stem>.<token>.jsonl`` (one result row per partition, each naming the pack, its ``byte_offset``,
``byte_length`` and ``sha256``), each atomically. A sidecar therefore means "done": a partition with
a row in one of its file's sidecars is never retrained, its stored row is returned instead, so a run
killed half-way resumes at chunk level. A failed partition gets a row but no bytes, and the next run
tries it again (in a chunk of its own: the others' files are left as they are). Two files a chunk,
not two a partition: a file created (in Azure ML, a blob written) per partition was the training
stage's fixed cost per model.

A file's partitions are trained in chunks of ``--chunk-partitions`` (default 16) partitions, and
each chunk's files are written as soon as it finishes: features stay vectorised over a chunk
(their cost per chunk is milliseconds next to seconds of fitting), and a kill loses at most the
chunk in progress rather than the whole file.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by file path, as Azure ML's parallel runtime does
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import glob
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from shared.models.artifact_format import dump_artifact, load_artifact
from shared.config import ProjectConfig, load_config
from shared.models.incremental import read_partition_list
from shared.keys import PARTITION_ID
from shared.lake import atomic_write
from shared.models.local_models import preload
from shared.trust import check_digest, digest_path, sha256_bytes
from shared.models.training import train_batch

# statsforecast's models (~2 s to import): once here, in the process that forks the workers (or
# once per Azure ML worker), never on a partition's path
preload()

CHUNK_PARTITIONS = 16


@dataclass(frozen=True)
class _State:
    cfg: ProjectConfig
    dataset_meta: dict[str, Any]
    output_dir: Path
    run_id: str
    chunk_partitions: int = CHUNK_PARTITIONS
    global_models: Any = None  # the run's GlobalModelSet, loaded once per worker
    only: frozenset[str] | None = None  # the partitions to train (None: every partition of a file)


# The Azure ML contract passes nothing from init() to run() but module state: this one holder,
# set by init() and read by run(), is the only module-level state of the script.
_state: _State | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shared.entry.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="project config file (TOML or JSON)")
    parser.add_argument("--dataset-meta", required=True, help="the prepared dataset's dataset.json")
    parser.add_argument("--output-dir", required=True, help="folder for model artifacts and sidecars")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--global-model", default=None,
                        help="the run's global model fits (runs/<run>/global/global.pkl), if any")
    parser.add_argument("--global-model-sha256", default=None,
                        help="the SHA-256 the global model's writer recorded (else read from its .sha256 "
                             "sidecar); checked before unpickling")
    parser.add_argument("--partitions", default=None,
                        help="JSON list of the partition ids to train (an incremental run); default all")
    parser.add_argument("--chunk-partitions", type=int, default=CHUNK_PARTITIONS,
                        help="partitions trained together before their artifacts are written")
    args, _unknown = parser.parse_known_args(argv)  # Azure ML adds its own arguments
    return args


def read_config(path: Path) -> ProjectConfig:
    """TOML (our project file) or JSON (``cfg.to_dict()``, as stored in dataset.json / run.json)."""
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ProjectConfig.from_dict(raw.get("config", raw))
    return load_config(path)


def init() -> None:
    global _state
    args = parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _state = _State(
        cfg=read_config(Path(args.config)),
        dataset_meta=json.loads(Path(args.dataset_meta).read_text(encoding="utf-8")),
        output_dir=output_dir,
        run_id=args.run_id,
        chunk_partitions=max(1, args.chunk_partitions),
        global_models=_load_global(args.global_model, args.global_model_sha256),
        only=frozenset(read_partition_list(args.partitions)) if args.partitions else None,
    )


def _load_global(path: str | None, expected: str | None = None) -> Any:
    """The run's global model fits, written by the pipeline's own global stage; read by the one
    artifact loader only once their bytes match the SHA-256 the writer recorded (passed, or its
    ``.sha256`` sidecar)."""
    if not path:
        return None
    data = Path(path).read_bytes()
    if not expected:
        sidecar = Path(digest_path(path))
        expected = sidecar.read_text(encoding="ascii").strip() if sidecar.is_file() else None
    what = f"global model {Path(path).name}"
    check_digest(data, expected, what)
    return load_artifact(data, what)


def run(mini_batch: list[str]) -> list[str]:
    if _state is None:
        raise RuntimeError("run() called before init()")
    lines: list[str] = []
    for path in mini_batch:
        lines.extend(train_file(Path(path), _state))
    return lines


def train_file(path: Path, state: _State) -> list[str]:
    """Train the partitions of one batch file that have no stored row yet; one line per partition."""
    ids = pq.read_table(path, columns=[PARTITION_ID]).column(PARTITION_ID).to_pylist()
    order = [pid for pid in dict.fromkeys(ids) if state.only is None or pid in state.only]
    # rows of this run stored by an earlier attempt (a sidecar from another run, an output folder
    # reused by hand, does not count as done); a failed row is tried again
    stored = _stored_rows(state.output_dir, path.stem, state.run_id)
    rows = {pid: stored[pid] for pid in order if pid in stored and stored[pid].get("status") != "failed"}
    todo = [pid for pid in order if pid not in rows]
    if todo:
        frame = pq.read_table(path).to_pandas()
        codes, uniques = pd.factorize(frame[PARTITION_ID])
        code_of = {pid: code for code, pid in enumerate(uniques)}
        for start in range(0, len(todo), state.chunk_partitions):
            chunk = [code_of[pid] for pid in todo[start:start + state.chunk_partitions]]
            part = frame[np.isin(codes, chunk)].reset_index(drop=True)
            results = train_batch(part, state.cfg, state.dataset_meta, state.global_models)
            rows.update(_finish_chunk(results, state, path.stem))
    missing = [pid for pid in order if pid not in rows]
    if missing:
        raise RuntimeError(f"train_batch returned no result for {len(missing)} partition(s) of {path.name}, "
                           f"e.g. {missing[:3]}")
    return [json.dumps(rows[pid], allow_nan=True) for pid in order]


def _finish_chunk(results: list[Any], state: _State, stem: str) -> dict[str, dict[str, Any]]:
    """Write a chunk's pack, then its sidecar (the 'done' mark); returns its rows by partition.

    The token makes each chunk's files its own, so an attempt running twice (a retried mini-batch
    whose first attempt is still alive) never mixes one attempt's pack with the other's sidecar."""
    name = f"{stem}.{uuid.uuid4().hex[:16]}"
    pack, offset = bytearray(), 0
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        row = {**result.to_row(), "run_id": state.run_id, "artifact": None}
        if result.status != "failed" and result.bundle is not None:
            data = dump_artifact(result.bundle)
            # the registry checks the range it copies against this digest
            row.update(artifact=f"{name}.pack", byte_offset=offset, byte_length=len(data), sha256=sha256_bytes(data))
            pack += data
            offset += len(data)
        rows[result.partition_id] = row
    if pack:
        atomic_write(state.output_dir / f"{name}.pack", lambda fh: fh.write(pack))
    text = "".join(json.dumps(row, allow_nan=True) + "\n" for row in rows.values())
    atomic_write(state.output_dir / f"{name}.jsonl", lambda fh: fh.write(text.encode("utf-8")))
    return rows


def _stored_rows(folder: Path, stem: str, run_id: str) -> dict[str, dict[str, Any]]:
    """This run's rows in the file's sidecars, by partition: a row that succeeded wins over a failed
    one (a retry); rows of another run are ignored."""
    found: dict[str, dict[str, Any]] = {}
    own = re.compile(re.escape(stem) + r"\.[0-9a-f]{16}\.jsonl")  # not the sidecars of a stem "<stem>.x"
    for sidecar in sorted(p for p in folder.glob(f"{glob.escape(stem)}.*.jsonl") if own.fullmatch(p.name)):
        for line in sidecar.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("run_id") != run_id:
                continue
            pid = row[PARTITION_ID]
            if pid not in found or found[pid].get("status") == "failed":
                found[pid] = row
    return found
