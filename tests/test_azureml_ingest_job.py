"""Ingestion as an Azure ML command job: built offline with the SDK's own classes, its entry script run
locally over a lake folder (the same dataset as ``pipeline.ingest``), submitted and polled idempotently."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

pytest.importorskip("azure.ai.ml")
pytestmark = pytest.mark.filterwarnings("ignore:The `context` parameter is deprecated")

from azure.ai.ml import load_job  # noqa: E402
from azure.core.exceptions import ResourceNotFoundError  # noqa: E402

from shared import layout
from shared.runs import backends, pipeline  # noqa: E402
from shared.azureml.client import AzureMLBackend, AzureMLError, AzureMLSettings  # noqa: E402
from shared.azureml.ingest_job import (build_ingest_job, ingest_id_for, ingest_job_status,  # noqa: E402
                                       plan_ingest, result_path, source_type, submit_ingest_job)
from shared.azureml.jobs import WORKER_ENV, stage_code  # noqa: E402
from shared.entry import ingest as entry  # noqa: E402
from shared.data.ingestion import REPORT_FIELDS  # noqa: E402
from shared.lake import LocalLake  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.data.synthetic import write_panel  # noqa: E402
from shared.runs.workspace import Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INGEST_ID = "i0123456789abcdef"
OVERRIDES = {"runner.progress": False, "runner.workers": 1}


def _settings(workdir: Path = Path("/unused"), compute: str = "azureml") -> Settings:
    return Settings(workdir=workdir, compute_backend=compute, registry_backend="local",
                    azureml_subscription_id="sub-1", azureml_resource_group="rg-mm",
                    azureml_workspace_dev="mlw-dev", azureml_workspace_prod="mlw-prod",
                    azureml_compute="cpu-cluster", azure_client_id="client-1")


@pytest.fixture(scope="module")
def aml() -> AzureMLSettings:
    return AzureMLSettings.from_settings(_settings(), environ={})


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    return stage_code(tmp_path_factory.mktemp("code") / "snapshot")


@pytest.fixture(scope="module")
def panel(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sales.csv"
    write_panel(path, partitions=6, periods=40, seed=5)
    return path


def _rest(job) -> dict:
    return json.loads(json.dumps(job._to_rest_object().as_dict(), default=str))


# -- the job, offline ----------------------------------------------------------------------------
def test_the_ingestion_job_is_a_command_job_over_the_lakes_datastores(aml, code):
    job = build_ingest_job(aml, plan_ingest("raw/uploads/sales.csv", "uri_file", INGEST_ID), code=code)
    job._validate()  # CommandJob's own checks raise (command, environment, inputs the command names)
    assert type(job).__name__ == "CommandJob"
    rest = _rest(job)
    props = rest["properties"]
    assert rest["name"] == f"ingest-{INGEST_ID}"
    assert props["jobType"] == "Command"
    assert props["computeId"] == "cpu-cluster"
    assert props["experimentName"] == "manymodels"
    assert props["identity"] == {"identityType": "Managed"}, "the compute identity reaches the datastores"
    assert Path(props["codeId"]) == code
    assert props["command"].split() == [
        "python", "-m", "shared.entry.ingest", "--source", "${{inputs.source}}",
        "--source-name", "raw/uploads/sales.csv", "--config", "${{inputs.config}}",
        "--prepared", "${{outputs.prepared}}", "--result", "${{outputs.result}}"]
    assert props["inputs"] == {
        "source": {"uri": "azureml://datastores/lake_raw/paths/uploads/sales.csv", "mode": "ReadOnlyMount",
                   "jobInputType": "uri_file"},
        "config": {"uri": f"azureml://datastores/lake_runs/paths/{INGEST_ID}/config/manymodels.toml",
                   "mode": "Download", "jobInputType": "uri_file"},
    }
    assert props["outputs"] == {
        "prepared": {"uri": "azureml://datastores/lake_prepared/paths/", "mode": "ReadWriteMount",
                     "jobOutputType": "uri_folder"},
        "result": {"uri": f"azureml://datastores/lake_runs/paths/{INGEST_ID}/results/ingest-{INGEST_ID}/",
                   "mode": "ReadWriteMount", "jobOutputType": "uri_folder"},
    }
    assert props["environmentVariables"] == WORKER_ENV
    assert props["resources"]["instanceCount"] == 1
    assert props["tags"] == {"manymodels": "ingest", "ingest_id": INGEST_ID, "source": "raw/uploads/sales.csv"}
    # the training jobs' environment: one image for every job
    environment = job.environment
    assert environment.name == "manymodels-parallel" and environment.image == aml.image
    pip = environment.conda_file["dependencies"][-1]["pip"]
    assert any(p.startswith("pandas") for p in pip) and any(p.startswith("pyarrow") for p in pip)
    assert not any(p.startswith("azure-functions") for p in pip)
    # the entry module is in the snapshot the job uploads, at the path -m names
    assert (code / "shared" / "entry" / "ingest.py").is_file()


def test_the_job_dumps_to_yaml_and_loads_back_valid(aml, code, tmp_path):
    job = build_ingest_job(aml, plan_ingest("raw/sales.parquet", "uri_file", INGEST_ID, "ingest-x-a2"), code=code)
    path = tmp_path / "ingest.yml"
    job.dump(path)
    spec = yaml.safe_load(path.read_text())
    assert spec["type"] == "command" and spec["compute"] == "azureml:cpu-cluster"
    assert spec["identity"] == {"type": "managed_identity"}
    assert spec["outputs"]["result"]["path"].endswith(f"/{INGEST_ID}/results/ingest-x-a2/")
    loaded = load_job(path)
    # load_job validates the YAML against the SDK's command job schema (marshmallow) and returns the
    # command() builder's object, which validates the job as a whole
    assert type(loaded).__name__ == "Command"
    result = loaded._validate()
    assert result.passed, result.error_messages
    assert loaded.command == job.command and loaded.inputs["source"].mode == "ro_mount"


def test_a_parquet_folder_is_a_uri_folder_and_only_lake_sources_are_accepted(aml, code, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    lake.write_bytes("raw/sales.csv", b"a,b\n")
    lake.write_bytes("raw/weekly/part-0.parquet", b"PAR1")
    assert source_type(lake, "raw/sales.csv") == "uri_file"
    assert source_type(lake, "raw/weekly") == "uri_folder"
    job = build_ingest_job(aml, plan_ingest("raw/weekly", "uri_folder", INGEST_ID), code=code)
    assert _rest(job)["properties"]["inputs"]["source"] == {
        "uri": "azureml://datastores/lake_raw/paths/weekly/", "mode": "ReadOnlyMount", "jobInputType": "uri_folder"}
    with pytest.raises(AzureMLError, match="no such source"):
        source_type(lake, "raw/missing.csv")
    with pytest.raises(AzureMLError, match="lake sources"):
        source_type(lake, "prepared/LATEST")
    with pytest.raises(AzureMLError, match="white space"):
        plan_ingest("raw/my sales.csv", "uri_file", INGEST_ID)


def test_the_ingest_id_follows_source_config_and_key():
    base = ingest_id_for("raw/a.csv", {"data": {"time": "date"}}, "ingest-1")
    assert base == ingest_id_for("raw/a.csv", {"data": {"time": "date"}}, "ingest-1")
    assert len({base, ingest_id_for("raw/b.csv", {"data": {"time": "date"}}, "ingest-1"),
                ingest_id_for("raw/a.csv", {"data": {"time": "day"}}, "ingest-1"),
                ingest_id_for("raw/a.csv", {"data": {"time": "date"}}, "ingest-2")}) == 4
    assert base.startswith("i") and len(base) == 17


# -- the entry script, run locally over a lake folder: the same dataset as pipeline.ingest ---------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _job_dirs(tmp_path: Path, ws: Workspace) -> dict[str, Path]:
    """What Azure ML would give the script: the mounted source, the downloaded config, two output mounts."""
    config = tmp_path / "job" / "config" / "manymodels.toml"
    config.parent.mkdir(parents=True)
    config.write_text(ws.config.to_toml(), encoding="utf-8")
    return {"config": config, "prepared": tmp_path / "job" / "prepared", "result": tmp_path / "job" / "result"}


@pytest.mark.parametrize("memory", [{}, {"ingest.memory_mb": 64, "ingest.workers": 1}], ids=["in-memory", "streamed"])
def test_the_entry_script_writes_the_dataset_pipeline_ingest_writes(tmp_path, panel, memory):
    """Both of the streaming module's paths (a small input in memory; a tight memory setting streams)."""
    local = Workspace.open(tmp_path / "local", overrides={**OVERRIDES, **memory})
    expected = pipeline.ingest(local, panel)
    dirs = _job_dirs(tmp_path, local)
    dirs["prepared"].mkdir(parents=True)  # Azure ML creates the output folder before the job starts
    args = ["--source", str(panel), "--source-name", "raw/sales.csv", "--config", str(dirs["config"]),
            "--prepared", str(dirs["prepared"]), "--result", str(dirs["result"])]
    assert entry.main(args) == 0

    result = json.loads((dirs["result"] / "ingest.json").read_text())
    assert result == {
        "status": "completed", "source": "raw/sales.csv", "dataset_id": expected.dataset_id,
        "partitions": expected.partitions, "rows": expected.rows, "reused": False,
        "report_path": f"prepared/{expected.dataset_id}/dataset.json",
        "report": {k: expected.report[k] for k in REPORT_FIELDS if k in expected.report},
    }
    assert "examples" not in result["report"], "input rows stay in dataset.json"
    # the same files at the same lake paths: batches and manifest byte for byte, dataset.json but its time
    ours, theirs = _files(dirs["prepared"]), _files(local.lake.local_path("prepared"))
    assert sorted(ours) == sorted(theirs)
    assert ours["LATEST"] == expected.dataset_id.encode()
    for name in ours:
        if name.endswith("dataset.json"):
            mine, other = json.loads(ours[name]), json.loads(theirs[name])
            mine.pop("created_at"), other.pop("created_at")
            assert mine == other
        else:
            assert ours[name] == theirs[name], name

    # a rerun (a second attempt, a duplicate job) returns the complete dataset as it is
    before = {p: (dirs["prepared"] / p).stat().st_mtime_ns for p in ours if p != "LATEST"}
    assert entry.main(args) == 0
    again = json.loads((dirs["result"] / "ingest.json").read_text())
    assert again["reused"] is True and again["dataset_id"] == expected.dataset_id
    assert {p: (dirs["prepared"] / p).stat().st_mtime_ns for p in before} == before


