"""Real-time serving under load (issue 5's benchmark): 10,000 production models, a bounded cache.

1. **Build** (kept in ``--workdir`` and reused when its parameters match): the pipeline trains
   ``--trained`` real partitions (generated panel -> ingest -> train -> promote), then the production
   registry receives ``--partitions`` copies of their artifacts under new partition ids (one
   ``register_many`` transaction; the artifacts are hard links). Training 10,000 models the slow
   way would only measure training again; serving cares about how many distinct models it must
   hold, and each copy is a distinct file, loaded and cached on its own.
2. **Server**: ``manymodels serve --workdir DIR --port N --cache-mb M`` in a subprocess; its RSS is
   sampled with psutil every 50 ms, and its own peak (``ru_maxrss``) read from ``/stats`` at the end.
3. **Load** (a second process, this file's ``load`` mode): ``--clients`` threads, each with one
   keep-alive HTTP/1.1 connection (``http.client``: the lightest client, so the load tool steals
   little CPU from the server on a 2-core machine). Each request picks a partition from a Zipf
   distribution over all partitions (exponent ``--zipf``, ranks shuffled), except a ``--sweep``
   share that walks through every partition in turn, so all of them are asked for (cold loads and
   evictions keep happening). Requests carry 4 future rows (date, price, promo) or, for a
   ``--horizon-share``, a horizon. Bounded by ``--max-requests`` and ``--duration``; it stops by itself.
   ``--rate`` paces the clients (requests/s in total; how late each request left against its
   schedule is reported too, so a server falling behind shows); ``--rate 0`` is closed-loop.
4. **Report**: p50/p99 latency of warm hits and of cold loads (told apart by the server's
   ``X-Cache: hit|miss`` header), throughput, hit rate, peak RSS against the cache cap.

Targets on 2 cores: warm p99 <= 10 ms; cold-load p99 <= 100 ms; peak RSS <= cache cap + 300 MB.

    python benchmarks/serving.py                      # 10,000 partitions, 256 MB cache, 16 clients
    python benchmarks/serving.py --rate 200 --duration 60
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUILD_FILE = "serving-bench.json"
TARGETS_FILE = "serving-targets.json"
COPY_RUN = "bench-copies"


# -- 1. build --------------------------------------------------------------------------------
def build(workdir: Path, trained: int, partitions: int, seed: int) -> dict:
    """A workdir whose production registry holds ``partitions`` models; reused if already built."""
    import numpy as np

    from shared.keys import PARTITION_ID, partition_id
    from shared.lake import read_parquet
    from shared.runs.pipeline import ingest, promote, train
    from shared.runs.workspace import Workspace
    from shared.data.synthetic import write_panel
    from shared.data.timegrid import from_periods

    wanted = {"trained": trained, "partitions": partitions, "seed": seed}
    marker = workdir / BUILD_FILE
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == wanted:
            print(f"reusing the built workdir {workdir} ({done['summary']})")
            return done
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    panel = workdir / "panel.parquet"
    write_panel(panel, partitions=trained, periods=156, freq="W", seed=seed)
    ws = Workspace.open(workdir / "work", overrides={"runner.progress": False, "runner.workers": 2,
                                                     "data.covariates": ["price", "promo"]})
    ingested = ingest(ws, panel)
    plan, _, registered = train(ws, ingested.dataset_id, progress=False)
    promoted = promote(ws, plan.run_id, min_accuracy=0.0)
    trained_seconds = time.perf_counter() - began
    sources = [r for r in ws.prod.find(latest_only=True) if r.run_id != COPY_RUN]
    if not sources:
        raise SystemExit("no model was promoted: nothing to serve")
    manifest = read_parquet(ws.lake, f"prepared/{ingested.dataset_id}/manifest.parquet").set_index(
        PARTITION_ID
    )
    anchor = json.loads(ws.lake.read_bytes(f"prepared/{ingested.dataset_id}/dataset.json"))["anchor"]
    began = time.perf_counter()
    items, targets = [], []
    for i in range(partitions):
        source = sources[i % len(sources)]
        keys = {"store": f"B{i // 100:04d}", "item": f"J{i % 100:03d}"}
        items.append(
            (
                {
                    "partition_id": partition_id([keys["store"], keys["item"]]),
                    "run_id": COPY_RUN,
                    "model_name": source.model_type,
                    "keys": keys,
                    "metrics": source.metrics,
                    "tags": {"copy_of": source.partition_id},
                },
                ws.prod.artifact_path(source),
            )
        )
        last = int(manifest.loc[source.partition_id, "last_period"])
        dates = from_periods(np.arange(last + 1, last + 5), ws.config.data.freq, anchor)
        targets.append({"keys": keys, "dates": [d.strftime("%Y-%m-%d") for d in dates]})
    ws.prod.register_many(items)
    copy_seconds = time.perf_counter() - began
    types: dict[str, int] = {}
    for source in sources:
        types[source.model_type] = types.get(source.model_type, 0) + 1
    summary = (
        f"trained {registered.trained + registered.baseline_only} real models through the pipeline and "
        f"promoted {promoted.promoted} in {trained_seconds:.0f} s; registered {partitions} copies of "
        f"their artifacts under new partition ids in {copy_seconds:.1f} s (model types {types})"
    )
    print(summary)
    (workdir / TARGETS_FILE).write_text(json.dumps(targets))
    done = {"params": wanted, "summary": summary, "work": str(ws.root)}
    marker.write_text(json.dumps(done))
    return done


# -- 2. server -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_for_health(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if get_json(port, "/health").get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy")


class RssSampler(threading.Thread):
    """The server's resident memory every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.samples += 1
            except psutil.NoSuchProcess:
                return
            self.stop.wait(self.interval)


