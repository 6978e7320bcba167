"""Real-time scoring over real HTTP on 127.0.0.1: uvicorn serving a workdir made by the whole pipeline.

Every request goes through a socket; the server's state is read back through ``/stats``.
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from registry_tools import damage_model
import uvicorn

from shared.keys import PARTITION_ID
from shared.lake import read_parquet
from shared.runs.pipeline import run_all
from shared.runs.workspace import Workspace
from shared.registries.registry import ModelRegistry
from shared.forecasts.scoring import score_batch, scoring_requests
from shared.serving import GcKeeper, Predictor, ServingOptions, create_app, open_predictor
from shared.data.synthetic import write_panel
from shared.data.timegrid import from_periods

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"runner.progress": False, "runner.workers": 2, "data.covariates": ["price", "promo"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """uvicorn in a background thread on a free port; stopped (gracefully) on exit."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(predictor), host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats").json()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Workspace, dict]:
    root = tmp_path_factory.mktemp("serving")
    panel = root / "panel.parquet"
    write_panel(panel, partitions=20, periods=156, freq="W", seed=5)
    ws = Workspace.open(root / "work", overrides=OVERRIDES)
    summary = run_all(ws, panel, min_accuracy=0.5, progress=False)
    assert summary["promoted"] >= 8 and summary["fallback_partitions"] >= 1
    return ws, summary


@pytest.fixture(scope="module")
def partitions(workspace) -> dict[str, list]:
    """Production and fallback partitions (ids and key values), each test taking its own."""
    ws, _ = workspace
    prod = sorted(ws.prod.find(latest_only=True), key=lambda r: r.partition_id)
    promoted = {r.partition_id for r in prod}
    fallback = sorted(
        (r for r in ws.dev.find(latest_only=True) if r.partition_id not in promoted),
        key=lambda r: r.partition_id,
    )
    return {
        "prod": [(r.partition_id, r.keys) for r in prod],
        "fallback": [(r.partition_id, r.keys) for r in fallback],
    }


@pytest.fixture(scope="module")
def server(workspace):
    ws, _ = workspace
    options = ServingOptions(cache_mb=64, check_interval_ms=50, max_body_bytes=64 * 1024, max_rows=200)
    with Server(open_predictor(ws, options)) as running:
        yield running


def _post(server: Server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/predict",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
        **kw,
    )


def _future_rows(ws: Workspace, pid: str, n: int, seed: int) -> list[dict]:
    """The next ``n`` periods of a partition, with varied prices, promotions and one unknown price."""
    manifest = read_parquet(ws.lake, f"prepared/{json_latest(ws)}/manifest.parquet").set_index(PARTITION_ID)
    last = int(manifest.loc[pid, "last_period"])
    anchor = json.loads(ws.lake.read_bytes(f"prepared/{json_latest(ws)}/dataset.json"))["anchor"]
    times = from_periods(np.arange(last + 1, last + 1 + n), ws.config.data.freq, anchor)
    rng = np.random.default_rng(seed)
    rows = [
        {
            "date": t.strftime("%Y-%m-%d"),
            "price": round(float(rng.uniform(1, 5)), 2),
            "promo": int(rng.integers(0, 2)),
        }
        for t in times
    ]
    rows[1]["price"] = None  # carried forward, as in a scoring file
    return rows


def json_latest(ws: Workspace) -> str:
    return ws.lake.read_bytes("prepared/LATEST").decode().strip()


