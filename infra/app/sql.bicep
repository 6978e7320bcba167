// The SQL store that serves predictions, metrics and promotion outcomes.
//
// sqlBackend:
//   'azuresql'           (default) Azure SQL Database, serverless General Purpose: auto-pauses when
//                        idle, so an idle deployment pays storage only.
//   'synapse-serverless' Azure SQL as above for the app's writes (upserts need a writable database,
//                        which a serverless pool is not), plus a Synapse workspace on the lake whose
//                        built-in serverless SQL pool queries the predictions Parquet in place.
//   'synapse-dedicated'  A Synapse workspace with a dedicated SQL pool as the store (no Azure SQL).
//                        Billed per hour while running; pause it when idle.
//
// Authentication is Entra ID only (no SQL logins, no passwords). The administrator is the
// deploying principal; the Function App identity gets a contained database user through the
// T-SQL in docs/deploy.md (ARM cannot create database users).
//
// Network: public endpoint with the firewall rule that admits Azure services (0.0.0.0), which the
// Function App's outbound traffic needs on Flex Consumption without VNet integration, plus an
// optional client IP. docs/deploy.md explains the private-endpoint alternative.

param location string
param tags object
param resourceToken string
@allowed([
  'azuresql'
  'synapse-serverless'
  'synapse-dedicated'
])
param sqlBackend string
param databaseName string
@description('Entra administrator: object id of a user or group, client id of an application or managed identity.')
param administratorObjectId string
@description('Display name of the Entra administrator.')
param administratorLogin string
@allowed([
  'User'
  'Group'
  'Application'
])
param administratorType string
@description('Admit traffic from Azure services (firewall rule 0.0.0.0).')
param allowAzureServices bool
@description('One client IPv4 address to admit (your workstation), or empty.')
param clientIpAddress string
@description('Lake account (ADLS Gen2) used as the Synapse workspace default file system.')
param lakeName string
param lakeDfsEndpoint string
@description('Dedicated SQL pool size when sqlBackend is synapse-dedicated.')
param dedicatedPoolSku string = 'DW100c'
@description('Serverless vCore bounds and auto-pause delay (minutes) of the Azure SQL database.')
param minCapacity string = '0.5'
param maxVCores int = 2
param autoPauseDelayMinutes int = 60

var useAzureSql = sqlBackend != 'synapse-dedicated'
var useSynapse = sqlBackend != 'azuresql'

resource server 'Microsoft.Sql/servers@2021-11-01' = if (useAzureSql) {
  name: 'sql-${resourceToken}'
  location: location
  tags: tags
  properties: {
    version: '12.0'
    minimalTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
    administrators: {
      administratorType: 'ActiveDirectory'
      azureADOnlyAuthentication: true
      login: administratorLogin
      sid: administratorObjectId
      principalType: administratorType
      tenantId: subscription().tenantId
    }
  }
}

resource database 'Microsoft.Sql/servers/databases@2021-11-01' = if (useAzureSql) {
  parent: server
  name: databaseName
  location: location
  tags: tags
  sku: {
    name: 'GP_S_Gen5'
    tier: 'GeneralPurpose'
    family: 'Gen5'
    capacity: maxVCores
  }
  properties: {
    autoPauseDelay: autoPauseDelayMinutes
    minCapacity: json(minCapacity)
    maxSizeBytes: 34359738368
    zoneRedundant: false
    requestedBackupStorageRedundancy: 'Local'
  }
}

resource allowAzure 'Microsoft.Sql/servers/firewallRules@2021-11-01' = if (useAzureSql && allowAzureServices) {
  parent: server
  name: 'AllowAllWindowsAzureIps'
  properties: {
    startIpAddress: '0.0.0.0'
    endIpAddress: '0.0.0.0'
  }
}

resource allowClient 'Microsoft.Sql/servers/firewallRules@2021-11-01' = if (useAzureSql && !empty(clientIpAddress)) {
  parent: server
  name: 'AllowClientIp'
  properties: {
    startIpAddress: clientIpAddress
    endIpAddress: clientIpAddress
  }
}

resource lake 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: lakeName
}

resource lakeBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: lake
  name: 'default'
}

resource synapseFileSystem 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = if (useSynapse) {
  parent: lakeBlobService
  name: 'synapse'
  properties: {
    publicAccess: 'None'
  }
}

resource synapse 'Microsoft.Synapse/workspaces@2021-06-01' = if (useSynapse) {
  name: 'synw-${resourceToken}'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    azureADOnlyAuthentication: true
    defaultDataLakeStorage: {
      accountUrl: lakeDfsEndpoint
      filesystem: 'synapse'
      resourceId: lake.id
      createManagedPrivateEndpoint: false
    }
    publicNetworkAccess: 'Enabled'
    managedResourceGroupName: 'rg-synw-${resourceToken}-managed'
  }
  dependsOn: [
    synapseFileSystem
  ]
}

resource synapseAdmin 'Microsoft.Synapse/workspaces/administrators@2021-06-01' = if (useSynapse) {
  parent: synapse
  name: 'activeDirectory'
  properties: {
    administratorType: 'ActiveDirectory'
    login: administratorLogin
    sid: administratorObjectId
    tenantId: subscription().tenantId
  }
}

resource synapseAllowAzure 'Microsoft.Synapse/workspaces/firewallRules@2021-06-01' = if (useSynapse && allowAzureServices) {
  parent: synapse
  name: 'AllowAllWindowsAzureIps'
  properties: {
    startIpAddress: '0.0.0.0'
    endIpAddress: '0.0.0.0'
  }
}

resource synapseAllowClient 'Microsoft.Synapse/workspaces/firewallRules@2021-06-01' = if (useSynapse && !empty(clientIpAddress)) {
  parent: synapse
  name: 'AllowClientIp'
  properties: {
    startIpAddress: clientIpAddress
    endIpAddress: clientIpAddress
  }
}

resource dedicatedPool 'Microsoft.Synapse/workspaces/sqlPools@2021-06-01' = if (sqlBackend == 'synapse-dedicated') {
  parent: synapse
  name: replace(databaseName, '-', '_')
  location: location
  tags: tags
  sku: {
    name: dedicatedPoolSku
  }
  properties: {
    createMode: 'Default'
    collation: 'SQL_Latin1_General_CP1_CI_AS'
  }
}

// Where the app's ODBC store writes: Azure SQL unless the backend is a dedicated pool.
var storeServer = useAzureSql ? '${server.name}${environment().suffixes.sqlServerHostname}' : '${synapse.name}.sql.azuresynapse.net'
var storeDatabase = useAzureSql ? databaseName : replace(databaseName, '-', '_')

output storeServer string = storeServer
output storeDatabase string = storeDatabase
output sqlServerName string = useAzureSql ? server.name : ''
output synapseWorkspaceName string = useSynapse ? synapse.name : ''
output synapsePrincipalId string = useSynapse ? synapse.identity.principalId : ''
output synapseServerlessEndpoint string = useSynapse ? '${synapse.name}-ondemand.sql.azuresynapse.net' : ''
