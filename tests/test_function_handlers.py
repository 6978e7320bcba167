"""Each trigger called with the SDK's own request, event and message types.

The client functions run with the real ``DurableOrchestrationClient``, built by the SDK from the
binding JSON and talking HTTP to a fake Durable extension on 127.0.0.1 (the edge): a valid input
starts what it should, exactly once; each kind of bad input gets its specified result (400 naming
the field, ignored with a log line, refused with the reason, or raised so the message is retried
and dead-lettered). The workspace is a real local one with a real ingested dataset.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import azure.functions as func
import numpy as np
import pandas as pd
import pytest

from durable_harness import FakeDurableExtension, app_functions
from function_app.messages import MessageError
from shared.runs import pipeline
from shared.keys import partition_id
from shared.lake import LocalLake
from shared.settings import Settings
from shared.data.synthetic import write_panel

BASE = "https://mm-func.azurewebsites.net"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """A real workspace: a raw CSV, a bad CSV, one ingested dataset and one planned training run."""
    root = tmp_path_factory.mktemp("ws")
    lake = LocalLake(root / "lake")
    raw = root / "lake" / "raw"
    raw.mkdir(parents=True)
    write_panel(raw / "sales.csv", partitions=6, periods=60, seed=11)
    frame = pd.read_csv(raw / "sales.csv")
    frame.drop(columns=["sales"]).to_csv(raw / "no-target.csv", index=False)
    frame.head(0).to_csv(raw / "header-only.csv", index=False)
    frame.drop(columns=["sales"]).head(20).to_csv(raw / "future.csv", index=False)
    (raw / "notes.txt").write_text("not data")
    ws = pipeline.Workspace.open(root, settings=Settings(workdir=root), overrides={"runner.progress": False})
    ingested = pipeline.ingest(ws, "raw/sales.csv")
    plan = pipeline.plan_training(ws, ingested.dataset_id)
    first = frame.iloc[0]
    return {
        "root": root,
        "lake": lake,
        "dataset_id": ingested.dataset_id,
        "run_id": plan.run_id,
        "first_keys": {"store": str(first["store"]), "item": str(first["item"])},
    }


@pytest.fixture(autouse=True)
def settings_env(workdir, monkeypatch):
    monkeypatch.setenv("MM_WORKDIR", str(workdir["root"]))
    monkeypatch.setenv("MM_LAKE_BACKEND", "local")
    monkeypatch.setenv("MM_GROUP_SIZE", "3")


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the Durable SDK keeps one HTTP session per loop."""
    from azure.durable_functions.models.utils import http_utils

    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.run_until_complete(http_utils._close_session())  # the SDK has no public shutdown hook
    event_loop.close()


@pytest.fixture
def extension():
    fake = FakeDurableExtension()
    yield fake
    fake.close()


def call(loop, extension, name: str, **kwargs):
    """Invoke a client function as the host does: trigger input plus the durableClient binding JSON."""
    function = app_functions()[name].get_user_function()
    return loop.run_until_complete(function(client=extension.client_json(), **kwargs))


def http(method: str, route: str, body=None, raw: bytes | None = None, route_params=None) -> func.HttpRequest:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    return func.HttpRequest(
        method,
        f"{BASE}/api/{route}",
        headers={"Content-Type": "application/json"},
        route_params=route_params or {},
        body=data,
    )


def status_request(instance_id: str) -> func.HttpRequest:
    return http("GET", f"status/{instance_id}", route_params={"instance_id": instance_id})


def reply(response: func.HttpResponse) -> dict:
    return json.loads(response.get_body())


# -- HTTP starts -------------------------------------------------------------------------------
def test_training_start_answers_202_with_the_status_url_and_starts_once(loop, extension, workdir):
    body = {"dataset_id": workdir["dataset_id"], "options": {"min_accuracy": 0.6}}
    first = call(loop, extension, "start_training_run", req=http("POST", "train", body))
    assert first.status_code == 202
    out = reply(first)
    assert out["started"] is True and out["id"].startswith("train-")
    assert first.headers["Location"] == out["statusUri"] == f"{BASE}/api/status/{out['id']}"
    # only our own status route: the extension's management URLs carry its system key (code=...)
    assert set(out) >= {"id", "started", "runtimeStatus", "statusUri"} and "management" not in out
    assert "code=" not in first.get_body().decode() and "webhooks" not in first.get_body().decode()
    [(name, instance, payload)] = extension.starts
    assert (name, instance) == ("train_orchestrator", out["id"])
    assert payload["dataset_id"] == workdir["dataset_id"] and payload["partition_ids"] is None
    assert payload["options"]["group_size"] == 3 and payload["options"]["min_accuracy"] == 0.6

    again = call(loop, extension, "start_training_run", req=http("POST", "train", body))
    assert again.status_code == 200 and reply(again) == out | {"started": False, "runtimeStatus": "Pending"}
    assert "code=" not in again.get_body().decode()
    assert len(extension.starts) == 1


def test_a_completed_run_is_not_started_again_but_a_failed_one_is(loop, extension, workdir):
    body = {"dataset_id": workdir["dataset_id"]}
    instance = reply(call(loop, extension, "start_training_run", req=http("POST", "train", body)))["id"]
    extension.set_status(instance, "Completed")
    assert call(loop, extension, "start_training_run", req=http("POST", "train", body)).status_code == 200
    extension.set_status(instance, "Failed")
    restarted = call(loop, extension, "start_training_run", req=http("POST", "train", body))
    assert restarted.status_code == 202 and reply(restarted)["id"] == instance
    assert [i for _, i, _ in extension.starts] == [instance, instance]


def test_a_full_retrain_reaches_the_orchestration_and_is_another_run_than_the_incremental_one(
        loop, extension, workdir):
    body = {"dataset_id": workdir["dataset_id"]}
    incremental = reply(call(loop, extension, "start_training_run", req=http("POST", "train", body)))
    extension.set_status(incremental["id"], "Completed")
    full = call(loop, extension, "start_training_run",
                req=http("POST", "train", {**body, "options": {"full": True}}))
    assert full.status_code == 202 and reply(full)["id"] != incremental["id"]
    assert [p["options"]["full"] for _, _, p in extension.starts] == [False, True]
    # a raw file: the event's incremental run and a full request of the same version are two runs
    raw = {"dataset": "raw/sales.csv"}
    first = reply(call(loop, extension, "start_training_run", req=http("POST", "train", raw)))
    again = reply(call(loop, extension, "start_training_run",
                       req=http("POST", "train", {**raw, "options": {"full": True}})))
    assert first["id"] != again["id"] and extension.starts[-1][2]["options"]["full"] is True
    # and from Service Bus
    call(loop, extension, "on_upstream_message",
         message=sb({"type": "retrain", "partitions": "all", "options": {"full": True}}, message_id="full-1"))
    assert extension.starts[-1][0] == "train_orchestrator" and extension.starts[-1][2]["options"]["full"] is True


def test_a_new_request_id_is_a_new_run_request(loop, extension, workdir):
    body = {"dataset_id": workdir["dataset_id"]}
    a = reply(
        call(loop, extension, "start_training_run", req=http("POST", "train", {**body, "request_id": "a"}))
    )
    b = reply(
        call(loop, extension, "start_training_run", req=http("POST", "train", {**body, "request_id": "b"}))
    )
    assert a["id"] != b["id"] and len(extension.starts) == 2


def test_training_without_a_dataset_pins_the_latest_and_partitions_by_key_values(loop, extension, workdir):
    keys = workdir["first_keys"]
    body = {"partitions": [keys, keys]}
    response = call(loop, extension, "start_training_run", req=http("POST", "train", body))
    assert response.status_code == 202
    payload = extension.starts[0][2]
    assert payload["dataset_id"] == workdir["dataset_id"]
    assert payload["partition_ids"] == [partition_id([keys["store"], keys["item"]])]


def test_training_from_a_raw_file_starts_the_ingestion_orchestration(loop, extension):
    response = call(
        loop, extension, "start_training_run", req=http("POST", "train", {"dataset": "raw/sales.csv"})
    )
    assert response.status_code == 202
    name, instance, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and instance.startswith("ingest-")
    assert payload["source"] == "raw/sales.csv" and payload["trigger"]["etag"].startswith("local-")


