"""What one group's Azure ML job reads: its data input and its registry slices.

The data input is the group's folder of mini-batch files when the group is all of it, else a
file-list MLTable naming exactly its files (both mounted ``ro_mount``). A scoring group also gets
a *slice* of each registry it needs, ``runs/<score_id>/registry/g<i>/<name>/index.sqlite``: the
index with only its partitions' newest versions, pinned when the run is planned; the artifacts
stay where the registry keeps them (see :mod:`shared.azureml.jobs`).
"""
from __future__ import annotations

import io
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from shared import layout
from shared.azureml.client import AzureMLError, AzureMLSettings

INPUT_MODE = "ro_mount"


@dataclass
class GroupInput:
    """The data input of one group: a uri_folder, or a file-list MLTable for a subset of a folder."""

    kind: str  # uri_folder | mltable
    uri: str
    files: list[str]
    mltable_path: str | None = None  # the lake path of the MLTable file, when one was written

    def to_input(self):
        from azure.ai.ml import Input

        # ro_mount for both: a parallel job accepts a file-list MLTable only as ro_mount or download
        return Input(type=self.kind, path=self.uri, mode=INPUT_MODE)


def group_input(aml: AzureMLSettings, lake: Any, run_id: str, group_index: int,
                batch_paths: list[str]) -> GroupInput:
    """The folder when the group is all of it; else write ``runs/<run>/inputs/g<i>/MLTable``."""
    if not batch_paths:
        raise AzureMLError(f"group {group_index} of {run_id} has no files")
    parents = {str(PurePosixPath(p).parent) for p in batch_paths}
    if len(parents) == 1:
        folder = parents.pop()
        siblings = {p for p in lake.list(folder) if str(PurePosixPath(p).parent) == folder}
        if siblings == set(batch_paths):
            return GroupInput("uri_folder", aml.lake_uri(folder, folder=True), list(batch_paths))
    folder = layout.group_inputs(run_id, group_index)
    lines = ["# files of one group, written by shared.azureml.jobs", "paths:"]
    lines += [f"  - file: {aml.long_lake_uri(p)}" for p in batch_paths]
    lake.write_bytes(f"{folder}/MLTable", ("\n".join(lines) + "\n").encode("utf-8"))
    return GroupInput("mltable", aml.lake_uri(folder, folder=True), list(batch_paths), f"{folder}/MLTable")



def registry_slice_path(score_id: str, group_index: int, name: str) -> str:
    """Lake folder of one scoring group's slice of registry ``name`` (dev | prod)."""
    return layout.registry_slice(score_id, group_index, name)



def group_partitions(lake: Any, batch_paths: list[str]) -> list[str]:
    """The partition ids a scoring group's request files ask for (their ``partition_id`` column only);
    :func:`scoring_partitions` reads them in one request where the plan recorded them."""
    import pyarrow.parquet as pq

    from shared.keys import PARTITION_ID

    ids: dict[str, None] = {}
    for path in batch_paths:
        table = pq.read_table(io.BytesIO(lake.read_bytes(path)), columns=[PARTITION_ID])
        ids.update(dict.fromkeys(str(v) for v in table.column(PARTITION_ID).to_pylist()))
    return list(ids)


def scoring_partitions(lake: Any, score_id: str, groups: list[list[str]]) -> list[list[str]]:
    """Each group's partition ids, from the plan's one partitions file (``layout.scoring_partitions``);
    a plan made before that file existed is read file by file."""
    import pyarrow.parquet as pq

    from shared.keys import PARTITION_ID

    path = layout.scoring_partitions(score_id)
    if not lake.exists(path):
        return [group_partitions(lake, paths) for paths in groups]
    table = pq.read_table(io.BytesIO(lake.read_bytes(path)))
    by_batch: dict[str, list[str]] = {}
    for batch, pid in zip(table.column("batch").to_pylist(), table.column(PARTITION_ID).to_pylist()):
        by_batch.setdefault(str(batch), []).append(str(pid))
    return [list(dict.fromkeys(pid for p in paths for pid in by_batch.get(PurePosixPath(p).name, [])))
            for paths in groups]


def slice_index(registry: Any, partition_ids: list[str]) -> tuple[bytes, int]:
    """A registry index holding only the newest version of ``partition_ids`` and the global models
    of those versions' runs (scoring binds a model's run's global model), as SQLite file bytes, and
    how many models it holds.

    Rows are copied as they are (versions, run ids, metrics, tags, digests, artifact paths relative
    to the registry folder), from the index the registry last pulled, in one read transaction, so
    the slice is one consistent state of the registry. Cost: the group's rows, not the registry's.
    """
    from shared.models.global_model import GLOBAL_ID

    work = Path(tempfile.mkdtemp(prefix="mm-slice-"))
    try:
        target = work / layout.REGISTRY_INDEX
        conn = sqlite3.connect(target, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            conn.execute("ATTACH DATABASE ? AS src", (str(registry.index_path),))
            conn.execute("BEGIN")  # one snapshot of the source for every read below
            schema = conn.execute("SELECT sql FROM src.sqlite_master WHERE sql IS NOT NULL "
                                  "AND name NOT LIKE 'sqlite_%' ORDER BY type = 'index'").fetchall()
            for (sql,) in schema:
                conn.execute(sql)
            conn.execute("CREATE TEMP TABLE want (partition_id TEXT PRIMARY KEY) WITHOUT ROWID")
            conn.executemany("INSERT OR IGNORE INTO temp.want VALUES (?)", [(str(p),) for p in partition_ids])
            conn.execute("CREATE TEMP TABLE keep (partition_id TEXT, version INTEGER, "
                         "PRIMARY KEY (partition_id, version)) WITHOUT ROWID")
            conn.execute("INSERT INTO temp.keep SELECT l.partition_id, l.version FROM src.latest l "
                         "JOIN temp.want w ON w.partition_id = l.partition_id")
            conn.execute("INSERT OR IGNORE INTO temp.keep SELECT g.partition_id, g.version FROM src.models g "
                         "WHERE g.partition_id = ? AND g.run_id IN (SELECT m.run_id FROM src.models m "
                         "JOIN temp.keep k ON k.partition_id = m.partition_id AND k.version = m.version)",
                         (GLOBAL_ID,))
            conn.execute("INSERT INTO main.meta SELECT * FROM src.meta")
            for table in ("models", "latest", "tags"):
                conn.execute(f"INSERT INTO main.{table} SELECT t.* FROM src.{table} t JOIN temp.keep k "
                             "ON k.partition_id = t.partition_id AND k.version = t.version")
            models = int(conn.execute("SELECT COUNT(*) FROM main.models").fetchone()[0])
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE src")
        finally:
            conn.close()
        return target.read_bytes(), models
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_registry_slice(lake: Any, registry: Any, name: str, partition_ids: list[str], dest: str) -> dict[str, int]:
    """Write ``dest/index.sqlite``: the slice of registry ``name`` a scoring group reads (one upload).

    Only the index is written: its artifact paths name the registry's own files, which are
    immutable once an index names them (the Azure ML registry names them by content), so the
    scoring job mounts the registry folder read-only and reads just the files its slice names,
    checked against the digests the slice carries. Idempotent: a retried plan writes the same
    slice. The registry is read as it was last pulled; the caller refreshes it first.
    """
    data, models = slice_index(registry, partition_ids)
    lake.write_bytes(f"{dest}/{layout.REGISTRY_INDEX}", data)
    return {"partitions": len(partition_ids), "models": models}
