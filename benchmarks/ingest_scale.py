"""Ingestion at scale: wall time, rows/s and peak memory of `manymodels ingest`, as a user runs it.

Generates a daily store x item panel (streamed: ``manymodels generate``), then runs
``manymodels ingest`` in a fresh workdir and samples the resident memory of the whole process
tree (the CLI and its worker processes) every 50 ms with psutil; prints wall, rows/s and the
peak. ``--double`` also ingests an input twice as long (same partitions, twice the periods) to
show the peak follows ``ingest.memory_mb``, not the input.

    python benchmarks/ingest_scale.py                       # 10,000 x 4,000 days: ~40M rows
    python benchmarks/ingest_scale.py --partitions 2000 --double
    python benchmarks/ingest_scale.py --memory-mb 1024 --workers 2

The summed RSS counts pages shared between the parent and its forked workers once per process,
so it overstates the real footprint; it is the conservative figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("manymodels")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shared.cli"]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS of the process tree (bytes) and stdout of one command."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        watched = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(watched))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, peak, stdout


def generate(path: Path, partitions: int, periods: int) -> int:
    cmd = [*cli(), "generate", "--partitions", str(partitions), "--periods", str(periods), "--freq", "D",
           "--out", str(path), "--json"]
    wall, _, stdout = run_measured(cmd, ROOT)
    rows = int(json.loads(stdout.strip().splitlines()[-1])["rows"])
    print(f"generated {rows:,} rows ({partitions:,} x {periods:,} days) in {wall:.1f}s -> {path} "
          f"({path.stat().st_size / 2**20:.0f} MB)", flush=True)
    return rows


def ingest(path: Path, rows: int, work: Path, args: argparse.Namespace) -> dict:
    workdir = work / f"ws-{path.stem}"
    shutil.rmtree(workdir, ignore_errors=True)
    config = work / "ingest.toml"
    config.write_text(
        f'[data]\nfreq = "D"\ncovariates = ["price", "promo"]\n'
        f'[ingest]\nmemory_mb = {args.memory_mb}\nworkers = {args.workers}\n',
        encoding="utf-8",
    )
    cmd = [*cli(), "ingest", "--data", str(path), "--workdir", str(workdir), "--config", str(config), "--json"]
    wall, peak, stdout = run_measured(cmd, ROOT)
    summary = json.loads(stdout.strip().splitlines()[-1])
    result = {
        "input_rows": rows,
        "output_rows": summary["rows"],
        "partitions": summary["partitions"],
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall),
        "peak_rss_mb": round(peak / 2**20),
        "memory_mb": args.memory_mb,
    }
    print(f"ingest {rows:,} rows: wall {wall:.1f}s, {rows / wall:,.0f} rows/s, peak RSS {peak / 2**30:.2f} GB "
          f"(process tree; setting {args.memory_mb} MB) -> {summary['partitions']:,} partitions, "
          f"{summary['rows']:,} rows", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--periods", type=int, default=4_000)
    parser.add_argument("--double", action="store_true", help="also ingest twice the periods")
    parser.add_argument("--memory-mb", type=int, default=2048, help="[ingest] memory_mb")
    parser.add_argument("--workers", type=int, default=0, help="[ingest] workers (0 = one per CPU)")
    parser.add_argument("--work", type=Path, help="folder for the inputs and workdirs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs and workdirs")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="mm-ingest-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; work folder {work}", flush=True)
    results = []
    try:
        sizes = [args.periods] + ([2 * args.periods] if args.double else [])
        for periods in sizes:
            path = work / f"panel-{args.partitions}x{periods}.parquet"
            rows = generate(path, args.partitions, periods)
            results.append(ingest(path, rows, work, args))
            if not args.keep:
                path.unlink(missing_ok=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
