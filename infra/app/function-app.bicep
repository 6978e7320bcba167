// The Function App: Flex Consumption (FC1), Linux, Python 3.11, running as its user-assigned
// identity. Why Flex Consumption rather than Elastic Premium for long Durable fan-outs: see
// docs/deploy.md ("Hosting plan"). In short: orchestrators and activities here are short (each
// activity submits or polls one Azure ML job and returns; durable timers wait between polls, at
// no cost), Flex scales out per trigger group to hundreds of instances and back to zero, takes
// its deployment package and host storage through managed identity (Elastic Premium needs an
// Azure Files content share reached with an account key), and its function timeout can be raised
// to unbounded for the local-compute mode, where an activity trains a whole group itself.
//
// App settings: `appSettings` below is the single place where the names the code reads are set.
// tests/test_infra_drift.py checks it against shared/settings.py SETTINGS, every binding's
// connection name and local.settings.json.template. Identity-based connections use
// <Connection>__blobServiceUri / __queueServiceUri / __fullyQualifiedNamespace plus
// __credential=managedidentity and __clientId; no setting holds a key.

param location string
param tags object
param name string
param planName string
param identityId string
param identityClientId string
param applicationInsightsConnectionString string
param hostStorageName string
param deploymentContainerName string
param lakeBlobEndpoint string
param lakeQueueEndpoint string
param serviceBusFullyQualifiedNamespace string
param upstreamQueueName string
param promotionQueueName string
@description('Comma-separated file names that complete a folder dataset (MM_DATASET_MARKERS).')
param datasetMarkers string
param azureMLWorkspaceDev string
param azureMLWorkspaceProd string
param azureMLCompute string
@description('Prefix of the Azure ML datastores, one per lake container (MM_AZUREML_DATASTORE_PREFIX).')
param azureMLDatastorePrefix string
@description('Online endpoint name, unique per region: mm-<resource token> (MM_AZUREML_ENDPOINT).')
param azureMLEndpointName string
@description('User-assigned identity the online endpoint runs as: the compute identity, which reads the lake and pulls images.')
param azureMLEndpointIdentityId string
param azureMLEndpointIdentityClientId string
@allowed([
  'local'
  'azureml'
])
param computeBackend string
@allowed([
  'local'
  'azureml'
])
param registryBackend string
param sqlServer string
param sqlDatabase string
@description('Project TOML shipped with the app (MM_CONFIG_FILE); empty: the code default.')
param projectConfigFile string
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int
@description('Extra or overriding app settings (for instance a tuning knob such as MM_GROUP_SIZE).')
param appSettingsOverrides object

resource hostStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: hostStorageName
}

var odbcConnection = 'Driver={ODBC Driver 18 for SQL Server};Server=tcp:${sqlServer},1433;Database=${sqlDatabase};Encrypt=yes;TrustServerCertificate=no;Connection Timeout=60;Authentication=ActiveDirectoryMsi;UID=${identityClientId}'

