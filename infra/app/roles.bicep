// Least-privilege role assignments, all by built-in role definition id, each at the narrowest
// scope that works (a container, a queue, one workspace) rather than the resource group.
//
// Function App identity
//   host storage   Storage Blob Data Owner, Queue Data Contributor, Table Data Contributor: the
//                  Functions host (keys, leases) and the Durable Functions task hub (queues,
//                  tables, large-message blobs). Storage Account Contributor only when the code
//                  has a blob trigger (Microsoft's documented requirement for AzureWebJobsStorage).
//   lake           Storage Blob Data Contributor (read raw, write prepared/runs/predictions); with
//                  a blob trigger: Storage Blob Data Owner + Queue Data Contributor (the trigger's
//                  documented roles; its poison queue lives in the lake account).
//   Service Bus    Data Receiver on every queue the app consumes; Data Sender on the queues it
//                  sends to (the promotion queue).
//   App Insights   Monitoring Metrics Publisher (telemetry with Entra auth, local auth disabled).
//   Azure ML dev   AzureML Data Scientist (submit and monitor parallel jobs, register models) and
//                  Storage Blob Data Contributor on the dev workspace storage (code snapshots,
//                  model artifacts).
//   Azure ML prod  a custom "model promoter" role: read the workspace and datastores, read/write
//                  models; no jobs, no compute, no deletes. No built-in role is that narrow
//                  (AzureML Data Scientist could also run jobs in production). Plus Storage Blob
//                  Data Contributor on the prod workspace storage for the model artifacts.
// Azure ML compute identity (what the parallel jobs and the ingestion command job run as)
//   lake           Storage Blob Data Reader on the account; Storage Blob Data Contributor only on
//                  the containers the jobs write to (prepared, runs: main.bicep computeWriteContainers).
//   Azure ML dev   Storage Blob Data Contributor on the dev workspace storage (outputs, logs);
//                  AcrPull on the shared registry (environment images).
//   Azure ML prod  Storage Blob Data Reader on the prod workspace storage: the online endpoint runs
//                  as this identity (MM_AZUREML_ENDPOINT_IDENTITY_ID), and a managed online
//                  endpoint's identity needs AcrPull on the workspace's registry and read access to
//                  its default storage (the deployment's code snapshot) to become healthy; it reads
//                  registry/prod with the lake role above.
// Deploying principal (optional; the user running azd, or CI)
//   lake           Storage Blob Data Contributor (upload raw files); Service Bus Data Sender on the
//                  upstream queue (send test messages); AzureML Data Scientist on dev.
// Synapse workspace identity (when deployed): Storage Blob Data Contributor on the lake.

param functionPrincipalId string
param computePrincipalId string
@description('Object id of the deploying user or CI principal; empty to skip its assignments.')
param deployerPrincipalId string = ''
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'
param hostStorageName string
param lakeName string
@description('Lake containers the Azure ML compute identity may write to.')
param computeWriteContainers array
param serviceBusName string
@description('Queues the Function App receives from.')
param receiveQueues array
@description('Queues the Function App sends to.')
param sendQueues array
@description('Queue the deploying principal may send test messages to.')
param deployerSendQueue string
param applicationInsightsName string
param devWorkspaceName string
param prodWorkspaceName string
param devWorkspaceStorageName string
param prodWorkspaceStorageName string
param containerRegistryName string
@description('True when the code has a blob trigger on the lake (roles documented for blob triggers).')
param hasBlobTrigger bool
param synapsePrincipalId string = ''

var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageAccountContributor: '17d1049b-9a84-46fb-8f53-869881c3d3ab'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  azureMLDataScientist: 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
  acrPull: '7f951dda-4ed3-4680-a7ca-43fe172d538d'
}

resource hostStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: hostStorageName
}

resource lake 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: lakeName
}

resource lakeBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: lake
  name: 'default'
}

resource computeContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = [for name in computeWriteContainers: {
  parent: lakeBlobService
  name: name
}]

resource serviceBus 'Microsoft.ServiceBus/namespaces@2021-11-01' existing = {
  name: serviceBusName
}

resource receiveQueueResources 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' existing = [for name in receiveQueues: {
  parent: serviceBus
  name: name
}]

resource sendQueueResources 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' existing = [for name in sendQueues: {
  parent: serviceBus
  name: name
}]

resource deployerQueue 'Microsoft.ServiceBus/namespaces/queues@2021-11-01' existing = {
  parent: serviceBus
  name: deployerSendQueue
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource devWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: devWorkspaceName
}

resource prodWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: prodWorkspaceName
}

resource devWorkspaceStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: devWorkspaceStorageName
}

resource prodWorkspaceStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: prodWorkspaceStorageName
}

resource containerRegistry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: containerRegistryName
}