@pytest.mark.parametrize(
    "body, field, words",
    [
        (None, "body", "not valid UTF-8 JSON"),
        ([1, 2], "body", "JSON object"),
        ({"datset": "raw/sales.csv"}, "datset", "unknown field"),
        ({"dataset_id": "nope"}, "dataset_id", "is not an id"),
        ({"dataset_id": "d0000000000000000"}, "dataset_id", "no dataset d0000000000000000"),
        ({"dataset": "raw/sales.csv", "dataset_id": "d0000000000000000"}, "dataset_id", "not both"),
        ({"dataset": "prepared/x.csv"}, "dataset", "under raw/"),
        ({"dataset": "raw/notes.txt"}, "dataset", ".csv or .parquet"),
        ({"dataset": "raw/missing.csv"}, "dataset", "no such file"),
        ({"dataset": "raw/no-target.csv"}, "dataset", "sales"),
        ({"dataset": "raw/header-only.csv"}, "dataset", "empty"),
        ({"partitions": []}, "partitions", "non-empty list"),
        ({"partitions": ["p123", "x"]}, "partitions[0]", "not a partition id"),
        ({"partitions": [{"store": "S1"}]}, "partitions[0]", "missing key column(s) ['item']"),
        ({"partitions": ["p" + "0" * 20]}, "partitions", "not in dataset"),
        ({"options": {"group_size": 0}}, "options.group_size", "out of bounds"),
        ({"options": {"min_accuracy": 1.5}}, "options.min_accuracy", "from 0 to 1"),
        ({"options": {"turbo": True}}, "options.turbo", "unknown option"),
        ({"options": {"config": {"forecast.horizon": "soon"}}}, "options.config", "forecast.horizon"),
    ],
)
def test_bad_training_requests_get_400_naming_the_field(loop, extension, body, field, words):
    req = http("POST", "train", raw=b"{not json" if body is None else None, body=body)
    response = call(loop, extension, "start_training_run", req=req)
    assert response.status_code == 400
    out = reply(response)
    assert out["field"] == field and words in out["error"]
    assert extension.starts == []


def test_promotion_start_defaults_to_the_latest_run(loop, extension, workdir):
    response = call(
        loop, extension, "start_promotion_run", req=http("POST", "promote", {"min_accuracy": 0.5})
    )
    assert response.status_code == 202
    name, _, payload = extension.starts[0]
    assert name == "promote_orchestrator" and payload["run_id"] == workdir["run_id"]
    assert payload["options"]["min_accuracy"] == 0.5


@pytest.mark.parametrize(
    "body, field",
    [
        ({"run_id": "r0000000000000000"}, "run_id"),
        ({"run_id": "latest"}, "run_id"),
        ({"min_accuracy": "high"}, "min_accuracy"),
        ({"run": "x"}, "run"),
    ],
)
def test_bad_promotion_requests_get_400(loop, extension, body, field):
    response = call(loop, extension, "start_promotion_run", req=http("POST", "promote", body))
    assert response.status_code == 400 and reply(response)["field"] == field


def test_scoring_start_with_a_scoring_file_and_a_horizon(loop, extension, workdir):
    response = call(
        loop, extension, "start_scoring_run", req=http("POST", "score", {"data": "raw/future.csv"})
    )
    assert response.status_code == 202
    name, instance, payload = extension.starts[0]
    assert name == "score_orchestrator" and instance.startswith("score-")
    assert payload["data"] == "raw/future.csv" and payload["dataset_id"] == workdir["dataset_id"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"data": "raw/absent.csv"}, "data"),
        ({"data": "predictions/future.csv"}, "data"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": 2.5}, "horizon"),
        ({"data": "../etc/passwd.csv"}, "data"),
    ],
)
def test_bad_scoring_requests_get_400(loop, extension, body, field):
    response = call(loop, extension, "start_scoring_run", req=http("POST", "score", body))
    assert response.status_code == 400 and reply(response)["field"] == field


def test_status_returns_the_durable_status_with_progress_or_404(loop, extension):
    extension.set_status(
        "train-abc",
        "Running",
        name="train_orchestrator",
        customStatus={"stage": "training", "groups_done": 2, "groups_total": 5},
    )
    response = call(
        loop,
        extension,
        "get_run_status",
        req=http("GET", "status/train-abc", route_params={"instance_id": "train-abc"}),
    )
    assert response.status_code == 200
    out = reply(response)
    assert out["runtimeStatus"] == "Running" and out["customStatus"]["groups_done"] == 2
    assert out["name"] == "train_orchestrator" and out["instanceId"] == "train-abc"
    missing = call(
        loop,
        extension,
        "get_run_status",
        req=http("GET", "status/nope", route_params={"instance_id": "nope"}),
    )
    assert missing.status_code == 404 and reply(missing)["field"] == "instance_id"
    bad = call(
        loop, extension, "get_run_status", req=http("GET", "status/x", route_params={"instance_id": "a/b"})
    )
    assert bad.status_code == 400


SYSTEM_KEY = "dUrAbLeSyStEmKeY0123456789=="


def client_with_system_key(extension) -> str:
    """The durableClient binding JSON with a recognisable system key where the host puts one: in every
    management URL (``code=...``) and in ``requiredQueryStringParameters``."""
    binding = json.loads(extension.client_json().replace("code=key", f"code={SYSTEM_KEY}"))
    binding.update(
        baseUrl=f"{extension.base}/runtime/webhooks/durabletask",
        requiredQueryStringParameters=f"code={SYSTEM_KEY}",
    )
    return json.dumps(binding)


@pytest.mark.parametrize(
    "name, req, status",
    [
        ("start_training_run", lambda w: http("POST", "train", {"dataset_id": w["dataset_id"]}), 202),
        ("start_training_run", lambda w: http("POST", "train", {"dataset_id": "nope"}), 400),
        ("start_training_run", lambda w: http("POST", "train", raw=b"{broken"), 400),
        ("start_promotion_run", lambda w: http("POST", "promote", {}), 202),
        ("start_promotion_run", lambda w: http("POST", "promote", {"run_id": "r0000000000000000"}), 400),
        ("start_scoring_run", lambda w: http("POST", "score", {"horizon": 2}), 202),
        ("start_scoring_run", lambda w: http("POST", "score", {"horizon": 0}), 400),
        ("get_run_status", lambda w: status_request("train-known"), 200),
        ("get_run_status", lambda w: status_request("train-unknown"), 404),  # unknown ids
        ("get_run_status", lambda w: status_request("a/b"), 400),
    ],
)
def test_no_response_carries_the_durable_management_urls_or_their_key(
    loop, extension, workdir, name, req, status
):
    """The management URLs carry the extension's system key: any function-key holder could terminate,
    rewind or purge every instance of the task hub with it. Only our own status route is returned."""
    extension.set_status("train-known", "Failed", name="train_orchestrator", output="boom",
                         customStatus={"stage": "training"})
    function = app_functions()[name].get_user_function()

    def answer() -> func.HttpResponse:
        return loop.run_until_complete(function(req=req(workdir), client=client_with_system_key(extension)))

    responses = [answer()]
    assert responses[0].status_code == status
    if status == 202:  # a repeat answers 200 with the same instance
        responses.append(answer())
        assert responses[1].status_code == 200
    for answer in responses:
        text = answer.get_body().decode() + json.dumps(dict(answer.headers))
        for leak in (SYSTEM_KEY, "code=", "webhooks", "statusQueryGetUri", "terminatePost", "purgeHistory"):
            assert leak not in text, f"{name} answered {answer.status_code} with {leak!r}: {text[:300]}"
        if status == 202:
            assert set(reply(answer)) == {"id", "started", "runtimeStatus", "statusUri"}
            assert answer.headers["Location"] == reply(answer)["statusUri"]


# -- lake events -------------------------------------------------------------------------------
# Events are built as Event Grid sends them (raw JSON, either schema, in the shapes of Microsoft's
# "Azure Blob Storage as an Event Grid source" examples) and decoded by the worker's own converter
# (azure.functions.eventgrid.EventGridEventInConverter), exactly as the host hands them to the
# function: no hand-built EventGridEvent objects.
LAKE_HOST = "https://mmlake.blob.core.windows.net"
LAKE_DFS = "https://mmlake.dfs.core.windows.net"
STORAGE_TOPIC = "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/mmlake"
BLOB_DELETED = "Microsoft.Storage.BlobDeleted"


