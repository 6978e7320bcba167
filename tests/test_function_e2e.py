"""End to end through the Functions app, with the local compute backend, against the CLI.

A raw CSV lands in the lake; its Event Grid event reaches ``on_lake_event``; the fake extension
plays ``ingest_orchestrator`` through the SDK's replay with the app's real activities (ingest,
plan, one local compute job per group in sub-orchestrations, register, promotion message); the
promotion message goes to ``on_promotion_message``; an HTTP start runs ``score_orchestrator``,
which loads the predictions into SQLite. The same data and config through ``manymodels run``
must give the same run, the same promotions and the same predictions.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import azure.functions as func
import pandas as pd
import pytest

from durable_harness import FakeDurableExtension, app_functions
from test_function_handlers import decoded, sb, storage_event  # the worker's decoding of raw inputs
from shared.config import ProjectConfig
from shared.data.synthetic import write_panel

pytestmark = pytest.mark.slow

CONFIG = {
    "runner.progress": False,
    "runner.workers": 1,
    "runner.rows_per_file": 300,
    "promotion.min_value": 0.85,
    "forecast.horizon": 6,
}


def _rows(db: Path, query: str) -> pd.DataFrame:
    with sqlite3.connect(db) as con:
        return pd.read_sql_query(query, con)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    csv = root / "sales.csv"
    write_panel(csv, partitions=10, periods=104, seed=21)
    config = root / "project.toml"
    ProjectConfig().with_overrides(CONFIG).save(config)
    return {"root": root, "csv": csv, "config": config}


@pytest.fixture(scope="module")
def through_functions(data, tmp_path_factory):
    """The whole flow through the app's triggers, orchestrators and activities."""
    from azure.durable_functions.models.utils import http_utils

    workdir = tmp_path_factory.mktemp("functions-wd")
    raw = workdir / "lake" / "raw"
    raw.mkdir(parents=True)
    (raw / "sales.csv").write_bytes(data["csv"].read_bytes())
    env = {
        "MM_WORKDIR": str(workdir),
        "MM_CONFIG_FILE": str(data["config"]),
        "MM_LAKE_BACKEND": "local",
        "MM_GROUP_SIZE": "2",
        "MM_MAX_GROUPS_PER_ORCHESTRATION": "1",
        "MM_MONITOR_POLL_SECONDS": "30",
    }
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    extension = FakeDurableExtension()
    loop = asyncio.new_event_loop()
    functions = app_functions()

    def client_call(name: str, **kwargs):
        return loop.run_until_complete(
            functions[name].get_user_function()(client=extension.client_json(), **kwargs)
        )

    try:
        # the event's JSON as Event Grid sends it, decoded by the worker's own converter
        body = storage_event("raw/sales.csv", etag="0x8DC0001", host="https://lake.blob.core.windows.net",
                             contentLength=data["csv"].stat().st_size)
        event = decoded(body)
        client_call("on_lake_event", event=event)
        [(_, ingest_id, _)] = extension.starts
        ingest = extension.run_pending()[ingest_id]
        assert ingest.status == "Completed", ingest.error

        [promotion] = [o for o in ingest.outputs if o["function"] == "send_promotion_message"]
        message = sb(promotion["value"].encode(), message_id="promo-1")  # as the worker decodes it
        functions["on_promotion_message"].get_user_function()(message=message)

        request = func.HttpRequest("POST", "https://app.example/api/score", body=b"{}", headers={})
        started = json.loads(client_call("start_scoring_run", req=request).get_body())
        scoring = extension.run_pending()[started["id"]]
        status = client_call(
            "get_run_status",
            req=func.HttpRequest(
                "GET",
                f"https://app.example/api/status/{ingest_id}",
                body=b"",
                route_params={"instance_id": ingest_id},
            ),
        )
        yield {
            "workdir": workdir,
            "ingest": ingest,
            "promotion": promotion,
            "scoring": scoring,
            "status": json.loads(status.get_body()),
        }
    finally:
        loop.run_until_complete(http_utils._close_session())  # the SDK has no public shutdown hook
        loop.close()
        extension.close()
        patch.undo()


@pytest.fixture(scope="module")
def through_cli(data, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("cli-wd")
    cli = Path(sys.executable).parent / "manymodels"
    done = subprocess.run(
        [
            str(cli),
            "run",
            "--data",
            str(data["csv"]),
            "--workdir",
            str(workdir),
            "--config",
            str(data["config"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": workdir, "summary": json.loads(done.stdout.strip().splitlines()[-1])}


def test_the_lake_event_runs_ingestion_training_and_queues_one_promotion(through_functions):
    ingest = through_functions["ingest"]
    assert ingest.status == "Completed", ingest.error
    training = ingest.output["training"]
    assert training["groups_total"] >= 2 and training["groups_failed"] == 0
    assert len(ingest.children) == training["groups_total"]  # one sub-orchestration per group here
    assert ingest.output["ingested"]["partitions"] == 10
    body = json.loads(through_functions["promotion"]["value"])
    assert body == {
        "type": "promote",
        "run_id": training["run_id"],
        "min_accuracy": None,
        "origin": through_functions["status"]["instanceId"],
    }
    status = through_functions["status"]
    assert status["runtimeStatus"] == "Completed" and status["customStatus"]["stage"] == "promotion-queued"
    assert status["customStatus"]["groups_done"] == training["groups_total"]


def test_the_functions_flow_gives_the_same_run_promotions_and_predictions_as_the_cli(
    through_functions, through_cli
):
    summary = through_cli["summary"]
    assert through_functions["ingest"].output["training"]["run_id"] == summary["run_id"]
    assert through_functions["scoring"].status == "Completed", through_functions["scoring"].error
    fn_db, cli_db = through_functions["workdir"] / "results.sqlite", through_cli["workdir"] / "results.sqlite"

    query = "select partition_id, decision from promotions order by partition_id"
    fn_promotions, cli_promotions = _rows(fn_db, query), _rows(cli_db, query)
    pd.testing.assert_frame_equal(fn_promotions, cli_promotions)
    assert (fn_promotions["decision"] == "promoted").sum() == summary["newly_promoted"] > 0
    assert (fn_promotions["decision"] == "rejected").sum() == summary["rejected"] > 0

    query = "select partition_id, status, model, accuracy from model_metrics order by partition_id"
    pd.testing.assert_frame_equal(_rows(fn_db, query), _rows(cli_db, query))

    query = (
        "select partition_id, store, item, date, prediction, model, is_fallback from predictions "
        "order by partition_id, date"
    )
    fn_predictions, cli_predictions = _rows(fn_db, query), _rows(cli_db, query)
    assert len(fn_predictions) == summary["predictions"] == 10 * 6
    assert (
        0 < fn_predictions["is_fallback"].sum() < len(fn_predictions)
    )  # rejected partitions use the fallback
    pd.testing.assert_frame_equal(fn_predictions, cli_predictions)
