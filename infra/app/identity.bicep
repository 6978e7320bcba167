// User-assigned managed identities: one for the Function App, one for the Azure ML compute cluster.
// User-assigned (not system-assigned) so role assignments can be made before the app exists and
// survive a re-created app, and so the app settings can name the client id explicitly.

param location string
param tags object
param functionIdentityName string
param computeIdentityName string

resource functionIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: functionIdentityName
  location: location
  tags: tags
}

resource computeIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: computeIdentityName
  location: location
  tags: tags
}

output functionIdentityId string = functionIdentity.id
output functionIdentityName string = functionIdentity.name
output functionIdentityClientId string = functionIdentity.properties.clientId
output functionIdentityPrincipalId string = functionIdentity.properties.principalId
output computeIdentityId string = computeIdentity.id
output computeIdentityName string = computeIdentity.name
output computeIdentityClientId string = computeIdentity.properties.clientId
output computeIdentityPrincipalId string = computeIdentity.properties.principalId