def storage_event(
    path: str,
    etag: str = "0x8DC1",
    event_type: str = "Microsoft.Storage.BlobCreated",
    schema: str = "EventGrid",
    host: str = LAKE_HOST,
    **data,
) -> dict:
    """The JSON of one storage event as Event Grid delivers it, in the Event Grid or CloudEvents schema.

    As documented: ``data.eTag`` is quoted (``"\"0x8D...\""``); an ADLS Gen2 (``dfs``) write is
    ``FlushWithClose`` with ``contentOffset`` and ``dataVersion`` "2"; a deletion has no ETag or
    length (``DeleteBlob``, or ``DeleteFile`` on the ``dfs`` endpoint); CloudEvents carry
    ``source`` / ``type`` / ``time`` / ``specversion`` and no ``datacontenttype``.
    """
    container, _, blob = path.partition("/")
    adls = ".dfs." in host
    payload = {
        "api": "FlushWithClose" if adls else "PutBlockList",
        "clientRequestId": "6d79dbfb-0e37-4fc4-981f-442c9ca65760",
        "requestId": "831e1650-001e-001b-66ab-eeb76e000000",
        "eTag": etag if etag.startswith('"') else f'"{etag}"',
        "contentType": "text/csv",
        "contentLength": 1234,
        **({"contentOffset": 0} if adls else {}),
        "blobType": "BlockBlob",
        "url": f"{host}/{path}",
        "sequencer": "00000000000004420000000000028963",
        "storageDiagnostics": {"batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"},
    }
    if event_type == BLOB_DELETED:
        payload = {k: v for k, v in payload.items() if k not in ("eTag", "contentLength", "contentOffset")}
        payload["api"] = "DeleteFile" if adls else "DeleteBlob"
    payload.update(data)
    subject = f"/blobServices/default/containers/{container}/blobs/{blob}"
    digest = hashlib.sha256(f"{path}|{etag}|{host}|{event_type}".encode()).hexdigest()
    event_id = f"831e1650-001e-001b-66ab-{digest[:12]}"
    if schema == "CloudEvents":
        return {
            "source": STORAGE_TOPIC,
            "subject": subject,
            "type": event_type,
            "time": "2024-06-01T18:41:00.9584103Z",
            "id": event_id,
            "data": payload,
            "specversion": "1.0",
        }
    return {
        "topic": STORAGE_TOPIC,
        "subject": subject,
        "eventType": event_type,
        "eventTime": "2024-06-01T18:41:00.9584103Z",
        "id": event_id,
        "data": payload,
        "dataVersion": "2" if adls else "",
        "metadataVersion": "1",
    }


# azure-functions >= 1.26 decodes a CloudEvents 1.0 delivery as func.CloudEvent. The copy the Python
# worker bundles can be older (scripts/validate-worker-bundle.sh runs these tests on one): there a
# CloudEvents delivery is an EventGridEvent without a type, which the app refuses clearly (tested below).
CLOUDEVENTS = hasattr(func, "CloudEvent")


def decoded(body: dict):
    """The event object the worker passes to the function, from the raw JSON (its own converter)."""
    if "specversion" in body and not CLOUDEVENTS:
        pytest.skip(f"azure-functions {func.__version__} has no CloudEvent; "
                    "test_a_cloudevents_delivery_to_a_library_without_cloudevents_is_refused covers it")
    return _convert(body)


def _convert(body: dict):
    from azure.functions.eventgrid import EventGridEventInConverter
    from azure.functions.meta import Datum

    return EventGridEventInConverter.decode(Datum(json.dumps(body), "json"), trigger_metadata={})


def blob_created(path: str, etag: str = "0x8DC1", **kw):
    return decoded(storage_event(path, etag, **kw))


@pytest.mark.parametrize("schema", ["EventGrid", "CloudEvents"])
def test_a_blob_created_event_starts_ingestion_once_per_file_version(loop, extension, schema):
    call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", schema=schema))
    call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", schema=schema))  # redelivery
    assert len(extension.starts) == 1
    name, instance, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and payload["source"] == "raw/sales.csv"
    assert payload["trigger"] == {
        "url": "https://mmlake.blob.core.windows.net/raw/sales.csv",
        "etag": "0x8DC1",
    }
    call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", etag="0x8DC2", schema=schema))
    assert len(extension.starts) == 2 and extension.starts[1][1] != instance  # a new version


def test_a_cloudevents_delivery_is_decoded_by_the_worker_as_a_cloud_event_and_accepted(loop, extension):
    event = blob_created("raw/sales.csv", schema="CloudEvents")
    assert isinstance(event, func.CloudEvent) and not hasattr(event, "event_type")  # what the handler gets
    call(loop, extension, "on_lake_event", event=event)
    assert [name for name, _, _ in extension.starts] == ["ingest_orchestrator"]


def test_a_cloudevents_delivery_without_its_type_is_refused_clearly_not_ignored(loop, extension, caplog):
    """An older azure-functions (or the worker's bundled copy on Python <= 3.12 without
    PYTHON_ISOLATE_WORKER_DEPENDENCIES=1) has no CloudEvent branch: its converter reads every payload
    as the Event Grid schema (``eventType``, ``topic``...), i.e. today's converter minus the
    ``specversion`` test, and hands the function an EventGridEvent whose event_type is None."""
    body = storage_event("raw/sales.csv", schema="CloudEvents")
    old_style = _convert({k: v for k, v in body.items() if k != "specversion"})  # the old converter's path
    assert isinstance(old_style, func.EventGridEvent) and old_style.event_type is None
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=old_style)
    assert extension.starts == []
    assert "malformed event dropped" in caplog.text and "CloudEvents" in caplog.text


def test_a_cloudevents_delivery_to_a_library_without_cloudevents_is_refused(loop, extension, caplog):
    """Whichever azure-functions the worker loads: a CloudEvents delivery is accepted (>= 1.26) or
    logged as malformed naming the fix, never started from a half-read event nor silently ignored."""
    event = _convert(storage_event("raw/sales.csv", etag="0x8DCE", schema="CloudEvents"))
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=event)
    if CLOUDEVENTS:
        assert isinstance(event, func.CloudEvent) and len(extension.starts) == 1
    else:
        assert isinstance(event, func.EventGridEvent) and event.event_type is None
        assert extension.starts == [] and "malformed event dropped" in caplog.text
        assert "PYTHON_ISOLATE_WORKER_DEPENDENCIES" in caplog.text


def test_the_same_file_version_through_the_dfs_and_the_blob_endpoint_is_one_run(loop, extension):
    """ADLS Gen2 events name the dfs endpoint; the Blob API (HTTP and upstream starts) the blob one."""
    adls = blob_created("raw/sales.csv", etag="0x8DD5", host=LAKE_DFS)  # FlushWithClose, dfs URL
    blob = blob_created("raw/sales.csv", etag="0x8DD5")  # PutBlockList, blob URL
    call(loop, extension, "on_lake_event", event=adls)
    call(loop, extension, "on_lake_event", event=blob)
    assert len(extension.starts) == 1


def test_an_adls_create_file_event_is_ignored_and_the_flush_with_close_starts_the_run(loop, extension, caplog):
    created = blob_created("raw/sales.csv", etag="0x8DE1", host=LAKE_DFS, api="CreateFile", contentLength=0)
    flushed = blob_created("raw/sales.csv", etag="0x8DE2", host=LAKE_DFS, api="FlushWithClose")
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=created)
    assert extension.starts == [] and "event ignored" in caplog.text and "CreateFile" in caplog.text
    call(loop, extension, "on_lake_event", event=flushed)
    assert len(extension.starts) == 1


def test_two_deliveries_at_the_same_moment_still_start_one_orchestration(loop, extension, caplog):
    handler = app_functions()["on_lake_event"].get_user_function()

    async def both():
        await asyncio.gather(
            *(
                handler(event=blob_created("raw/sales.csv", etag="0xRACE"), client=extension.client_json())
                for _ in range(2)
            )
        )

    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        loop.run_until_complete(both())
    assert len(extension.starts) == 1
    # usually both pass the status check before either starts, and the extension refuses the second start
    assert (
        "duplicate start refused by the extension" in caplog.text or "duplicate start ignored" in caplog.text
    )


