"""The online endpoint's scoring script: init() loads nothing but the index, run() loads on demand.

The production registry folder is laid out in a local lake exactly as in blob storage
(``registry/prod/`` with ``HEAD``, ``index.sqlite`` and the artifacts), and the script is driven
through its Azure ML contract: environment variables, ``init()``, ``run(raw_json)``.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pandas as pd
import pytest

from shared.azureml import online_score
from shared.lake import read_parquet
from shared.runs.pipeline import Workspace, ingest, promote, score, train
from shared.data.synthetic import write_panel

pytestmark = pytest.mark.slow

OVERRIDES = {"runner.progress": False, "runner.rows_per_file": 400, "runner.workers": 2,
             "data.covariates": ["price", "promo"]}  # requests below carry them


def _scored_workspace(tmp_path_factory, partitions: int, seed: int, min_accuracy: float):
    """A workspace through ingest, train, promote (at ``min_accuracy``) and batch scoring."""
    data = tmp_path_factory.mktemp("data") / "sales.parquet"
    write_panel(data, partitions=partitions, periods=104, freq="W", seed=seed)
    ws = Workspace.open(tmp_path_factory.mktemp("ws"), overrides=OVERRIDES)
    ingest(ws, data)
    plan, _, _ = train(ws)
    promote(ws, plan.run_id, min_accuracy=min_accuracy)
    scoring, _ = score(ws)
    return ws, read_parquet(ws.lake, f"predictions/{scoring.score_id}/predictions.parquet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _scored_workspace(tmp_path_factory, partitions=8, seed=21, min_accuracy=0.0)


@pytest.fixture
def serving(trained, tmp_path, monkeypatch):
    ws, _ = trained
    lake_root = tmp_path / "storage"
    _publish(ws.prod.root, lake_root, head="v1")
    monkeypatch.setenv("MM_SERVING_LAKE_DIR", str(lake_root))
    monkeypatch.setenv("MM_SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MM_SERVING_CONFIG", json.dumps(ws.config.to_dict()))
    monkeypatch.setenv("MM_SERVING_CACHE_MODELS", "3")
    monkeypatch.setenv("MM_SERVING_REFRESH_SECONDS", "0")
    monkeypatch.delenv("MM_SERVING_STORAGE_URL", raising=False)
    online_score.init()
    yield lake_root
    monkeypatch.setattr(online_score, "_predictor", None)


def _publish(registry_root: Path, lake_root: Path, head: str, name: str = "prod") -> None:
    """A registry folder as the pipeline leaves it in storage: artifacts, a single-file snapshot
    of the index (WAL included), HEAD last."""
    target = lake_root / "registry" / name
    target.mkdir(parents=True, exist_ok=True)
    if (registry_root / "artifacts").is_dir():
        shutil.copytree(registry_root / "artifacts", target / "artifacts", dirs_exist_ok=True)
    source, copy = sqlite3.connect(registry_root / "index.sqlite"), sqlite3.connect(target / "index.sqlite")
    source.backup(copy)
    copy.close()
    source.close()
    (target / "HEAD").write_text(head)


def _request(**body) -> str:
    return json.dumps(body)


def test_init_reads_the_index_and_loads_no_model(serving, tmp_path):
    stats = online_score.cache_stats()
    assert stats["models"] == 0 and stats["loads"] == 0
    artifacts = list((tmp_path / "cache").rglob("*.pkl"))
    assert artifacts == [], "no artifact is even downloaded at start-up"


def test_a_request_gets_the_batch_scoring_forecast_of_its_partition(serving, trained):
    ws, predictions = trained
    row = predictions[predictions["is_fallback"] == 0].iloc[0]
    answer = online_score.run(_request(keys={"store": row["store"], "item": row["item"]}))
    assert answer.get("partition_id") == row["partition_id"], answer
    assert answer["model_version"] == row["model_version"] and answer["model"] == row["model"]
    batch = predictions[predictions["partition_id"] == row["partition_id"]].sort_values("date")
    assert [p["date"] for p in answer["predictions"]] == batch["date"].dt.strftime("%Y-%m-%d").tolist()
    assert [p["prediction"] for p in answer["predictions"]] == pytest.approx(batch["prediction"].tolist())

    rows = [{"date": d, "price": 2.5, "promo": 0} for d in batch["date"].dt.strftime("%Y-%m-%d").tolist()[:3]]
    by_rows = online_score.run(_request(partition_id=row["partition_id"], rows=rows))
    assert len(by_rows["predictions"]) == 3
    assert len(online_score.run(_request(partition_id=row["partition_id"], horizon=2))["predictions"]) == 2


@pytest.fixture(scope="module")
def unpromoted(tmp_path_factory):
    """A run nothing of which was promoted, batch-scored along the scoring chain (nobody forecasts
    perfectly: production stays empty)."""
    return _scored_workspace(tmp_path_factory, partitions=6, seed=23, min_accuracy=1.0)


def test_partitions_without_a_production_model_get_the_batch_chain_answer_sources_and_intervals(
        unpromoted, tmp_path, monkeypatch):
    ws, predictions = unpromoted
    assert not (predictions["source"] == "production").any()
    lake_root = tmp_path / "storage"
    _publish(ws.prod.root, lake_root, head="p1")
    _publish(ws.dev.root, lake_root, head="d1", name="dev")
    monkeypatch.setenv("MM_SERVING_LAKE_DIR", str(lake_root))
    monkeypatch.setenv("MM_SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MM_SERVING_CONFIG", json.dumps(ws.config.to_dict()))
    monkeypatch.setenv("MM_SERVING_REFRESH_SECONDS", "0")
    monkeypatch.delenv("MM_SERVING_STORAGE_URL", raising=False)
    online_score.init()
    try:
        for pid, batch in predictions.groupby("partition_id"):
            batch = batch.sort_values("date")
            first = batch.iloc[0]
            answer = online_score.run(_request(keys={"store": first["store"], "item": first["item"]}))
            assert answer["source"] == first["source"], (pid, answer)
            got = answer["predictions"]
            assert [p["prediction"] for p in got] == pytest.approx(batch["prediction"].tolist())
            assert [p["lower"] for p in got] == pytest.approx(batch["lower"].tolist())
            assert [p["upper"] for p in got] == pytest.approx(batch["upper"].tolist())
        assert set(predictions["source"]) & {"unpromoted", "global"}, "the chain went past the baseline"
    finally:
        monkeypatch.setattr(online_score, "_predictor", None)


def test_errors_are_answered_with_their_status_and_the_field(serving, trained):
    _, predictions = trained
    pid = predictions["partition_id"].iloc[0]
    assert online_score.run("{not json")["status"] == 400
    assert online_score.run(_request(keys={"store": "s1"}))["field"] == "keys.item"
    missing = online_score.run(_request(keys={"store": "nowhere", "item": "nothing"}))
    assert missing["status"] == 404 and "no model for partition" in missing["error"]
    assert online_score.run(_request(partition_id=pid, horizon=0))["status"] == 400
    both = online_score.run(_request(partition_id=pid, horizon=2, rows=[{"date": "2030-01-01"}]))
    assert both["status"] == 400 and "not both" in both["error"]
    assert online_score.run(_request(partition={"store": "s1", "item": "i1"}))["field"] == "partition", \
        "one contract for every front end: 'keys', not the endpoint's old 'partition'"


def test_models_load_on_demand_once_and_the_cache_stays_bounded(serving, trained):
    _, predictions = trained
    pids = list(dict.fromkeys(predictions.loc[predictions["is_fallback"] == 0, "partition_id"]))[:5]
    assert len(pids) == 5
    first = _request(partition_id=pids[0])
    threads = [threading.Thread(target=online_score.run, args=(first,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert online_score.cache_stats()["loads"] == 1, "concurrent first requests load the model once"
    for pid in pids:
        online_score.run(_request(partition_id=pid))
    stats = online_score.cache_stats()
    assert stats["loads"] == 5 and stats["models"] == 3 and stats["evictions"] == 2
    assert (stats["hits"], stats["misses"]) == (8, 5), "7 waiting first requests + 1 repeat hit"


def test_a_newly_promoted_version_is_picked_up_through_head(serving, trained, tmp_path):
    ws, predictions = trained
    pid = predictions.loc[predictions["is_fallback"] == 0, "partition_id"].iloc[0]
    before = online_score.run(_request(partition_id=pid))["model_version"]
    record = ws.prod.latest(pid)
    staging = tmp_path / "next-prod"
    _publish(ws.prod.root, staging, head="unused")
    staging = staging / "registry" / "prod"
    from shared.registries.registry import ModelRegistry

    nxt = ModelRegistry(staging, "prod")
    row = record.to_row()
    row.update(run_id="r-next", tags={**record.tags, "run_id": "r-next"})
    nxt.register_many([(row, nxt.raw_bytes(record))])
    nxt.close()
    _publish(staging, serving, head="v2")
    after = online_score.run(_request(partition_id=pid))
    assert after["model_version"] == before + 1 and after["run_id"] == "r-next"
    assert isinstance(pd.Timestamp(after["predictions"][0]["date"]), pd.Timestamp)


# -- under the real inference server (azureml-inference-server-http), over HTTP on 127.0.0.1 ------------
@pytest.fixture(scope="module")
def inference_server(trained, tmp_path_factory):
    """``azmlinfsrv`` serving this scoring script, as a managed online endpoint's container runs it."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    from azureml_tools import APP_ROOT, azmlinfsrv

    server = azmlinfsrv()
    ws, _ = trained
    root = tmp_path_factory.mktemp("endpoint")
    _publish(ws.prod.root, root / "storage", head="v1")
    _publish(ws.dev.root, root / "storage", head="d1", name="dev")  # the scoring chain's fallbacks
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_", "PYTHON"))}
    env.update(MM_SERVING_LAKE_DIR=str(root / "storage"), MM_SERVING_CACHE_DIR=str(root / "cache"),
               MM_SERVING_CONFIG=json.dumps(ws.config.to_dict()), MM_SERVING_REFRESH_SECONDS="0",
               AZUREML_MODEL_DIR=str(root), APPLICATIONINSIGHTS_CONNECTION_STRING="")
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(server), "--entry_script", str(APP_ROOT / "shared/azureml/online_score.py"), "--port", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base}/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("azmlinfsrv did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _post(base: str, body: bytes) -> tuple[int, dict, object]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base}/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_the_endpoint_answers_the_shared_contract_over_http_under_the_real_inference_server(
        inference_server, trained):
    _, predictions = trained
    row = predictions[predictions["is_fallback"] == 0].iloc[0]
    status, headers, body = _post(inference_server, _request(
        keys={"store": row["store"], "item": row["item"]}, horizon=3).encode())
    assert status == 200, body
    assert isinstance(body, dict), "the body is a JSON object, not a JSON string holding JSON"
    assert body["partition_id"] == row["partition_id"] and len(body["predictions"]) == 3
    assert headers.get("X-Model-Version") == str(body["model_version"])


