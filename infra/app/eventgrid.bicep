// Event Grid: a system topic on the lake account and the subscriptions that turn new raw files
// into ingestion runs.
//
// * Event Grid trigger (the only path): endpoint type AzureFunction, addressed by the function's
//   resource id. No key in the template, and Event Grid validates the endpoint through ARM.
//   There is no blob-trigger subscription: the app has no blob trigger (a func.InputStream trigger
//   ships the whole blob to the worker), and its WebHook would need the host's blobs_extension
//   system key, which exists only after the host has run once.
// The endpoint exists only after the code is deployed (ARM validates it), so the subscription is
// created on the second provisioning (createSubscriptions; see azure.yaml's postdeploy hook).
//
// Filters: BlobCreated and BlobRenamed, subject in the raw container, file types by suffix (advanced
// filter on subject: one subjectEndsWith per subscription would allow only one suffix), and only the
// API calls that complete a file (an ADLS Gen2 CreateFile fires BlobCreated for an empty file first;
// the FlushWithClose that completes it, a Blob API upload, a copy, an SFTP commit and a file renamed
// into raw/ by Spark or Data Factory (RenameFile; its subject is the new name) are kept).
// function_app/messages.py BLOB_CREATED, BLOB_RENAMED and COMPLETED_APIS hold the same lists.
// Delivery: retried with exponential back-off up to maxDeliveryAttempts within the TTL, then
// dead-lettered as a blob into the host storage account, written with the topic's own identity.

param location string
param tags object
param systemTopicName string
param lakeId string
param functionAppId string
@description('Event Grid-triggered function that ingests a new raw file.')
param eventGridFunctionName string
@description('Create the event subscriptions (needs the code deployed; see azure.yaml).')
param createSubscriptions bool
param rawContainerName string
param fileSuffixes array
param deadLetterStorageId string
param deadLetterStorageName string
param deadLetterContainerName string
param maxDeliveryAttempts int = 10
param eventTimeToLiveInMinutes int = 1440

var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

var eventFilter = {
  includedEventTypes: [
    'Microsoft.Storage.BlobCreated'
    'Microsoft.Storage.BlobRenamed'
  ]
  subjectBeginsWith: '/blobServices/default/containers/${rawContainerName}/'
  enableAdvancedFilteringOnArrays: true
  advancedFilters: [
    {
      operatorType: 'StringEndsWith'
      key: 'subject'
      values: fileSuffixes
    }
    {
      operatorType: 'StringIn'
      key: 'data.api'
      values: [
        'PutBlob'
        'PutBlockList'
        'FlushWithClose'
        'CopyBlob'
        'SftpCommit'
        'RenameFile'
      ]
    }
  ]
}

var retryPolicy = {
  maxDeliveryAttempts: maxDeliveryAttempts
  eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
}

var deadLetter = {
  identity: {
    type: 'SystemAssigned'
  }
  deadLetterDestination: {
    endpointType: 'StorageBlob'
    properties: {
      resourceId: deadLetterStorageId
      blobContainerName: deadLetterContainerName
    }
  }
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: lakeId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource deadLetterStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: deadLetterStorageName
}

resource deadLetterBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: deadLetterStorage
  name: 'default'
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: deadLetterBlobService
  name: deadLetterContainerName
}

// The topic writes dead letters with its own identity, scoped to the one container.
resource deadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetterContainer.id, systemTopic.id, storageBlobDataContributor)
  scope: deadLetterContainer
  properties: {
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
  }
}

resource toEventGridTrigger 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = if (createSubscriptions) {
  parent: systemTopic
  name: 'raw-to-${replace(toLower(eventGridFunctionName), '_', '-')}'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionAppId}/functions/${eventGridFunctionName}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: eventFilter
    retryPolicy: retryPolicy
    deadLetterWithResourceIdentity: deadLetter
  }
  dependsOn: [
    deadLetterWriter
  ]
}

output systemTopicName string = systemTopic.name
output systemTopicPrincipalId string = systemTopic.identity.principalId