@pytest.mark.parametrize("schema", ["EventGrid", "CloudEvents"])
@pytest.mark.parametrize(
    "path, kw",
    [
        ("raw/sales.csv", {"event_type": BLOB_DELETED}),  # deletions (DeleteBlob)
        ("raw/sales.csv", {"event_type": BLOB_DELETED, "host": LAKE_DFS}),  # ADLS deletions (DeleteFile)
        ("prepared/d1/manifest.parquet", {}),  # other containers
        ("raw/notes.txt", {}),  # unsupported files
        ("raw/sales.csv", {"host": LAKE_DFS, "api": "CreateFile", "contentLength": 0}),  # ADLS: no data yet
        ("raw/sales.csv", {"api": "SftpCreate", "contentLength": 0, "contentOffset": 0}),  # SFTP: likewise
    ],
)
def test_events_that_are_not_new_raw_data_files_are_ignored(loop, extension, path, kw, schema, caplog):
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=blob_created(path, schema=schema, **kw))
    assert extension.starts == [] and "ignored" in caplog.text


def test_a_bad_raw_file_is_refused_with_the_validation_reason_and_not_retried(loop, extension, caplog):
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=blob_created("raw/no-target.csv"))
    assert extension.starts == []
    assert (
        "file rejected" in caplog.text and "sales" in caplog.text and "path=raw/no-target.csv" in caplog.text
    )


@pytest.mark.parametrize("schema", ["EventGrid", "CloudEvents"])
@pytest.mark.parametrize(
    "path, data, field",
    [
        ("raw/sales.csv", {"url": None}, "data.url"),
        ("raw/sales.csv", {"eTag": ""}, "data.eTag"),
        ("raw/sales.csv", {"contentLength": -1}, "data.contentLength"),
        ("raw/sales.csv", {"url": "https://mmlake.blob.core.windows.net/raw/other.csv"}, "data.url"),
        ("raw/../../etc/passwd.csv", {}, "path"),  # hostile paths
        ("raw/with space.csv", {}, "path"),
        ("raw/%2e%2e/secrets.csv", {}, "path"),
    ],
)
def test_a_permanently_invalid_event_is_logged_and_dropped_not_redelivered_for_a_day(
    loop, extension, path, data, field, schema, caplog
):
    """Raising would make Event Grid redeliver it for up to 24 hours: it can never succeed."""
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        result = call(loop, extension, "on_lake_event", event=blob_created(path, schema=schema, **data))
    assert result is None and extension.starts == []
    assert "malformed event dropped" in caplog.text and f"field={field}" in caplog.text


def test_a_transient_failure_raises_so_event_grid_retries_it(loop, extension, monkeypatch):
    """The Durable extension unreachable: the event must come again, so the function raises."""
    extension.close()
    with pytest.raises(Exception) as caught:
        call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", etag="0xDOWN"))
    assert not isinstance(caught.value, AssertionError)


@pytest.mark.parametrize(
    "error, raises",
    [
        ("ServiceRequestError", True),  # the connection failed: transient
        ("HttpResponseError", True),  # 503 Server Busy, throttling: transient
        ("LakeError", False),  # the blob is gone (deleted since the event): permanent, logged
    ],
)
def test_a_lake_read_failure_raises_only_when_a_retry_can_succeed(
    loop, extension, monkeypatch, error, raises, caplog
):
    """The sample check reads the file: an unreachable or busy lake must come again (Event Grid retries
    a raising function), a file that is no longer there never will."""
    from azure.core import exceptions as azure_errors

    from function_app import raw_files
    from shared.lake import LakeError

    exc = LakeError("no such file in the lake: raw/sales.csv") if error == "LakeError" else getattr(
        azure_errors, error)("connection reset by peer")

    def read_fails(lake, path):
        raise exc

    monkeypatch.setattr(raw_files, "_open", read_fails)
    event = blob_created("raw/sales.csv", etag=f"0x{error}")
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        if raises:
            with pytest.raises(type(exc)):
                call(loop, extension, "on_lake_event", event=event)
        else:
            assert call(loop, extension, "on_lake_event", event=event) is None
    assert extension.starts == []
    assert ("file rejected" in caplog.text) is not raises


def test_an_sftp_upload_starts_the_run_on_its_commit_not_on_its_empty_create(loop, extension, caplog):
    """SFTP uploads report SftpCreate (an empty blob, when the file is opened) then SftpCommit."""
    created = blob_created("raw/sales.csv", etag="0x8DF1", api="SftpCreate", contentLength=0, contentOffset=0)
    committed = blob_created("raw/sales.csv", etag="0x8DF2", api="SftpCommit", contentOffset=0)
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=created)
    assert extension.starts == [] and "event ignored" in caplog.text and "SftpCreate" in caplog.text
    call(loop, extension, "on_lake_event", event=committed)
    assert len(extension.starts) == 1


def test_an_event_grid_batch_reaches_the_function_one_event_at_a_time(loop, extension):
    """Event Grid posts arrays (every documented example is one); the Event Grid extension invokes the
    function once per element, and the binding declares no ``cardinality: many``. The worker's
    converter cannot decode a whole array as one event: it fails before our code runs, so such an
    invocation would fail and be retried, never be half-handled."""
    from azure.functions.eventgrid import EventGridEventInConverter
    from azure.functions.meta import Datum

    batch = [storage_event("raw/sales.csv", "0x8DB1"), storage_event("raw/sales.csv", "0x8DB1"),
             storage_event("raw/sales.csv", "0x8DB2")]
    with pytest.raises(AttributeError):
        EventGridEventInConverter.decode(Datum(json.dumps(batch), "json"), trigger_metadata={})
    [trigger] = [b for b in app_functions()["on_lake_event"].get_bindings_dict()["bindings"]
                 if b["type"] == "eventGridTrigger"]
    assert "cardinality" not in trigger
    for element in batch:
        call(loop, extension, "on_lake_event", event=decoded(element))
    assert len(extension.starts) == 2  # the repeated element is a duplicate of the first


def test_an_adls_event_and_http_and_upstream_starts_of_one_file_version_are_one_run(
    loop, extension, monkeypatch
):
    """ADLS events name the ``dfs`` endpoint; an HTTP or upstream start names the file through the lake's
    Blob API (``blob`` endpoint, quoted ETag). One file version, one instance id."""
    from shared.lake import LocalLake

    monkeypatch.setattr(LocalLake, "uri", property(lambda self: LAKE_HOST))  # as the Blob API names it
    monkeypatch.setattr("function_app.starts.file_version", lambda lake, path: '"0x8DA7"')
    call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", etag="0x8DA7", host=LAKE_DFS))
    assert extension.starts[0][2]["trigger"]["url"] == f"{LAKE_DFS}/raw/sales.csv"
    by_http = call(
        loop, extension, "start_training_run", req=http("POST", "train", {"dataset": "raw/sales.csv"})
    )
    message = sb({"type": "dataset-ready", "path": "raw/sales.csv", "etag": "0x8DA7"}, message_id="up-1")
    call(loop, extension, "on_upstream_message", message=message)
    assert len(extension.starts) == 1
    assert by_http.status_code == 200 and reply(by_http)["id"] == extension.starts[0][1]


BLOB_RENAMED = "Microsoft.Storage.BlobRenamed"


def blob_renamed(path: str, source: str = "staging/_temporary/0/sales.csv", schema: str = "EventGrid", **data):
    """A file renamed on ADLS Gen2, as Event Grid delivers it: the subject and ``destinationUrl``
    name the new path, ``sourceUrl`` the old one; no ETag and no length."""
    body = storage_event(path, event_type=BLOB_RENAMED, schema=schema, host=LAKE_DFS)
    body["data"] = {
        "api": "RenameFile",
        "clientRequestId": "2b4f1e6e-1a3e-4a1b-9e7f-0e0d9c3b2a10",
        "requestId": "8fe2c8d2-b01f-0041-3a16-5fd2b2000000",
        "destinationUrl": f"{LAKE_DFS}/{path}",
        "sourceUrl": f"{LAKE_DFS}/{source}",
        "sequencer": "00000000000000000000000000005e5d0000000000000bb1",
        "storageDiagnostics": {"batchId": "0a1c4b1e-3e95-4a5a-8b6c-3e5f1c9d7a20"},
        **data,
    }
    return decoded(body)


