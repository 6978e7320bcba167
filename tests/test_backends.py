"""Backends chosen in one place: local by default, Azure by settings, opened only when asked for."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shared import layout
from shared.runs import backends
from shared.runs.compute import JobHandle
from shared.lake import LocalLake
from shared.registries.registry import ModelRegistry
from shared.settings import Settings
from shared.runs.workspace import Workspace


def test_no_settings_means_local_everywhere(tmp_path: Path) -> None:
    assert (backends.lake_backend(None), backends.registry_backend(None), backends.compute_backend(None)) == (
        "local", "local", "local")
    lake = backends.open_lake(Settings(workdir=tmp_path))
    assert isinstance(lake, LocalLake) and lake.root == (tmp_path / "lake").resolve()
    assert backends.open_lake(None, tmp_path / "w").root == (tmp_path / "w" / "lake").resolve()
    assert isinstance(backends.open_compute(None), backends.LocalCompute)
    assert isinstance(backends.open_compute(Settings(workdir=tmp_path, compute_backend="azureml")),
                      backends.AzureMLCompute)


def test_local_registries_live_under_the_workdir(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path, remember=False)
    dev, prod = backends.open_registries(ws)
    assert isinstance(dev, ModelRegistry) and isinstance(prod, ModelRegistry)
    assert (dev.root, prod.root) == (tmp_path.resolve() / "registry" / "dev", tmp_path.resolve() / "registry" / "prod")
    assert prod.folder() == prod.root


def test_opening_local_backends_imports_no_azure_sdk(tmp_path: Path) -> None:
    import subprocess

    code = ("import sys; from shared.runs.workspace import Workspace; ws = Workspace.open(sys.argv[1]); "
            "ws.dev, ws.prod, ws.compute; "
            "print(sorted(m for m in sys.modules if m.startswith(('azure.ai.ml', 'azure.storage', 'shared.azureml'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_a_blob_lake_without_an_account_is_refused_with_the_settings_to_set(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from shared.lake import LakeError

    settings = SimpleNamespace(workdir=tmp_path, lake_backend="blob", lake_connection_string=None,
                               lake_blob_service_uri=None)
    with pytest.raises(LakeError, match="LakeStorage"):
        backends.open_lake(settings)


def test_local_compute_runs_nothing_for_an_unknown_kind_and_knows_its_jobs(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path, remember=False)
    compute = backends.LocalCompute()
    with pytest.raises(backends.BackendError, match="unknown job kind"):
        compute.submit(ws, "predict", "r1", 0, [])
    with pytest.raises(backends.BackendError, match="unknown job"):
        compute.status(ws, "train-r1-g00000")
    handle = JobHandle("train-r1-g00000", "train", "r1", 0, state="completed")
    ws.lake.write_bytes(layout.job_record("r1", handle.job_id), handle.to_json().encode())
    assert compute.status(ws, handle.job_id) == handle
    assert json.loads(ws.lake.read_bytes("runs/r1/jobs/train-r1-g00000.json"))["state"] == "completed"


def test_the_azure_compute_refuses_an_unknown_kind_before_any_sdk_call(tmp_path: Path) -> None:
    with pytest.raises(backends.BackendError):
        backends.AzureMLCompute().submit(Workspace.open(tmp_path, remember=False), "nope", "r1", 0, [])


def test_every_backend_is_found_by_name_in_one_table_and_an_unknown_one_is_refused_naming_the_known() -> None:
    from types import SimpleNamespace

    assert {(i, n) for i, n in backends.BACKENDS} == {
        ("lake", "local"), ("lake", "blob"), ("registry", "local"), ("registry", "azureml"),
        ("compute", "local"), ("compute", "azureml")}
    with pytest.raises(backends.BackendError, match=r"unknown compute backend 'spark'; one of \['azureml', 'local'\]"):
        backends.open_compute(SimpleNamespace(compute_backend="spark"))


class _SharedLakeWithoutLease(LocalLake):
    """A lake several machines write (say, a network share) that offers no cross-machine lease."""

    shared_writers = True


def test_a_lake_shared_by_machines_without_a_cross_machine_lease_is_refused_for_writing(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, None, _SharedLakeWithoutLease(tmp_path / "lake"))
    with pytest.raises(backends.BackendError, match="shared by several machines but has no cross-machine"):
        with backends.writer_lease(ws, "promote_run of orchestration p-1", wait=0):
            pass
    # a local lake takes the workdir's lock instead (one machine)
    local = Workspace(tmp_path, None, LocalLake(tmp_path / "lake"))
    with backends.writer_lease(local, "promote_run of orchestration p-1", wait=0) as lock:
        assert lock is not None


def test_the_local_compute_ingests_in_process_and_has_no_ingestion_job_to_poll(tmp_path: Path) -> None:
    from shared.data.synthetic import write_panel

    ws = Workspace.open(tmp_path, remember=False, overrides={"runner.progress": False})
    write_panel(tmp_path / "sales.csv", partitions=3, periods=30, seed=1)
    handle = backends.submit_ingest(ws, str(tmp_path / "sales.csv"), key="k")
    assert handle.state == "completed" and handle.summary["partitions"] == 3
    with pytest.raises(backends.BackendError, match="no ingestion job"):
        backends.ingest_status(ws, handle.job_id)
