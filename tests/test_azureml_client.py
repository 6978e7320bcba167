"""The Azure ML client calls at the cloud edge: submit, poll, register, share, deploy.

The SDK runs unchanged down to azure-core's own ``RequestsTransport``; only the network is
replaced: the transport's ``requests`` session is :class:`FakeAzureML`, an in-memory Azure
Resource Manager + Azure ML registry that records every request and answers with synthetic JSON
(PUT stores a resource, GET returns it, 404 otherwise; one-shot responses script throttling and
failures). The tests assert the requests we send (method, path, body fields) and our handling of
429 with Retry-After, a failed job and a missing model.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("azure.ai.ml")

import jwt  # noqa: E402
import requests  # noqa: E402
from azure.core.credentials import AccessToken, AccessTokenInfo  # noqa: E402
from azure.core.exceptions import HttpResponseError  # noqa: E402
from azure.core.pipeline.transport import RequestsTransport  # noqa: E402
from urllib3.response import HTTPResponse  # noqa: E402

from shared.azureml.client import AzureMLBackend, AzureMLError, AzureMLSettings, RetryPolicy  # noqa: E402
from shared.azureml.endpoint import deploy_online  # noqa: E402
from shared.azureml.jobs import parallel_job_status, stage_code, submit_parallel_job  # noqa: E402
from shared.azureml.registry import (HEAD_FILE, INDEX_FILE, MANIFEST_FILE, AzureMLRegistry,  # noqa: E402
                                     RegistryConflictError, WorkspaceAssetPublisher)
from shared.runs.backends import open_azureml_registries as open_registries  # noqa: E402
from shared.config import ProjectConfig, PromotionRules  # noqa: E402
from shared.lake import LocalLake  # noqa: E402
from shared.runs.workspace import Workspace  # noqa: E402
from shared.registries.promotion import promote_run  # noqa: E402
from shared.registries.registry import ArtifactIntegrityError, ModelRegistry, RegistryError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")

SUB, RG = "sub-1", "rg-mm"
ARM = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices"
DEV, PROD = f"{ARM}/workspaces/mlw-dev", f"{ARM}/workspaces/mlw-prod"
REG = f"{ARM}/registries/mmreg"
RUN = "r0123456789abcdef"
DATASET = "d00112233445566aa"


# -- the fake service -------------------------------------------------------------------------------
@dataclass
class Call:
    method: str
    path: str
    query: dict
    body: dict | None
    host: str


class FakeAzureML:
    """A ``requests.Session`` stand-in serving Azure ML's REST API from memory."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.resources: dict[str, dict] = {}
        self.scripted: list[tuple[str, str, int, dict, dict | None]] = []
        self.job_status: dict[str, str] = {}

    # requests.Session API used by RequestsTransport
    def mount(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def script(self, method: str, pattern: str, status: int, body: dict | None = None,
               headers: dict | None = None) -> None:
        """Answer the next matching request with this response, once."""
        self.scripted.append((method, pattern, status, headers or {}, body))

    def request(self, method, url, headers=None, data=None, **kwargs):
        parts = urlsplit(url)
        path = parts.path.replace("/mferp/managementfrontend", "")
        raw = data.decode() if isinstance(data, bytes) else data
        body = json.loads(raw) if raw else None
        self.calls.append(Call(method, path, parse_qs(parts.query), body, parts.netloc))
        for i, (m, pattern, status, hdrs, payload) in enumerate(self.scripted):
            if m == method and re.search(pattern, path):
                del self.scripted[i]
                return _response(url, method, status, payload, hdrs)
        status, payload = self.route(method, path, parts.query, body)
        return _response(url, method, status, payload, {})

    def route(self, method: str, path: str, query: str, body: dict | None) -> tuple[int, dict | None]:
        if path.endswith("/discovery"):
            return 200, {"registryName": "mmreg", "subscriptionId": SUB, "resourceGroup": RG,
                         "primaryRegion": "westeurope",
                         "primaryRegionResourceProviderUri": "https://westeurope.api.azureml.ms/"}
        if method == "GET" and re.search(r"/computes/[^/]+$", path):
            scale = {"maxNodeCount": 12, "minNodeCount": 0}
            return 200, {"id": path, "name": path.rsplit("/", 1)[-1], "location": "westeurope",
                         "properties": {"computeType": "AmlCompute",
                                        "properties": {"vmSize": "STANDARD_D16S_V3", "scaleSettings": scale}}}
        if method == "GET" and re.search(r"/codes/[^/]+/versions$", path) and "hash=" in query:
            # the snapshot was uploaded before: the SDK finds it by content hash and uploads nothing
            code = f"{path.split('/codes/')[0]}/codes/manymodels-code/versions/1"
            self.resources.setdefault(code, {"id": code, "name": "1", "properties": {
                "codeUri": "https://stmldev.blob.core.windows.net/code/LocalUpload/abc/snapshot"}})
            return 200, {"value": [self.resources[code]]}
        if method == "GET" and path.endswith("/versions") and "top=1" in query:
            versions = [v for p, v in self.resources.items() if p.startswith(path + "/")]
            return 200, {"value": versions[-1:]}
        if method == "GET" and re.fullmatch(rf"{ARM}/workspaces/[^/]+", path):
            return 200, {"id": path, "name": path.rsplit("/", 1)[-1], "location": "westeurope",
                         "properties": {"workspaceId": "00000000-aaaa-bbbb-cccc-000000000001"}}
        if method == "POST" and path.endswith("/import"):
            props = body["properties"]
            target = f"{REG}/models/{props['destinationName']}/versions/{props['destinationVersion']}"
            asset_id = f"azureml://registries/mmreg/models/{props['destinationName']}/versions/" \
                       f"{props['destinationVersion']}"
            self.resources[target] = {"id": asset_id, "name": props["destinationVersion"],
                                      "properties": {"modelUri": props["sourceAssetId"],
                                                     "modelType": "custom_model", "flavors": {}}}
            return 200, None
        if method == "PUT":
            stored = dict(body or {})
            stored.update({"id": path, "name": path.rsplit("/", 1)[-1]})
            props = stored.setdefault("properties", {})
            if "/jobs/" in path:
                props["status"] = self.job_status.get(stored["name"], "NotStarted")
            if "/models/" in path and props.get("flavors") is None:
                props["flavors"] = {}  # the service answers with an empty map, never null
            if "/onlineEndpoints/" in path:
                props["provisioningState"] = "Succeeded"
                host = f"{path.rsplit('/', 1)[-1]}.westeurope.inference.ml.azure.com"
                props.setdefault("scoringUri", f"https://{host}/score")
            self.resources[path] = stored
            return 200, stored
        if method == "GET" and path in self.resources:
            found = json.loads(json.dumps(self.resources[path]))
            if "/jobs/" in path and found["name"] in self.job_status:
                found["properties"]["status"] = self.job_status[found["name"]]
            return 200, found
        return 404, {"error": {"code": "ResourceNotFound", "message": f"{path} not found"}}

    def requests_to(self, method: str, pattern: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.search(pattern, c.path)]


def _response(url: str, method: str, status: int, payload: dict | None, headers: dict) -> requests.Response:
    content = json.dumps(payload).encode() if payload is not None else b""
    response = requests.Response()
    response.status_code = status
    response.reason = "OK" if status < 400 else "Error"
    response.headers.update({"content-type": "application/json", **headers})
    response.raw = HTTPResponse(body=io.BytesIO(content), headers=dict(response.headers), status=status,
                                preload_content=False)
    response._content = content
    response._content_consumed = True
    response.url = url
    response.request = requests.Request(method, url).prepare()
    return response


class FakeCredential:
    """Tokens the SDK accepts: pipeline jobs check the Azure ML audience in the JWT."""

    token = jwt.encode({"aud": "https://ml.azure.com", "tid": "tenant-1", "oid": "me"}, None,
                       algorithm="none")

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self.token, 4_102_444_800)

    def get_token_info(self, *scopes, options=None) -> AccessTokenInfo:
        return AccessTokenInfo(self.token, 4_102_444_800)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def service() -> FakeAzureML:
    return FakeAzureML()


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    return stage_code(tmp_path_factory.mktemp("code") / "snapshot")