@pytest.mark.parametrize("schema", ["EventGrid", "CloudEvents"])
def test_a_file_renamed_into_raw_starts_one_run_with_the_files_current_version(
    loop, extension, monkeypatch, schema, caplog
):
    """Spark and Data Factory write elsewhere and rename into raw/: no BlobCreated fires for raw/.
    The rename carries no ETag, so the lake's is read; an HTTP start of that version is the same run."""
    from shared.lake import LocalLake

    monkeypatch.setattr(LocalLake, "uri", property(lambda self: LAKE_HOST))
    monkeypatch.setattr("function_app.starts.file_version", lambda lake, path: '"0x8DB1"')
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=blob_renamed("raw/sales.csv", schema=schema))
        call(loop, extension, "on_lake_event", event=blob_renamed("raw/sales.csv", schema=schema))  # redelivery
    assert len(extension.starts) == 1
    name, instance, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and payload["source"] == "raw/sales.csv"
    assert payload["trigger"] == {"url": f"{LAKE_DFS}/raw/sales.csv", "etag": "0x8DB1"}
    assert "renamed_from=" in caplog.text and "_temporary/0/sales.csv" in caplog.text
    by_http = call(loop, extension, "start_training_run", req=http("POST", "train", {"dataset": "raw/sales.csv"}))
    assert by_http.status_code == 200 and reply(by_http)["id"] == instance


def spark_folder(workdir, name: str, parts: int = 3) -> str:
    """A folder dataset as Spark's committer leaves it in raw/: part files, then _SUCCESS."""
    folder = workdir["root"] / "lake" / "raw" / name
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(workdir["root"] / "lake" / "raw" / "sales.csv")
    bounds = np.linspace(0, len(frame), parts + 1).astype(int)
    for i, piece in enumerate(frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])):
        piece.to_parquet(folder / f"part-{i:05d}-6f1c2a9e-4d1b-4f0e-9c7a-1b2d3e4f5a6b-c000.snappy.parquet",
                         index=False)
    (folder / "_SUCCESS").write_bytes(b"")
    return f"raw/{name}"


@pytest.mark.parametrize("schema", ["EventGrid", "CloudEvents"])
def test_a_folder_written_by_spark_starts_one_ingestion_of_the_whole_folder_on_its_success_marker(
        loop, extension, workdir, schema, caplog):
    """df.repartition(3).write.parquet('abfss://raw@.../sales_2024'): the committer's events in order
    (tasks' files under _temporary, renamed into place at job commit, then _SUCCESS created and
    flushed) start exactly one run, of the folder, once the marker is there."""
    folder = spark_folder(workdir, "sales_2024")
    parts = sorted(p.name for p in (workdir["root"] / "lake" / folder).glob("part-*"))
    temp = f"{folder}/_temporary/0/_temporary/attempt_202406300000_0001_m_000000_0"
    sequence = (
        [blob_created(f"{temp}/{p}", host=LAKE_DFS, schema=schema) for p in parts]  # task output
        + [blob_renamed(f"{folder}/{p}", source=f"{temp}/{p}", schema=schema) for p in parts]  # job commit
        + [blob_created(f"{folder}/_SUCCESS", host=LAKE_DFS, schema=schema, api="CreateFile", contentLength=0),
           blob_created(f"{folder}/_SUCCESS", etag="0x8DD5", host=LAKE_DFS, schema=schema, contentLength=0)]
    )
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        for event in sequence + sequence[-1:]:  # and the marker's event delivered twice
            assert call(loop, extension, "on_lake_event", event=event) is None
    assert len(extension.starts) == 1
    name, _, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and payload["source"] == folder
    assert payload["trigger"]["etag"] == "0x8DD5" and payload["trigger"]["url"].endswith(f"{folder}/_SUCCESS")
    assert caplog.text.count("a part file of a folder dataset") == len(parts)
    # the folder is what gets ingested: every part's rows, one dataset
    ws = pipeline.Workspace.open(workdir["root"], settings=Settings(workdir=workdir["root"]),
                                 overrides={"runner.progress": False})
    whole = pipeline.ingest(ws, folder)
    single = pipeline.ingest(ws, "raw/sales.csv")
    assert whole.rows == single.rows and whole.partitions == single.partitions


def test_a_folder_completed_by_a_manifest_the_user_names_starts_one_ingestion_on_it(
        loop, extension, workdir, monkeypatch, caplog):
    """A Data Factory copy into raw/ (sink file name prefix part-) whose pipeline writes _manifest.json
    last: with MM_DATASET_MARKERS naming it, the parts' events are ignored and the manifest's starts one
    run of the folder. Without the setting the manifest is not a data file: nothing starts."""
    folder = spark_folder(workdir, "adf_copy")
    (workdir["root"] / "lake" / folder / "_SUCCESS").unlink()
    (workdir["root"] / "lake" / folder / "_manifest.json").write_text('{"files": 3}')
    parts = sorted(p.name for p in (workdir["root"] / "lake" / folder).glob("part-*"))
    sequence = [blob_created(f"{folder}/{p}", api="PutBlockList") for p in parts] \
        + [blob_created(f"{folder}/_manifest.json", etag="0x8DE1", api="PutBlob", contentLength=13)]
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        for event in sequence:
            assert call(loop, extension, "on_lake_event", event=event) is None
    assert extension.starts == [] and "not a data file" in caplog.text

    monkeypatch.setenv("MM_DATASET_MARKERS", "_SUCCESS,_manifest.json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        for event in sequence:
            assert call(loop, extension, "on_lake_event", event=event) is None
    assert len(extension.starts) == 1
    name, _, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and payload["source"] == folder
    assert payload["trigger"]["url"].endswith(f"{folder}/_manifest.json") and payload["trigger"]["etag"] == "0x8DE1"
    assert "_SUCCESS or _manifest.json marker arrives" in caplog.text


@pytest.mark.parametrize("markers", ["", "sales.csv", "part-00000", "../up", "a/b", "x" * 101])
def test_a_marker_name_that_could_be_data_or_a_path_is_refused_when_the_settings_are_read(markers):
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="MM_DATASET_MARKERS"):
        Settings.from_env({"MM_DATASET_MARKERS": markers or " , "})


def test_a_success_marker_beside_no_parquet_parts_is_refused_with_the_reason(loop, extension, workdir, caplog):
    folder = workdir["root"] / "lake" / "raw" / "empty_output"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_SUCCESS").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=blob_created("raw/empty_output/_SUCCESS", contentLength=0))
    assert extension.starts == [] and "no Parquet part files" in caplog.text


def test_a_renamed_file_is_checked_like_a_new_one(loop, extension, caplog):
    """Its version comes from the real (local) lake, and a bad or vanished file is refused, not retried."""
    call(loop, extension, "on_lake_event", event=blob_renamed("raw/sales.csv"))
    assert extension.starts[0][2]["trigger"]["etag"].startswith("local-")
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        assert call(loop, extension, "on_lake_event", event=blob_renamed("raw/no-target.csv")) is None
        assert call(loop, extension, "on_lake_event", event=blob_renamed("raw/renamed-away.csv")) is None
    assert len(extension.starts) == 1
    assert caplog.text.count("file rejected") == 2 and "no such file in the lake: raw/renamed-away.csv" in caplog.text


@pytest.mark.parametrize(
    "event, words",
    [
        (lambda: blob_renamed("raw/batch", api="RenameDirectory"), "not a file rename"),  # folders
        (lambda: blob_renamed("prepared/sales.csv"), "not in the 'raw' container"),
        (lambda: blob_renamed("raw/notes.txt"), "not a data file"),
        (lambda: blob_renamed("raw/out/_temporary/0/part-0000.csv"), "hidden or temporary"),
        (lambda: blob_created("raw/out/_temporary/0/task_1/part-0000.parquet", host=LAKE_DFS), "hidden or temporary"),
        (lambda: blob_created("raw/out/.part-0000.csv"), "hidden or temporary"),
        (lambda: blob_created("raw/_SUCCESS.csv"), "hidden or temporary"),
    ],
)
def test_renamed_folders_and_work_in_progress_paths_are_ignored_with_the_reason(
    loop, extension, event, words, caplog
):
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        assert call(loop, extension, "on_lake_event", event=event()) is None
    assert extension.starts == [] and "event ignored" in caplog.text and words in caplog.text


