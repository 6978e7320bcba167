"""The workspace: a workdir's remembered config, lazily opened backends, and staged runs for entry scripts."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared import layout
from shared.config import CONFIG_FILE_NAME
from shared.lake import LakeError, LocalLake, check_path
from shared.registries.registry import ModelRegistry
from shared.runs.local_compute import StagedRun
from shared.runs.workspace import Workspace


class MemoryLake:
    """A lake that is not a local folder (as the Blob lake is not): entry scripts must be staged."""

    uri = "memory://"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.writes: list[str] = []

    def read_bytes(self, path: str) -> bytes:
        if path not in self.files:
            raise LakeError(f"no {path}")
        return self.files[check_path(path)]

    def write_bytes(self, path: str, data: bytes) -> None:
        self.files[check_path(path)] = data
        self.writes.append(path)

    def exists(self, path: str) -> bool:
        return path in self.files

    def list(self, prefix: str) -> list[str]:
        return sorted(p for p in self.files if p.startswith(prefix.rstrip("/") + "/"))

    def delete(self, path: str) -> None:
        self.files.pop(path, None)

    def local_path(self, path: str) -> Path | None:
        return None


def test_open_remembers_the_config_unless_told_not_to(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "a", overrides={"forecast.horizon": 5})
    assert (ws.root / CONFIG_FILE_NAME).is_file() and ws.config_file == ws.root / CONFIG_FILE_NAME
    again = Workspace.open(tmp_path / "a")
    assert again.config.forecast.horizon == 5, "the workdir remembers its config"
    once = Workspace.open(tmp_path / "b", overrides={"forecast.horizon": 7}, remember=False)
    assert once.config.forecast.horizon == 7 and not (once.root / CONFIG_FILE_NAME).exists()


def test_without_settings_every_backend_is_local_and_opened_on_first_use(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path, remember=False)
    assert isinstance(ws.lake, LocalLake) and ws.lake.root == (tmp_path / "lake").resolve()
    assert ws._dev is None and ws._prod is None, "no registry is opened before it is asked for"
    assert isinstance(ws.prod, ModelRegistry) and ws.prod.name == "prod"
    assert ws.dev.root == ws.root / layout.registry_dir("dev")
    assert ws.registry_roots() == (ws.root / "registry" / "prod", ws.root / "registry" / "dev")
    assert ws.compute.name == "local" and ws.compute is ws.compute
    assert ws.sql_location == str(ws.root / ws.config.store.sqlite_file)
    with ws.store() as store:
        assert store is not None


def test_sql_location_names_the_odbc_setting_not_the_connection(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path, overrides={"store.backend": "odbc"}, remember=False)
    assert ws.sql_location == f"odbc ({ws.config.store.odbc_connection_setting})"


def test_a_staged_run_on_a_local_lake_hands_out_the_lakes_own_files(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path, remember=False)
    ws.lake.write_bytes("prepared/d1/batches/batch-00000.parquet", b"x")
    with StagedRun(ws, "r1", ["prepared/d1/batches/batch-00000.parquet"]) as staged:
        assert staged.input("prepared/d1/batches/batch-00000.parquet").read_bytes() == b"x"
        assert staged.output("models") == ws.lake.local_path("runs/r1/models")
        config = staged.write_config(ws.config)
    assert config == ws.lake.local_path(layout.run_config("r1"))


def test_a_staged_run_on_a_remote_lake_downloads_once_and_uploads_only_what_it_wrote(tmp_path: Path) -> None:
    lake = MemoryLake()
    lake.write_bytes("prepared/d1/dataset.json", b"{}")
    lake.write_bytes("runs/r1/models/p1.pkl", b"old")  # an earlier output: what makes a rerun resume
    lake.writes.clear()
    ws = Workspace(tmp_path, Workspace.open(tmp_path, remember=False).config, lake)
    with StagedRun(ws, "r1", [], ["prepared/d1/dataset.json"]) as staged:
        assert staged.input("prepared/d1/dataset.json").read_bytes() == b"{}"
        models = staged.output("models")
        assert (models / "p1.pkl").read_bytes() == b"old"
        (models / "p2.pkl").write_bytes(b"new")
        (models / ".tmp-p3.pkl").write_bytes(b"half-written")
        tmp = staged.tmp
    assert lake.writes == ["runs/r1/models/p2.pkl"]
    assert not tmp.exists(), "the staging folder is removed"


def test_a_staged_run_uploads_nothing_but_cleans_up_when_the_group_raises(tmp_path: Path) -> None:
    lake = MemoryLake()
    ws = Workspace(tmp_path, Workspace.open(tmp_path, remember=False).config, lake)
    with pytest.raises(RuntimeError):
        with StagedRun(ws, "r1", []) as staged:
            tmp = staged.tmp
            raise RuntimeError("boom")
    assert not tmp.exists()