def test_row_predictions_equal_batch_scoring_of_the_same_rows(server, workspace, partitions):
    ws, _ = workspace
    chosen = [partitions["prod"][0], partitions["prod"][1], partitions["fallback"][0]]
    bodies = {
        pid: {"keys": keys, "rows": _future_rows(ws, pid, 6, seed=i)} for i, (pid, keys) in enumerate(chosen)
    }
    first, second, fallback = (bodies[pid]["rows"] for pid, _ in chosen)
    first[2]["price"] = str(first[2]["price"])  # a number sent as text, as a CSV scoring file has it
    second.reverse()  # out of order: answered in request order, each period as batch scoring does
    scoring_file = pd.DataFrame([{**body["keys"], **row} for body in bodies.values() for row in body["rows"]])
    batch = score_batch(scoring_requests(scoring_file, ws.config), ws.config, ws.prod, ws.dev)
    for pid, body in bodies.items():
        response = _post(server, body)
        assert response.status_code == 200, response.text
        got = response.json()
        expected = batch[batch[PARTITION_ID] == pid].reset_index(drop=True)
        dates = expected["date"].dt.strftime("%Y-%m-%d")
        by_date = dict(zip(dates, expected["prediction"]))
        bounds = dict(zip(dates, zip(expected["lower"], expected["upper"])))
        assert got[PARTITION_ID] == pid and got["keys"] == body["keys"]
        assert [p["date"] for p in got["predictions"]] == [r["date"] for r in body["rows"]]
        assert [p["prediction"] for p in got["predictions"]] == [by_date[r["date"]] for r in body["rows"]]
        assert [(p["lower"], p["upper"]) for p in got["predictions"]] == [bounds[r["date"]] for r in body["rows"]]
        assert got["source"] == expected["source"][0]
        assert (got["model"], got["model_version"], got["run_id"], got["is_fallback"]) == (
            expected["model"][0],
            int(expected["model_version"][0]),
            expected["run_id"][0],
            int(expected["is_fallback"][0]),
        )
    assert _post(server, bodies[chosen[2][0]]).json()["source"] in ("unpromoted", "global", "baseline")


def test_horizon_predictions_equal_the_batch_predictions_table(server, workspace, partitions):
    ws, summary = workspace
    table = read_parquet(ws.lake, f"predictions/{summary['score_id']}/predictions.parquet")
    for pid, keys in [partitions["prod"][2], partitions["fallback"][-1]]:
        first = _post(server, {"keys": keys})  # no rows, no horizon: the trained horizon, as batch
        again = _post(server, {"keys": keys, "horizon": ws.config.forecast.horizon})
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        expected = table[table[PARTITION_ID] == pid].sort_values("date")
        got = first.json()["predictions"]
        assert [p["prediction"] for p in got] == expected["prediction"].tolist()
        assert [p["date"] for p in got] == expected["date"].dt.strftime("%Y-%m-%d").tolist()
        assert [p["lower"] for p in got] == expected["lower"].tolist()
        assert [p["upper"] for p in got] == expected["upper"].tolist()
        assert first.json()["is_fallback"] == int(expected["is_fallback"].iloc[0])
        assert first.json()["source"] == expected["source"].iloc[0]
    short = _post(server, {"keys": partitions["prod"][2][1], "horizon": 3}).json()["predictions"]
    assert len(short) == 3


def test_a_hit_and_a_miss_are_told_apart_by_a_header(server, partitions):
    pid, keys = partitions["prod"][3]
    first, second = _post(server, {"keys": keys, "horizon": 2}), _post(server, {"keys": keys, "horizon": 2})
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.headers["x-model-version"] == str(first.json()["model_version"])


