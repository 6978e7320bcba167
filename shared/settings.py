"""Deployment settings: which backends to use and how to reach them, read from the environment.

One object, :class:`Settings`, built by :meth:`Settings.from_env` when a caller asks for it —
never at import time — so the Functions host, the CLI and the tests can each set the environment
first. The project configuration (columns, horizon, rules) lives in ``manymodels.toml``; these
settings only say *where* things run. ``SETTINGS`` lists every variable with its default and
meaning: the README table, ``local.settings.json.template`` and the Bicep app settings follow it.

Connection names (``LakeStorage``, ``ServiceBusConnection``) follow the Functions convention for
identity-based connections: ``<name>__blobServiceUri`` / ``<name>__fullyQualifiedNamespace`` plus
``<name>__credential`` and ``<name>__clientId``; a plain ``<name>`` holds a connection string
(Azurite, development). The same variables serve the host's bindings and our own SDK clients.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from shared.config import CHOICES
from shared.errors import ManyModelsError

LAKE_CONNECTION = "LakeStorage"
SERVICEBUS_CONNECTION = "ServiceBusConnection"
HOST_STORAGE_CONNECTION = "AzureWebJobsStorage"
BINDING_CONNECTIONS = (LAKE_CONNECTION, SERVICEBUS_CONNECTION, HOST_STORAGE_CONNECTION)
_TASK_HUB = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,44}$")
_MARKER = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
DATA_FILE_SUFFIXES = (".csv", ".parquet")  # what a raw data file is named (function_app.messages.DATA_SUFFIXES)


class SettingsError(ManyModelsError, ValueError):
    """A setting has an invalid value or a required one is missing; the message names the variable."""


@dataclass(frozen=True)
class SettingSpec:
    """One environment variable: the field it fills, its default, its allowed values and meaning."""

    env: str
    field: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    kind: str = "str"  # str | int | path | optional
    where: tuple[
        str, ...
    ] = ()  # "azure": the Bicep app settings set it; "local": local.settings.json.template does


_A, _L, _AL = ("azure",), ("local",), ("azure", "local")

SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "MM_WORKDIR",
        "workdir",
        None,
        "Local working folder (config, local registries, SQLite store, staging cache). "
        "Default: <temp dir>/manymodels.",
        kind="path",
        where=_L,
    ),
    SettingSpec(
        "MM_CONFIG_FILE",
        "config_file",
        None,
        "Project TOML shipped with the app (relative to the app root); default: the one "
        "remembered in the workdir.",
        kind="optional",
    ),
    SettingSpec(
        "MM_LAKE_BACKEND",
        "lake_backend",
        "local",
        "Where the lake lives: a local folder (<workdir>/lake) or Azure Blob / ADLS Gen2.",
        choices=("local", "blob"),
        where=_AL,
    ),
    SettingSpec(
        LAKE_CONNECTION,
        "lake_connection_string",
        None,
        "Lake connection string for Azurite or development; never set in Azure.",
        kind="optional",
        where=_L,
    ),
    SettingSpec(
        f"{LAKE_CONNECTION}__blobServiceUri",
        "lake_blob_service_uri",
        None,
        "Lake blob endpoint for identity-based access, e.g. https://<account>.blob.core.windows.net.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        f"{LAKE_CONNECTION}__queueServiceUri",
        "lake_queue_service_uri",
        None,
        "Lake queue endpoint; read by the host only (the blob trigger keeps its poison queue there).",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        f"{LAKE_CONNECTION}__credential",
        "lake_credential",
        None,
        "'managedidentity' for identity-based connections.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        f"{LAKE_CONNECTION}__clientId",
        "lake_client_id",
        None,
        "Client id of the user-assigned managed identity used for the lake.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_COMPUTE_BACKEND",
        "compute_backend",
        "local",
        "Where groups are trained and scored: the local process pool or Azure ML parallel jobs.",
        choices=("local", "azureml"),
        where=_AL,
    ),
    SettingSpec(
        "MM_REGISTRY_BACKEND",
        "registry_backend",
        "local",
        "Model registries: local files + index, or Azure ML workspaces (dev and prod).",
        choices=("local", "azureml"),
        where=_AL,
    ),
    SettingSpec(
        "MM_STORE_BACKEND",
        "store_backend",
        None,
        "Result store override: sqlite or odbc (default: the project config's store.backend).",
        choices=CHOICES["store.backend"],
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_SQL_DIALECT",
        "sql_dialect",
        None,
        "SQL dialect for the ODBC store: sqlite, postgresql or mssql (Azure SQL / Synapse).",
        choices=CHOICES["store.dialect"],
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_SQL_CONNECTION_SETTING",
        "sql_connection_setting",
        "MM_SQL_CONNECTION",
        "Name of the variable that holds the ODBC connection string of the SQL store.",
        where=_A,
    ),
    SettingSpec(
        SERVICEBUS_CONNECTION,
        "servicebus_connection_string",
        None,
        "Service Bus connection string for the local emulator or development; never set in Azure.",
        kind="optional",
        where=_L,
    ),
    SettingSpec(
        f"{SERVICEBUS_CONNECTION}__fullyQualifiedNamespace",
        "servicebus_namespace",
        None,
        "Service Bus namespace host (<name>.servicebus.windows.net) for identity-based access.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        f"{SERVICEBUS_CONNECTION}__credential",
        "servicebus_credential",
        None,
        "'managedidentity' for identity-based Service Bus connections.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        f"{SERVICEBUS_CONNECTION}__clientId",
        "servicebus_client_id",
        None,
        "Client id of the user-assigned managed identity used for Service Bus.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_DATASET_MARKERS",
        "dataset_markers",
        "_SUCCESS",
        "Comma-separated file names whose arrival in a raw/ folder marks it a complete folder dataset "
        "(ingested once, whole; its part-* files never alone): Spark's and Hadoop's _SUCCESS, plus the "
        "manifest your pipeline writes last (e.g. _SUCCESS,_manifest.json). Bicep: datasetMarkers.",
        where=_A,
    ),
    SettingSpec(
        "MM_UPSTREAM_QUEUE",
        "upstream_queue",
        "mm-upstream",
        "Service Bus queue that upstream systems send dataset-ready / retrain / score messages to "
        "(bound as %MM_UPSTREAM_QUEUE%).",
        where=_AL,
    ),
    SettingSpec(
        "MM_PROMOTION_QUEUE",
        "promotion_queue",
        "mm-promotions",
        "Service Bus queue with one promotion message per finished training run "
        "(bound as %MM_PROMOTION_QUEUE%).",
        where=_AL,
    ),
    SettingSpec(
        "MM_TASK_HUB",
        "task_hub",
        "manymodels",
        "Durable Functions task hub (host.json hubName %MM_TASK_HUB%): letters and digits, 3-45.",
        where=_AL,
    ),
    SettingSpec(
        "MM_AZUREML_SUBSCRIPTION_ID",
        "azureml_subscription_id",
        None,
        "Azure subscription of the Azure ML workspaces.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_AZUREML_RESOURCE_GROUP",
        "azureml_resource_group",
        None,
        "Resource group of the Azure ML workspaces.",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_AZUREML_WORKSPACE_DEV",
        "azureml_workspace_dev",
        None,
        "Development Azure ML workspace (training, dev registry).",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_AZUREML_WORKSPACE_PROD",
        "azureml_workspace_prod",
        None,
        "Production Azure ML workspace (promoted models only).",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_AZUREML_COMPUTE",
        "azureml_compute",
        "cpu-cluster",
        "Azure ML compute cluster that runs the parallel jobs.",
        where=_A,
    ),
    SettingSpec(
        "AZURE_CLIENT_ID",
        "azure_client_id",
        None,
        "Client id of the user-assigned managed identity for DefaultAzureCredential (Azure ML).",
        kind="optional",
        where=_A,
    ),
    SettingSpec(
        "MM_GROUP_SIZE",
        "group_size",
        50,
        "Mini-batch files per group: one compute job (one Durable activity) per group.",
        kind="int",
        where=_L,
    ),
    SettingSpec(
        "MM_MAX_GROUPS_PER_ORCHESTRATION",
        "max_groups_per_orchestration",
        16,
        "Above this many groups the orchestrator fans out sub-orchestrations of at most this "
        "many groups each, so no single history grows with the number of groups.",
        kind="int",
        where=_L,
    ),
    SettingSpec(
        "MM_MONITOR_POLL_SECONDS",
        "poll_interval_seconds",
        60,
        "Durable timer interval between two status checks of a running compute job.",
        kind="int",
        where=_L,
    ),
    SettingSpec(
        "MM_JOB_TIMEOUT_SECONDS",
        "job_timeout_seconds",
        4 * 3600,
        "A compute job still running this long after submission is reported as timed out.",
        kind="int",
        where=_L,
    ),
    SettingSpec(
        "MM_ACTIVITY_MAX_ATTEMPTS",
        "activity_max_attempts",
        3,
        "Attempts per activity (Durable RetryOptions) before its failure is reported.",
        kind="int",
        where=_L,
    ),
    SettingSpec(
        "MM_ACTIVITY_RETRY_SECONDS",
        "activity_retry_seconds",
        30,
        "Delay before the first retry of a failed activity.",
        kind="int",
        where=_L,
    ),
)

# Settings the Functions host itself needs (name -> value); our code never reads them. The host
# storage (Durable task hub) is identity-based in Azure, ``UseDevelopmentStorage=true`` locally.
HOST_SETTINGS: dict[str, str] = {
    "FUNCTIONS_WORKER_RUNTIME": "python",
    "PYTHON_SCRIPT_FILE_NAME": "main.py",  # the entry module (a function_app.py would clash with the package)
    # Load the app's pinned azure-functions (the one the tests run) ahead of the copy the Python worker
    # bundles; without it, Python <= 3.12 runs the worker's copy (the app works there too, but an older
    # copy cannot decode CloudEvents: see scripts/validate-worker-bundle.sh).
    "PYTHON_ISOLATE_WORKER_DEPENDENCIES": "1",
    f"{HOST_STORAGE_CONNECTION}__accountName": "<host storage account name>",
}


@dataclass(frozen=True)
class Settings:
    """Deployment settings; build with :meth:`from_env` (or directly in tests)."""

    workdir: Path
    config_file: str | None = None
    lake_backend: str = "local"
    lake_connection_string: str | None = None
    lake_blob_service_uri: str | None = None
    lake_queue_service_uri: str | None = None
    lake_credential: str | None = None
    lake_client_id: str | None = None
    compute_backend: str = "local"
    registry_backend: str = "local"
    store_backend: str | None = None
    sql_dialect: str | None = None
    sql_connection_setting: str = "MM_SQL_CONNECTION"
    servicebus_connection_string: str | None = None
    servicebus_namespace: str | None = None
    servicebus_credential: str | None = None
    servicebus_client_id: str | None = None
    dataset_markers: str = "_SUCCESS"
    upstream_queue: str = "mm-upstream"
    promotion_queue: str = "mm-promotions"
    task_hub: str = "manymodels"
    azureml_subscription_id: str | None = None
    azureml_resource_group: str | None = None
    azureml_workspace_dev: str | None = None
    azureml_workspace_prod: str | None = None
    azureml_compute: str = "cpu-cluster"
    azure_client_id: str | None = None
    group_size: int = 50
    max_groups_per_orchestration: int = 16
    poll_interval_seconds: int = 60
    job_timeout_seconds: int = 4 * 3600
    activity_max_attempts: int = 3
    activity_retry_seconds: int = 30

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every variable of ``SETTINGS`` (empty counts as unset) and check the combination."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in SETTINGS:
            raw = env.get(spec.env)
            raw = raw.strip() if isinstance(raw, str) else raw
            values[spec.field] = _parse(spec, raw if raw else None)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that cannot work, naming the variables to set."""
        for spec in SETTINGS:
            value = getattr(self, spec.field)
            if spec.choices and value is not None and value not in spec.choices:
                raise SettingsError(f"{spec.env}: {value!r} is not one of {list(spec.choices)}")
        self.folder_markers  # raises on a name that cannot be a marker
        if not _TASK_HUB.match(self.task_hub):
            raise SettingsError(
                f"MM_TASK_HUB: {self.task_hub!r} must be 3-45 letters and digits, starting with a letter"
            )
        if self.lake_backend == "blob" and not (self.lake_connection_string or self.lake_blob_service_uri):
            raise SettingsError(
                f"MM_LAKE_BACKEND=blob needs {LAKE_CONNECTION} (a connection string) or "
                f"{LAKE_CONNECTION}__blobServiceUri (identity-based access)"
            )
        if "azureml" in (self.compute_backend, self.registry_backend):
            missing = [
                s.env
                for s in SETTINGS
                if s.field
                in (
                    "azureml_subscription_id",
                    "azureml_resource_group",
                    "azureml_workspace_dev",
                    "azureml_workspace_prod",
                )
                and not getattr(self, s.field)
            ]
            if missing:
                raise SettingsError(f"the azureml backend needs {', '.join(missing)}")

    @property
    def folder_markers(self) -> tuple[str, ...]:
        """The file names that complete a folder dataset (``MM_DATASET_MARKERS``), checked: plain file
        names that no data file or part file could have."""
        names = tuple(dict.fromkeys(n.strip() for n in self.dataset_markers.split(",") if n.strip()))
        if not names:
            raise SettingsError("MM_DATASET_MARKERS: name at least one marker file (the default is _SUCCESS)")
        for name in names:
            if not _MARKER.match(name) or name in (".", "..") or name.lower().endswith(DATA_FILE_SUFFIXES) \
                    or name.startswith("part-"):
                raise SettingsError(
                    f"MM_DATASET_MARKERS: {name!r} cannot be a marker: a marker is a file name of letters, "
                    "digits, '.', '_' or '-' (at most 100), not a data file (.csv, .parquet) nor a part-* file")
        return names

    def config_overrides(self) -> dict[str, Any]:
        """Dotted project-config overrides implied by the deployment (the SQL store in Azure)."""
        out: dict[str, Any] = {}
        if self.store_backend:
            out["store.backend"] = self.store_backend
            out["store.odbc_connection_setting"] = self.sql_connection_setting
        if self.sql_dialect:
            out["store.dialect"] = self.sql_dialect
        return out

    def as_env(self) -> dict[str, str]:
        """The settings back as environment variables (unset ones left out), e.g. for a subprocess."""
        out = {}
        for spec in SETTINGS:
            value = getattr(self, spec.field)
            if value is not None:
                out[spec.env] = str(value)
        return out


