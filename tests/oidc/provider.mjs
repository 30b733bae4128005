// An OpenID Connect provider nobody here wrote (npm `oidc-provider`), configured as a hospital's
// identity provider would be for Fhirmament: clients get JWT access tokens (RFC 9068) for the
// FHIR base they name as `resource`, carrying SMART scopes and, for a clinician, fhirUser.
//
//   OIDC_PROVIDER_DIR=<dir with node_modules/oidc-provider> PORT=<port> node provider.mjs
//
// Prints "ready" once it listens on 127.0.0.1:PORT.
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const dir = process.env.OIDC_PROVIDER_DIR;
const port = Number(process.env.PORT);
const { default: Provider } = await import(
  pathToFileURL(join(dir, 'node_modules', 'oidc-provider', 'lib', 'index.js')).href
);

const SCOPES = 'system/Patient.rs system/Patient.cruds user/Patient.rs patient/Patient.rs';
const client = (client_id, scope) => ({
  client_id,
  client_secret: `${client_id}-secret`,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
  scope,
});

const provider = new Provider(`http://127.0.0.1:${port}`, {
  scopes: ['openid', ...SCOPES.split(' ')],
  clients: [
    client('ehr-backend', 'system/Patient.rs system/Patient.cruds'),
    client('clinician-portal', 'user/Patient.rs'),
  ],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => ({
        scope: SCOPES,
        audience: resource,
        accessTokenTTL: 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (_ctx, token) =>
    token.clientId === 'clinician-portal' ? { fhirUser: 'Practitioner/ext-dr-1' } : undefined,
});
provider.listen(port, '127.0.0.1', () => console.log('ready'));
