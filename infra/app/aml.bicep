// Azure ML: a development workspace (training jobs, dev model registry, the compute cluster) and a
// separate production workspace (promoted models only; training never writes there), sharing one
// container registry for environment images. The compute cluster scales to zero when idle and
// runs as its own user-assigned identity, which is what the jobs (the parallel training and scoring
// jobs, the ingestion command job) use to reach the lake.

param location string
param tags object
param resourceToken string
param logAnalyticsId string
param computeIdentityId string
@description('Compute cluster name; the app reads it as MM_AZUREML_COMPUTE.')
param computeName string
param computeVmSize string
@minValue(1)
param computeMaxNodes int
@allowed([
  'Dedicated'
  'LowPriority'
])
param computeVmPriority string
@description('Idle time before a node is released (ISO 8601); the cluster always scales to zero.')
param computeIdleTimeBeforeScaleDown string = 'PT120S'
@description('The lake account and its containers: each gets a datastore <prefix><container> in the dev workspace.')
param lakeName string
param lakeContainers array
param datastorePrefix string
@description('Lake container of the model registries (registry/dev, registry/prod): its datastore exists in both workspaces.')
param registryContainer string

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: 'cr${resourceToken}'
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    adminUserEnabled: false
  }
}

module dev 'aml-workspace.bicep' = {
  name: 'aml-dev'
  params: {
    location: location
    tags: tags
    workspaceName: 'mlw-dev-${resourceToken}'
    friendlyName: 'manymodels dev'
    workspaceDescription: 'Training, evaluation and the development model registry of manymodels.'
    storageName: 'stmldev${resourceToken}'
    keyVaultName: 'kv-mld-${resourceToken}'
    applicationInsightsName: 'appi-mld-${resourceToken}'
    logAnalyticsId: logAnalyticsId
    containerRegistryId: registry.id
  }
}

module prod 'aml-workspace.bicep' = {
  name: 'aml-prod'
  params: {
    location: location
    tags: tags
    workspaceName: 'mlw-prod-${resourceToken}'
    friendlyName: 'manymodels prod'
    workspaceDescription: 'Production model registry of manymodels: only promoted models live here.'
    storageName: 'stmlprd${resourceToken}'
    keyVaultName: 'kv-mlp-${resourceToken}'
    applicationInsightsName: 'appi-mlp-${resourceToken}'
    logAnalyticsId: logAnalyticsId
    containerRegistryId: registry.id
  }
}

resource devWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: 'mlw-dev-${resourceToken}'
}

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-04-01' = {
  parent: devWorkspace
  name: computeName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${computeIdentityId}': {}
    }
  }
  properties: {
    computeType: 'AmlCompute'
    description: 'manymodels parallel jobs (training and batch scoring); scales to zero when idle.'
    properties: {
      vmSize: computeVmSize
      vmPriority: computeVmPriority
      osType: 'Linux'
      remoteLoginPortPublicAccess: 'Disabled'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: computeMaxNodes
        nodeIdleTimeBeforeScaleDown: computeIdleTimeBeforeScaleDown
      }
    }
  }
  dependsOn: [
    dev
  ]
}

// Identity-based datastores (no stored credential): a job reads and writes through them as the
// compute cluster's identity, which holds the lake roles (roles.bicep).
resource devDatastores 'Microsoft.MachineLearningServices/workspaces/datastores@2024-04-01' = [for container in lakeContainers: {
  parent: devWorkspace
  name: '${datastorePrefix}${container}'
  properties: {
    datastoreType: 'AzureBlob'
    accountName: lakeName
    containerName: container
    endpoint: environment().suffixes.storage
    protocol: 'https'
    credentials: {
      credentialsType: 'None'
    }
    description: 'manymodels lake container ${container}'
  }
  dependsOn: [
    dev
  ]
}]

resource prodWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: 'mlw-prod-${resourceToken}'
}

resource prodRegistryDatastore 'Microsoft.MachineLearningServices/workspaces/datastores@2024-04-01' = {
  parent: prodWorkspace
  name: '${datastorePrefix}${registryContainer}'
  properties: {
    datastoreType: 'AzureBlob'
    accountName: lakeName
    containerName: registryContainer
    endpoint: environment().suffixes.storage
    protocol: 'https'
    credentials: {
      credentialsType: 'None'
    }
    description: 'manymodels production model registry folder (lake container ${registryContainer})'
  }
  dependsOn: [
    prod
  ]
}

output registryId string = registry.id
output registryName string = registry.name
output devWorkspaceName string = dev.outputs.workspaceName
output devWorkspaceId string = dev.outputs.workspaceId
output devStorageName string = dev.outputs.storageName
output prodWorkspaceName string = prod.outputs.workspaceName
output prodWorkspaceId string = prod.outputs.workspaceId
output prodStorageName string = prod.outputs.storageName
output computeName string = cluster.name
