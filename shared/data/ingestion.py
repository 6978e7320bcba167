"""The ingestion stage: a source (local file, lake path, folder dataset, ODBC query) into a prepared
dataset in the lake, and ``prepared/LATEST`` pointed at it.

Below the workspace and the backends: the local compute backend runs it in process and the Azure ML
ingestion job's entry script runs it on the cluster, so it imports neither (``ws`` is anything with
the workspace's ``lake``, ``config`` and ``local_dir``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import faults, layout
from shared.lake import folder_parts
from shared.data.streaming import ingest_source
from shared.results.summaries import IngestSummary

if TYPE_CHECKING:  # pragma: no cover
    from shared.runs.workspace import Workspace

REPORT_FIELDS = ("input_rows", "output_rows", "partitions", "counts", "policy", "anchor")


def ingest(ws: Workspace, source: str | Path, query: str | None = None) -> IngestSummary:
    """Read, validate and partition a source; the same data twice gives the same dataset.

    Within ``ingest.memory_mb`` whatever the source's size (``shared.data.streaming``)."""
    faults.point("ingest.start")
    dataset, report = ingest_source(
        ws.lake, resolve_source(ws, source), ws.config, query=query, tmp_root=ws.local_dir(".cache")
    )
    faults.point("ingest.latest")
    ws.lake.write_bytes(layout.LATEST_DATASET, dataset.dataset_id.encode())
    return IngestSummary(
        dataset_id=dataset.dataset_id,
        partitions=int(len(dataset.manifest)),
        rows=int(dataset.manifest["n_rows"].sum()),
        report=report.to_dict(),
        reused=bool(getattr(dataset, "reused", False)),
        rewrote=str(getattr(dataset, "rewrote", "") or ""),
    )


def resolve_source(ws: Workspace, source: str | Path) -> str | Path:
    """A lake path (raw/..., scoring/...) is staged to a local file; else a local path or ODBC."""
    text = str(source)
    if text.startswith("odbc:"):
        return text
    if layout.is_source(text) and not Path(text).exists():
        local = ws.lake.local_path(text)
        if local is not None:
            return local
        staged = ws.local_dir(".cache", "sources") / text.rstrip("/").replace("/", "__")
        if ws.lake.exists(text):
            staged.write_bytes(ws.lake.read_bytes(text))
            return staged
        # a folder dataset (Spark's part files): its parts, each staged under its own name
        shutil.rmtree(staged, ignore_errors=True)  # never mixed with an earlier version's parts
        prefix = text.rstrip("/") + "/"
        for path in folder_parts(ws.lake, text):
            target = staged / path[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(ws.lake.read_bytes(path))
        return staged
    return Path(text)


def result_of(summary: Any, source: str) -> dict[str, Any]:
    """What an ingestion returns through Durable: counts and lake paths, never rows.

    The validation report's examples (input rows) stay in the dataset's ``dataset.json``
    (``report_path``); only its counts travel.
    """
    raw = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    report = raw.get("report") or {}
    return {
        "status": "completed",
        "source": source,
        "dataset_id": raw["dataset_id"],
        "partitions": int(raw["partitions"]),
        "rows": int(raw["rows"]),
        "reused": bool(raw.get("reused", False)),
        "report_path": layout.dataset_meta(raw["dataset_id"]),
        "report": {k: report[k] for k in REPORT_FIELDS if k in report},
    }