@pytest.fixture
def sleeps() -> list[float]:
    return []


def _aml(**changes) -> AzureMLSettings:
    base = AzureMLSettings(subscription_id=SUB, resource_group=RG, workspace_dev="mlw-dev",
                           workspace_prod="mlw-prod", compute="cpu-cluster", instance_count=2)
    return base.with_changes(**changes) if changes else base


def _backend(service: FakeAzureML, sleeps: list[float], code: Path, **changes) -> AzureMLBackend:
    transport = RequestsTransport(session=service, session_owner=False)
    # retry_total=0: the SDK's per-request retries are off, so throttling reaches our wrapper
    return AzureMLBackend(_aml(**changes), credential=FakeCredential(),
                          client_kwargs={"transport": transport, "retry_total": 0},
                          retry=RetryPolicy(attempts=4, sleep=sleeps.append), code=code)


@pytest.fixture
def ws(tmp_path, service, sleeps, code) -> Workspace:
    workspace = Workspace(tmp_path, ProjectConfig(), LocalLake(tmp_path / "lake"))
    for i in range(2):
        workspace.lake.write_bytes(f"prepared/{DATASET}/batches/batch-{i:05d}.parquet", b"PAR1")
    meta = {"run_id": RUN, "dataset_id": DATASET, "kind": "train", "config": workspace.config.to_dict()}
    workspace.lake.write_bytes(f"runs/{RUN}/run.json", json.dumps(meta).encode())
    workspace.azureml = _backend(service, sleeps, code)
    return workspace


