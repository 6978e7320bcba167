"""Real-time scoring on Azure ML: the managed online endpoint and its deployment, as code.

The deployment ships the ``shared`` snapshot and runs ``shared/azureml/online_score.py``, which
opens the **production registry folder** read-only and loads a partition's model the first time a
request names it (a bounded LRU cache), never all at start-up: 10,000 models preloaded would not
fit the container. No model asset is attached to the deployment on purpose: the registry folder
is the source, so a newly promoted version is picked up by the script's cheap ``HEAD`` check
instead of a redeployment.

Sizing follows the reference architecture (about two nodes on average): two instances by
default, a request timeout well above a cold load, and probes that leave the container time to
start. Managed endpoints autoscale through Azure Monitor autoscale rules on the deployment (an
infrastructure resource, see docs/azureml.md); the deployment's own ``scale_settings`` is the
fixed ``default`` type, the only one managed deployments accept.

**Identity.** The scoring container reads the production registry as the endpoint's identity. With
``MM_AZUREML_ENDPOINT_IDENTITY_ID`` the endpoint is given that user-assigned identity and the
container gets its client id as ``AZURE_CLIENT_ID`` (so the credential asks for a token of an
identity that is attached); without it, the endpoint has a system-assigned identity and no client
id is injected. Never the caller's own ``AZURE_CLIENT_ID``: that identity is not attached to the
endpoint, ``init()`` would fail to get a token and the deployment would never become healthy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.azureml.client import AzureMLSettings, call_with_retry
from shared.azureml.jobs import build_environment, stage_code
from shared.azureml.registry import DEV_PREFIX, PROD_PREFIX

SCORING_SCRIPT = "shared/azureml/online_score.py"
DEPLOYMENT_NAME = "blue"
REQUEST_TIMEOUT_MS = 5_000
MAX_CONCURRENT_REQUESTS = 8
MAX_QUEUE_WAIT_MS = 500
CACHE_MB = 512
CACHE_MODELS = 2_000


def build_endpoint(aml: AzureMLSettings, auth_mode: str = "key"):
    """The endpoint: a stable URL and key, and the identity its containers run as."""
    from azure.ai.ml.entities import IdentityConfiguration, ManagedIdentityConfiguration, ManagedOnlineEndpoint

    if aml.endpoint_identity_id:
        identity = IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[ManagedIdentityConfiguration(resource_id=aml.endpoint_identity_id)])
    else:
        identity = IdentityConfiguration(type="system_assigned")
    return ManagedOnlineEndpoint(
        name=aml.endpoint_name, auth_mode=auth_mode, identity=identity,
        description="manymodels real-time forecasts: one model per partition, loaded on demand",
        tags={"manymodels": "serving", "registry": PROD_PREFIX},
    )


def serving_environment_variables(aml: AzureMLSettings, storage_url: str, config: Any,
                                  cache_mb: int = CACHE_MB,
                                  cache_models: int = CACHE_MODELS) -> dict[str, str]:
    """What online_score.py reads: where the production registry is, the project config (key and
    time columns, covariates, horizon: the shared request contract needs them), the cache size."""
    env = {
        "MM_SERVING_STORAGE_URL": storage_url,
        "MM_SERVING_REGISTRY_PREFIX": PROD_PREFIX,
        "MM_SERVING_CONFIG": json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")),
        "MM_PARTITION_KEYS": ",".join(config.data.keys),
        "MM_SERVING_CACHE_MB": str(cache_mb),
        "MM_SERVING_CACHE_MODELS": str(cache_models),
        "MM_SERVING_REFRESH_SECONDS": "30",
        "OMP_NUM_THREADS": "1",
    }
    if config.scoring_reads_dev:  # the chain's other sources read the development registry
        env["MM_SERVING_DEV_REGISTRY_PREFIX"] = DEV_PREFIX
    if aml.endpoint_identity_client_id:  # the endpoint's own user-assigned identity, never the caller's
        env["AZURE_CLIENT_ID"] = aml.endpoint_identity_client_id
    return env


def build_deployment(aml: AzureMLSettings, storage_url: str, config: Any, name: str = DEPLOYMENT_NAME,
                     code: Path | str | None = None, environment: Any = None):
    """The managed deployment: environment, instance type and count, request settings, probes."""
    from azure.ai.ml.entities import (CodeConfiguration, DefaultScaleSettings, ManagedOnlineDeployment,
                                      OnlineRequestSettings, ProbeSettings)

    return ManagedOnlineDeployment(
        name=name,
        endpoint_name=aml.endpoint_name,
        environment=environment or build_environment(aml, "serving"),
        code_configuration=CodeConfiguration(code=str(code or stage_code()), scoring_script=SCORING_SCRIPT),
        instance_type=aml.serving_instance_type,
        instance_count=aml.serving_instance_count,
        scale_settings=DefaultScaleSettings(),
        request_settings=OnlineRequestSettings(request_timeout_ms=REQUEST_TIMEOUT_MS,
                                               max_concurrent_requests_per_instance=MAX_CONCURRENT_REQUESTS,
                                               max_queue_wait_ms=MAX_QUEUE_WAIT_MS),
        # liveness: restart a wedged container; readiness: no traffic until init() has finished
        liveness_probe=ProbeSettings(initial_delay=30, period=10, timeout=2, failure_threshold=3,
                                     success_threshold=1),
        readiness_probe=ProbeSettings(initial_delay=10, period=5, timeout=2, failure_threshold=3,
                                      success_threshold=1),
        environment_variables=serving_environment_variables(aml, storage_url, config),
        app_insights_enabled=True,
        tags={"manymodels": "serving"},
    )


def deploy_online(ws: Any, backend: Any = None, name: str = DEPLOYMENT_NAME, traffic: int = 100,
                  storage_url: str | None = None) -> dict[str, Any]:
    """Create or update the endpoint and deployment in the production workspace; route traffic.

    Three long-running operations, each awaited: endpoint, deployment, then the endpoint again
    with its traffic split (a deployment only gets traffic once it is healthy).
    """
    from shared.azureml.client import AzureMLBackend, AzureMLError

    backend = backend or AzureMLBackend.for_workspace(ws)
    aml = backend.aml
    storage_url = storage_url or aml.prod_storage_url or getattr(ws.settings, "lake_blob_service_uri", None)
    if not storage_url:
        raise AzureMLError("the online endpoint reads the production registry from blob storage: set "
                           "MM_AZUREML_PROD_STORAGE_URL or LakeStorage__blobServiceUri")
    client = backend.client("prod")
    endpoint = build_endpoint(aml)
    call_with_retry(lambda: client.online_endpoints.begin_create_or_update(endpoint).result(),
                    f"create endpoint {aml.endpoint_name}", backend.retry)
    deployment = build_deployment(aml, storage_url, ws.config, name=name, code=backend.code)
    call_with_retry(lambda: client.online_deployments.begin_create_or_update(deployment).result(),
                    f"create deployment {aml.endpoint_name}/{name}", backend.retry)
    endpoint.traffic = {name: traffic}
    result = call_with_retry(lambda: client.online_endpoints.begin_create_or_update(endpoint).result(),
                             f"route traffic of {aml.endpoint_name}", backend.retry)
    return {"endpoint": aml.endpoint_name, "deployment": name, "traffic": dict(endpoint.traffic),
            "scoring_uri": getattr(result, "scoring_uri", None)}