var appSettings = {
  // The Functions host: identity-based host storage (Durable task hub, keys, leases).
  AzureWebJobsStorage__blobServiceUri: hostStorage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: hostStorage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: hostStorage.properties.primaryEndpoints.table
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  // The entry module: main.py registers the blueprints of the function_app/ package.
  PYTHON_SCRIPT_FILE_NAME: 'main.py'
  // The app's pinned azure-functions (the version the tests run) ahead of the worker's bundled copy.
  PYTHON_ISOLATE_WORKER_DEPENDENCIES: '1'
  // DefaultAzureCredential (Azure ML, our own SDK clients) picks the user-assigned identity.
  AZURE_CLIENT_ID: identityClientId
  // shared/settings.py SETTINGS, in its order.
  MM_WORKDIR: '' // empty: the code default, <temp dir>/manymodels, writable on every plan
  MM_CONFIG_FILE: projectConfigFile
  MM_LAKE_BACKEND: 'blob'
  LakeStorage__blobServiceUri: lakeBlobEndpoint
  LakeStorage__queueServiceUri: lakeQueueEndpoint
  LakeStorage__credential: 'managedidentity'
  LakeStorage__clientId: identityClientId
  MM_COMPUTE_BACKEND: computeBackend
  MM_REGISTRY_BACKEND: registryBackend
  MM_STORE_BACKEND: 'odbc'
  MM_SQL_DIALECT: 'mssql'
  MM_SQL_CONNECTION_SETTING: 'MM_SQL_CONNECTION'
  MM_SQL_CONNECTION: odbcConnection
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identityClientId
  MM_UPSTREAM_QUEUE: upstreamQueueName
  MM_PROMOTION_QUEUE: promotionQueueName
  MM_DATASET_MARKERS: datasetMarkers
  MM_TASK_HUB: 'manymodels' // host.json durableTask hubName; tables and queues in the host storage
  MM_AZUREML_SUBSCRIPTION_ID: subscription().subscriptionId
  MM_AZUREML_RESOURCE_GROUP: resourceGroup().name
  MM_AZUREML_WORKSPACE_DEV: azureMLWorkspaceDev
  MM_AZUREML_WORKSPACE_PROD: azureMLWorkspaceProd
  MM_AZUREML_COMPUTE: azureMLCompute
  // Tuning knobs, restating the code defaults (the drift test keeps them equal); change them
  // with the appSettingsOverrides parameter.
  MM_GROUP_SIZE: '50'
  MM_MAX_GROUPS_PER_ORCHESTRATION: '16'
  MM_MONITOR_POLL_SECONDS: '60'
  MM_JOB_TIMEOUT_SECONDS: '14400'
  MM_ACTIVITY_MAX_ATTEMPTS: '3'
  MM_ACTIVITY_RETRY_SECONDS: '30'
  // shared/azureml/client.py EXTRA_SETTINGS: how Azure ML runs the parallel jobs. Empty values
  // take the code default; numbers restate it.
  MM_AZUREML_REGISTRY: '' // empty: promotion registers into the production workspace
  MM_AZUREML_CREDENTIAL: 'managed_identity' // the user-assigned identity only (AZURE_CLIENT_ID)
  MM_AZUREML_INSTANCE_COUNT: '2'
  MM_AZUREML_INSTANCE_TYPE: ''
  MM_AZUREML_MAX_CONCURRENCY: '4'
  MM_AZUREML_MINI_BATCH_SIZE: ''
  MM_AZUREML_MAX_RETRIES: ''
  MM_AZUREML_MINI_BATCH_TIMEOUT: '1800'
  MM_AZUREML_MINI_BATCH_ERROR_THRESHOLD: '0'
  MM_AZUREML_ERROR_THRESHOLD: '-1'
  MM_AZUREML_LOGGING_LEVEL: 'INFO'
  MM_AZUREML_DATASTORE_PREFIX: azureMLDatastorePrefix
  MM_AZUREML_PROD_STORAGE_URL: '' // empty: the lake's registry container
  MM_AZUREML_PROD_DATASTORE: '' // empty: <prefix>registry, created in both workspaces
  MM_AZUREML_IMAGE: ''
  MM_AZUREML_EXPERIMENT: 'manymodels'
  MM_AZUREML_ASSET_NAME: 'manymodels'
  MM_AZUREML_ENDPOINT: azureMLEndpointName
  MM_AZUREML_ENDPOINT_IDENTITY_ID: azureMLEndpointIdentityId
  MM_AZUREML_ENDPOINT_IDENTITY_CLIENT_ID: azureMLEndpointIdentityClientId
  MM_AZUREML_SERVING_INSTANCE_TYPE: 'Standard_DS3_v2'
  MM_AZUREML_SERVING_INSTANCE_COUNT: '2'
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${hostStorage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(appSettings, appSettingsOverrides)
}

// Basic-auth publishing stays off: azd deploys to Flex Consumption with Entra ID.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

output id string = functionApp.id
output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