def _batches() -> list[str]:
    return [f"prepared/{DATASET}/batches/batch-{i:05d}.parquet" for i in range(2)]


# -- submit and poll ---------------------------------------------------------------------------------
def test_submitting_a_group_puts_one_named_pipeline_job_with_its_parallel_step(ws, service):
    handle = submit_parallel_job(ws, "train", RUN, 0, _batches())
    name = f"train-{RUN}-g00000"
    assert (handle.job_id, handle.kind, handle.run_id, handle.group_index, handle.state) == \
        (name, "train", RUN, 0, "queued")

    assert [c.method for c in service.requests_to("GET", rf"/jobs/{name}$")] == ["GET"], "looked up first"
    puts = [c.path for c in service.calls if c.method == "PUT"]
    assert puts[-1] == f"{DEV}/jobs/{name}", "the job itself is the last write"
    environment = rf"{DEV}/environments/manymodels-parallel/versions/[0-9a-f]{{16}}"
    assert any(re.fullmatch(environment, p) for p in puts)
    assert any(re.fullmatch(rf"{DEV}/components/azureml_anonymous/versions/[-0-9a-f]+", p) for p in puts)
    assert not [c for c in service.calls if "blob.core.windows.net" in c.host], "snapshot not re-uploaded"

    job = service.requests_to("PUT", rf"/jobs/{name}$")[0].body["properties"]
    assert job["jobType"] == "Pipeline"
    assert job["experimentName"] == "manymodels"
    assert job["tags"]["run_id"] == RUN and job["tags"]["manymodels"] == "train"
    assert job["inputs"]["data"]["uri"] == f"azureml://datastores/lake_prepared/paths/{DATASET}/batches/"
    (step,) = job["jobs"].values()
    assert step["type"] == "parallel"
    assert step["resources"]["instance_count"] == 2
    assert step["mini_batch_size"] == 1 and step["max_concurrency_per_instance"] == 4
    assert step["retry_settings"] == {"max_retries": 2, "timeout": 1800}
    assert step["outputs"]["models"]["uri"].endswith(f"/paths/{RUN}/models/")
    assert step["componentId"].startswith(f"{DEV}/components/azureml_anonymous/")
    (component_put,) = service.requests_to("PUT", r"/components/azureml_anonymous/")
    component = component_put.body["properties"]["componentSpec"]
    assert component["task"]["entry_script"] == "shared/entry/train.py"
    assert "--run-id " + RUN in component["task"]["program_arguments"]
    assert ws.lake.exists(f"runs/{RUN}/config/manymodels.toml")


def test_a_redelivered_submit_returns_the_live_job_and_submits_nothing(ws, service):
    first = submit_parallel_job(ws, "train", RUN, 0, _batches())
    service.job_status[first.job_id] = "Running"
    puts = len([c for c in service.calls if c.method == "PUT"])
    again = submit_parallel_job(ws, "train", RUN, 0, _batches())
    assert (again.job_id, again.state) == (first.job_id, "running")
    assert len([c for c in service.calls if c.method == "PUT"]) == puts


def test_polling_maps_states_and_summarises_a_completed_group(ws, service):
    handle = submit_parallel_job(ws, "train", RUN, 0, _batches())
    for azure_state, ours in (("Queued", "queued"), ("Preparing", "queued"), ("Running", "running"),
                              ("Finalizing", "running"), ("CancelRequested", "running")):
        service.job_status[handle.job_id] = azure_state
        assert parallel_job_status(ws, handle.job_id).state == ours
    rows = [{"partition_id": f"p{i}", "status": s} for i, s in enumerate(["trained", "trained", "skipped"])]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    ws.lake.write_bytes(f"runs/{RUN}/results/g00000/rows.jsonl", lines.encode())
    service.job_status[handle.job_id] = "Completed"
    done = parallel_job_status(ws, handle.job_id)
    assert done.state == "completed" and done.done
    assert done.summary == {"run_id": RUN, "group_index": 0, "partitions": 3,
                            "statuses": {"trained": 2, "skipped": 1}}
    assert service.requests_to("GET", rf"{DEV}/jobs/{handle.job_id}$")[-1].method == "GET"