def test_an_unknown_partition_is_404_naming_it(server):
    response = _post(server, {"keys": {"store": "S999", "item": "I9999"}, "horizon": 2})
    assert response.status_code == 404
    body = response.json()
    assert "store=S999, item=I9999" in body["error"]
    assert body["partition"]["keys"] == {"store": "S999", "item": "I9999"}


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        ({"keys": {"store": "S001"}}, "keys.item"),
        ({"keys": {"store": "S001", "item": "I0001", "shelf": 3}}, "keys.shelf"),
        ({"keys": {"store": "S001", "item": "I0001"}, "horizon": 0}, "horizon"),
        ({"keys": {"store": "S001", "item": "I0001"}, "horizon": "4"}, "horizon"),
        ({"keys": {"store": "S001", "item": "I0001"}, "rows": []}, "rows"),
        (
            {
                "keys": {"store": "S001", "item": "I0001"},
                "rows": [{"date": "2030-01-06", "price": 2}, {"date": "2030-01-13", "price": "cheap"}],
            },
            "rows[1].price",
        ),
        ({"keys": {"store": "S001", "item": "I0001"}, "rows": [{"date": "next week"}]}, "rows[0].date"),
        (
            {"keys": {"store": "S001", "item": "I0001"}, "rows": [{"date": "2030-01-06", "prise": 2}]},
            "rows[0].prise",
        ),
        ({"keys": {"store": "S001", "item": "I0001"}, "row": []}, "row"),
    ],
)
def test_malformed_json_and_bad_fields_are_400_naming_the_field(server, body, field):
    response = _post(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field


def test_rows_before_the_end_of_training_are_400_naming_the_row(server, workspace, partitions):
    ws, _ = workspace
    pid, keys = partitions["prod"][4]
    rows = _future_rows(ws, pid, 2, seed=9)
    rows.append({"date": "2020-01-05", "price": 2.0, "promo": 0})
    response = _post(server, {"keys": keys, "rows": rows})
    assert response.status_code == 400
    assert response.json()["field"] == "rows[2].date" and "last trained period" in response.json()["error"]


def test_a_request_too_large_is_413(server, partitions):
    _, keys = partitions["prod"][0]
    big = json.dumps({"keys": keys, "rows": [{"date": "2030-01-06", "price": 1.0, "promo": 0}] * 3000})
    response = _post(server, big)
    assert response.status_code == 413 and response.json()["limit"] == 64 * 1024
    rows = [{"date": str(d.date()), "price": 1.0} for d in pd.date_range("2030-01-06", periods=201, freq="W")]
    response = _post(server, {"keys": keys, "rows": rows})
    assert response.status_code == 413 and response.json()["field"] == "rows"


def test_a_corrupted_artifact_is_503_with_the_reason_and_other_partitions_still_answer(
    server, workspace, partitions
):
    ws, _ = workspace
    pid, keys = partitions["prod"][5]
    path = ws.prod.artifact_path(ws.prod.latest(pid))
    good = path.read_bytes()
    damage_model(ws.prod, ws.prod.latest(pid), b"\x80\x05garbage")  # its bytes in the pack, its neighbours intact
    try:
        for _ in range(2):  # not cached: the second request tries again and fails the same way
            response = _post(server, {"keys": keys, "horizon": 2})
            assert response.status_code == 503
            body = response.json()
            # the registry checks the artifact's SHA-256 before unpickling it (issue 12)
            assert "ArtifactIntegrityError" in body["reason"] and "failed to load" in body["error"]
            assert body["partition"][PARTITION_ID] == pid and response.headers["retry-after"]
        assert _post(server, {"keys": partitions["prod"][6][1], "horizon": 2}).status_code == 200
        failures = server.stats()["cache"]["load_failures"]
        assert failures >= 2
    finally:
        path.unlink()
        path.write_bytes(good)
    assert _post(server, {"keys": keys, "horizon": 2}).status_code == 200


class GatedRegistry(ModelRegistry):
    """The production registry, with loads held until the test lets them go."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, name)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def load(self, record):
        if record.partition_id == "_global":  # the run's shared global model, loaded once per process
            return super().load(record)
        self.calls += 1
        self.entered.set()
        assert self.release.wait(20)
        return super().load(record)


def test_many_concurrent_first_requests_load_the_model_once(workspace, partitions):
    ws, _ = workspace
    prod = GatedRegistry(ws.prod.root, "prod")
    cache = ServingOptions(check_interval_ms=50).make_cache(prod, ws.dev, "baseline")
    _, keys = partitions["prod"][7]
    with Server(Predictor(ws.config, cache)) as running, ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_post, running, {"keys": keys, "horizon": 4}) for _ in range(16)]
        assert prod.entered.wait(20)
        time.sleep(0.5)  # all 16 requests reach the server while the load is held
        prod.release.set()
        responses = [f.result() for f in futures]
        stats = running.stats()["cache"]
    assert prod.calls == 1 and stats["loads"] == 1
    assert all(r.status_code == 200 and r.headers["x-cache"] == "miss" for r in responses)
    assert len({r.text for r in responses}) == 1
    assert stats["misses"] == 16


def test_models_are_evicted_under_the_byte_cap(workspace, partitions):
    ws, _ = workspace
    options = ServingOptions(cache_mb=0.1, check_interval_ms=50)
    with Server(open_predictor(ws, options)) as running:
        for _, keys in partitions["prod"]:
            assert _post(running, {"keys": keys, "horizon": 2}).status_code == 200
        stats = running.stats()["cache"]
        assert stats["max_bytes"] == int(0.1 * 2**20)
        assert stats["evictions"] > 0 and stats["bytes_held"] <= stats["max_bytes"]
        assert stats["entries"] < len(partitions["prod"])
        first = _post(running, {"keys": partitions["prod"][0][1], "horizon": 2})
        assert first.headers["x-cache"] == "miss"  # it was evicted: loaded again


def test_a_newly_promoted_version_is_served_without_a_restart(server, workspace, partitions):
    ws, _ = workspace
    pid, keys = partitions["prod"][8]
    before = _post(server, {"keys": keys, "horizon": 2}).json()
    dev_record = ws.dev.latest(pid)
    ws.prod.register_many(
        [
            (
                {
                    "partition_id": pid,
                    "run_id": "r-retrained",
                    "model_name": dev_record.model_type,
                    "keys": keys,
                },
                ws.dev.raw_bytes(dev_record),
            )
        ]
    )
    deadline = time.monotonic() + 10
    while True:
        after = _post(server, {"keys": keys, "horizon": 2})
        if after.json()["model_version"] == before["model_version"] + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after.json()["model_version"] == before["model_version"] + 1
    assert after.json()["run_id"] == "r-retrained" and after.headers["x-cache"] == "miss"
    assert server.stats()["cache"]["index_changes"] >= 1


def test_health_and_stats(server, partitions):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{server.url}/api/health").status_code == 200
    _post(server, {"keys": partitions["prod"][0][1], "horizon": 2})
    stats = server.stats()
    assert {
        "hits",
        "misses",
        "loads",
        "load_failures",
        "evictions",
        "load_seconds_total",
        "load_seconds_max",
        "bytes_held",
        "entries",
    } <= set(stats["cache"])
    assert stats["requests"]["200"] >= 1
    assert stats["process"]["peak_rss_bytes"] >= stats["process"]["rss_bytes"] > 0


def test_the_serve_command_answers_over_http(workspace, partitions):
    ws, _ = workspace
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "serve",
            "--workdir",
            str(ws.root),
            "--port",
            str(port),
            "--cache-mb",
            "32",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "manymodels serve did not come up"
            time.sleep(0.1)
        response = httpx.post(
            f"http://127.0.0.1:{port}/predict", json={"keys": partitions["prod"][0][1], "horizon": 2}
        )
        assert response.status_code == 200 and len(response.json()["predictions"]) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/stats").json()["cache"]["max_bytes"] == 32 * 2**20
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode in (0, -15), output  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert "Finished server process" in output


def test_serve_refuses_a_workdir_without_models(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "serve",
            "--workdir",
            str(tmp_path),
            "--port",
            str(_free_port()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "no production registry" in result.stderr


def test_options_come_from_the_environment_and_bad_values_name_the_variable():
    options = ServingOptions.from_env({"MM_SERVING_CACHE_MB": "64", "MM_SERVING_MAX_ROWS": "10"}, cache_mb=None)
    assert (options.cache_mb, options.max_rows, options.check_interval_ms) == (64.0, 10, 1000.0)
    assert ServingOptions.from_env({"MM_SERVING_CACHE_MB": "64"}, cache_mb=32).cache_mb == 32
    with pytest.raises(ValueError, match="MM_SERVING_MAX_ROWS"):
        ServingOptions.from_env({"MM_SERVING_MAX_ROWS": "ten"})


def test_the_gc_keeper_freezes_after_loads_and_collects_fully_on_schedule(workspace, partitions):
    ws, _ = workspace
    predictor = open_predictor(ws, ServingOptions())
    keeper = GcKeeper(predictor, full_every=600.0)
    start = time.monotonic()
    try:
        keeper.tick(start + 1)
        keeper.tick(start + 2)  # no load since: nothing new to freeze
        assert keeper.freezes == 1 and gc.get_freeze_count() > 0
        predictor.cache.get(partitions["prod"][0][0])
        keeper.tick(start + 3)
        assert keeper.freezes == 2
        keeper.tick(start + 601)
        assert keeper.full_collections == 1 and keeper.stats()["last_full_ms"] > 0
    finally:
        gc.unfreeze()
        predictor.close()


def test_the_core_answers_without_any_http_framework(workspace, partitions):
    ws, _ = workspace
    predictor = open_predictor(ws, ServingOptions(check_interval_ms=0))
    try:
        pid, keys = partitions["prod"][9]
        ok = predictor.handle({"keys": keys, "horizon": 3})
        assert ok.status == 200 and ok.headers["X-Cache"] == "miss" and len(ok.body["predictions"]) == 3
        by_id = predictor.handle(json.dumps({"partition_id": pid, "horizon": 3}))
        assert by_id.headers["X-Cache"] == "hit" and by_id.body["keys"] == keys
        assert by_id.body["predictions"] == ok.body["predictions"]
        assert predictor.handle({"partition_id": "p123"}).body["field"] == "partition_id"
        assert predictor.handle({"keys": {"store": "S0", "item": "I0"}}).status == 404
        assert predictor.stats()["requests"] == {"200": 2, "400": 1, "404": 1}
    finally:
        predictor.close()


# -- issue 12: bounded work per request, client errors are 4xx, no server paths -----------------------
def test_a_row_far_beyond_the_end_of_training_is_400_naming_the_row(server, workspace, partitions):
    ws, _ = workspace
    pid, keys = partitions["prod"][2]
    rows = _future_rows(ws, pid, 2, seed=3)
    started = time.monotonic()
    for far in ("2261-12-25", "9999-12-31"):
        response = _post(server, {"keys": keys, "rows": [*rows, {"date": far, "price": 1.0, "promo": 0}]})
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "rows[2].date"
    assert "periods ahead" in _post(server, {"keys": keys, "rows": [{"date": "2261-12-25"}]}).json()["error"]
    assert time.monotonic() - started < 5
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("make_body, field", [
    (lambda keys: b'{"keys": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "body"),
    (lambda keys: {"keys": keys, "rows": [{"date": "2026-01-04", "price": 1e308, "promo": 1e308}]}, None),
    (lambda keys: {"keys": keys, "rows": [{"date": "2026-01-04", "price": -1e308, "promo": 0}]}, None),
    (lambda keys: {"keys": keys, "rows": [{"date": "2026-01-04", "price": "1e400", "promo": 0}]}, None),
])
def test_hostile_bodies_are_4xx_never_500(server, partitions, make_body, field):
    for _, keys in partitions["prod"][:3] + partitions["fallback"][:2]:
        response = _post(server, make_body(keys))
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400 and field:
            assert response.json()["field"] == field
        if response.status_code == 200:
            assert all(np.isfinite(p["prediction"]) for p in response.json()["predictions"])


def test_error_bodies_show_no_server_paths(workspace, partitions):
    ws, _ = workspace
    pid, keys = partitions["prod"][7]
    predictor = open_predictor(ws, ServingOptions(check_interval_ms=0))
    path = ws.prod.artifact_path(ws.prod.latest(pid))
    good = path.read_bytes()
    path.unlink()
    try:  # a missing artifact: the registry's error quotes its absolute path, the answer does not
        response = predictor.handle({"keys": keys, "horizon": 2})
    finally:
        path.write_bytes(good)
        predictor.close()
    assert response.status == 503 and "missing" in response.body["error"]
    assert str(ws.root) not in response.json_bytes().decode() and "/tmp" not in response.json_bytes().decode()


def _start_serve(ws: Workspace, env: dict) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "serve", "--workdir", str(ws.root), "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**__import__("os").environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "manymodels serve did not come up"
        time.sleep(0.1)


def test_a_slow_request_never_blocks_health_and_sigterm_stops_serve_mid_request(workspace, partitions):
    """The frozen-server attack (issue 12, case 3) on a real `manymodels serve` process: each forecast
    takes 30 s (an injected fault at the forecast), the budget is 1 s."""
    ws, _ = workspace
    pid, keys = partitions["prod"][3]
    far_rows = _future_rows(ws, pid, 100, seed=4)  # 100 periods ahead: forecast on a thread
    proc, url = _start_serve(ws, {"MM_FAULT": "serve.forecast:sleep:30", "MM_SERVING_REQUEST_SECONDS": "1"})
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(httpx.post, f"{url}/predict", json={"keys": keys, "rows": far_rows}, timeout=30)
            time.sleep(0.3)
            started = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
            answered = slow.result()
        assert answered.status_code == 503 and "time budget" in answered.json()["error"]
        assert answered.headers["retry-after"]
        # another slow request in flight, then SIGTERM: the server is gone within seconds
        stuck = ThreadPoolExecutor(1)
        stuck.submit(httpx.post, f"{url}/predict", json={"keys": keys, "rows": far_rows}, timeout=30)
        time.sleep(0.3)
        proc.terminate()
        started = time.monotonic()
        proc.wait(timeout=8)
        assert time.monotonic() - started < 5
        stuck.shutdown(wait=False)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0]
    assert proc.returncode in (0, -15), output


# -- request rows with UTC offsets follow the ingest rule (issue 18) -------------------------------


@pytest.mark.parametrize("freq, times, answered", [
    # daily: the local date as written, across Berlin's change to summer time
    ("D", ["2024-03-30T00:00:00+01:00", "2024-03-31T00:00:00+01:00", "2024-04-01T00:00:00+02:00"],
     ["2024-03-30", "2024-03-31", "2024-04-01"]),
    # hourly: the instants in UTC, so New York's repeated autumn hour is two hours, not one
    ("h", ["2024-11-03T01:00:00-04:00", "2024-11-03T01:00:00-05:00", "2024-11-03T02:00:00-05:00"],
     ["2024-11-03T05:00:00", "2024-11-03T06:00:00", "2024-11-03T07:00:00"]),
    ("h", ["2024-03-10T03:00:00-04:00"], ["2024-03-10T07:00:00"]),
], ids=["daily-berlin", "hourly-autumn", "hourly-one-offset"])
def test_request_rows_with_offsets_mean_what_the_same_rows_mean_in_a_csv(tmp_path, freq, times, answered):
    from shared.config import ProjectConfig
    from shared.data.ingest import read_source
    from shared.serving.request import RequestParser
    from shared.data.timegrid import PERIOD
    from shared.data.validation import validate

    cfg = ProjectConfig().with_overrides({"data.freq": freq, "data.covariates": []})
    parsed = RequestParser(cfg).parse({"keys": {"store": "S1", "item": "I1"},
                                       "rows": [{"date": t} for t in times]})
    assert parsed.rows.times == answered
    frame = pd.DataFrame({"store": "S1", "item": "I1", "date": times, "sales": 1.0})
    frame.to_csv(tmp_path / "rows.csv", index=False)
    ingested, _ = validate(read_source(tmp_path / "rows.csv", cfg), cfg)
    assert parsed.rows.periods.tolist() == ingested[PERIOD].tolist()
    scored = scoring_requests(frame.drop(columns="sales"), cfg)  # the rows of `score --data`
    assert scored[PERIOD].tolist() == ingested[PERIOD].tolist()


# -- issue 18: the server's own limits, a read-only workdir, its settings, its log, invalid strings ---
CAPS_THAT_BYPASS_PERMISSIONS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
LIMITS = {"MM_SERVING_MAX_CONNECTIONS": "40", "MM_SERVING_READ_SECONDS": "2",
          "MM_SERVING_KEEP_ALIVE_SECONDS": "1", "MM_SERVING_CACHE_MB": "48"}


def _drop_permission_caps() -> None:
    """preexec_fn: the child (still root) loses the capabilities that ignore permission bits, so a
    folder without write permission is read-only to it, as it is to an unprivileged server account."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in CAPS_THAT_BYPASS_PERMISSIONS:
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the child after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _serve_logged(workdir: Path, env: dict, log: Path, preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """`manymodels serve` with its output in a file (read by the tests); returns once /health answers."""
    import os

    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "serve", "--workdir", str(workdir), "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, preexec_fn=preexec_fn,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "manymodels serve did not come up: " + log.read_text()
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def limited(workspace, tmp_path_factory):
    """A real `manymodels serve` with small connection limits, its settings from the environment."""
    ws, _ = workspace
    log = tmp_path_factory.mktemp("limited") / "serve.log"
    proc, url = _serve_logged(ws.root, LIMITS, log)
    try:
        yield proc, url, log
    finally:
        _stop(proc)


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed (or answered and closed) this connection, without waiting."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_slow_connections_beyond_the_cap_are_closed_and_health_still_answers(limited):
    """The trickling-connections attack (issue 18, item 9) at a bounded scale: three times
    MM_SERVING_MAX_CONNECTIONS connections that never finish their headers. The server holds at most
    the cap (the oldest idle ones are closed as new ones arrive), /health still answers at once, and
    every trickler is gone after MM_SERVING_READ_SECONDS although it keeps sending bytes."""
    _, url, _ = limited
    port = int(url.rsplit(":", 1)[1])
    cap, count = int(LIMITS["MM_SERVING_MAX_CONNECTIONS"]), 3 * int(LIMITS["MM_SERVING_MAX_CONNECTIONS"])
    socks: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: attacker\r\n")  # the headers never end
            socks.append(sock)
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 200 and time.monotonic() - started < 1.0
        time.sleep(0.3)
        assert sum(_closed_by_server(s) for s in socks) >= count - cap
        time.sleep(0.5)
        for sock in socks:  # trickle: one more header line each, which must not buy more time
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                continue
        deadline = opened + float(LIMITS["MM_SERVING_READ_SECONDS"]) + 3.0
        while not all(_closed_by_server(s) for s in socks):
            assert time.monotonic() < deadline, "slow connections outlived MM_SERVING_READ_SECONDS"
            time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_idle_and_silent_connections_are_closed_after_their_configured_times(limited):
    _, url, _ = limited
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: client\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        idle = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server: the keep-alive ran out
        waited = time.monotonic() - idle
    assert 0.5 < waited < float(LIMITS["MM_SERVING_KEEP_ALIVE_SECONDS"]) + 1.5, waited
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # never sends a byte
        opened = time.monotonic()
        assert sock.recv(65536) == b""
        waited = time.monotonic() - opened
    assert waited < float(LIMITS["MM_SERVING_READ_SECONDS"]) + 1.5, waited


def test_a_body_that_trickles_past_the_read_time_is_408_and_the_connection_closed(limited):
    _, url, _ = limited
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{")
        started, answer = time.monotonic(), b""
        for _ in range(6):  # a byte every 0.5 s: never the whole body
            time.sleep(0.5)
            try:
                sock.sendall(b" ")
            except OSError:
                break
        while chunk := sock.recv(65536):
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"MM_SERVING_READ_SECONDS" in answer and waited < float(LIMITS["MM_SERVING_READ_SECONDS"]) + 2.5


def test_serve_takes_the_cache_size_from_the_environment_unless_the_flag_is_given(limited):
    _, url, _ = limited
    assert httpx.get(f"{url}/stats").json()["cache"]["max_bytes"] == 48 * 2**20  # MM_SERVING_CACHE_MB
    # (the flag given wins over the variable: test_the_serve_command_answers_over_http passes --cache-mb 32)


def test_a_client_that_disconnects_mid_body_costs_one_log_line(limited):
    _, url, log = limited
    port = int(url.rsplit(":", 1)[1])
    before = log.read_text()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n" + b'{"keys": ' * 10)
            time.sleep(0.2)
    time.sleep(0.5)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    added = log.read_text()[len(before):].splitlines()
    assert "Traceback" not in "\n".join(added), "\n".join(added)
    assert len([line for line in added if "disconnected" in line]) == 3, added
    assert len([line for line in added if "connections:" not in line]) == 3, added  # (the limits' summary)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_serve_runs_on_a_read_only_workdir_and_picks_up_new_versions(workspace, partitions, tmp_path):
    """The recommended server setup: the workdir readable, not writable, by the server's account.
    Root ignores permission bits, so the server runs without the capabilities that let it."""
    import shutil
    import sqlite3

    ws, _ = workspace
    copy = tmp_path / "ro-work"
    shutil.copytree(ws.root, copy, ignore=shutil.ignore_patterns(".manymodels.lock"))
    for name in ("dev", "prod"):  # a finished pipeline: the WAL checkpointed, no -wal / -shm beside
        conn = sqlite3.connect(copy / "registry" / name / "index.sqlite")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    assert not list(copy.rglob("*.sqlite-shm")) and not list(copy.rglob("*.sqlite-wal"))
    subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(copy / 'probe')!r}, 'w')"],
                               preexec_fn=_drop_permission_caps, capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr  # the workdir is read-only to it
        before = _files(copy)
        proc, url = _serve_logged(copy, {"MM_SERVING_CHECK_MS": "50"}, tmp_path / "serve.log",
                                  preexec_fn=_drop_permission_caps)
        try:
            pid, keys = partitions["prod"][10]
            first = httpx.post(f"{url}/predict", json={"keys": keys, "horizon": 2}, timeout=30)
            assert first.status_code == 200, first.text
            fallback = httpx.post(f"{url}/predict", json={"keys": partitions["fallback"][0][1], "horizon": 2},
                                  timeout=30)  # the dev registry too (the scoring chain)
            assert fallback.status_code == 200, fallback.text
            assert httpx.get(f"{url}/stats", timeout=5).status_code == 200
            assert _files(copy) == before  # nothing written, nothing created
            # the pipeline's account (here: full root) promotes a new version; the server notices it
            prod = ModelRegistry(copy / "registry" / "prod", "prod")
            record = ws.dev.latest(pid)
            prod.register_many([({"partition_id": pid, "run_id": "r-readonly", "model_name": record.model_type,
                                  "keys": keys}, ws.dev.raw_bytes(record))])
            prod.close()
            deadline = time.monotonic() + 15
            while True:
                after = httpx.post(f"{url}/predict", json={"keys": keys, "horizon": 2}, timeout=30)
                assert after.status_code == 200, after.text
                if after.json()["run_id"] == "r-readonly":
                    break
                assert time.monotonic() < deadline, "the read-only server never saw the new version"
                time.sleep(0.1)
            assert after.json()["model_version"] == first.json()["model_version"] + 1
        finally:
            _stop(proc)
        output = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in output, output
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)