# -- 3. the load tool (its own process) ---------------------------------------------------------------
def load(args: argparse.Namespace) -> None:
    """Send requests from ``clients`` threads until the count or the time bound; write the samples."""
    sys.setswitchinterval(0.0005)  # a thread whose answer arrived gets the GIL soon: less client-side delay
    targets = json.loads(Path(args.targets).read_text())
    n = len(targets)
    order = list(range(n))
    random.Random(args.seed).shuffle(order)  # Zipf rank -> partition
    cumulative = list(itertools.accumulate(1.0 / (rank**args.zipf) for rank in range(1, n + 1)))
    total = cumulative[-1]
    counter = itertools.count()
    sweep = itertools.count(args.sweep_start)
    deadline = time.monotonic() + args.duration
    rate = float(args.rate)
    per_client_interval = args.clients / rate if rate > 0 else 0.0
    results: list[list[tuple]] = [[] for _ in range(args.clients)]
    errors: list[str] = []

    def body_for(rng: random.Random, index: int) -> tuple[str, bytes]:
        target = targets[index]
        if rng.random() < args.horizon_share:
            return "horizon", json.dumps({"keys": target["keys"], "horizon": 4}).encode()
        rows = [
            {"date": d, "price": round(rng.uniform(1.0, 6.0), 2), "promo": int(rng.random() < 0.2)}
            for d in target["dates"]
        ]
        return "rows", json.dumps({"keys": target["keys"], "rows": rows}).encode()

    def client(slot: int) -> None:
        rng = random.Random(args.seed * 1000 + slot)
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        out = results[slot]
        next_send = time.monotonic() + rng.random() * per_client_interval
        while next(counter) < args.max_requests and time.monotonic() < deadline:
            if rng.random() < args.sweep:
                index = next(sweep) % n
            else:
                index = order[bisect.bisect_left(cumulative, rng.random() * total)]
            kind, body = body_for(rng, index)
            lag = 0.0
            if per_client_interval:
                pause = next_send - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                lag = max(time.monotonic() - next_send, 0.0)  # sent late: this client or the previous answer
                next_send += per_client_interval
            started = time.monotonic()
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
                continue
            timing = response.getheader("Server-Timing") or "app;dur=nan"
            out.append(
                (
                    time.monotonic() - started,
                    response.status,
                    response.getheader("X-Cache") or "-",
                    float(timing.rpartition("dur=")[2]) / 1000.0,
                    kind,
                    index,
                    lag,
                )
            )
        conn.close()

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    samples = [s for part in results for s in part]
    Path(args.out).write_text(
        json.dumps(
            {
                "elapsed": elapsed,
                "samples": samples,
                "errors": errors[:20],
                "error_count": len(errors),
                "sweep_end": next(sweep),
            }
        )
    )


