// The data lake: an ADLS Gen2 account (hierarchical namespace) with one container per lake area
// the code uses (shared/lake.py CONTAINERS). The code talks to it through the Blob API, which
// works on hierarchical-namespace accounts; Azure ML and Synapse may use the DFS endpoint.
// Shared-key access is off: the Function App, the Azure ML compute and Event Grid use identities.

param location string
param tags object
param name string
@description('Containers (file systems) to create; must include every container the code uses.')
param containerNames array
@description('Days a deleted blob or container can be restored.')
param softDeleteDays int = 7

resource lake 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    isHnsEnabled: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: lake
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for containerName in containerNames: {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}]

output id string = lake.id
output name string = lake.name
output blobEndpoint string = lake.properties.primaryEndpoints.blob
output queueEndpoint string = lake.properties.primaryEndpoints.queue
output dfsEndpoint string = lake.properties.primaryEndpoints.dfs