@pytest.mark.parametrize("raw, field", [
    (b'{"keys": {"store": "\\ud800", "item": "I0001"}, "horizon": 2}', "keys.store"),
    (b'{"keys": {"store": "S001", "item": "I0001\\udfff"}}', "keys.item"),
    (b'{"keys": {"store": "S001", "item": "I0001", "\\ud800": 1}}', "keys"),
    (b'{"keys": {"store": "S001", "item": "I0001"}, "rows": [{"date": "\\ud800", "price": 1}]}',
     "rows[0].date"),
    (b'{"keys": {"store": "S001", "item": "I0001"}, "rows": [{"date": "2030-01-06", "price": "\\ud83d"}]}',
     "rows[0].price"),
    (b'{"partition_id": "p\\udc00"}', "partition_id"),
])
def test_a_lone_surrogate_in_any_string_is_400_naming_the_field(server, raw, field):
    response = _post(server, raw)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field and "surrogate" in response.json()["error"]


def test_a_valid_surrogate_pair_is_just_a_character(server):
    response = _post(server, b'{"keys": {"store": "S\\ud83d\\ude00", "item": "I0001"}, "horizon": 2}')
    assert response.status_code == 404 and "S\U0001F600" in response.json()["error"]


@pytest.mark.parametrize("covariate, value", [("price", 1e308), ("price", -1e300), ("promo", 1e308),
                                              ("price", "1e300")])
def test_a_covariate_beyond_the_magnitude_bound_is_400_naming_the_field(server, workspace, partitions,
                                                                        covariate, value):
    ws, _ = workspace
    pid, keys = partitions["prod"][11]
    rows = _future_rows(ws, pid, 2, seed=11)
    rows[1][covariate] = value
    response = _post(server, {"keys": keys, "rows": rows})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == f"rows[1].{covariate}" and "magnitude" in response.json()["error"]
    rows[1][covariate] = 1
    assert _post(server, {"keys": keys, "rows": rows}).status_code == 200
