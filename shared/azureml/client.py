"""Reaching Azure ML: the settings it needs, the credential, the MLClients, and throttling.

Everything that talks to the service goes through :func:`ml_client` (one client per workspace or
registry) and :func:`call_with_retry` (an operation retried when Azure ML throttles). The SDK's
own azure-core pipeline already retries single HTTP requests; the wrapper adds an *operation*
level retry because one SDK call (submitting a pipeline job, sharing a model) is several requests,
and a 429 on the fifth should not lose the first four's work nor surface as a failed activity
while the service only asks us to wait. Every operation we call is idempotent (PUT by name and
version), so repeating it is safe.
"""
from __future__ import annotations

import email.utils
import hashlib
import re
import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TypeVar

from azure.core.exceptions import HttpResponseError

from shared.errors import ManyModelsError

log = logging.getLogger(__name__)

T = TypeVar("T")

THROTTLED = (429, 503)
DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"


class AzureMLError(ManyModelsError, RuntimeError):
    """An Azure ML operation cannot be done: a missing setting, job, or model; the message says which."""


# -- settings ------------------------------------------------------------------------------------
_ENDPOINT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")


def default_endpoint_name(subscription_id: str, resource_group: str, workspace: str) -> str:
    """An online endpoint name of our own deployment: endpoint names are unique per Azure region
    (they become ``<name>.<region>.inference.ml.azure.com``), so a fixed name collides across
    environments and tenants. 3-32 characters, a letter first, letters, digits and hyphens."""
    digest = hashlib.sha256(f"{subscription_id}/{resource_group}/{workspace}".lower().encode()).hexdigest()
    return f"mm-online-{digest[:12]}"


# Variables this package reads beyond shared.settings.Settings (which holds subscription, resource
# group, workspace names, compute and AZURE_CLIENT_ID): (env var, field, default, meaning).
EXTRA_SETTINGS: tuple[tuple[str, str, Any, str], ...] = (
    ("MM_AZUREML_REGISTRY", "registry", None,
     "Azure ML registry that receives promoted models (models.share); empty: the prod workspace."),
    ("MM_AZUREML_CREDENTIAL", "credential", "default",
     "'default' (DefaultAzureCredential) or 'managed_identity' (ManagedIdentityCredential only)."),
    ("MM_AZUREML_INSTANCE_COUNT", "instance_count", 2, "Nodes per parallel job."),
    ("MM_AZUREML_INSTANCE_TYPE", "instance_type", None, "VM size override for parallel jobs."),
    ("MM_AZUREML_MAX_CONCURRENCY", "max_concurrency", 4,
     "Worker processes per node (max_concurrency_per_instance); one per core is usual."),
    ("MM_AZUREML_MINI_BATCH_SIZE", "mini_batch_size", None,
     "Files per run(mini_batch) call; default: the project config's runner.mini_batch_size."),
    ("MM_AZUREML_MAX_RETRIES", "max_retries", None,
     "Retries of a failed or timed-out mini-batch; default: the project config's runner.retries."),
    ("MM_AZUREML_MINI_BATCH_TIMEOUT", "mini_batch_timeout", 1800, "Seconds one run(mini_batch) may take."),
    ("MM_AZUREML_MINI_BATCH_ERROR_THRESHOLD", "mini_batch_error_threshold", 0,
     "Failed mini-batches (after retries) tolerated before the job fails; -1: never fail."),
    ("MM_AZUREML_ERROR_THRESHOLD", "error_threshold", -1,
     "Failed items tolerated (rows returned < files given); -1: ignore, our rows carry failures."),
    ("MM_AZUREML_LOGGING_LEVEL", "logging_level", "INFO", "Parallel job log level: DEBUG, INFO, WARNING."),
    ("MM_AZUREML_DATASTORE_PREFIX", "datastore_prefix", "lake_",
     "Datastore of lake container C is <prefix>C (lake_prepared, lake_runs, lake_registry ...)."),
    ("MM_AZUREML_PROD_STORAGE_URL", "prod_storage_url", None,
     "Blob endpoint of the production registry's storage; empty: the lake's 'registry' container."),
    ("MM_AZUREML_PROD_DATASTORE", "prod_datastore", None,
     "Datastore (in both workspaces) of the production registry folder; default <prefix>registry."),
    ("MM_AZUREML_IMAGE", "image", DEFAULT_IMAGE, "Base image of the job and serving environments."),
    ("MM_AZUREML_EXPERIMENT", "experiment", "manymodels", "Experiment name of submitted jobs."),
    ("MM_AZUREML_ASSET_NAME", "asset_name", "manymodels", "Model asset name (one version per run)."),
    ("MM_AZUREML_ENDPOINT", "endpoint_name", None,
     "Managed online endpoint name (unique per region); default mm-online-<hash of subscription, "
     "resource group and production workspace>. The Bicep sets mm-<resource token>."),
    ("MM_AZUREML_ENDPOINT_IDENTITY_ID", "endpoint_identity_id", None,
     "Resource id of the user-assigned identity the online endpoint runs as (it reads the production "
     "registry); empty: a system-assigned identity."),
    ("MM_AZUREML_ENDPOINT_IDENTITY_CLIENT_ID", "endpoint_identity_client_id", None,
     "Client id of that identity, given to the scoring container as AZURE_CLIENT_ID."),
    ("MM_AZUREML_SERVING_INSTANCE_TYPE", "serving_instance_type", "Standard_DS3_v2",
     "VM size of the online deployment."),
    ("MM_AZUREML_SERVING_INSTANCE_COUNT", "serving_instance_count", 2, "Instances of the online deployment."),
)
_INT_FIELDS = {"instance_count", "max_concurrency", "mini_batch_size", "max_retries", "mini_batch_timeout",
               "mini_batch_error_threshold", "error_threshold", "serving_instance_count"}