def default_workdir() -> Path:
    """The app's working folder when MM_WORKDIR is unset: writable on every Functions plan."""
    return Path(tempfile.gettempdir()) / "manymodels"


def _parse(spec: SettingSpec, raw: str | None) -> Any:
    if spec.kind == "path":
        return Path(raw).expanduser() if raw else default_workdir()
    if raw is None:
        return spec.default
    if spec.kind == "int":
        try:
            value = int(raw)
        except ValueError as exc:
            raise SettingsError(f"{spec.env}: expected a whole number, got {raw!r}") from exc
        if value < 1:
            raise SettingsError(f"{spec.env}: must be >= 1, got {value}")
        return value
    if spec.choices:
        value = raw.lower()
        if value not in spec.choices:
            raise SettingsError(f"{spec.env}: {raw!r} is not one of {list(spec.choices)}")
        return value
    return raw


def _check_fields_match() -> None:
    """Import-time consistency of two constant tables (no environment access)."""
    declared = {f.name: f.default for f in fields(Settings)}
    listed = [s.field for s in SETTINGS]
    if set(listed) != set(declared) or len(listed) != len(set(listed)):
        raise RuntimeError("shared.settings: SETTINGS and Settings fields disagree")
    for spec in SETTINGS:
        if spec.kind != "path" and declared[spec.field] != spec.default:
            raise RuntimeError(f"shared.settings: default of {spec.field} differs from SETTINGS")


_check_fields_match()