def test_a_failed_job_is_reported_and_its_retry_submits_a_new_attempt(ws, service):
    first = submit_parallel_job(ws, "train", RUN, 0, _batches())
    service.job_status[first.job_id] = "Failed"
    failed = parallel_job_status(ws, first.job_id)
    assert failed.state == "failed" and failed.done and "Failed" in failed.detail
    retry = submit_parallel_job(ws, "train", RUN, 0, _batches())
    assert retry.job_id == f"{first.job_id}-a2" and retry.state == "queued"
    assert service.requests_to("PUT", rf"/jobs/{first.job_id}-a2$")
    assert parallel_job_status(ws, retry.job_id).run_id == RUN, "identity from the job's tags"


def test_polling_an_unknown_job_names_it(ws):
    with pytest.raises(AzureMLError, match="no Azure ML job named train-nope-g00000"):
        parallel_job_status(ws, "train-nope-g00000")


def test_throttling_is_retried_after_the_wait_the_service_asks_for(ws, service, sleeps):
    service.script("GET", r"/jobs/", 429, {"error": {"code": "TooManyRequests", "message": "slow down"}},
                   {"Retry-After": "7"})
    service.script("GET", r"/jobs/", 503, {"error": {"code": "ServiceUnavailable", "message": "busy"}})
    handle = submit_parallel_job(ws, "train", RUN, 0, _batches())
    assert handle.state == "queued"
    assert sleeps == [7.0, 4.0], "Retry-After honoured; exponential back-off without it (2 s, then 4 s)"
    assert len(service.requests_to("GET", rf"/jobs/{handle.job_id}$")) == 3


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "Wed, 01 Jan 2100 00:00:30 GMT"}, 120.0),  # far future: capped at max_delay
    ({"Retry-After": "soon"}, 2.0),  # unreadable: our own back-off
])
def test_every_form_of_retry_after_is_understood(ws, service, sleeps, headers, expected):
    service.script("GET", r"/jobs/", 429, {"error": {"code": "TooManyRequests", "message": "wait"}}, headers)
    parallel_job_status(ws, submit_parallel_job(ws, "train", RUN, 0, _batches()).job_id)
    assert sleeps == [expected]


def test_throttling_that_outlasts_the_policy_fails_visibly(ws, service, sleeps):
    for _ in range(4):
        service.script("GET", r"/jobs/", 429, {"error": {"code": "TooManyRequests", "message": "slow down"}},
                       {"Retry-After": "1"})
    with pytest.raises(HttpResponseError) as info:
        submit_parallel_job(ws, "train", RUN, 0, _batches())
    assert info.value.status_code == 429 and sleeps == [1.0, 1.0, 1.0]
    assert not [c for c in service.calls if c.method == "PUT"], "nothing submitted"


# -- the registry ---------------------------------------------------------------------------------------
def _records(run_id: str, n: int = 3) -> list[tuple[dict, bytes]]:
    items = []
    for i in range(n):
        pid = f"p{i:020d}"
        items.append(({"partition_id": pid, "run_id": run_id, "model_type": "gbm", "fingerprint": f"f{i}",
                       "metrics": {"accuracy": 0.9 - i * 0.1, "wape": 0.1 + i * 0.1},
                       "keys": {"store": f"s{i}", "item": "i1"}, "status": "trained"},
                      _pickled({"model": f"{run_id}-{i}"})))
    return items


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)  # as the training entry script writes


