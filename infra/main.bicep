// manymodels in Azure: everything the Function App's triggers, orchestrators and backends talk to,
// wired with managed identities and no keys in settings. azd layout: `azd up` provisions this at
// subscription scope (it creates the resource group), then deploys the app (service `api`).
//
// The names the code uses (lake containers, Service Bus queues, function names, file types) are
// the variables below; tests/test_infra_drift.py fails when they and the code disagree.

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name: names the resource group and seeds every resource name.')
param environmentName string

@minLength(1)
@description('Region of every resource; it must offer Flex Consumption and Azure ML.')
param location string

@description('Object id of the deploying user or CI principal (azd sets AZURE_PRINCIPAL_ID): the SQL Entra administrator, and data roles to try the system.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('SQL Entra administrator: object id of a user or group (empty: the deploying user when principalType is User, else the Function App identity).')
param sqlAdminObjectId string = ''

@allowed([
  'User'
  'Group'
])
param sqlAdminType string = 'User'

@description('Display name recorded for the SQL Entra administrator.')
param sqlAdminLogin string = 'manymodels-sql-admin'

@description('SQL store: Azure SQL serverless (default), plus a Synapse serverless workspace on the lake, or a Synapse dedicated pool instead.')
@allowed([
  'azuresql'
  'synapse-serverless'
  'synapse-dedicated'
])
param sqlBackend string = 'azuresql'

@description('Admit Azure services through the SQL firewall (rule 0.0.0.0): the Function App needs it without VNet integration.')
param sqlAllowAzureServices bool = true

@description('One client IPv4 address admitted by the SQL firewall (your workstation), or empty.')
param sqlClientIpAddress string = ''

@description('Where groups are trained and scored (MM_COMPUTE_BACKEND).')
@allowed([
  'azureml'
  'local'
])
param computeBackend string = 'azureml'

@description('Where models are registered (MM_REGISTRY_BACKEND).')
@allowed([
  'azureml'
  'local'
])
param registryBackend string = 'azureml'

@description('Azure ML compute cluster name (MM_AZUREML_COMPUTE).')
param computeName string = 'cpu-cluster'

@description('VM size of the compute cluster nodes (the reference used 16 vCPU nodes).')
param computeVmSize string = 'Standard_D4s_v3'

@minValue(1)
@description('Most nodes the cluster scales out to; it always scales back to zero.')
param computeMaxNodes int = 4

@allowed([
  'Dedicated'
  'LowPriority'
])
param computeVmPriority string = 'Dedicated'

@allowed([
  512
  2048
  4096
])
@description('Memory of one Flex Consumption instance (4096 for the local-compute mode).')
param functionInstanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param functionMaximumInstanceCount int = 100

@description('Project TOML shipped with the app (MM_CONFIG_FILE); empty: the code default.')
param projectConfigFile string = ''

@description('App settings to add or override, e.g. {"MM_GROUP_SIZE": "100"}.')
param appSettingsOverrides object = {}

@description('File names whose arrival completes a folder dataset in raw/ (MM_DATASET_MARKERS): Spark and Hadoop write _SUCCESS; add the manifest your Data Factory or other pipeline writes last. Each becomes an Event Grid subject suffix.')
@minLength(1)
@maxLength(20)
param datasetMarkers array = [
  '_SUCCESS'
]

@description('Create the Event Grid subscriptions. Their endpoints exist only once the code is deployed, so azd sets this after the first deploy (azure.yaml postdeploy hook).')
param createEventSubscriptions bool = false


// -- names shared with the code ---------------------------------------------------------------
// shared/lake.py CONTAINERS, and the container of the model registries' folders
// (shared/azureml/registry.py DEV_PREFIX 'registry/dev', PROD_PREFIX 'registry/prod')
var registryContainer = 'registry'
var lakeContainers = [
  'raw'
  'prepared'
  'runs'
  'scoring'
  'predictions'
  registryContainer
]
// shared/azureml/client.py: the datastore of lake container C is <prefix>C
var azureMLDatastorePrefix = 'lake_'
// function_app/messages.py RAW_CONTAINER and DATA_SUFFIXES
var rawContainer = 'raw'
var dataFileSuffixes = [
  '.csv'
  '.parquet'
]
// and the markers that complete a folder dataset (Spark / Hadoop _SUCCESS, or a named manifest: its
// part files are ignored; the marker starts one run): the Event Grid filter's subject suffixes
var markerSuffixes = [for marker in datasetMarkers: '/${marker}']
var eventFileSuffixes = concat(dataFileSuffixes, markerSuffixes)
// shared/settings.py defaults of MM_UPSTREAM_QUEUE and MM_PROMOTION_QUEUE
var upstreamQueueName = 'mm-upstream'
var promotionQueueName = 'mm-promotions'
// function_app/ingestion.py: the Event Grid trigger (the app has no blob trigger)
var eventGridFunctionName = 'on_lake_event'
var hasBlobTrigger = false
// The Azure ML jobs write only to these containers: the parallel jobs under runs/<run_id>/ (models,
// results, predictions); the ingestion command job the dataset under prepared/<dataset_id>/ (and
// prepared/LATEST) and its result under runs/<ingest_id>/ (shared/azureml/ingest_job.py).
var computeWriteContainers = [
  'prepared'
  'runs'
]

// lockDuration: the upstream handler only validates and starts an orchestration (seconds); the
// promotion handler copies a run's models, so it takes the 5-minute maximum (the host renews it).
// maxDeliveryCount: a message whose handler raised this many times is dead-lettered.
var serviceBusQueues = [
  {
    name: upstreamQueueName
    maxDeliveryCount: 5
    lockDuration: 'PT1M'
    defaultMessageTimeToLive: 'P14D'
  }
  {
    name: promotionQueueName
    maxDeliveryCount: 5
    lockDuration: 'PT5M'
    defaultMessageTimeToLive: 'P14D'
  }
]

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  project: 'manymodels'
}
var sqlDatabaseName = 'manymodels'
// The SQL administrator: an explicit user or group, else the deploying user, else (CI with a
// service principal) the Function App identity, whose SQL id is its client id.
var sqlAdminIsDeployer = empty(sqlAdminObjectId) && principalType == 'User' && !empty(principalId)
var functionAppName = 'func-${resourceToken}'
// Online endpoint names are unique per Azure region: built from the resource token, never fixed.
var azureMLEndpointName = 'mm-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    location: location
    tags: tags
    functionIdentityName: 'id-func-${resourceToken}'
    computeIdentityName: 'id-aml-${resourceToken}'
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    location: location
    tags: tags
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
  }
}

