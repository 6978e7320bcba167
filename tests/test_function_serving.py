"""The Functions route POST /api/predict, called as the worker calls it, over a pipeline-made workdir."""

from __future__ import annotations

import asyncio
import json

import azure.functions as func
import pytest
from registry_tools import damage_model

from durable_harness import app_functions
from function_app.serving import worker_predictor
from shared.keys import PARTITION_ID
from shared.lake import read_parquet
from shared.runs.pipeline import run_all
from shared.runs.workspace import Workspace
from shared.settings import Settings
from shared.data.synthetic import write_panel

BASE = "http://localhost:7071"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fn-serving")
    write_panel(root / "panel.parquet", partitions=8, periods=130, seed=4)
    ws = Workspace.open(
        root / "work",
        settings=Settings(workdir=root / "work"),
        overrides={"runner.progress": False, "runner.workers": 2, "data.covariates": ["price", "promo"]},
    )
    summary = run_all(ws, root / "panel.parquet", min_accuracy=0.5, progress=False)
    table = read_parquet(ws.lake, f"predictions/{summary['score_id']}/predictions.parquet")
    return ws, table


@pytest.fixture(autouse=True)
def worker(workdir, monkeypatch):
    """A fresh worker: settings from the environment, the predictor made on the first request."""
    ws, _ = workdir
    monkeypatch.setenv("MM_WORKDIR", str(ws.root))
    monkeypatch.setenv("MM_LAKE_BACKEND", "local")
    monkeypatch.setenv("MM_SERVING_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("MM_SERVING_CHECK_MS", "0")
    worker_predictor.reset()
    yield
    worker_predictor.reset()


def call(name: str, method: str, route: str, body: bytes = b"") -> func.HttpResponse:
    handler = app_functions()[name].get_user_function()
    request = func.HttpRequest(
        method,
        f"{BASE}/api/{route}",
        headers={"Content-Type": "application/json"},
        params={},
        route_params={},
        body=body,
    )
    return asyncio.run(handler(request))


def predict(body) -> func.HttpResponse:
    return call(
        "predict_partition", "POST", "predict", body if isinstance(body, bytes) else json.dumps(body).encode()
    )


def test_predictions_equal_the_batch_predictions_and_name_the_model(workdir):
    ws, table = workdir
    for record in ws.prod.find(latest_only=True)[:3]:
        response = predict({"keys": record.keys})
        assert response.status_code == 200 and response.mimetype == "application/json"
        body = json.loads(response.get_body())
        expected = table[table[PARTITION_ID] == record.partition_id].sort_values("date")
        assert [p["prediction"] for p in body["predictions"]] == expected["prediction"].tolist()
        assert (body["model"], body["model_version"], body["run_id"], body["is_fallback"]) == (
            record.model_type,
            record.version,
            record.run_id,
            0,
        )
        assert [(p["lower"], p["upper"]) for p in body["predictions"]] == list(zip(expected["lower"], expected["upper"]))
        assert body["source"] == expected["source"].iloc[0] == "production"


def test_partitions_without_a_production_model_get_the_batch_chain_answer(workdir):
    ws, table = workdir
    served = table[table["source"] != "production"]
    assert not served.empty, "the fixture should hold partitions answered by the scoring chain"
    for pid, expected in list(served.groupby(PARTITION_ID))[:3]:
        expected = expected.sort_values("date")
        keys = {k: str(expected[k].iloc[0]) for k in ws.config.data.keys}
        body = json.loads(predict({"keys": keys}).get_body())
        assert body["source"] == expected["source"].iloc[0] and body["is_fallback"] == 1
        assert [p["prediction"] for p in body["predictions"]] == expected["prediction"].tolist()
        assert [p["lower"] for p in body["predictions"]] == expected["lower"].tolist()
        assert [p["upper"] for p in body["predictions"]] == expected["upper"].tolist()


def test_the_cache_lives_as_long_as_the_worker_and_is_made_lazily(workdir):
    ws, _ = workdir
    keys = ws.prod.find(latest_only=True)[0].keys
    assert worker_predictor._predictor is None  # importing and indexing the app made nothing
    first = predict({"keys": keys, "horizon": 2})
    predictor = worker_predictor._predictor
    second = predict({"keys": keys, "horizon": 2})
    assert worker_predictor._predictor is predictor
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("miss", "hit")
    assert predictor.cache.stats()["loads"] == 1


def test_errors_carry_their_status_and_name_the_field_or_partition(workdir):
    ws, _ = workdir
    keys = ws.prod.find(latest_only=True)[0].keys
    assert json.loads(predict(b"{oops").get_body())["field"] == "body"
    bad = predict({"keys": keys, "horizon": -1})
    assert bad.status_code == 400 and json.loads(bad.get_body())["field"] == "horizon"
    missing = predict({"keys": {"store": "S404", "item": "I404"}})
    assert missing.status_code == 404 and "store=S404, item=I404" in json.loads(missing.get_body())["error"]
    huge = predict({"keys": keys, "rows": [{"date": "2031-01-05", "price": 1.0, "promo": 0}] * 200})
    assert huge.status_code == 413


def test_a_broken_model_is_503_and_the_others_still_answer(workdir):
    ws, _ = workdir
    broken, fine = ws.prod.find(latest_only=True)[-2:]
    path = ws.prod.artifact_path(broken)
    good = path.read_bytes()
    damage_model(ws.prod, broken)  # its bytes in the production pack: the models beside it are intact
    try:
        response = predict({"keys": broken.keys})
        assert response.status_code == 503
        assert "failed to load" in json.loads(response.get_body())["error"]
        assert predict({"keys": fine.keys}).status_code == 200
    finally:
        path.unlink()
        path.write_bytes(good)
    assert predict({"keys": broken.keys}).status_code == 200


def test_health_answers_with_the_production_index(workdir):
    response = call("serving_health", "GET", "health")
    body = json.loads(response.get_body())
    assert response.status_code == 200 and body["status"] == "ok" and body["prod_index_version"] >= 1


def test_a_row_far_beyond_the_end_of_training_is_400_naming_the_row(workdir, monkeypatch):
    """Bounded work per request (issue 12, case 3) on the Functions route: the same Predictor bound."""
    ws, _ = workdir
    keys = ws.prod.find(latest_only=True)[0].keys
    far = predict({"keys": keys, "rows": [{"date": "2200-01-05", "price": 1.0, "promo": 0}]})
    assert far.status_code == 400
    body = json.loads(far.get_body())
    assert body["field"] == "rows[0].date" and "MM_SERVING_MAX_DISTANCE" in body["error"]
    monkeypatch.setenv("MM_SERVING_MAX_DISTANCE", "100000")
    worker_predictor.reset()
    assert predict({"keys": keys, "rows": [{"date": "2200-01-05", "price": 1.0, "promo": 0}]}).status_code == 200


def test_invalid_strings_and_huge_covariates_are_400_naming_the_field(workdir):
    """The Functions route checks requests with the server's parser (issue 18): a lone surrogate in
    a key, or a covariate beyond the magnitude bound, is a 400 naming the field, never a 500 or a 200."""
    ws, _ = workdir
    record = ws.prod.find(latest_only=True)[0]
    surrogate = predict(b'{"keys": {"store": "\\ud800", "item": "I0001"}, "horizon": 2}')
    assert surrogate.status_code == 400 and json.loads(surrogate.get_body())["field"] == "keys.store"
    nxt = predict({"keys": record.keys, "horizon": 1})
    date = json.loads(nxt.get_body())["predictions"][0]["date"]
    huge = predict({"keys": record.keys, "rows": [{"date": date, "price": 1e308, "promo": 0}]})
    assert huge.status_code == 400 and json.loads(huge.get_body())["field"] == "rows[0].price"