@dataclass(frozen=True)
class AzureMLSettings:
    """Where and how Azure ML runs our work. Build with :meth:`from_settings` or :meth:`from_env`."""

    subscription_id: str
    resource_group: str
    workspace_dev: str
    workspace_prod: str
    compute: str = "cpu-cluster"
    client_id: str | None = None
    registry: str | None = None
    credential: str = "default"
    instance_count: int = 2
    instance_type: str | None = None
    max_concurrency: int = 4
    mini_batch_size: int | None = None
    max_retries: int | None = None
    mini_batch_timeout: int = 1800
    mini_batch_error_threshold: int = 0
    error_threshold: int = -1
    logging_level: str = "INFO"
    datastore_prefix: str = "lake_"
    prod_storage_url: str | None = None
    prod_datastore: str | None = None
    image: str = DEFAULT_IMAGE
    experiment: str = "manymodels"
    asset_name: str = "manymodels"
    endpoint_name: str | None = None
    endpoint_identity_id: str | None = None
    endpoint_identity_client_id: str | None = None
    serving_instance_type: str = "Standard_DS3_v2"
    serving_instance_count: int = 2

    def __post_init__(self) -> None:
        if not self.endpoint_name:  # derived, never one fixed name for every deployment
            object.__setattr__(self, "endpoint_name", default_endpoint_name(
                self.subscription_id, self.resource_group, self.workspace_prod))

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] | None = None) -> "AzureMLSettings":
        """The core names from ``shared.settings.Settings``, the rest from ``EXTRA_SETTINGS``."""
        base = {
            "subscription_id": getattr(settings, "azureml_subscription_id", None),
            "resource_group": getattr(settings, "azureml_resource_group", None),
            "workspace_dev": getattr(settings, "azureml_workspace_dev", None),
            "workspace_prod": getattr(settings, "azureml_workspace_prod", None),
            "compute": getattr(settings, "azureml_compute", None) or "cpu-cluster",
            "client_id": getattr(settings, "azure_client_id", None),
        }
        return cls._build(base, os.environ if environ is None else environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AzureMLSettings":
        """Everything from the environment (the variable names of ``shared.settings``)."""
        env = os.environ if environ is None else environ
        base = {
            "subscription_id": env.get("MM_AZUREML_SUBSCRIPTION_ID"),
            "resource_group": env.get("MM_AZUREML_RESOURCE_GROUP"),
            "workspace_dev": env.get("MM_AZUREML_WORKSPACE_DEV"),
            "workspace_prod": env.get("MM_AZUREML_WORKSPACE_PROD"),
            "compute": env.get("MM_AZUREML_COMPUTE") or "cpu-cluster",
            "client_id": env.get("AZURE_CLIENT_ID") or None,
        }
        return cls._build(base, env)

    @classmethod
    def _build(cls, base: dict[str, Any], env: Mapping[str, str]) -> "AzureMLSettings":
        missing = [name for name in ("subscription_id", "resource_group", "workspace_dev", "workspace_prod")
                   if not base.get(name)]
        if missing:
            names = {"subscription_id": "MM_AZUREML_SUBSCRIPTION_ID",
                     "resource_group": "MM_AZUREML_RESOURCE_GROUP",
                     "workspace_dev": "MM_AZUREML_WORKSPACE_DEV",
                     "workspace_prod": "MM_AZUREML_WORKSPACE_PROD"}
            raise AzureMLError("the azureml backend needs " + ", ".join(names[m] for m in missing))
        values = dict(base)
        for env_name, field_name, default, _ in EXTRA_SETTINGS:
            raw = (env.get(env_name) or "").strip()
            if not raw:
                values[field_name] = default
            elif field_name in _INT_FIELDS:
                try:
                    values[field_name] = int(raw)
                except ValueError as exc:
                    raise AzureMLError(f"{env_name}: expected a whole number, got {raw!r}") from exc
            else:
                values[field_name] = raw
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.credential not in ("default", "managed_identity"):
            raise AzureMLError(f"MM_AZUREML_CREDENTIAL: {self.credential!r} is not 'default' or "
                               "'managed_identity'")
        if self.endpoint_name and not _ENDPOINT_NAME.match(self.endpoint_name):
            raise AzureMLError(f"MM_AZUREML_ENDPOINT: {self.endpoint_name!r} is not an endpoint name (3-32 "
                               "characters: a letter, then letters, digits and hyphens)")
        if bool(self.endpoint_identity_id) != bool(self.endpoint_identity_client_id):
            raise AzureMLError("MM_AZUREML_ENDPOINT_IDENTITY_ID and MM_AZUREML_ENDPOINT_IDENTITY_CLIENT_ID "
                               "name one identity: set both or neither")
        if self.credential == "managed_identity" and not self.client_id:
            raise AzureMLError("MM_AZUREML_CREDENTIAL=managed_identity needs AZURE_CLIENT_ID")
        if self.instance_count < 1 or self.max_concurrency < 1 or self.mini_batch_timeout < 1:
            raise AzureMLError("instance count, max concurrency and mini-batch timeout must be >= 1")
        if self.logging_level not in ("DEBUG", "INFO", "WARNING"):
            raise AzureMLError(f"MM_AZUREML_LOGGING_LEVEL: {self.logging_level!r} is not DEBUG, INFO "
                               "or WARNING")
        if self.workspace_dev == self.workspace_prod:
            raise AzureMLError("MM_AZUREML_WORKSPACE_DEV and MM_AZUREML_WORKSPACE_PROD must differ: "
                               "production models live apart from training")

    def with_changes(self, **changes: Any) -> "AzureMLSettings":
        derived = default_endpoint_name(self.subscription_id, self.resource_group, self.workspace_prod)
        if "endpoint_name" not in changes and self.endpoint_name == derived:
            changes["endpoint_name"] = None  # a derived name follows the workspace it was derived from
        out = replace(self, **changes)
        out.check()
        return out

    # -- lake paths as Azure ML data URIs --------------------------------------------------------
    def datastore_for(self, container: str) -> str:
        """The datastore registered for a lake container (one datastore per container)."""
        return f"{self.datastore_prefix}{container}"

    @property
    def registry_datastore(self) -> str:
        return self.prod_datastore or self.datastore_for("registry")

    def lake_uri(self, lake_path: str, folder: bool = False, datastore: str | None = None) -> str:
        """``prepared/d1/batches`` -> ``azureml://datastores/lake_prepared/paths/d1/batches/``."""
        container, _, rest = lake_path.strip("/").partition("/")
        store = datastore or self.datastore_for(container)
        uri = f"azureml://datastores/{store}/paths/{rest}"
        return uri.rstrip("/") + "/" if folder else uri

    def long_lake_uri(self, lake_path: str, workspace: str | None = None) -> str:
        """The fully qualified form, which MLTable files need (they are read outside any workspace)."""
        container, _, rest = lake_path.strip("/").partition("/")
        return (f"azureml://subscriptions/{self.subscription_id}/resourcegroups/{self.resource_group}/"
                f"workspaces/{workspace or self.workspace_dev}/"
                f"datastores/{self.datastore_for(container)}/paths/{rest}")

    @staticmethod
    def documented() -> list[tuple[str, Any, str]]:
        return [(env, default, meaning) for env, _, default, meaning in EXTRA_SETTINGS]


# -- credential and clients -----------------------------------------------------------------------
def make_credential(aml: AzureMLSettings) -> Any:
    """DefaultAzureCredential (CLI locally, managed identity in Azure) or ManagedIdentityCredential.

    With a user-assigned identity both need its client id: DefaultAzureCredential would otherwise
    try the system-assigned identity, which our Function App and compute cluster do not have.
    """
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if aml.credential == "managed_identity":
        return ManagedIdentityCredential(client_id=aml.client_id)
    if aml.client_id:
        return DefaultAzureCredential(managed_identity_client_id=aml.client_id)
    return DefaultAzureCredential()


def ml_client(aml: AzureMLSettings, target: str = "dev", credential: Any = None, **client_kwargs: Any):
    """An MLClient for the dev or prod workspace, or the Azure ML registry (``target="registry"``).

    ``client_kwargs`` go to every azure-core pipeline of the client: ``transport`` (tests replace
    the HTTP layer with synthetic responses), ``retry_total`` (the SDK's per-request retries).
    Telemetry is off: the Function App must not phone home on every cold start.
    """
    from azure.ai.ml import MLClient

    if target not in ("dev", "prod", "registry"):
        raise AzureMLError(f"unknown Azure ML target {target!r}: dev, prod or registry")
    credential = credential or make_credential(aml)
    client_kwargs.setdefault("enable_telemetry", False)
    client_kwargs.setdefault("show_progress", False)
    if target == "registry":
        if not aml.registry:
            raise AzureMLError("no Azure ML registry configured: set MM_AZUREML_REGISTRY")
        return MLClient(credential, aml.subscription_id, aml.resource_group, registry_name=aml.registry,
                        **client_kwargs)
    workspace = aml.workspace_dev if target == "dev" else aml.workspace_prod
    return MLClient(credential, aml.subscription_id, aml.resource_group, workspace, **client_kwargs)


# -- throttling ------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """How long to keep retrying a throttled operation; ``sleep`` is injectable for tests."""

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 120.0
    sleep: Callable[[float], None] = time.sleep


def retry_after_seconds(error: HttpResponseError) -> float | None:
    """The wait the service asked for: ``Retry-After`` (seconds or an HTTP date) or the ms variants."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) / 1000.0)
            except ValueError:
                continue
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither seconds nor an HTTP date: back off on our own
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return max(0.0, (parsed - datetime.now(timezone.utc)).total_seconds())


def call_with_retry(operation: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """Run ``operation``; on 429/503 wait as told (else exponential back-off) and try again.

    Any other error, or throttling that outlasts ``policy.attempts``, propagates unchanged so the
    caller (a Durable activity) fails visibly and its own retry policy takes over.
    """
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except HttpResponseError as exc:
            status = getattr(exc, "status_code", None)
            if status not in THROTTLED or attempt == policy.attempts:
                raise
            wait = retry_after_seconds(exc)
            if wait is None:
                wait = policy.base_delay * (2 ** (attempt - 1))
            wait = min(wait, policy.max_delay)
            log.warning("Azure ML throttled %s (HTTP %s), attempt %d/%d: waiting %.1f s",
                        what, status, attempt, policy.attempts, wait)
            policy.sleep(wait)


# -- the backend object a workspace carries -------------------------------------------------------
class AzureMLBackend:
    """The Azure ML side of a pipeline workspace: settings, one client per target, retry policy.

    ``Workspace`` objects get one on first use (``ws.azureml``), built from ``ws.settings``;
    tests attach their own with a synthetic transport. ``code`` is the snapshot folder jobs
    upload (default: :func:`shared.azureml.jobs.stage_code`).
    """

    def __init__(self, aml: AzureMLSettings, credential: Any = None,
                 client_kwargs: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None,
                 code: Any = None) -> None:
        self.aml = aml
        self.credential = credential
        self.client_kwargs = dict(client_kwargs or {})
        self.retry = retry or RetryPolicy()
        self.code = code
        self._clients: dict[str, Any] = {}

    @classmethod
    def for_workspace(cls, ws: Any) -> "AzureMLBackend":
        backend = getattr(ws, "azureml", None)
        if backend is None:
            settings = getattr(ws, "settings", None)
            if settings is None:
                raise AzureMLError("the azureml backend needs deployment settings (MM_AZUREML_*)")
            backend = cls(AzureMLSettings.from_settings(settings))
            ws.azureml = backend
        return backend

    def client(self, target: str = "dev") -> Any:
        if target not in self._clients:
            if self.credential is None:
                self.credential = make_credential(self.aml)
            self._clients[target] = ml_client(self.aml, target, credential=self.credential,
                                              **self.client_kwargs)
        return self._clients[target]
