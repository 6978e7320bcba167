"""Azure ML as a backend of the core: parallel jobs, the model registry, production, online serving.

Selected by settings (``MM_COMPUTE_BACKEND=azureml``, ``MM_REGISTRY_BACKEND=azureml``); local stays
the default. ``shared.pipeline`` calls :func:`submit_parallel_job` and :func:`parallel_job_status`
for compute; :func:`open_registries` gives the dev and prod registries with the interface of the
local :class:`shared.registry.ModelRegistry`. Nothing here is imported unless a backend is azureml,
and the SDK itself (``azure.ai.ml``) is imported only inside the functions that use it.

Modules: ``client`` (settings, credential, MLClients, throttling), ``jobs`` (the parallel jobs),
``registry`` (our index + one model asset per run), ``promotion`` (production workspace or
registry), ``endpoint`` (managed online endpoint as code), ``online_score`` (its scoring script).
See docs/azureml.md.
"""
from shared.azureml.client import (AzureMLBackend, AzureMLError, AzureMLSettings, RetryPolicy,
                                   call_with_retry, ml_client)
from shared.azureml.jobs import map_job_state, parallel_job_status, submit_parallel_job
from shared.azureml.registry import AzureMLRegistry, RegistryConflictError, open_registries

__all__ = [
    "AzureMLBackend", "AzureMLError", "AzureMLRegistry", "AzureMLSettings", "RegistryConflictError",
    "RetryPolicy", "call_with_retry", "map_job_state", "ml_client", "open_registries",
    "parallel_job_status", "submit_parallel_job",
]