def test_registering_a_run_makes_one_model_version_and_our_own_index(ws, service, tmp_path):
    dev, _ = open_registries(ws)
    records = dev.register_many(_records(RUN))
    assert [r.version for r in records] == [1, 1, 1]

    (put,) = service.requests_to("PUT", r"/models/manymodels/versions/")
    version = put.path.rsplit("/", 1)[-1]
    assert put.path == f"{DEV}/models/manymodels/versions/{version}" and version.startswith(RUN + "-")
    body = put.body["properties"]
    assert body["modelUri"] == f"azureml://subscriptions/{SUB}/resourcegroups/{RG}/workspaces/mlw-dev/" \
                               f"datastores/lake_registry/paths/dev/assets/{version}/"
    assert body["modelType"] == "custom_model"
    assert body["tags"]["run_id"] == RUN and body["tags"]["models"] == "3"
    assert body["tags"]["partition_keys"] == "store,item" and body["tags"]["model_types"] == "gbm:3"
    assert body["tags"]["accuracy_median"] == "0.8000"
    assert service.requests_to("GET", rf"/models/manymodels/versions/{version}$"), "existence checked first"

    lake = ws.lake
    assert lake.exists(f"registry/dev/{INDEX_FILE}") and lake.exists(f"registry/dev/{HEAD_FILE}")
    pack = lake.read_bytes(f"registry/dev/{records[0].artifact}")
    first = records[0]
    assert pack[first.byte_offset:first.byte_offset + first.byte_length] == _pickled({"model": f"{RUN}-0"})
    assert re.fullmatch(r"artifacts/packs/[0-9a-f]{32}-[0-9a-f]{12}\.pack", first.artifact), "named by content"
    assert {r.artifact for r in records} == {first.artifact}, "one pack uploaded for the run's models"
    assert len(lake.list("registry/dev/artifacts")) == 1
    manifest = [json.loads(line) for line in lake.read_bytes(f"registry/dev/assets/{version}/{MANIFEST_FILE}")
                .decode().splitlines()]
    assert [m["partition_id"] for m in manifest] == [r.partition_id for r in records]
    assert manifest[0]["tags"]["store"] == "s0" and manifest[0]["metrics"]["accuracy"] == 0.9
    # the asset holds the pack once; the manifest says which range of it is whose
    second = manifest[1]
    staged = lake.read_bytes(f"registry/dev/assets/{version}/{second['asset_file']}")
    assert staged[second["byte_offset"]:second["byte_offset"] + second["byte_length"]] == _pickled({"model": f"{RUN}-1"})
    assert {m["asset_file"] for m in manifest} == {first.artifact.rsplit("/", 1)[-1]}

    # another process (a scoring job, the online endpoint) reads the same index from the lake
    reader = AzureMLRegistry("dev", lake, tmp_path / "reader-cache")
    assert reader.latest(records[2].partition_id).metrics["wape"] == pytest.approx(0.3)
    assert [r.partition_id for r in reader.find({"store": "s1"})] == [records[1].partition_id]
    # the registry folder is a plain local registry: the entry scripts open it as is
    plain = ModelRegistry(lake.local_path("registry/dev"), "dev")
    assert plain.count() == 3 and plain.load(plain.latest(records[2].partition_id)) == {"model": f"{RUN}-2"}

    puts = len(service.requests_to("PUT", r"/models/"))
    assert dev.register_many(_records(RUN)) == records, "idempotent by run and partition"
    assert len(service.requests_to("PUT", r"/models/")) == puts, "an existing version is never re-registered"


def test_a_missing_model_is_none_and_a_missing_artifact_names_itself(ws, tmp_path):
    dev, _ = open_registries(ws)
    assert dev.latest("p-unknown") is None and dev.get("p-unknown", 1) is None
    (record,) = dev.register_many(_records(RUN, 1))
    ws.lake.delete(f"registry/dev/{record.artifact}")
    reader = AzureMLRegistry("dev", ws.lake, tmp_path / "other-cache")
    with pytest.raises(Exception, match=record.partition_id):
        reader.load(reader.latest(record.partition_id))


def test_a_second_run_reaches_readers_through_the_head_check(ws, tmp_path):
    dev, _ = open_registries(ws)
    dev.register_many(_records(RUN))
    clock = [0.0]
    reader = AzureMLRegistry("dev", ws.lake, tmp_path / "reader", refresh_seconds=30, clock=lambda: clock[0])
    pid = _records(RUN)[0][0]["partition_id"]
    assert reader.latest(pid).version == 1
    dev.register_many(_records("r-second-run"))
    assert reader.latest(pid).version == 1, "within refresh_seconds no HEAD read"
    clock[0] = 31.0
    assert reader.latest(pid).version == 2 and reader.latest(pid).run_id == "r-second-run"
    assert reader.index_version() == dev.index_version()


