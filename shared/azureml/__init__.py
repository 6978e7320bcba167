"""The Azure backends of the core: the Blob lake, Azure ML parallel jobs, registry, production, serving.

Selected by settings (``MM_LAKE_BACKEND=blob``, ``MM_COMPUTE_BACKEND=azureml``,
``MM_REGISTRY_BACKEND=azureml``); local stays the default. :mod:`shared.runs.backends` is the one place
that opens them (the lake, the dev and prod registries with the interface of the local
:class:`shared.registries.registry.ModelRegistry`, the compute backend). Nothing here is imported unless a
backend is an Azure one, and the Azure ML SDK itself (``azure.ai.ml``) is imported only inside the
functions that use it.

Modules: ``blob_lake`` (the lake on Blob storage / ADLS Gen2), ``client`` (settings, credential,
MLClients, throttling), ``jobs`` (the parallel jobs), ``registry`` (our index + one model asset per
run), ``promotion`` (production workspace or registry), ``endpoint`` (managed online endpoint as
code), ``online_score`` (its scoring script). See docs/azureml.md.
"""
from shared.azureml.client import (AzureMLBackend, AzureMLError, AzureMLSettings, RetryPolicy,
                                   call_with_retry, ml_client)
from shared.azureml.jobs import map_job_state, parallel_job_status, submit_parallel_job
from shared.azureml.registry import AzureMLRegistry, RegistryConflictError

__all__ = [
    "AzureMLBackend", "AzureMLError", "AzureMLRegistry", "AzureMLSettings", "RegistryConflictError",
    "RetryPolicy", "call_with_retry", "map_job_state", "ml_client",
    "parallel_job_status", "submit_parallel_job",
]