module hostStorage 'app/host-storage.bicep' = {
  name: 'host-storage'
  scope: rg
  params: {
    location: location
    tags: tags
    name: 'st${resourceToken}'
    deploymentContainerName: 'app-package-${functionAppName}'
    deadLetterContainerName: 'eventgrid-deadletter'
  }
}

module lake 'app/storage-lake.bicep' = {
  name: 'storage-lake'
  scope: rg
  params: {
    location: location
    tags: tags
    name: 'stlake${resourceToken}'
    containerNames: lakeContainers
  }
}

module serviceBus 'app/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  params: {
    location: location
    tags: tags
    name: 'sb-${resourceToken}'
    queues: serviceBusQueues
  }
}

module aml 'app/aml.bicep' = {
  name: 'aml'
  scope: rg
  params: {
    location: location
    tags: tags
    resourceToken: resourceToken
    logAnalyticsId: monitoring.outputs.logAnalyticsId
    computeIdentityId: identity.outputs.computeIdentityId
    computeName: computeName
    computeVmSize: computeVmSize
    computeMaxNodes: computeMaxNodes
    computeVmPriority: computeVmPriority
    lakeName: lake.outputs.name
    lakeContainers: lakeContainers
    datastorePrefix: azureMLDatastorePrefix
    registryContainer: registryContainer
  }
}

module sql 'app/sql.bicep' = {
  name: 'sql'
  scope: rg
  params: {
    location: location
    tags: tags
    resourceToken: resourceToken
    sqlBackend: sqlBackend
    databaseName: sqlDatabaseName
    administratorObjectId: !empty(sqlAdminObjectId) ? sqlAdminObjectId : (sqlAdminIsDeployer ? principalId : identity.outputs.functionIdentityClientId)
    administratorLogin: !empty(sqlAdminObjectId) || sqlAdminIsDeployer ? sqlAdminLogin : identity.outputs.functionIdentityName
    administratorType: !empty(sqlAdminObjectId) ? sqlAdminType : (sqlAdminIsDeployer ? 'User' : 'Application')
    allowAzureServices: sqlAllowAzureServices
    clientIpAddress: sqlClientIpAddress
    lakeName: lake.outputs.name
    lakeDfsEndpoint: lake.outputs.dfsEndpoint
  }
}

