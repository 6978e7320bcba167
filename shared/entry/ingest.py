"""The ingestion entry script: what an Azure ML command job runs, and what local ingestion returns.

Ingestion is the pipeline's own :func:`shared.data.ingestion.ingest` (the bounded-memory streaming code
of :mod:`shared.data.streaming`) wherever it runs: the local backend calls :func:`run_ingest` in the
process (CLI, Functions activity); the Azure ML command job (:mod:`shared.azureml.ingest_job`)
runs this module as a script over the lake's mounts::

    python -m shared.entry.ingest --source <mounted raw file> --source-name raw/sales.csv \
        --config <manymodels.toml> --prepared <mount of the lake's prepared container> \
        --result <mount of runs/<ingest id>/results/<job name>>

``--prepared`` is the root of the lake's ``prepared`` container (the job's ``rw_mount`` output):
the dataset's batch files, manifest and ``dataset.json`` (which carries the validation report)
and ``prepared/LATEST`` are written there at the lake paths :mod:`shared.layout` names, exactly
as a local ingestion writes them. The same data gives the same dataset id, and a dataset whose
``dataset.json`` already exists is returned as it is (``reused``): a rerun writes nothing twice.

The script then writes ``<result>/ingest.json``: the small summary the Functions activity reads
back (dataset id, partitions, rows, the path of the report, its counts; never rows of data). A
data or config error (the input breaks the data contract, an unreadable file) is a permanent
failure: the result file says why and the script exits with status 2, so the job fails with the
reason; anything else exits 1 with the error recorded the same way.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import os
import shutil
import tempfile
import traceback
from typing import Any

from shared import layout
from shared.errors import ManyModelsError
from shared.data.ingestion import result_of

RESULT_FILE = "ingest.json"
DATA_ERROR_EXIT = 2


def run_ingest(ws: Any, source: str | Path, name: str | None = None) -> dict[str, Any]:
    """Ingest ``source`` into the workspace's lake with the pipeline's own code; the small result."""
    from shared.data.ingestion import ingest

    return result_of(ingest(ws, source), name or str(source))


def failure_of(error: BaseException, source: str) -> dict[str, Any]:
    text = str(error).strip() or type(error).__name__
    return {
        "status": "failed",
        "source": source,
        "error_type": type(error).__name__,
        "reason": text.splitlines()[0][:500],
        "error": text[:4000],
    }


# -- the job's side: a lake made of the job's mounts -----------------------------------------------
def mounted_workspace(prepared: Path, config: Path, work: Path) -> Any:
    """A workspace whose lake's ``prepared`` container is the job's output mount.

    ``work/lake/prepared`` is a symbolic link to the mount, so the lake is the ordinary
    :class:`~shared.lake.LocalLake` and every path is the layout's; ``work`` also holds the
    streaming code's spill files (the node's local disk, not the mount).
    """
    from shared.config import load_config
    from shared.lake import LocalLake
    from shared.runs.workspace import Workspace

    prepared.mkdir(parents=True, exist_ok=True)  # Azure ML makes its output folders; a local run may not
    lake_root = work / "lake"
    lake_root.mkdir(parents=True, exist_ok=True)
    link = lake_root / layout.PREPARED
    if not link.exists():
        os.symlink(prepared.resolve(), link, target_is_directory=True)
    return Workspace(work, load_config(config), LocalLake(lake_root))


def write_result(folder: Path, result: dict[str, Any]) -> Path:
    from shared.lake import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / RESULT_FILE
    atomic_write_bytes(target, json.dumps(result, indent=2, sort_keys=True, default=str).encode("utf-8"))
    return target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shared.entry.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="the raw file (or Parquet folder), mounted")
    parser.add_argument("--source-name", default=None, help="its lake path (raw/...), for the result")
    parser.add_argument("--config", required=True, type=Path, help="the project config (TOML)")
    parser.add_argument("--prepared", required=True, type=Path, help="root of the lake's prepared container")
    parser.add_argument("--result", required=True, type=Path, help="folder of ingest.json")
    parser.add_argument("--work-dir", default=None, type=Path, help="local scratch (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.source_name or str(args.source)
    work = Path(tempfile.mkdtemp(prefix="mm-ingest-", dir=args.work_dir))
    try:
        try:
            ws = mounted_workspace(args.prepared, args.config, work)
            result = run_ingest(ws, args.source, name)
        except ManyModelsError as exc:  # the data or the config: permanent, the reason says which
            write_result(args.result, failure_of(exc, name))
            print(f"ingestion of {name} refused: {str(exc).splitlines()[0]}", file=sys.stderr)
            return DATA_ERROR_EXIT
        except Exception as exc:
            write_result(args.result, failure_of(exc, name))
            traceback.print_exc()
            return 1
        write_result(args.result, result)
        print(json.dumps({k: result[k] for k in ("dataset_id", "partitions", "rows", "reused")}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
