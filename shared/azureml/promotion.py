"""Production on Azure ML: promoted models reach a separate workspace or an Azure ML registry.

The business rules are the core's (:func:`shared.registries.promotion.promote_run`); what changes in Azure
is where ``prod.copy_many(dev, records)`` lands. The production :class:`AzureMLRegistry` copies
the eligible models' artifacts into the production registry folder (its own storage account when
``MM_AZUREML_PROD_STORAGE_URL`` is set), updates the production index, and publishes the batch as
one model version with one of two publishers:

- **an Azure ML registry** (``MM_AZUREML_REGISTRY`` set): the batch is registered in the dev
  workspace as ``<asset>-promoted:<version>`` by reference, then *shared* into the registry as
  ``<asset>:<version>``; the registry copies the files into its own storage. This is exactly what
  ``MLClient.models.share`` does (a workspace look-up for its id, then an import of a
  ``WorkspaceAssetReference`` into the registry); we make the two calls ourselves so that they
  run through the same client settings as everything else (credential, transport, retries) and
  the registry's discovery request is made once per client, not once per share.
- **a production workspace** (no registry): "download and re-register" — the files were copied
  by our own code into the production folder, and the version is registered in the production
  workspace by reference to its datastore.

Either way the tags travel with the asset, the per-model tags with its ``models.jsonl``, and the
production index is updated in the same write. Training never holds a production publisher: the
dev registry has none, and the production registry refuses ``register_many``.
"""
from __future__ import annotations

from typing import Any

from shared.azureml.client import AzureMLSettings, RetryPolicy, call_with_retry
from shared.azureml.registry import AssetBatch, WorkspaceAssetPublisher

PROMOTED_SUFFIX = "-promoted"


class RegistrySharePublisher:
    """Share each promoted batch from the dev workspace into an Azure ML registry."""

    def __init__(self, dev_client: Any, registry_client: Any, aml: AzureMLSettings,
                 retry: RetryPolicy | None = None) -> None:
        self.dev_client = dev_client
        self.registry_client = registry_client
        self.aml = aml
        self.retry = retry
        # the batch is staged in the production folder; the dev workspace reaches it through the
        # production datastore (registered in both workspaces)
        self.staging = WorkspaceAssetPublisher(dev_client, aml, asset_name=aml.asset_name + PROMOTED_SUFFIX,
                                               datastore=aml.registry_datastore, retry=retry)

    def publish(self, batch: AssetBatch) -> str:
        from azure.core.exceptions import ResourceNotFoundError

        name = self.aml.asset_name
        try:
            call_with_retry(lambda: self.registry_client.models.get(name=name, version=batch.version),
                            f"get registry model {name}:{batch.version}", self.retry)
            return f"azureml://registries/{self.aml.registry}/models/{name}/versions/{batch.version}"
        except ResourceNotFoundError:
            pass
        self.staging.publish(batch)
        return self.share(self.staging.asset_name, batch.version, name, batch.version)

    def share(self, name: str, version: str, share_with_name: str, share_with_version: str) -> str:
        """``models.share`` in two explicit calls (see the module docstring for why)."""
        from azure.ai.ml.constants._common import ASSET_ID_FORMAT
        from azure.ai.ml.entities._assets.workspace_asset_reference import WorkspaceAssetReference

        workspace = call_with_retry(lambda: self.dev_client.workspaces.get(self.aml.workspace_dev),
                                    f"get workspace {self.aml.workspace_dev}", self.retry)
        asset_id = ASSET_ID_FORMAT.format(workspace.location, workspace._workspace_id, "models", name,
                                          version)
        reference = WorkspaceAssetReference(name=share_with_name, version=share_with_version,
                                            asset_id=asset_id)
        call_with_retry(lambda: self.registry_client.models.create_or_update(reference),
                        f"share {name}:{version} into registry {self.aml.registry}", self.retry)
        return (f"azureml://registries/{self.aml.registry}/models/{share_with_name}/"
                f"versions/{share_with_version}")


def production_publisher(backend: Any) -> Any:
    """The registry share when a registry is configured, else the production workspace."""
    aml = backend.aml
    if aml.registry:
        return RegistrySharePublisher(backend.client("dev"), backend.client("registry"), aml, backend.retry)
    return WorkspaceAssetPublisher(backend.client("prod"), aml, datastore=aml.registry_datastore,
                                   retry=backend.retry)