@pytest.mark.parametrize("payload, status, field", [
    (b"{not json", 400, "body"),
    (json.dumps({"keys": {"store": "s1"}}).encode(), 400, "keys.item"),
    (json.dumps({"partition": {"store": "s1", "item": "i1"}}).encode(), 400, "partition"),
    (json.dumps({"keys": {"store": "nowhere", "item": "nothing"}}).encode(), 404, None),
])
def test_errors_are_encoded_once_with_their_status_under_the_real_inference_server(
        inference_server, payload, status, field):
    code, _, body = _post(inference_server, payload)
    assert code == status
    assert isinstance(body, dict), f"error body encoded twice: {body!r}"
    assert body["status"] == status and body.get("field") == field


def test_every_partition_gets_the_local_servers_answer_from_the_endpoint_over_http(inference_server, trained):
    """One contract for every front end: the endpoint under azmlinfsrv answers each request with the
    status and body of the local server (``manymodels serve``; the Functions route runs the same
    shared.serving.Predictor), for forecasts along the whole scoring chain and for errors."""
    from starlette.testclient import TestClient

    from shared.serving import open_predictor
    from shared.serving.app import create_app

    ws, predictions = trained
    requests = [_request(keys={"store": r["store"], "item": r["item"]}, horizon=4)
                for _, r in predictions.drop_duplicates("partition_id").iterrows()]
    first = predictions.sort_values("date").iloc[0]
    dates = sorted(predictions.loc[predictions["partition_id"] == first["partition_id"], "date"])[:2]
    requests += [
        _request(partition_id=first["partition_id"],
                 rows=[{"date": d.strftime("%Y-%m-%d"), "price": 2.5, "promo": 1} for d in dates]),
        _request(keys={"store": "nowhere", "item": "nothing"}),
        _request(keys={"store": "s1"}),
        _request(partition={"store": "s1", "item": "i1"}),
        _request(partition_id=first["partition_id"], horizon=0),
        "{not json",
    ]
    with TestClient(create_app(open_predictor(ws))) as local:
        for body in requests:
            status, _, answer = _post(inference_server, body.encode())
            expected = local.post("/predict", content=body.encode(), headers={"Content-Type": "application/json"})
            assert (status, answer) == (expected.status_code, expected.json()), body