module functionApp 'app/function-app.bicep' = {
  name: 'function-app'
  scope: rg
  params: {
    location: location
    tags: tags
    name: functionAppName
    planName: 'plan-${resourceToken}'
    identityId: identity.outputs.functionIdentityId
    identityClientId: identity.outputs.functionIdentityClientId
    azureMLEndpointName: azureMLEndpointName
    azureMLEndpointIdentityId: identity.outputs.computeIdentityId
    azureMLEndpointIdentityClientId: identity.outputs.computeIdentityClientId
    applicationInsightsConnectionString: monitoring.outputs.applicationInsightsConnectionString
    hostStorageName: hostStorage.outputs.name
    deploymentContainerName: hostStorage.outputs.deploymentContainerName
    lakeBlobEndpoint: lake.outputs.blobEndpoint
    lakeQueueEndpoint: lake.outputs.queueEndpoint
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    upstreamQueueName: upstreamQueueName
    promotionQueueName: promotionQueueName
    datasetMarkers: join(datasetMarkers, ',')
    azureMLWorkspaceDev: aml.outputs.devWorkspaceName
    azureMLWorkspaceProd: aml.outputs.prodWorkspaceName
    azureMLCompute: aml.outputs.computeName
    azureMLDatastorePrefix: azureMLDatastorePrefix
    computeBackend: computeBackend
    registryBackend: registryBackend
    sqlServer: sql.outputs.storeServer
    sqlDatabase: sql.outputs.storeDatabase
    projectConfigFile: projectConfigFile
    instanceMemoryMB: functionInstanceMemoryMB
    maximumInstanceCount: functionMaximumInstanceCount
    appSettingsOverrides: appSettingsOverrides
  }
}

module roles 'app/roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    functionPrincipalId: identity.outputs.functionIdentityPrincipalId
    computePrincipalId: identity.outputs.computeIdentityPrincipalId
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
    hostStorageName: hostStorage.outputs.name
    lakeName: lake.outputs.name
    computeWriteContainers: computeWriteContainers
    serviceBusName: serviceBus.outputs.name
    receiveQueues: [
      upstreamQueueName
      promotionQueueName
    ]
    sendQueues: [
      promotionQueueName
      upstreamQueueName // a message that must wait is scheduled again on its own queue (function_app/waiting.py)
    ]
    deployerSendQueue: upstreamQueueName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    devWorkspaceName: aml.outputs.devWorkspaceName
    prodWorkspaceName: aml.outputs.prodWorkspaceName
    devWorkspaceStorageName: aml.outputs.devStorageName
    prodWorkspaceStorageName: aml.outputs.prodStorageName
    containerRegistryName: aml.outputs.registryName
    hasBlobTrigger: hasBlobTrigger
    synapsePrincipalId: sql.outputs.synapsePrincipalId
  }
}

module eventGrid 'app/eventgrid.bicep' = {
  name: 'eventgrid'
  scope: rg
  params: {
    location: location
    tags: tags
    systemTopicName: 'evgt-${resourceToken}'
    lakeId: lake.outputs.id
    functionAppId: functionApp.outputs.id
    eventGridFunctionName: eventGridFunctionName
    createSubscriptions: createEventSubscriptions
    rawContainerName: rawContainer
    fileSuffixes: eventFileSuffixes
    deadLetterStorageId: hostStorage.outputs.id
    deadLetterStorageName: hostStorage.outputs.name
    deadLetterContainerName: hostStorage.outputs.deadLetterContainerName
  }
  dependsOn: [
    roles
  ]
}

// -- outputs: azd stores them in the environment (.azure/<env>/.env) ---------------------------
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = 'https://${functionApp.outputs.defaultHostName}'
output AZURE_FUNCTION_IDENTITY_NAME string = identity.outputs.functionIdentityName
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.outputs.functionIdentityClientId
output AZURE_COMPUTE_IDENTITY_CLIENT_ID string = identity.outputs.computeIdentityClientId
output LAKE_ACCOUNT_NAME string = lake.outputs.name
output LAKE_BLOB_ENDPOINT string = lake.outputs.blobEndpoint
output SERVICEBUS_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output EVENTGRID_SYSTEM_TOPIC string = eventGrid.outputs.systemTopicName
output MM_AZUREML_SUBSCRIPTION_ID string = subscription().subscriptionId
output MM_AZUREML_RESOURCE_GROUP string = rg.name
output MM_AZUREML_WORKSPACE_DEV string = aml.outputs.devWorkspaceName
output MM_AZUREML_WORKSPACE_PROD string = aml.outputs.prodWorkspaceName
output MM_AZUREML_COMPUTE string = aml.outputs.computeName
output MM_AZUREML_ENDPOINT string = azureMLEndpointName
output MM_AZUREML_ENDPOINT_IDENTITY_ID string = identity.outputs.computeIdentityId
output MM_AZUREML_ENDPOINT_IDENTITY_CLIENT_ID string = identity.outputs.computeIdentityClientId
output MM_UPSTREAM_QUEUE string = upstreamQueueName
output MM_PROMOTION_QUEUE string = promotionQueueName
output SQL_SERVER string = sql.outputs.storeServer
output SQL_DATABASE string = sql.outputs.storeDatabase
output SYNAPSE_SERVERLESS_ENDPOINT string = sql.outputs.synapseServerlessEndpoint