def test_a_write_that_races_another_writer_is_refused_without_damage(ws, service, sleeps, code, tmp_path):
    backend = ws.azureml

    class InterleavingLake(LocalLake):
        """The real local lake; a second writer commits just as the first starts its uploads."""

        armed = True

        def write_bytes(self, path: str, data: bytes) -> None:
            if InterleavingLake.armed and "/artifacts/" in path:
                InterleavingLake.armed = False
                other = AzureMLRegistry("dev", LocalLake(self.root), tmp_path / "other",
                                        publisher=WorkspaceAssetPublisher(backend.client("dev"), backend.aml))
                other.register_many(_records("r-other"))
            super().write_bytes(path, data)

    lake = InterleavingLake(ws.lake.root)
    first = AzureMLRegistry("dev", lake, tmp_path / "first",
                            publisher=WorkspaceAssetPublisher(backend.client("dev"), backend.aml))
    with pytest.raises(RegistryConflictError, match="another writer"):
        first.register_many(_records(RUN))
    retried = first.register_many(_records(RUN))
    assert [r.version for r in retried] == [2, 2, 2], "the retry pulls the other write and numbers after it"
    check = AzureMLRegistry("dev", LocalLake(ws.lake.root), tmp_path / "check")
    assert check.count() == 6
    pid = retried[0].partition_id
    assert check.load(check.get(pid, 1)) == {"model": "r-other-0"}, "the other writer's model is intact"
    assert check.load(check.get(pid, 2)) == {"model": f"{RUN}-0"}


def test_a_write_interrupted_before_its_commit_leaves_nothing_behind(ws, tmp_path):
    backend = ws.azureml

    class FlakyLake(LocalLake):
        """The real local lake; the first index upload fails as a dropped connection would."""

        failed = False

        def write_bytes(self, path: str, data: bytes) -> None:
            if path.endswith(INDEX_FILE) and not FlakyLake.failed:
                FlakyLake.failed = True
                raise ConnectionError("connection reset while uploading the index")
            super().write_bytes(path, data)

    lake = FlakyLake(ws.lake.root)
    registry = AzureMLRegistry("dev", lake, tmp_path / "cache",
                               publisher=WorkspaceAssetPublisher(backend.client("dev"), backend.aml))
    with pytest.raises(ConnectionError):
        registry.register_many(_records(RUN))
    assert not lake.exists(f"registry/dev/{HEAD_FILE}"), "not committed"
    assert registry.count() == 0, "the working copy did not run ahead of the lake"
    records = registry.register_many(_records(RUN))
    assert [r.version for r in records] == [1, 1, 1]
    assert AzureMLRegistry("dev", LocalLake(ws.lake.root), tmp_path / "check").count() == 3


# -- promotion -------------------------------------------------------------------------------------------
RULES = PromotionRules(metric="accuracy", min_value=0.75, min_history=0)


def _promote(ws, dev, prod):
    dev.register_many(_records(RUN))
    return promote_run(dev, prod, RUN, RULES)


def test_promotion_shares_the_eligible_models_into_the_azure_ml_registry(tmp_path, service, sleeps, code):
    ws = Workspace(tmp_path, ProjectConfig(), LocalLake(tmp_path / "lake"))
    ws.azureml = _backend(service, sleeps, code, registry="mmreg")
    dev, prod = open_registries(ws)
    decisions = _promote(ws, dev, prod)
    assert [d.decision for d in decisions] == ["promoted", "promoted", "rejected"]

    promoted = prod.find(run_id=RUN)
    assert len(promoted) == 2 and all(r.tags["source_registry"] == "dev" for r in promoted)
    (dev_put,) = service.requests_to("PUT", r"/workspaces/mlw-dev/models/manymodels-promoted/versions/")
    version = dev_put.path.rsplit("/", 1)[-1]
    assert dev_put.body["properties"]["modelUri"].endswith(
        f"/datastores/lake_registry/paths/prod/assets/{version}/")
    assert dev_put.body["properties"]["tags"]["models"] == "2"
    assert service.requests_to("GET", r"/workspaces/mlw-dev$"), "the workspace id for the asset reference"
    (share,) = service.requests_to("POST", r"/registries/mmreg/import$")
    assert share.host == "westeurope.api.azureml.ms"
    assert share.body["properties"] == {
        "referenceType": "Id", "destinationName": "manymodels", "destinationVersion": version,
        "sourceAssetId": "azureml://locations/westeurope/workspaces/00000000-aaaa-bbbb-cccc-000000000001/"
                         f"models/manymodels-promoted/versions/{version}"}
    assert not service.requests_to("PUT", r"/workspaces/mlw-prod/"), "the registry replaces prod"
    assert ws.lake.exists(f"registry/prod/assets/{version}/{MANIFEST_FILE}")

    again = promote_run(dev, prod, RUN, RULES)
    assert [d.decision for d in again] == ["unchanged", "unchanged", "rejected"]
    assert len(service.requests_to("POST", r"/import$")) == 1, "a shared version is never shared twice"


