"""How many requests does planning a scoring run make, and how long does it hold the lake's lease?
(issue 20, item 4)

Against a real Blob API (Azurite, started here on 127.0.0.1), through a transport that counts every
request and adds a fixed latency to each (a distant storage account answers in ~10-30 ms, Azurite
in ~1 ms), it builds what a scoring plan meets in Azure: an ingested dataset of N partitions, and
dev and prod Azure ML registries (index and artifacts in the lake) holding one model per partition
plus the run's global model. Then it plans a scoring run in G groups as the Functions activity does
(``pipeline.plan_scoring`` with the writer lease as ``writer``) and prints:

- requests of the whole plan, of the registry slices, and while the lease was held;
- the lease's hold time and the plan's wall time;
- what the per-model slice copy it replaced cost: a download and an upload per model and registry,
  sequential, under the lease (``2 x models x registries`` round trips at the latency).

Target (issue 20): slices in O(groups) requests, the lease held for seconds at reference scale.

    python benchmarks/scoring_plan.py --partitions 10000 --groups 16 --latency 0.02
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Azurite's well-known development account and key (public, documented, valid only against it)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINERS = ("raw", "prepared", "runs", "scoring", "registry")
Request = tuple[float, str, str]  # (monotonic time, method, path?query)


class CountingTransport:
    """azure-core's requests transport, counting every request and delaying each by ``latency`` s."""

    def __init__(self, latency: float = 0.0) -> None:
        from azure.core.pipeline.transport import RequestsTransport

        self.inner = RequestsTransport()
        self.latency = latency
        self.log: list[Request] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "CountingTransport":
        self.inner.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.inner.__exit__(*args)

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def send(self, request: Any, **kwargs: Any) -> Any:
        from urllib.parse import urlsplit

        time.sleep(self.latency)
        url = urlsplit(request.url)
        with self._lock:
            self.log.append((time.monotonic(), request.method, f"{url.path}?{url.query}"))
        return self.inner.send(request, **kwargs)


class AssetPublisher:
    """Azure ML's model-asset edge (management requests that cannot be made offline): names only."""

    def publish(self, batch: Any) -> str:
        return f"manymodels:{batch.version}"


@dataclass
class PlanRun:
    plan: Any
    log: list[Request]  # the plan's requests alone
    ws: Any
    prod: Any
    partitions: list[str]


def plan_over_blob(connection_string: str, workdir: Path, partitions: int, groups: int, latency: float,
                   periods: int = 30) -> PlanRun:
    """Empty the lake's containers, ingest ``partitions`` series, register and promote one model each
    (and a global model) into Azure ML registries in the lake, then plan a scoring run in ``groups``
    groups with the writer lease as the Functions activity holds it; only the plan is delayed."""
    from azure.storage.blob import BlobServiceClient

    from shared.runs import backends, pipeline
    from shared.azureml.blob_lake import BlobLake
    from shared.azureml.registry import AzureMLRegistry
    from shared.models.global_model import GLOBAL_ID
    from shared.settings import Settings
    from shared.data.synthetic import write_panel
    from shared.runs.workspace import Workspace

    transport = CountingTransport()
    lake = BlobLake(BlobServiceClient.from_connection_string(connection_string, transport=transport))
    for name in CONTAINERS:  # the deployment's containers (Bicep makes them), empty
        container = lake.service.get_container_client(name)
        if not container.exists():
            container.create_container()
        for blob in list(container.list_blobs()):
            container.delete_blob(blob.name)
    workdir.mkdir(parents=True, exist_ok=True)
    csv = workdir / "sales.csv"
    write_panel(csv, partitions=partitions, periods=periods, seed=5)
    settings = Settings(workdir=workdir, lake_backend="blob", compute_backend="local", registry_backend="local",
                        lake_connection_string=connection_string)
    overrides = {"runner.progress": False, "runner.rows_per_file": max(12, partitions // groups * 12)}
    ws = Workspace.open(settings=settings, overrides=overrides, remember=False)
    ws.lake = lake
    lake.write_bytes("raw/bench/sales.csv", csv.read_bytes())
    dataset_id = pipeline.ingest(ws, "raw/bench/sales.csv").dataset_id
    pids = [str(p) for p in pipeline._load_dataset(ws, dataset_id).manifest["partition_id"]]
    dev = AzureMLRegistry("dev", lake, workdir / "cache", publisher=AssetPublisher())
    prod = AzureMLRegistry("prod", lake, workdir / "cache", publisher=AssetPublisher())
    trained = dev.register_many([({"partition_id": pid, "run_id": "r" + "1" * 16, "model_type": "ets"},
                                  b"m" * 2_000) for pid in [*pids, GLOBAL_ID]])
    prod.copy_many(dev, trained)
    ws._dev, ws._prod, ws._compute = dev, prod, backends.AzureMLCompute()
    transport.latency = latency
    mark = len(transport.log)
    plan = pipeline.plan_scoring(ws, dataset_id=dataset_id, group_size=1,
                                 writer=lambda: backends.writer_lease(ws, "plan_scoring_run of orchestration bench"))
    return PlanRun(plan, transport.log[mark:], ws, prod, pids)


def under_lease(log: list[Request]) -> tuple[list[Request], float]:
    """The requests made while the writer lease was held (acquire to release), and the hold time."""
    lease = [i for i, (_, _, path) in enumerate(log) if ".manymodels-writer" in path and "comp=lease" in path]
    first, last = lease[0], lease[-1]
    return log[first:last + 1], log[last][0] - log[first][0]


def slice_uploads(log: list[Request]) -> int:
    return sum(1 for _, method, path in log if method == "PUT" and "/registry/g" in path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_azurite(folder: Path) -> tuple[subprocess.Popen, str]:
    executable = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if not executable.exists():
        sys.exit(f"Azurite is not installed ({executable}): run 'npm install' in {ROOT}")
    port = _free_port()
    proc = subprocess.Popen([str(executable), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                             "--skipApiVersionCheck", "--disableTelemetry", "--inMemoryPersistence", "--silent"],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    return proc, f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to every request")
    parser.add_argument("--small", type=int, default=500, help="a smaller panel, to show requests do not grow")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")
    with tempfile.TemporaryDirectory(prefix="mm-bench-plan-") as tmp:
        proc, connection = start_azurite(Path(tmp))
        try:
            print(f"{'partitions':>10} {'groups':>6} {'requests':>8} {'slices':>6} {'leased':>6} "
                  f"{'held s':>7} {'plan s':>7} {'before: leased requests':>24} {'before: held s':>14}")
            for n in (args.small, args.partitions):
                run = plan_over_blob(connection, Path(tmp) / f"wd{n}", n, args.groups, args.latency)
                held, seconds = under_lease(run.log)
                wall = run.log[-1][0] - run.log[0][0]
                before = 2 * (n + 1) * 2  # download + upload of every model and global model, both registries
                print(f"{n:>10} {len(run.plan.groups):>6} {len(run.log):>8} {slice_uploads(run.log):>6} "
                      f"{len(held):>6} {seconds:>7.2f} {wall:>7.2f} {before:>24} {before * args.latency:>14.0f}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print("requests: the plan's; slices: index uploads (one per group and registry); leased: requests while the "
          "lease was held. 'before' is the per-model copy the plan used to make under the lease, at this latency.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
