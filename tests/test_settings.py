"""The deployment settings: read lazily from the environment, validated with the variable's name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import HOST_SETTINGS, SETTINGS, Settings, SettingsError, default_workdir

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_need_no_environment_at_all():
    s = Settings.from_env({})
    assert s.workdir == default_workdir()
    assert (s.lake_backend, s.compute_backend, s.registry_backend) == ("local", "local", "local")
    assert (s.upstream_queue, s.promotion_queue, s.task_hub) == ("mm-upstream", "mm-promotions", "manymodels")
    assert (s.group_size, s.max_groups_per_orchestration, s.poll_interval_seconds) == (50, 16, 60)
    assert s.config_overrides() == {}


GUARD = """
import os, sys
OURS = ("MM_", "LakeStorage", "ServiceBusConnection", "AZURE_CLIENT_ID")

class Guarded(dict):
    def _check(self, key):
        if str(key).startswith(OURS):
            raise AssertionError(f"environment read at import time: {key}")
    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)
    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)
    def __contains__(self, key):
        self._check(key)
        return super().__contains__(key)

os.environ = Guarded(os.environ)
sys.path.insert(0, sys.argv[1])
import main  # the whole app: every blueprint module and the core it imports
main.app.get_functions()
print("clean")
"""


def test_importing_the_app_reads_no_setting():
    """The host sets app settings before it calls a function, not before it imports the app."""
    done = subprocess.run(
        [sys.executable, "-c", GUARD, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("clean")


def test_every_variable_is_read_and_empty_means_unset(tmp_path):
    env = {
        "MM_WORKDIR": str(tmp_path),
        "MM_LAKE_BACKEND": "BLOB",
        "LakeStorage__blobServiceUri": "https://lake.blob.core.windows.net",
        "LakeStorage__credential": "managedidentity",
        "LakeStorage__clientId": "1111",
        "MM_COMPUTE_BACKEND": "azureml",
        "MM_REGISTRY_BACKEND": "azureml",
        "MM_AZUREML_SUBSCRIPTION_ID": "sub",
        "MM_AZUREML_RESOURCE_GROUP": "rg",
        "MM_AZUREML_WORKSPACE_DEV": "dev",
        "MM_AZUREML_WORKSPACE_PROD": "prod",
        "MM_AZUREML_COMPUTE": "big",
        "MM_STORE_BACKEND": "odbc",
        "MM_SQL_DIALECT": "mssql",
        "MM_SQL_CONNECTION_SETTING": "SQL_CONN",
        "ServiceBusConnection__fullyQualifiedNamespace": "bus.servicebus.windows.net",
        "MM_UPSTREAM_QUEUE": "up",
        "MM_PROMOTION_QUEUE": "promo",
        "MM_TASK_HUB": "mmProd",
        "MM_GROUP_SIZE": "7",
        "MM_MAX_GROUPS_PER_ORCHESTRATION": "4",
        "MM_MONITOR_POLL_SECONDS": "15",
        "MM_JOB_TIMEOUT_SECONDS": "600",
        "MM_ACTIVITY_MAX_ATTEMPTS": "5",
        "MM_ACTIVITY_RETRY_SECONDS": "2",
        "MM_CONFIG_FILE": "",
        "LakeStorage": " ",
    }
    s = Settings.from_env(env)
    assert s.workdir == tmp_path and s.lake_backend == "blob" and s.lake_client_id == "1111"
    assert s.config_file is None and s.lake_connection_string is None
    assert (s.group_size, s.max_groups_per_orchestration, s.poll_interval_seconds, s.job_timeout_seconds) == (
        7,
        4,
        15,
        600,
    )
    assert (s.activity_max_attempts, s.activity_retry_seconds, s.azureml_compute, s.task_hub) == (
        5,
        2,
        "big",
        "mmProd",
    )
    assert s.config_overrides() == {
        "store.backend": "odbc",
        "store.odbc_connection_setting": "SQL_CONN",
        "store.dialect": "mssql",
    }
    assert Settings.from_env(s.as_env()) == s


@pytest.mark.parametrize(
    "env, words",
    [
        ({"MM_GROUP_SIZE": "many"}, "MM_GROUP_SIZE: expected a whole number"),
        ({"MM_MONITOR_POLL_SECONDS": "0"}, "MM_MONITOR_POLL_SECONDS: must be >= 1"),
        ({"MM_LAKE_BACKEND": "s3"}, "MM_LAKE_BACKEND: 's3' is not one of ['local', 'blob']"),
        (
            {"MM_LAKE_BACKEND": "blob"},
            "needs LakeStorage (a connection string) or LakeStorage__blobServiceUri",
        ),
        (
            {"MM_COMPUTE_BACKEND": "azureml", "MM_AZUREML_SUBSCRIPTION_ID": "s"},
            "needs MM_AZUREML_RESOURCE_GROUP, MM_AZUREML_WORKSPACE_DEV, MM_AZUREML_WORKSPACE_PROD",
        ),
        ({"MM_TASK_HUB": "my-hub"}, "MM_TASK_HUB"),
        ({"MM_SQL_DIALECT": "oracle"}, "MM_SQL_DIALECT"),
    ],
)
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert words in str(caught.value)


def test_the_table_documents_every_field_once_with_a_description():
    names = [spec.env for spec in SETTINGS]
    assert len(names) == len(set(names))
    assert all(len(spec.description) > 20 for spec in SETTINGS)
    assert {spec.field for spec in SETTINGS} == set(Settings.__dataclass_fields__)


def test_the_local_settings_template_sets_every_local_setting_and_nothing_unknown():
    values = json.loads((ROOT / "local.settings.json.template").read_text())["Values"]
    local = {spec.env for spec in SETTINGS if "local" in spec.where}
    known = (
        {spec.env for spec in SETTINGS} | set(HOST_SETTINGS) | {"AzureWebJobsStorage", "MM_SQL_CONNECTION"}
    )
    assert local <= set(values)
    assert set(values) <= known
    assert values["PYTHON_SCRIPT_FILE_NAME"] == HOST_SETTINGS["PYTHON_SCRIPT_FILE_NAME"] == "main.py"
    assert (ROOT / "main.py").is_file()
    Settings.from_env(values)  # the template itself is a valid configuration


def test_the_workspace_takes_its_root_and_lake_from_the_settings(tmp_path):
    from shared.lake import LocalLake
    from shared.runs.pipeline import Workspace

    ws = Workspace.open(settings=Settings(workdir=tmp_path / "wd"))
    assert ws.root == (tmp_path / "wd").resolve()
    assert isinstance(ws.lake, LocalLake) and ws.lake.root == (tmp_path / "wd" / "lake").resolve()
