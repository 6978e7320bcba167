// Service Bus namespace and the queues the code uses. Standard tier (topics, duplicate detection,
// sessions available; Basic has no topics). Local (SAS key) auth is disabled: senders and the
// Function App authenticate with Entra ID (Azure Service Bus Data Sender / Receiver roles).
//
// Each queue: lockDuration is how long a receiver owns a message before it is redelivered (the
// Functions host renews the lock while the function runs, up to maxAutoLockRenewalDuration in
// host.json); after maxDeliveryCount failed deliveries (the function raised) the message moves to
// the queue's dead-letter sub-queue, and expired messages are dead-lettered too, never dropped.

param location string
param tags object
param name string
@description('Queues: objects with name, maxDeliveryCount, lockDuration (ISO 8601, at most PT5M), defaultMessageTimeToLive.')
param queues array

// 2024-01-01: minimumTlsVersion and publicNetworkAccess are in this schema (not in 2021-11-01,
// where ARM dropped them silently).
resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource serviceBusQueues 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = [for queue in queues: {
  parent: namespace
  name: queue.name
  properties: {
    maxDeliveryCount: queue.maxDeliveryCount
    lockDuration: queue.lockDuration
    defaultMessageTimeToLive: queue.defaultMessageTimeToLive
    deadLetteringOnMessageExpiration: true
    requiresDuplicateDetection: false
    requiresSession: false
    enablePartitioning: false
    maxSizeInMegabytes: 1024
  }
}]

output id string = namespace.id
output name string = namespace.name
// <name>.servicebus.windows.net: the value of ServiceBusConnection__fullyQualifiedNamespace.
output fullyQualifiedNamespace string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
output queueNames array = [for (queue, i) in queues: serviceBusQueues[i].name]