# -- 4. phases and report -----------------------------------------------------------------------------
def phases(args: argparse.Namespace) -> list[dict]:
    """``cycle``: closed loop, half the requests walking every partition, until all were asked for
    (throughput, evictions, memory); ``paced``: a steady rate, the latency figures."""
    out = []
    for name in args.phases.split(","):
        if name == "cycle":
            out.append(
                {
                    "name": "cycle",
                    "rate": 0.0,
                    "sweep": args.cycle_sweep,
                    "duration": args.cycle_seconds,
                    "max_requests": int(args.partitions / args.cycle_sweep * 1.05) + args.clients,
                }
            )
        elif name == "paced":
            for rate in (float(r) for r in str(args.rate).split(",")):
                out.append(
                    {
                        "name": f"paced-{rate:g}",
                        "rate": rate,
                        "sweep": args.sweep,
                        "duration": args.duration,
                        "max_requests": args.max_requests,
                    }
                )
        else:
            raise SystemExit(f"unknown phase {name!r}: cycle, paced")
    return out


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "manymodels-serving-bench"
    built = build(workdir, args.trained, args.partitions, args.seed)
    port = args.port or free_port()
    load_avg = os.getloadavg()
    log = open(workdir / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "serve",
            "--workdir",
            built["work"],
            "--port",
            str(port),
            "--cache-mb",
            str(args.cache_mb),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sampler = None
    results = []
    sweep_start = 0
    try:
        wait_for_health(port, server)
        sampler = RssSampler(server.pid)
        sampler.start()
        idle_rss = sampler.process.memory_info().rss
        for phase in phases(args):
            out = workdir / f"load-{phase['name']}.json"
            command = [
                sys.executable,
                __file__,
                "load",
                "--port",
                str(port),
                "--targets",
                str(workdir / TARGETS_FILE),
                "--out",
                str(out),
                "--clients",
                str(args.clients),
                "--duration",
                str(phase["duration"]),
                "--max-requests",
                str(phase["max_requests"]),
                "--zipf",
                str(args.zipf),
                "--sweep",
                str(phase["sweep"]),
                "--sweep-start",
                str(sweep_start),
                "--horizon-share",
                str(args.horizon_share),
                "--rate",
                str(phase["rate"]),
                "--seed",
                str(args.seed + len(results)),
            ]
            before = get_json(port, "/stats")
            subprocess.run(command, check=True, timeout=phase["duration"] + 120)
            result = json.loads(out.read_text())
            sweep_start = result["sweep_end"]
            results.append((phase, result, before, get_json(port, "/stats")))
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join(2)
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    report(args, built, results, sampler, idle_rss, load_avg)
    return 0


def percentiles(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "n/a"
    arr = np.asarray(values) * 1000.0
    return (
        f"p50 {np.percentile(arr, 50):6.2f} ms, p99 {np.percentile(arr, 99):6.2f} ms, max {arr.max():6.1f} ms"
    )


def p99(values: list[float]) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values) * 1000.0, 99)) if values else float("nan")