@pytest.mark.parametrize(
    "data, field",
    [
        ({"destinationUrl": None}, "data.destinationUrl"),
        ({"destinationUrl": f"{LAKE_DFS}/raw/other.csv"}, "data.destinationUrl"),
    ],
)
def test_a_malformed_rename_is_dropped_with_the_field_named(loop, extension, data, field, caplog):
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        assert call(loop, extension, "on_lake_event", event=blob_renamed("raw/sales.csv", **data)) is None
    assert extension.starts == [] and "malformed event dropped" in caplog.text and f"field={field}" in caplog.text


def test_a_file_still_being_copied_is_retried_not_rejected(loop, extension, monkeypatch, caplog):
    """On a hierarchical-namespace account a CopyBlob's BlobCreated fires when the copy starts: the
    sample would read a partial file. Event Grid must deliver it again, an HTTP caller retry."""
    from function_app.raw_files import NotReady
    from shared.lake import LocalLake

    monkeypatch.setattr(LocalLake, "copy_pending", lambda self, path: True, raising=False)
    event = blob_created("raw/sales.csv", etag="0x8DCC", host=LAKE_DFS, api="CopyBlob")
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(NotReady, match="copy"):
        call(loop, extension, "on_lake_event", event=event)
    assert extension.starts == [] and "file not complete yet" in caplog.text
    answer = call(loop, extension, "start_training_run", req=http("POST", "train", {"dataset": "raw/sales.csv"}))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
    assert reply(answer)["field"] == "dataset" and "still running" in reply(answer)["error"]
    monkeypatch.setattr(LocalLake, "copy_pending", lambda self, path: False, raising=False)
    call(loop, extension, "on_lake_event", event=event)  # the redelivery once the copy is done
    assert len(extension.starts) == 1


class ScheduledOnTheQueue:
    """The network edge of Service Bus: records what the function schedules, on which queue, for when."""

    def __init__(self):
        self.sent = []

    def factory(self, settings):
        def open_sender(queue):
            recorder = self

            class Sender:
                def schedule_messages(self, message, when):
                    recorder.sent.append((queue, message, when))
                    return [len(recorder.sent)]

                def close(self):
                    pass

            return Sender()

        return open_sender


def test_a_message_whose_file_is_still_being_copied_waits_on_the_queue_and_then_starts_one_run(
        loop, extension, monkeypatch, caplog):
    """Raising would abandon it, and the ~1 s redeliveries would dead-letter it within seconds."""
    from function_app import waiting
    from shared.lake import LocalLake

    queue = ScheduledOnTheQueue()
    monkeypatch.setattr(waiting, "SENDER_FACTORY", queue.factory)
    monkeypatch.setattr(LocalLake, "copy_pending", lambda self, path: True, raising=False)
    body = {"type": "dataset-ready", "path": "raw/sales.csv", "etag": "0x8DCC"}
    message = sb(body, message_id="copy-1")
    delays = []
    for _ in range(3):  # the copy goes on: each delivery completes and schedules the next, later
        with caplog.at_level(logging.INFO, logger="manymodels.functions"):
            assert call(loop, extension, "on_upstream_message", message=message) is None  # completes
        target, scheduled, when = queue.sent[-1]
        assert target == "mm-upstream" and bytes(next(scheduled.body)) == message.get_body()
        assert scheduled.application_properties[waiting.ORIGINAL_ID] == "copy-1"
        delays.append((when - datetime.now(timezone.utc)).total_seconds())
        message = sb(json.loads(bytes(next(scheduled.body))), message_id=scheduled.message_id,
                     properties=dict(scheduled.application_properties))  # as Service Bus delivers it
    assert [round(d, -1) for d in delays] == [30, 60, 120] and extension.starts == []
    assert "sent again later" in caplog.text and "rejected" not in caplog.text
    monkeypatch.setattr(LocalLake, "copy_pending", lambda self, path: False, raising=False)
    call(loop, extension, "on_upstream_message", message=message)  # the copy is complete now
    direct = sb(body, message_id="copy-1")  # had it been ready at once: the same run
    call(loop, extension, "on_upstream_message", message=direct)
    assert len(extension.starts) == 1 and extension.starts[0][0] == "ingest_orchestrator"


def test_a_message_that_waited_the_longest_is_dead_lettered_with_the_reason(loop, extension, monkeypatch, caplog):
    from function_app import waiting
    from function_app.raw_files import NotReady
    from shared.lake import LocalLake

    queue = ScheduledOnTheQueue()
    monkeypatch.setattr(waiting, "SENDER_FACTORY", queue.factory)
    monkeypatch.setattr(LocalLake, "copy_pending", lambda self, path: True, raising=False)
    last = sb({"type": "dataset-ready", "path": "raw/sales.csv"}, message_id="copy-9~wait12",
              properties={waiting.ORIGINAL_ID: "copy-9", waiting.WAITS: waiting.MAX_WAITS})
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(NotReady):
        call(loop, extension, "on_upstream_message", message=last)
    assert queue.sent == [] and "longest wait" in caplog.text


def test_the_app_has_no_blob_trigger_that_would_ship_whole_blobs_to_the_worker():
    """A func.InputStream blob trigger makes the host read the whole blob and send it over gRPC."""
    bindings = [b for f in app_functions().values() for b in f.get_bindings_dict()["bindings"]]
    assert not [b for b in bindings if b["type"] == "blobTrigger"]
    assert not [b for b in bindings if b["type"] == "blob" and b.get("dataType") != "string"]


# -- the event loop stays free: blocking work of async functions runs on worker threads -------------------
def _loop_stall(loop, coro_factory) -> float:
    """The longest time the event loop could not run a 5 ms heartbeat while ``coro_factory()`` ran."""
    gaps: list[float] = []

    async def heartbeat(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def both() -> None:
        stop = asyncio.Event()
        beat = asyncio.ensure_future(heartbeat(stop))
        # let the heartbeat take its first beat: a function that blocks before its first await
        # would otherwise run before the heartbeat started and its stall would go unmeasured
        await asyncio.sleep(0.02)
        try:
            await coro_factory()
        finally:
            stop.set()
            await beat

    loop.run_until_complete(both())
    return max(gaps)


@pytest.fixture
def slow_settings(monkeypatch):
    """Reading the deployment settings takes 0.4 s (a cold file system, a slow Key Vault reference)."""
    original = Settings.from_env.__func__

    def slow(cls, *args, **kwargs):
        time.sleep(0.4)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Settings, "from_env", classmethod(slow))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("on_lake_event", lambda w: {"event": blob_created("raw/sales.csv", etag="0xLOOP")}),
        ("start_training_run", lambda w: {"req": http("POST", "train", {"dataset_id": w["dataset_id"]})}),
        ("start_scoring_run", lambda w: {"req": http("POST", "score", {"horizon": 2})}),
        ("start_promotion_run", lambda w: {"req": http("POST", "promote", {})}),
        ("on_upstream_message", lambda w: {"message": sb({"type": "score", "horizon": 3})}),
    ],
)
def test_async_functions_keep_blocking_work_off_the_event_loop(loop, extension, workdir, slow_settings, name, kwargs):
    """The worker runs every async function of a process on one loop: blocking there stalls them all."""
    function = app_functions()[name].get_user_function()
    stall = _loop_stall(loop, lambda: function(client=extension.client_json(), **kwargs(workdir)))
    assert len(extension.starts) == 1
    assert stall < 0.3, f"{name} blocked the event loop for {stall:.2f} s"


# -- Service Bus ---------------------------------------------------------------------------------
def sb(body, message_id: str = "msg-1", delivery_count: int = 1, data_type: str = "bytes",
       properties: dict | None = None):
    """The message the worker passes to the function: the body and the trigger metadata the Service Bus
    extension sends, decoded by the worker's own converter (ServiceBusMessageInConverter)."""
    from azure.functions.meta import Datum
    from azure.functions.servicebus import ServiceBusMessageInConverter

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    data = Datum(raw if data_type == "bytes" else raw.decode("utf-8"), data_type)
    metadata = {
        "MessageId": Datum(message_id, "string"),
        "DeliveryCount": Datum(delivery_count, "int"),
        "ContentType": Datum("application/json", "string"),
        "SequenceNumber": Datum(7, "int"),
        "EnqueuedTimeUtc": Datum("2024-06-01T00:00:00Z", "string"),
        "LockToken": Datum("87931fd2-39f4-415a-9fdc-adfdcbed3148", "string"),
        "UserProperties": Datum("{}", "json"),  # its presence means cardinality one
        "ApplicationProperties": Datum(json.dumps(properties or {}), "json"),
    }
    message = ServiceBusMessageInConverter.decode(data, trigger_metadata=metadata)
    assert isinstance(message, func.ServiceBusMessage) and message.message_id == message_id
    return message