def test_promotion_without_a_registry_re_registers_in_the_production_workspace(ws, service):
    dev, prod = open_registries(ws)
    _promote(ws, dev, prod)
    (put,) = service.requests_to("PUT", r"/models/manymodels/versions/")[1:]
    assert put.path.startswith(f"{PROD}/models/manymodels/versions/{RUN}-")
    assert put.body["properties"]["tags"]["source_registry"] == "dev"
    assert put.body["properties"]["tags"]["manymodels_registry"] == "prod"
    assert prod.latest(_records(RUN)[0][0]["partition_id"]).tags["source_version"] == "1"


def test_training_can_never_register_into_production(ws):
    _, prod = open_registries(ws)
    with pytest.raises(RegistryError, match="only by promotion"):
        prod.register_many(_records(RUN))
    reader = AzureMLRegistry("prod", ws.lake, ws.root / "ro")
    with pytest.raises(RegistryError, match="read-only"):
        reader.copy_many(ModelRegistry(ws.root / "local-dev", "dev"), [])  # nothing to copy, still refused


# -- deployment ---------------------------------------------------------------------------------------
def test_deploying_puts_the_endpoint_the_deployment_and_then_its_traffic(ws, service):
    out = deploy_online(ws, storage_url="https://stprod.blob.core.windows.net")
    name = ws.azureml.aml.endpoint_name
    assert re.fullmatch(r"mm-online-[0-9a-f]{12}", name), "derived per deployment, never one fixed name"
    endpoint = f"{PROD}/onlineEndpoints/{name}"
    puts = [c for c in service.calls if c.method == "PUT" and "/online" in c.path]
    assert [c.path for c in puts] == [endpoint, f"{endpoint}/deployments/blue", endpoint]
    assert puts[0].body["properties"]["authMode"] == "Key"
    deployment = puts[1].body["properties"]
    assert deployment["endpointComputeType"] == "Managed"
    assert deployment["instanceType"] == "Standard_DS3_v2"
    assert puts[1].body["sku"]["capacity"] == 2
    assert deployment["scaleSettings"] == {"scaleType": "Default"}
    assert deployment["requestSettings"] == {"maxConcurrentRequestsPerInstance": 8, "requestTimeout": "PT5S",
                                             "maxQueueWait": "PT0.5S"}
    assert deployment["livenessProbe"]["failureThreshold"] == 3
    assert deployment["livenessProbe"]["period"] == "PT10S"
    assert deployment["codeConfiguration"]["scoringScript"] == "shared/azureml/online_score.py"
    assert re.search(r"/environments/manymodels-serving/versions/[0-9a-f]{16}$", deployment["environmentId"])
    variables = deployment["environmentVariables"]
    assert variables["MM_SERVING_STORAGE_URL"] == "https://stprod.blob.core.windows.net"
    assert deployment["environmentVariables"]["MM_PARTITION_KEYS"] == "store,item"
    assert json.loads(variables["MM_SERVING_CONFIG"])["data"]["keys"] == ["store", "item"]
    # the scoring chain's fallbacks (unpromoted, global, baseline) read the development registry
    assert variables["MM_SERVING_REGISTRY_PREFIX"] == "registry/prod"
    assert variables["MM_SERVING_DEV_REGISTRY_PREFIX"] == "registry/dev"
    assert "model" not in deployment or not deployment["model"], "models come from the registry, on demand"
    assert puts[2].body["properties"]["traffic"] == {"blue": 100}
    assert out["traffic"] == {"blue": 100} and out["scoring_uri"].endswith("/score")
    assert not service.requests_to("PUT", r"/workspaces/mlw-dev/online"), "serving is production"



def test_the_endpoint_runs_as_the_identity_whose_client_id_the_container_gets(ws, service, sleeps, code):
    """A client id given to the container must belong to an identity attached to the endpoint."""
    caller = "11111111-2222-3333-4444-555555555555"  # the Function App's own identity: not the endpoint's
    uami = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-aml"
    ws.azureml = _backend(service, sleeps, code, client_id=caller, endpoint_identity_id=uami,
                          endpoint_identity_client_id="99999999-8888-7777-6666-555555555555")
    deploy_online(ws, storage_url="https://stprod.blob.core.windows.net")
    puts = [c for c in service.calls if c.method == "PUT" and "/online" in c.path]
    identity = puts[0].body["identity"]
    assert identity["type"].lower() == "userassigned" and list(identity["userAssignedIdentities"]) == [uami]
    variables = puts[1].body["properties"]["environmentVariables"]
    assert variables["AZURE_CLIENT_ID"] == "99999999-8888-7777-6666-555555555555"