def test_the_entry_script_runs_as_the_jobs_command_line(tmp_path, panel, code):
    """``python -m shared.entry.ingest`` from the code snapshot, as the job's command runs it."""
    ws = Workspace.open(tmp_path / "ws", overrides=OVERRIDES, remember=False)
    dirs = _job_dirs(tmp_path, ws)
    out = subprocess.run(
        [sys.executable, "-m", "shared.entry.ingest", "--source", str(panel), "--source-name", "raw/sales.csv",
         "--config", str(dirs["config"]), "--prepared", str(dirs["prepared"]), "--result", str(dirs["result"])],
        cwd=code, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((dirs["result"] / "ingest.json").read_text())
    assert (dirs["prepared"] / result["dataset_id"] / "dataset.json").is_file()
    assert json.loads(out.stdout.strip().splitlines()[-1])["dataset_id"] == result["dataset_id"]


def test_a_bad_file_fails_the_job_with_exit_2_and_its_reason(tmp_path, panel):
    bad = tmp_path / "no-target.csv"
    pd.read_csv(panel).drop(columns=["sales"]).to_csv(bad, index=False)
    ws = Workspace.open(tmp_path / "ws", overrides=OVERRIDES, remember=False)
    dirs = _job_dirs(tmp_path, ws)
    code = entry.main(["--source", str(bad), "--source-name", "raw/no-target.csv", "--config", str(dirs["config"]),
                       "--prepared", str(dirs["prepared"]), "--result", str(dirs["result"])])
    assert code == entry.DATA_ERROR_EXIT
    result = json.loads((dirs["result"] / "ingest.json").read_text())
    assert result["status"] == "failed" and result["source"] == "raw/no-target.csv"
    assert "sales" in result["reason"] and "\n" not in result["reason"]
    assert not [p for p in dirs["prepared"].rglob("dataset.json")]


# -- submit and poll, against a scripted Azure ML client -----------------------------------------------
class FakeJobs:
    def __init__(self) -> None:
        self.jobs: dict[str, SimpleNamespace] = {}
        self.created: list = []

    def get(self, name: str):
        if name not in self.jobs:
            raise ResourceNotFoundError(f"job {name} not found")
        return self.jobs[name]

    def create_or_update(self, job, experiment_name=None):
        self.created.append(job)
        self.jobs[job.name] = SimpleNamespace(name=job.name, status="Queued", studio_url="https://ml.azure.com/x",
                                              tags=dict(job.tags))
        return self.jobs[job.name]


@pytest.fixture
def azure_ws(tmp_path, aml, code, panel):
    ws = Workspace.open(tmp_path / "ws", settings=_settings(tmp_path / "ws"), overrides=OVERRIDES, remember=False)
    ws.lake.write_bytes("raw/sales.csv", panel.read_bytes())
    backend = AzureMLBackend(aml, credential=object(), code=code)
    fake = FakeJobs()
    backend._clients["dev"] = SimpleNamespace(jobs=fake)
    ws.azureml = backend
    return ws, fake


def test_submit_writes_the_config_submits_once_and_a_failed_job_gets_a_new_attempt(azure_ws):
    ws, fake = azure_ws
    handle = backends.submit_ingest(ws, "raw/sales.csv", key="ingest-abc")
    ingest_id = handle.run_id
    assert handle.kind == "ingest" and handle.state == "queued" and handle.job_id == f"ingest-{ingest_id}"
    assert len(json.dumps(handle.to_dict())) < 500, "a handle, never data"
    assert ws.lake.read_bytes(layout.run_config(ingest_id)).decode() == ws.config.to_toml()
    [job] = fake.created
    assert job.inputs["source"].path == "azureml://datastores/lake_raw/paths/sales.csv"

    again = submit_ingest_job(ws, "raw/sales.csv", key="ingest-abc")
    assert again.job_id == handle.job_id and len(fake.created) == 1, "a redelivered submit finds its job"

    fake.jobs[handle.job_id].status = "Failed"
    retry = submit_ingest_job(ws, "raw/sales.csv", key="ingest-abc")
    assert retry.job_id == f"ingest-{ingest_id}-a2" and len(fake.created) == 2
    assert fake.created[-1].outputs["result"].path.endswith(f"/results/ingest-{ingest_id}-a2/")


def test_status_reads_the_jobs_result_or_its_reason(azure_ws):
    ws, fake = azure_ws
    handle = backends.submit_ingest(ws, "raw/sales.csv", key="k")
    name, ingest_id = handle.job_id, handle.run_id
    fake.jobs[name].status = "Running"
    assert backends.ingest_status(ws, name).state == "running"

    fake.jobs[name].status = "Completed"
    missing = ingest_job_status(ws, name)
    assert missing.state == "failed" and "completed without" in missing.detail

    result = {"status": "completed", "dataset_id": "d0123456789abcdef", "partitions": 6, "rows": 240}
    ws.lake.write_bytes(result_path(ingest_id, name), json.dumps(result).encode())
    done = ingest_job_status(ws, name)
    assert done.state == "completed" and done.summary == result

    fake.jobs[name].status = "Failed"
    ws.lake.write_bytes(result_path(ingest_id, name), json.dumps(
        {"status": "failed", "reason": "column 'sales': missing"}).encode())
    failed = ingest_job_status(ws, name)
    assert failed.state == "failed" and failed.detail.startswith("column 'sales': missing (Azure ML Failed")

    with pytest.raises(AzureMLError, match="not a manymodels ingestion job"):
        ingest_job_status(ws, "train-r1-g00000")
    with pytest.raises(AzureMLError, match="no Azure ML job"):
        ingest_job_status(ws, "ingest-ifedcba9876543210")


def test_the_local_backend_ingests_in_process_and_has_nothing_to_poll(tmp_path, panel):
    ws = Workspace.open(tmp_path / "ws", settings=Settings(workdir=tmp_path / "ws"), overrides=OVERRIDES,
                        remember=False)
    ws.lake.write_bytes("raw/sales.csv", panel.read_bytes())
    handle = backends.submit_ingest(ws, "raw/sales.csv", key="ingest-abc")
    assert handle.state == "completed" and handle.kind == "ingest"
    assert handle.summary["dataset_id"] == pipeline.latest_dataset_id(ws)
    assert handle.summary["source"] == "raw/sales.csv" and "examples" not in handle.summary["report"]
    with pytest.raises(backends.BackendError, match="nothing|no ingestion job"):
        backends.ingest_status(ws, handle.job_id)