def test_upstream_dataset_ready_starts_ingestion_like_the_lake_event_would(loop, extension):
    call(
        loop, extension, "on_upstream_message", message=sb({"type": "dataset-ready", "path": "raw/sales.csv"})
    )
    call(
        loop,
        extension,
        "on_upstream_message",
        message=sb({"type": "dataset-ready", "path": "raw/sales.csv"}, message_id="msg-2"),
    )
    assert len(extension.starts) == 1  # same file version: one run whatever the message id
    assert extension.starts[0][0] == "ingest_orchestrator"


def test_upstream_retrain_with_partition_keys_and_redelivery(loop, extension, workdir):
    keys = workdir["first_keys"]
    body = {"type": "retrain", "partitions": [keys], "options": {"group_size": 1}}
    call(loop, extension, "on_upstream_message", message=sb(body, message_id="retrain-7"))
    call(loop, extension, "on_upstream_message", message=sb(body, message_id="retrain-7", delivery_count=2))
    assert len(extension.starts) == 1
    name, _, payload = extension.starts[0]
    assert name == "train_orchestrator" and payload["options"]["group_size"] == 1
    assert payload["partition_ids"] == [partition_id([keys["store"], keys["item"]])]
    call(
        loop, extension, "on_upstream_message", message=sb(body, message_id="retrain-8")
    )  # tomorrow's retrain
    assert len(extension.starts) == 2


@pytest.mark.parametrize("data_type", ["bytes", "string", "json"])
def test_upstream_score_message(loop, extension, data_type):
    """Whatever typed data the host sends the body as, the function reads the same message."""
    message = sb({"type": "score", "horizon": 4}, message_id=f"score-{data_type}", data_type=data_type)
    call(loop, extension, "on_upstream_message", message=message)
    name, _, payload = extension.starts[0]
    assert name == "score_orchestrator" and payload["horizon"] == 4 and payload["data"] is None


def test_an_upstream_message_that_meets_a_transient_failure_raises_to_be_redelivered(loop, extension, caplog):
    """The Durable extension unreachable: not the message's fault, so it is not logged as rejected; the
    function raises, Service Bus abandons the lock and redelivers (dead-lettered only after
    maxDeliveryCount)."""
    extension.close()
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(Exception) as caught:
        call(loop, extension, "on_upstream_message", message=sb({"type": "score", "horizon": 2}))
    assert not isinstance(caught.value, (AssertionError, MessageError))
    assert "upstream message rejected" not in caplog.text


@pytest.mark.parametrize(
    "body, field",
    [
        (b"\xff\xfe not json", "body"),
        ([1, 2], "body"),
        ({"type": "reboot"}, "type"),
        ({}, "type"),
        ({"type": "dataset-ready"}, "path"),
        ({"type": "dataset-ready", "path": "raw/missing.csv"}, "path"),
        ({"type": "dataset-ready", "path": "raw/no-target.csv"}, "path"),
        ({"type": "retrain"}, "partitions"),
        ({"type": "retrain", "partitions": "some"}, "partitions"),
        ({"type": "score", "path": "raw/none.csv"}, "path"),
        ({"type": "score", "horizon": -1}, "horizon"),
    ],
)
def test_invalid_upstream_messages_raise_so_they_are_dead_lettered(loop, extension, body, field, caplog):
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(MessageError) as caught:
        call(loop, extension, "on_upstream_message", message=sb(body if isinstance(body, bytes) else body))
    assert caught.value.field == field
    assert "upstream message rejected" in caplog.text and "message_id=msg-1" in caplog.text
    assert extension.starts == []


def test_a_promotion_message_promotes_its_run(workdir, caplog):
    handler = app_functions()["on_promotion_message"].get_user_function()
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        handler(
            message=sb(
                {"type": "promote", "run_id": workdir["run_id"], "origin": "train-x", "min_accuracy": 0.5}
            )
        )
    assert "run promoted" in caplog.text and f"run_id={workdir['run_id']}" in caplog.text


@pytest.mark.parametrize(
    "body, error",
    [
        ({"type": "promote"}, "MessageError"),
        ({"type": "train", "run_id": "r0000000000000000"}, "MessageError"),
        (b"promote everything", "MessageError"),
        ({"type": "promote", "run_id": "r0000000000000000"}, "PipelineError"),
    ],
)
def test_a_poison_promotion_message_raises_with_its_reason_logged(body, error, caplog):
    handler = app_functions()["on_promotion_message"].get_user_function()
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(Exception) as caught:
        handler(message=sb(body))
    assert type(caught.value).__name__ == error
    assert ("promotion message rejected" if error == "MessageError" else "promotion failed") in caplog.text


@pytest.mark.parametrize("transient", ["lease", "lake"])
def test_a_promotion_that_meets_a_transient_failure_raises_to_be_redelivered(
    workdir, monkeypatch, transient, caplog
):
    """The writer lease held elsewhere, or the lake unreachable: the message is fine, so the function
    raises and Service Bus redelivers it (never completed without its promotion)."""
    from shared.locking import WorkdirLockedError

    def busy(*args, **kwargs):
        if transient == "lease":
            raise WorkdirLockedError("the lake's writer lease is held by train_orchestrator", None)
        raise ConnectionResetError("lake unreachable")

    monkeypatch.setattr(pipeline, "promote", busy)
    handler = app_functions()["on_promotion_message"].get_user_function()
    body = {"type": "promote", "run_id": workdir["run_id"], "origin": "train-x"}
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(Exception) as caught:
        handler(message=sb(body, message_id="promo-busy"))
    expected = "WorkdirLockedError" if transient == "lease" else "ConnectionResetError"
    assert type(caught.value).__name__ == expected
    assert "promotion message rejected" not in caplog.text


# -- against Azurite: a real upload and its event ----------------------------------------------------
@pytest.mark.azurite
def test_a_real_blob_upload_and_its_event_delivered_twice_start_one_orchestration(
    loop, extension, azurite_blob, monkeypatch, tmp_path, caplog
):
    from azure.storage.blob import BlobServiceClient

    monkeypatch.setenv("MM_WORKDIR", str(tmp_path / "wd"))
    monkeypatch.setenv("MM_LAKE_BACKEND", "blob")
    monkeypatch.setenv("LakeStorage", azurite_blob.connection_string)
    service = BlobServiceClient.from_connection_string(azurite_blob.connection_string)
    if not service.get_container_client("raw").exists():
        service.create_container("raw")

    def upload(name: str, frame: pd.DataFrame) -> func.EventGridEvent:
        local = tmp_path / Path(name).name
        frame.to_parquet(local, index=False)
        blob = service.get_blob_client("raw", name)
        blob.upload_blob(local.read_bytes(), overwrite=True)
        props = blob.get_blob_properties()
        assert blob.url == f"{service.url.rstrip('/')}/raw/{name}"
        # the event's JSON as Event Grid sends it, decoded by the worker's own converter
        return decoded(storage_event(f"raw/{name}", etag=props.etag, host=service.url.rstrip("/"),
                                     contentLength=props.size))

    panel = tmp_path / "panel.parquet"
    write_panel(panel, partitions=4, periods=40, seed=2)
    frame = pd.read_parquet(panel)
    event = upload("uploads/week-23.parquet", frame)
    for _ in range(2):  # Event Grid delivers at least once
        call(loop, extension, "on_lake_event", event=event)
    assert len(extension.starts) == 1
    name, _, payload = extension.starts[0]
    assert name == "ingest_orchestrator" and payload["source"] == "raw/uploads/week-23.parquet"
    assert payload["trigger"]["etag"] == event.get_json()["eTag"].strip('"')

    changed = upload("uploads/week-23.parquet", frame.head(len(frame) - 1))  # a new version of the file
    call(loop, extension, "on_lake_event", event=changed)
    assert len(extension.starts) == 2

    bad = upload("uploads/no-target.parquet", frame.drop(columns=["sales"]))  # checked through ranged reads
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        call(loop, extension, "on_lake_event", event=bad)
    assert len(extension.starts) == 2
    assert "file rejected" in caplog.text and "sales" in caplog.text