// -- a custom role for promotion into the production workspace ---------------------------------
resource modelPromoter 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'manymodels-model-promoter')
  properties: {
    roleName: 'manymodels model promoter (${resourceGroup().name})'
    description: 'Register and read models in an Azure ML workspace; no jobs, compute, endpoints or deletes.'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: [
          'Microsoft.MachineLearningServices/workspaces/read'
          'Microsoft.MachineLearningServices/workspaces/models/*/read'
          'Microsoft.MachineLearningServices/workspaces/models/*/write'
          'Microsoft.MachineLearningServices/workspaces/models/*/action'
          'Microsoft.MachineLearningServices/workspaces/datastores/read'
          'Microsoft.MachineLearningServices/workspaces/datastores/listsecrets/action'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
  }
}

// -- Function App identity ---------------------------------------------------------------------
resource funcHostBlob 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, functionPrincipalId, roles.storageBlobDataOwner)
  scope: hostStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
  }
}

resource funcHostQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, functionPrincipalId, roles.storageQueueDataContributor)
  scope: hostStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
  }
}

resource funcHostTable 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, functionPrincipalId, roles.storageTableDataContributor)
  scope: hostStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
  }
}

resource funcHostAccount 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasBlobTrigger) {
  name: guid(hostStorage.id, functionPrincipalId, roles.storageAccountContributor)
  scope: hostStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageAccountContributor)
  }
}

resource funcLakeBlob 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(lake.id, functionPrincipalId, hasBlobTrigger ? roles.storageBlobDataOwner : roles.storageBlobDataContributor)
  scope: lake
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', hasBlobTrigger ? roles.storageBlobDataOwner : roles.storageBlobDataContributor)
  }
}

resource funcLakeQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasBlobTrigger) {
  name: guid(lake.id, functionPrincipalId, roles.storageQueueDataContributor)
  scope: lake
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
  }
}

resource funcQueueReceive 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in receiveQueues: {
  name: guid(receiveQueueResources[i].id, functionPrincipalId, roles.serviceBusDataReceiver)
  scope: receiveQueueResources[i]
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
  }
}]

resource funcQueueSend 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in sendQueues: {
  name: guid(sendQueueResources[i].id, functionPrincipalId, roles.serviceBusDataSender)
  scope: sendQueueResources[i]
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
  }
}]

resource funcTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, functionPrincipalId, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

resource funcDevScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(devWorkspace.id, functionPrincipalId, roles.azureMLDataScientist)
  scope: devWorkspace
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
  }
}

resource funcDevStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(devWorkspaceStorage.id, functionPrincipalId, roles.storageBlobDataContributor)
  scope: devWorkspaceStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

resource funcProdPromoter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(prodWorkspace.id, functionPrincipalId, modelPromoter.id)
  scope: prodWorkspace
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: modelPromoter.id
  }
}

resource funcProdStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(prodWorkspaceStorage.id, functionPrincipalId, roles.storageBlobDataContributor)
  scope: prodWorkspaceStorage
  properties: {
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

// -- Azure ML compute identity -----------------------------------------------------------------
resource computeLakeRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(lake.id, computePrincipalId, roles.storageBlobDataReader)
  scope: lake
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
  }
}

resource computeLakeWrite 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in computeWriteContainers: {
  name: guid(computeContainers[i].id, computePrincipalId, roles.storageBlobDataContributor)
  scope: computeContainers[i]
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}]

resource computeDevStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(devWorkspaceStorage.id, computePrincipalId, roles.storageBlobDataContributor)
  scope: devWorkspaceStorage
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

// the online endpoint (production workspace) runs as the compute identity: its code snapshot lives here
resource computeProdStorageRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(prodWorkspaceStorage.id, computePrincipalId, roles.storageBlobDataReader)
  scope: prodWorkspaceStorage
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
  }
}

resource computeAcrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(containerRegistry.id, computePrincipalId, roles.acrPull)
  scope: containerRegistry
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.acrPull)
  }
}

// -- deploying principal -----------------------------------------------------------------------
resource deployerLake 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(lake.id, deployerPrincipalId, roles.storageBlobDataContributor)
  scope: lake
  properties: {
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

resource deployerUpstream 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(deployerQueue.id, deployerPrincipalId, roles.serviceBusDataSender)
  scope: deployerQueue
  properties: {
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
  }
}

resource deployerDevScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(devWorkspace.id, deployerPrincipalId, roles.azureMLDataScientist)
  scope: devWorkspace
  properties: {
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
  }
}

// -- Synapse workspace identity (sqlBackend synapse-*) -----------------------------------------
resource synapseLake 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(synapsePrincipalId)) {
  name: guid(lake.id, synapsePrincipalId, roles.storageBlobDataContributor)
  scope: lake
  properties: {
    principalId: synapsePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

output modelPromoterRoleId string = modelPromoter.id