def report(args, built, results, sampler, idle_rss, load_avg) -> None:
    mb = 2**20
    lines = [
        f"build: {built['summary']}",
        f"machine: {os.cpu_count()} cores; load average before the run "
        f"{load_avg[0]:.2f} / {load_avg[1]:.2f} / {load_avg[2]:.2f} (1/5/15 min)",
        f"clients: {args.clients} threads, one keep-alive connection each; Zipf s={args.zipf} over "
        f"{args.partitions} partitions; {args.horizon_share:.0%} horizon requests (next 4 periods), the rest "
        f"4 explicit future rows with prices and promotions",
    ]
    summary: dict = {"phases": {}, "load_average": load_avg, "args": vars(args)}
    final_stats = results[-1][3] if results else {}
    paced = [p["name"] for p, *_ in results if p["rate"]]
    target_phase = (
        paced[0] if paced else results[-1][0]["name"]
    )  # the targets are judged on the first paced phase
    warm_all, cold_all = [], []
    for phase, result, before, after in results:
        samples = result["samples"]
        ok = [s for s in samples if s[1] == 200]
        hits, misses = [s for s in ok if s[2] == "hit"], [s for s in ok if s[2] == "miss"]
        statuses: dict[int, int] = {}
        for s in samples:
            statuses[s[1]] = statuses.get(s[1], 0) + 1
        c0, c1 = before["cache"], after["cache"]
        loads = c1["loads"] - c0["loads"]
        load_ms = 1000 * (c1["load_seconds_total"] - c0["load_seconds_total"]) / max(loads, 1)
        pace = f"paced at {phase['rate']:g} req/s" if phase["rate"] else "closed loop"
        distinct = len({s[5] for s in samples})
        lines += [
            "",
            f"phase {phase['name']}: {pace}, {phase['sweep']:.0%} sweep; {len(samples)} requests in "
            f"{result['elapsed']:.1f} s = {len(samples) / result['elapsed']:.0f} req/s; statuses {statuses}; "
            f"transport errors {result['error_count']}; {distinct} distinct partitions asked for",
            f"  hit rate {len(hits) / max(len(ok), 1):.1%} ({len(hits)} hits, {len(misses)} cold loads); "
            "cache: "
            f"{loads} loads (mean {load_ms:.2f} ms, max so far {1000 * c1['load_seconds_max']:.1f} ms), "
            f"{c1['evictions'] - c0['evictions']} evictions, {c1['entries']} entries holding "
            f"{c1['bytes_held'] / mb:.0f} of {c1['max_bytes'] / mb:.0f} MB",
        ]
        if phase["rate"]:
            lines.append(
                f"  send lag behind the schedule (client side): {percentiles([s[6] for s in samples])}"
            )
        for kind in ("rows", "horizon", None):
            label = kind or "all"
            h = [s for s in hits if kind is None or s[4] == kind]
            m = [s for s in misses if kind is None or s[4] == kind]
            if not h and not m:
                continue
            lines.append(
                f"  {label:8s} warm hits : {percentiles([s[0] for s in h])}   "
                f"(in server {percentiles([s[3] for s in h])})"
            )
            lines.append(
                f"  {label:8s} cold loads: {percentiles([s[0] for s in m])}   "
                f"(in server {percentiles([s[3] for s in m])})"
            )
        if phase["name"] == target_phase:
            warm_all += [s[0] for s in hits]
            cold_all += [s[0] for s in misses]
        summary["phases"][phase["name"]] = {
            "requests": len(samples),
            "seconds": result["elapsed"],
            "throughput": len(samples) / result["elapsed"],
            "hit_rate": len(hits) / max(len(ok), 1),
            "warm_p99_ms": p99([s[0] for s in hits]),
            "cold_p99_ms": p99([s[0] for s in misses]),
            "statuses": statuses,
            "distinct_partitions": distinct,
            "evictions": c1["evictions"] - c0["evictions"],
        }
    cap = final_stats["cache"]["max_bytes"]
    peak = max(sampler.peak if sampler else 0, final_stats["process"]["peak_rss_bytes"])
    asked = len({s[5] for _, result, _, _ in results for s in result["samples"]})
    lines += [
        "",
        f"partitions asked for over the run: {asked} of {args.partitions}",
        f"server RSS: idle {idle_rss / mb:.0f} MB, peak {peak / mb:.0f} MB (psutil every 50 ms: "
        f"{sampler.samples if sampler else 0} samples; "
        f"ru_maxrss {final_stats['process']['peak_rss_bytes'] / mb:.0f} MB); "
        f"limit = cache cap + 300 MB = {cap / mb + 300:.0f} MB",
        f"gc: {final_stats.get('gc')}",
    ]
    verdicts = [
        ("warm p99 <= 10 ms", p99(warm_all) <= 10.0),
        ("cold-load p99 <= 100 ms", p99(cold_all) <= 100.0),
        ("peak RSS <= cap + 300 MB", peak <= cap + 300 * mb),
    ]
    lines.append(
        f"targets (phase {target_phase}; peak RSS over the whole run): "
        + ", ".join(f"{name}: {'met' if good else 'MISSED'}" for name, good in verdicts)
        + f" (warm p99 {p99(warm_all):.2f} ms, cold p99 {p99(cold_all):.2f} ms, peak {peak / mb:.0f} MB)"
    )
    print("\n".join(lines))
    summary.update(
        peak_rss_mb=peak / mb,
        cache_cap_mb=cap / mb,
        partitions_asked=asked,
        warm_p99_ms=p99(warm_all),
        cold_p99_ms=p99(cold_all),
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode")
    parser.add_argument("--workdir", help="where to build (reused when the build parameters match)")
    parser.add_argument("--trained", type=int, default=300, help="real models trained through the pipeline")
    parser.add_argument("--partitions", type=int, default=10_000, help="production models served")
    parser.add_argument("--cache-mb", type=int, default=256)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--phases", default="cycle,paced", help="cycle, paced or both (in that order)")
    parser.add_argument("--cycle-sweep", type=float, default=0.5, help="sweep share of the cycle phase")
    parser.add_argument("--cycle-seconds", type=float, default=240.0, help="time bound of the cycle phase")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    loader = sub.add_parser("load", help="the load tool (the benchmark runs it in its own process)")
    for p in (parser, loader):
        p.add_argument("--clients", type=int, default=16)
        p.add_argument("--duration", type=float, default=60.0, help="seconds at most (paced phase)")
        p.add_argument("--max-requests", type=int, default=100_000, help="requests at most (paced phase)")
        p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the access skew")
        p.add_argument("--sweep", type=float, default=0.1, help="share of requests walking every partition")
        p.add_argument("--horizon-share", type=float, default=0.5, help="share of horizon requests")
        p.add_argument(
            "--rate",
            default="50,100",
            help="total requests/s of the paced phase; several "
            "comma-separated rates make one paced phase each",
        )
        p.add_argument("--seed", type=int, default=0)
    loader.add_argument("--port", type=int, required=True)
    loader.add_argument("--targets", required=True)
    loader.add_argument("--out", required=True)
    loader.add_argument("--sweep-start", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "load":
        load(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