# -- the ingestion activities with the Azure ML backend: a handle in, a handle out, never data ------------
def test_the_ingestion_activities_submit_and_poll_an_azure_ml_job_without_reading_the_file(
    workdir, monkeypatch
):
    """The real activities, the real workspace and job builder; only the Azure ML client is scripted."""
    from types import SimpleNamespace

    from azure.core.exceptions import ResourceNotFoundError

    from durable_harness import call_activity
    from shared.azureml import ingest_job
    from shared.azureml.client import AzureMLBackend, AzureMLSettings
    from shared.azureml.jobs import stage_code

    for name, value in {"MM_COMPUTE_BACKEND": "azureml", "MM_AZUREML_SUBSCRIPTION_ID": "sub-1",
                        "MM_AZUREML_RESOURCE_GROUP": "rg", "MM_AZUREML_WORKSPACE_DEV": "mlw-dev",
                        "MM_AZUREML_WORKSPACE_PROD": "mlw-prod"}.items():
        monkeypatch.setenv(name, value)
    jobs: dict = {}

    def create(job, experiment_name=None):
        jobs[job.name] = SimpleNamespace(name=job.name, status="Queued", studio_url="", tags=dict(job.tags), job=job)
        return jobs[job.name]

    def get(name):
        if name not in jobs:
            raise ResourceNotFoundError(name)
        return jobs[name]

    aml = AzureMLSettings.from_env()
    backend = AzureMLBackend(aml, credential=object(), code=stage_code())
    backend._clients["dev"] = SimpleNamespace(jobs=SimpleNamespace(get=get, create_or_update=create))
    monkeypatch.setattr(AzureMLBackend, "for_workspace", classmethod(lambda cls, ws: backend))
    read = []
    monkeypatch.setattr(pipeline, "ingest", lambda *a, **k: read.append(a))  # must never run in the Function

    functions = app_functions()
    payload = {"source": "raw/sales.csv", "config": {}, "key": "ingest-abc"}
    handle = call_activity(functions["ingest_dataset"], payload, [])
    assert handle["state"] == "queued" and handle["kind"] == "ingest" and read == []
    assert len(json.dumps(handle)) < 400
    [submitted] = jobs.values()
    assert submitted.job.inputs["source"].path == "azureml://datastores/lake_raw/paths/sales.csv"

    status = {"job_id": handle["job_id"], "config": {}}
    assert call_activity(functions["get_ingest_job_status"], status, [])["state"] == "queued"
    submitted.status = "Completed"
    result = {"status": "completed", "dataset_id": workdir["dataset_id"], "partitions": 6, "rows": 360}
    workdir["lake"].write_bytes(ingest_job.result_path(handle["run_id"], handle["job_id"]), json.dumps(result).encode())
    done = call_activity(functions["get_ingest_job_status"], status, [])
    assert done["state"] == "completed" and done["summary"] == result


# -- issue 18: every number and string of a message is bounded; only the lake's own account -------
LONG_PATH = "raw/" + "a" * 5000 + ".csv"


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"type": "dataset-ready", "path": LONG_PATH}, "path", "5,008 characters"),
        ({"type": "dataset-ready", "path": "raw/" + "b" * 300 + ".csv"}, "path", "one folder or file name"),
        ({"type": "score", "path": LONG_PATH}, "path", "5,008 characters"),
        ({"type": "score", "horizon": 10**12}, "horizon", "out of bounds"),
        ({"type": "score", "horizon": 600}, "horizon", "beyond scoring.max_distance 520"),
        ({"type": "retrain", "partitions": "all", "options": {"group_size": 10**30}}, "options.group_size",
         "out of bounds"),
        ({"type": "retrain", "partitions": [{"store": "\ud800", "item": "I1"}]}, "partitions[0].store",
         "not valid unicode"),
        ({"type": "score", "horizon": 2, "options": {"config": {"\ud800": 1}}}, "options.config",
         "not valid unicode"),
        ({"type": "retrain", "partitions": [{"store": "S" * 2000, "item": "I1"}]}, "partitions[0].store",
         "1,024"),
    ],
)
def test_oversized_and_unencodable_upstream_messages_are_message_errors_not_crashes(
    loop, extension, body, field, words, caplog
):
    """A 5,000-character path used to reach the file system (OSError, retried with a server path);
    a horizon of 10**12 and a group size of 10**30 used to start runs the CLI refuses; a lone
    surrogate used to raise UnicodeEncodeError while hashing the key."""
    with caplog.at_level(logging.INFO, logger="manymodels.functions"), pytest.raises(MessageError) as caught:
        call(loop, extension, "on_upstream_message", message=sb(body))
    assert caught.value.field == field and words in caught.value.reason
    assert "upstream message rejected" in caplog.text and extension.starts == []
    assert "/tmp" not in str(caught.value)


@pytest.mark.parametrize(
    "route, name, body, field, words",
    [
        ("train", "start_training_run", {"dataset": LONG_PATH}, "dataset", "5,008 characters"),
        ("score", "start_scoring_run", {"data": LONG_PATH}, "data", "5,008 characters"),
        ("score", "start_scoring_run", {"horizon": 10**12}, "horizon", "out of bounds"),
        ("train", "start_training_run", {"options": {"group_size": 10**30}}, "options.group_size", "out of bounds"),
        ("train", "start_training_run", {"partitions": [{"store": "\ud800", "item": "I1"}]},
         "partitions[0].store", "not valid unicode"),
        ("score", "start_scoring_run", {"request_id": "\udfff"}, "request_id", "not valid unicode"),
        ("promote", "start_promotion_run", {"min_accuracy": 0.5, "request_id": "x\ud800"}, "request_id",
         "not valid unicode"),
    ],
)
def test_oversized_and_unencodable_http_starts_get_400_naming_the_field(
    loop, extension, route, name, body, field, words
):
    response = call(loop, extension, name, req=http("POST", route, body))
    assert response.status_code == 400
    out = reply(response)
    assert out["field"] == field and words in out["error"]
    assert extension.starts == []


BLOB_LAKE_KEY = "a2V5LW9mLXRoZS1sYWtlLW5vdC1hLXNlY3JldA=="  # base64 of a placeholder, no real account


@pytest.mark.parametrize("host", ["https://otheracct.blob.core.windows.net", "https://otheracct.dfs.core.windows.net"])
def test_an_event_naming_another_storage_account_is_ignored_with_the_reason(
    loop, extension, monkeypatch, host, caplog
):
    """The subscription is the lake's, but an event is only JSON: one naming another account's blob
    must not make the app ingest the lake's file of the same name (or read another account)."""
    monkeypatch.setenv("MM_LAKE_BACKEND", "blob")
    monkeypatch.setenv(
        "LakeStorage",
        f"DefaultEndpointsProtocol=https;AccountName=mmlake;AccountKey={BLOB_LAKE_KEY};"
        "EndpointSuffix=core.windows.net",
    )
    with caplog.at_level(logging.INFO, logger="manymodels.functions"):
        result = call(loop, extension, "on_lake_event", event=blob_created("raw/sales.csv", host=host))
    assert result is None and extension.starts == []
    assert "event ignored" in caplog.text and "'otheracct'" in caplog.text and "'mmlake'" in caplog.text


def test_events_of_the_lakes_own_account_pass_the_account_check_on_either_endpoint():
    from function_app.messages import Ignored, check_lake_account

    for url in (f"{LAKE_HOST}/raw/sales.csv", f"{LAKE_DFS}/raw/sales.csv"):
        check_lake_account(url, "https://mmlake.blob.core.windows.net")
    check_lake_account("http://127.0.0.1:10000/devstoreaccount1/raw/a.csv", "http://127.0.0.1:10000/devstoreaccount1")
    check_lake_account(f"{LAKE_HOST}/raw/sales.csv", "file:///srv/mm/lake")  # a local lake has no account
    with pytest.raises(Ignored, match="'devstoreaccount2'"):
        check_lake_account("http://127.0.0.1:10000/devstoreaccount2/raw/a.csv",
                           "http://127.0.0.1:10000/devstoreaccount1")
