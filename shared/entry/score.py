"""The batch-scoring entry script: the same file an Azure ML parallel job runs, and our local runner.

Contract (Azure ML parallel job): ``init()`` once per worker, parsing the script's arguments from
``sys.argv``; ``run(mini_batch)`` per mini-batch of scoring-request files (written by
:func:`shared.forecasts.scoring.prepare_scoring`, whole partitions each), returning one JSON line per
partition (its status: scored, fallback, no_model or failed, with the model used and a reason).

Arguments: ``--config`` (the project config, TOML or JSON), ``--dataset-meta`` (the prepared
dataset's ``dataset.json``), ``--prod-registry`` and ``--dev-registry`` (registry roots; the dev
registry serves the baseline fallback), ``--output-dir``, ``--score-id``.

Per input file the script writes ``<output-dir>/<file stem>.parquet`` (the predictions), then the
sidecar ``<file stem>.status.jsonl`` (the status lines), each atomically. The sidecar means
"done": a file that has one is not scored again and its stored lines are returned, so a killed
scoring run resumes at file level and never writes a prediction twice.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # loaded by file path, as Azure ML's parallel runtime does
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.config import ProjectConfig
from shared.lake import atomic_write
from shared.entry.train import read_config
from shared.forecasts.scoring import GlobalModels, score_frame, status_line

STATUS_SUFFIX = ".status.jsonl"


@dataclass(frozen=True)
class _State:
    cfg: ProjectConfig
    dataset_meta: dict[str, Any]
    prod: Any
    dev: Any
    output_dir: Path
    score_id: str
    global_models: Any = None  # loaded once per worker, on first use


# The Azure ML contract passes nothing from init() to run() but module state: this one holder,
# set by init() and read by run(), is the only module-level state of the script.
_state: _State | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shared.entry.score", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="project config file (TOML or JSON)")
    parser.add_argument("--dataset-meta", required=True, help="the prepared dataset's dataset.json")
    parser.add_argument("--prod-registry", required=True, help="root of the production model registry")
    parser.add_argument("--prod-index", default=None,
                        help="the group's slice of the production index (default: the registry's own)")
    parser.add_argument("--dev-registry", default=None, help="root of the development registry (baseline fallback)")
    parser.add_argument("--dev-index", default=None,
                        help="the group's slice of the development index (default: the registry's own)")
    parser.add_argument("--output-dir", required=True, help="folder for the prediction files")
    parser.add_argument("--score-id", required=True)
    args, _unknown = parser.parse_known_args(argv)  # Azure ML adds its own arguments
    return args


def init() -> None:
    from shared.registries.registry import ModelRegistry

    global _state
    args = parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prod = ModelRegistry(Path(args.prod_registry), "prod", index=args.prod_index)
    dev = ModelRegistry(Path(args.dev_registry), "dev", index=args.dev_index) if args.dev_registry else None
    cfg = read_config(Path(args.config))
    for registry in (prod, dev):
        if registry is not None:  # models may be built from the project's estimator packages
            registry.packages = tuple(cfg.training.estimator_packages)
    _state = _State(
        cfg=cfg,
        dataset_meta=json.loads(Path(args.dataset_meta).read_text(encoding="utf-8")),
        prod=prod,
        dev=dev,
        output_dir=output_dir,
        score_id=args.score_id,
        global_models=GlobalModels(prod, dev),
    )


def run(mini_batch: list[str]) -> list[str]:
    if _state is None:
        raise RuntimeError("run() called before init()")
    lines: list[str] = []
    for path in mini_batch:
        lines.extend(score_file(Path(path), _state))
    return lines


def score_file(path: Path, state: _State) -> list[str]:
    """Score one request file unless its sidecar says it is done; one status line per partition."""
    stem = path.name.removesuffix(".parquet")
    out = state.output_dir / f"{stem}.parquet"
    sidecar = state.output_dir / f"{stem}{STATUS_SUFFIX}"
    if out.is_file() and sidecar.is_file():
        return [line for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
    frame = pq.read_table(path).to_pandas()
    predictions, statuses = score_frame(frame, state.cfg, state.prod, state.dev, state.cfg.scoring_chain,
                                        state.global_models)
    predictions = predictions.assign(score_id=state.score_id)
    table = pa.Table.from_pandas(predictions, preserve_index=False)
    atomic_write(out, lambda fh: pq.write_table(table, fh, compression="zstd"))
    extra = {"score_id": state.score_id, "dataset_id": state.dataset_meta.get("dataset_id"), "file": path.name}
    lines = [status_line({**status, **extra}) for status in statuses]
    text = "".join(line + "\n" for line in lines)
    atomic_write(sidecar, lambda fh: fh.write(text.encode("utf-8")))
    return lines

