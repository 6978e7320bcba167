"""What one group's Azure ML job reads: its data input and its registry slices.

The data input is the group's folder of mini-batch files when the group is all of it, else a
file-list MLTable naming exactly its files (both mounted ``ro_mount``). A scoring group also gets
a *slice* of each registry it needs, ``runs/<score_id>/registry/g<i>/<name>/``: the index with
only its partitions' newest versions, and their artifacts (see :mod:`shared.azureml.jobs`).
Every name here is also importable from :mod:`shared.azureml.jobs`.
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
    """The partition ids a scoring group's request files ask for (their ``partition_id`` column only)."""
    import pyarrow.parquet as pq

    from shared.keys import PARTITION_ID

    ids: dict[str, None] = {}
    for path in batch_paths:
        table = pq.read_table(io.BytesIO(lake.read_bytes(path)), columns=[PARTITION_ID])
        ids.update(dict.fromkeys(str(v) for v in table.column(PARTITION_ID).to_pylist()))
    return list(ids)


def write_registry_slice(lake: Any, registry: Any, name: str, partition_ids: list[str], dest: str) -> dict[str, int]:
    """Write ``dest``: a registry folder holding only the newest version of ``partition_ids``.

    The index is a consistent copy of the registry's (SQLite backup API) with every other row
    deleted, so versions, run ids, metrics and tags are exactly the registry's; the artifacts
    are those rows' files, at the same relative paths. Works over a local ``ModelRegistry`` and
    an :class:`~shared.azureml.registry.AzureMLRegistry` (whose working copy fetches only the
    artifacts asked for). Idempotent: a retried submission rewrites the same slice.
    """
    from shared.global_model import GLOBAL_ID

    if hasattr(registry, "refresh"):
        registry.refresh(force=True)
    records = dict(registry.latest_many(partition_ids))
    # scoring binds a model's run's global model (registry.by_run(run_id, GLOBAL_ID)): keep those too
    for run_id in sorted({r.run_id for r in records.values()}):
        found = registry.by_run(run_id, GLOBAL_ID)
        if found is not None:
            records[f"{GLOBAL_ID}:{run_id}"] = found
    work = Path(tempfile.mkdtemp(prefix="mm-slice-"))
    try:
        index = work / layout.REGISTRY_INDEX
        source = sqlite3.connect(Path(registry.root) / layout.REGISTRY_INDEX)
        target = sqlite3.connect(index)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            target.execute("CREATE TEMP TABLE keep (partition_id TEXT, version INTEGER, "
                           "PRIMARY KEY (partition_id, version))")
            target.executemany("INSERT INTO keep VALUES (?, ?)",
                               [(r.partition_id, r.version) for r in records.values()])
            for table in ("models", "tags", "latest"):
                target.execute(f"DELETE FROM {table} WHERE (partition_id, version) NOT IN "
                               "(SELECT partition_id, version FROM keep)")
            target.commit()
            target.execute("VACUUM")
        finally:
            target.close()
            source.close()
        for record in records.values():
            lake.write_bytes(f"{dest}/{record.artifact}", Path(registry.artifact_path(record)).read_bytes())
        lake.write_bytes(f"{dest}/{layout.REGISTRY_INDEX}", index.read_bytes())  # last: the slice is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"partitions": len(partition_ids), "models": len(records)}