def test_without_a_user_assigned_identity_the_endpoint_is_system_assigned_and_gets_no_client_id(
        ws, service, sleeps, code):
    ws.azureml = _backend(service, sleeps, code, client_id="11111111-2222-3333-4444-555555555555")
    deploy_online(ws, storage_url="https://stprod.blob.core.windows.net")
    puts = [c for c in service.calls if c.method == "PUT" and "/online" in c.path]
    assert puts[0].body["identity"]["type"].lower() == "systemassigned"
    assert "AZURE_CLIENT_ID" not in puts[1].body["properties"]["environmentVariables"], \
        "the caller's identity is not attached to the endpoint: init() could never get a token"


def test_endpoint_names_are_derived_per_deployment_and_checked():
    a = _aml()
    b = AzureMLSettings(subscription_id=SUB, resource_group=RG, workspace_dev="mlw-dev", workspace_prod="mlw-2")
    assert a.endpoint_name != b.endpoint_name and len(a.endpoint_name) <= 32
    assert _aml(endpoint_name="mm-abc123").endpoint_name == "mm-abc123"
    assert a.with_changes(workspace_prod="mlw-2").endpoint_name == b.endpoint_name, "re-derived"
    assert _aml(endpoint_name="mm-abc123").with_changes(workspace_prod="mlw-2").endpoint_name == "mm-abc123"
    with pytest.raises(AzureMLError, match="not an endpoint name"):
        AzureMLSettings.from_env({"MM_AZUREML_SUBSCRIPTION_ID": SUB, "MM_AZUREML_RESOURCE_GROUP": RG,
                                  "MM_AZUREML_WORKSPACE_DEV": "d", "MM_AZUREML_WORKSPACE_PROD": "p",
                                  "MM_AZUREML_ENDPOINT": "9-bad_name"})


def test_our_endpoint_names_pass_the_sdks_own_rule_and_the_check_agrees_with_it():
    """3-32 characters, a letter first, letters, digits and hyphens, no hyphen last (the SDK's
    validate_endpoint_or_deployment_name); the Bicep's mm-<uniqueString> is 16 characters."""
    from azure.ai.ml.entities._endpoint._endpoint_helpers import validate_endpoint_or_deployment_name
    from azure.ai.ml.exceptions import ValidationException

    from shared.azureml.client import _ENDPOINT_NAME

    derived = [AzureMLSettings(subscription_id=SUB, resource_group=f"rg-{i}", workspace_dev="mlw-dev",
                               workspace_prod="mlw-prod").endpoint_name for i in range(50)]
    assert len(set(derived)) == 50
    bicep_like = "mm-" + "0123456789abc"  # uniqueString(): 13 lowercase letters and digits
    for name in [*derived, bicep_like]:
        validate_endpoint_or_deployment_name(name)
    for name in ["ab", "a" * 33, "9abc", "-abc", "abc-", "ab_c", "ab.c", "a" * 32, "abc", "a-1"]:
        try:
            validate_endpoint_or_deployment_name(name)
            sdk_accepts = True
        except ValidationException:
            sdk_accepts = False
        assert bool(_ENDPOINT_NAME.match(name)) == sdk_accepts, name


def test_a_reader_loads_one_model_of_a_pack_as_its_byte_range(ws, tmp_path):
    """The online endpoint's first request for a partition fetches that model, not its whole pack."""
    dev, _ = open_registries(ws)
    records = dev.register_many(_records(RUN, 3))
    reads: list[tuple[str, str]] = []
    lake = ws.lake

    class Counting:
        def __getattr__(self, name):
            return getattr(lake, name)

        def read_bytes(self, path):
            reads.append(("whole", path))
            return lake.read_bytes(path)

        def read_range(self, path, offset, length):
            reads.append(("range", path))
            return lake.read_range(path, offset, length)

    reader = AzureMLRegistry("dev", Counting(), tmp_path / "reader-cache")
    assert reader.load(reader.latest(records[1].partition_id)) == {"model": f"{RUN}-1"}
    pack_reads = [kind for kind, path in reads if path.endswith(".pack")]
    assert pack_reads == ["range"], reads
    assert not list((tmp_path / "reader-cache").rglob("*.pack")), "the pack was not downloaded"
    # bytes that do not match the index's digest are refused before anything is unpickled
    first = records[0]
    path = lake.local_path(f"registry/dev/{first.artifact}")
    data = bytearray(path.read_bytes())
    data[first.byte_offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="does not match the SHA-256"):
        reader.load(reader.latest(first.partition_id))
