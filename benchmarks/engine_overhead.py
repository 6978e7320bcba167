"""How much does the engine cost on top of the models' own work? (issue 2's benchmark)

On the same generated partitions, in one script, it measures:

1. ideal            the estimators' own fit + predict time, summed, divided by the workers;
2. ideal + prep     the same plus our feature preparation (vectorised per mini-batch file);
3. ideal + pandas   the same plus per-partition pandas feature preparation (what a user writes);
4. train in-process the whole training code run serially in this process, divided by the workers
                    (= preparation + fit + selection bookkeeping); and the same preparation + fit
                    as timed inside the runner's workers while they ran side by side (two busy
                    cores are slower than one: shared caches and memory bandwidth);
5. runner           `manymodels` runner wall time with the workers (process pool, init()/run(),
                    artifacts and result files written, resumable);
6. joblib peer      joblib.Parallel(n_jobs=workers) over partitions, each preparing its features
                    with pandas and training the same candidates: the way a user would do it.

Targets (issue 22): runner < 0.5 x the joblib peer, and runner <= 1.10 x (4) (preparation + fit /
workers, fit timed in the runner's workers).

    python benchmarks/engine_overhead.py --partitions 500 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.models.features import pandas_partition_features  # noqa: E402
from shared.keys import PARTITION_ID  # noqa: E402
from shared.lake import read_parquet  # noqa: E402
from shared.runs.pipeline import ingest, plan_training, train_group  # noqa: E402
from shared.runs.workspace import Workspace  # noqa: E402
from shared.data.synthetic import write_panel  # noqa: E402
from shared.models.training import time_breakdown, train_batch  # noqa: E402


def peer_task(part: pd.DataFrame, cfg) -> tuple[str, float, float]:
    """One partition, the user's way: pandas features, then the same candidate models."""
    t = time.perf_counter()
    pandas_partition_features(part, cfg)
    prep = time.perf_counter() - t
    [result] = train_batch(part, cfg, {})
    return result.status, prep, result.fit_seconds


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the runner's workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=500)
    parser.add_argument("--periods", type=int, default=156)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="keep the workdir here instead of a temp folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mm-bench-"))
    try:
        data = root / "sales.parquet"
        write_panel(data, partitions=args.partitions, periods=args.periods, freq="W", seed=11)
        ws = Workspace.open(root / "ws", overrides={"runner.workers": args.workers, "runner.progress": False})
        ingested = ingest(ws, data)
        plan = plan_training(ws, ingested.dataset_id)
        batches = [read_parquet(ws.lake, p) for g in plan.groups for p in g]
        cfg = ws.config
        n, w = ingested.partitions, args.workers

        # (1)-(4): the training code serially in this process, with its own time breakdown.
        cpu_before = _cpu_seconds()
        t = time.perf_counter()
        results = [r for frame in batches for r in train_batch(frame, cfg, {})]
        serial = time.perf_counter() - t
        serial_cpu = _cpu_seconds() - cpu_before
        tb = time_breakdown(results)
        parts = [g for frame in batches for _, g in frame.groupby(PARTITION_ID, sort=False)]
        t = time.perf_counter()
        for part in parts:
            pandas_partition_features(part, cfg)
        pandas_prep = time.perf_counter() - t

        # (5): the runner, on the same batch files, through the pipeline stage the CLI uses.
        cpu_before = _cpu_seconds()
        t = time.perf_counter()
        summary = train_group(ws, plan.run_id, [p for g in plan.groups for p in g], progress=False)
        runner_wall = time.perf_counter() - t
        runner_cpu = _cpu_seconds() - cpu_before
        # the same breakdown measured inside the runner's workers, while both ran at once
        in_run = {"features": 0.0, "estimators": 0.0}
        for path in ws.lake.list(f"runs/{plan.run_id}/results"):
            for line in ws.lake.read_bytes(path).decode().splitlines():
                timings = json.loads(line).get("timings") or {}
                for k in in_run:
                    in_run[k] += timings.get(k, 0.0)
        assert summary.partitions == n, summary

        # (6): the joblib peer over partitions.
        from joblib import Parallel, delayed

        t = time.perf_counter()
        peer = Parallel(n_jobs=w)(delayed(peer_task)(part, cfg) for part in parts)
        peer_wall = time.perf_counter() - t
        assert len(peer) == n

        ideal = tb["estimators_seconds"] / w
        rows = {
            "ideal (estimators fit+predict / workers)": ideal,
            "ideal + our vectorised feature prep": (tb["estimators_seconds"] + tb["features_seconds"]) / w,
            "ideal + per-partition pandas prep": (tb["estimators_seconds"] + pandas_prep) / w,
            "training code in-process / workers (prep + fit)": serial / w,
            f"manymodels runner, {w} workers (wall)": runner_wall,
            f"joblib.Parallel(n_jobs={w}) peer (wall)": peer_wall,
        }
        print(f"\n{n} partitions x {args.periods} weeks, {w} workers, {os.cpu_count()} CPUs")
        print(f"{'':50s} {'ms/partition':>12s} {'x ideal':>8s}")
        for name, seconds in rows.items():
            print(f"{name:50s} {1000 * seconds / n:12.2f} {seconds / ideal:8.2f}")
        floor = serial / w
        in_run_floor = (in_run["features"] + in_run["estimators"]) / w
        print(f"{'prep + fit timed in the runner workers / workers':50s} "
              f"{1000 * in_run_floor / n:12.2f} {in_run_floor / ideal:8.2f}")
        print(f"\nper-partition pandas prep alone: {1000 * pandas_prep / n:.2f} ms "
              f"({pandas_prep / tb['estimators_seconds']:.2f}x the estimators' own time); "
              f"ours: {tb['features_ms_per_partition']:.2f} ms")
        print(f"runner vs (prep + fit) / workers, fit timed in the runner's workers: "
              f"{runner_wall / in_run_floor:.3f}  (target <= 1.10)  "
              f"{'PASS' if runner_wall <= 1.10 * in_run_floor else 'MISS'}")
        print(f"runner vs (prep + fit) / workers, fit timed alone in this process:  "
              f"{runner_wall / floor:.3f}  (includes the slowdown of two cores working at once)")
        print(f"runner vs joblib peer:            {runner_wall / peer_wall:.3f}  (target < 0.50)  "
              f"{'PASS' if runner_wall < 0.5 * peer_wall else 'MISS'}")
        print(f"CPU seconds, runner (parent + workers) vs in-process training: {runner_cpu:.1f} vs "
              f"{serial_cpu:.1f} = {runner_cpu / serial_cpu:.3f} (engine work plus the two-core slowdown)")
        print(f"machine load average during the run: {os.getloadavg()[0]:.2f}")
        if args.json:
            print(json.dumps({"partitions": n, "workers": w, "ideal_s": ideal, "serial_s": serial,
                              "pandas_prep_s": pandas_prep, "runner_s": runner_wall, "peer_s": peer_wall,
                              "in_run_prep_fit_s": in_run_floor * w,
                              **{k: v for k, v in tb.items()}}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
