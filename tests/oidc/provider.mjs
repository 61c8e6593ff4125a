// A real OpenID provider (the certified `oidc-provider` package) for the tests of people's login.
//
// Listens on 127.0.0.1 with an OS-chosen port and prints one JSON line to stdout:
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT}
// Clients, users and token lifetimes come from a JSON file named by the first argument:
//   {"clients": [...oidc-provider client metadata, plus optional "id_token_ttl" / "refresh_token_ttl"...],
//    "users": {"alice": {"password": "...", "groups": ["dba"], "email": "...", "db_role": ["..."]}}}
// Authorization code + PKCE, the device authorization grant and refresh tokens are enabled; ID tokens
// carry `groups` (scope `groups`), `email` and `db_role` (scope `pgproxy`). Sign-in is a plain HTML form
// (#login, #password) that checks the password; consent is implied (these are first-party clients).
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { generateKeyPair, exportJWK } from 'jose';
import Provider, { errors } from 'oidc-provider';

const spec = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = spec.users;
const ttlOf = (client, name, fallback) => client?.metadata()?.[name] ?? fallback;

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, error) {
  return `<!doctype html><html><head><title>Sign in</title></head><body>
<h1>Sign in to the test provider</h1>
${error ? `<p id="error">${escape(error)}</p>` : ''}
<form id="login-form" method="post" action="/interaction/${escape(uid)}/login">
<label>User <input id="login" name="login" autocomplete="username"></label>
<label>Password <input id="password" name="password" type="password"></label>
<button type="submit">Sign in</button>
</form></body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return new URLSearchParams(body);
}

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: spec.clients,
  jwks: { keys: [signingKey] },
  extraClientMetadata: { properties: ['id_token_ttl', 'refresh_token_ttl'] },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups', 'pgproxy'],
  claims: {
    openid: ['sub'],
    profile: ['name'],
    email: ['email'],
    groups: ['groups'],
    pgproxy: ['db_role'],
  },
  conformIdTokenClaims: false, // scope claims go into the ID token too (what pgproxy reads)
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: {
    IdToken: (ctx, token, client) => ttlOf(client, 'id_token_ttl', 3600),
    AccessToken: (ctx, token, client) => ttlOf(client, 'id_token_ttl', 3600),
    RefreshToken: (ctx, token, client) => ttlOf(client, 'refresh_token_ttl', 86400),
    DeviceCode: 600,
    Interaction: 600,
    Session: 3600,
    Grant: 86400,
  },
  rotateRefreshToken: true,
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token'),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async findAccount(ctx, sub) {
    const user = users[sub];
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, name: sub, email: user.email ?? `${sub}@example.test`, groups: user.groups ?? [],
                 db_role: user.db_role ?? [] };
      },
    };
  },
  // First-party test clients: every requested scope is granted without a consent page.
  async loadExistingGrant(ctx) {
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId,
                                                accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope(ctx.oidc.requestParamScopes ? [...ctx.oidc.requestParamScopes].join(' ') : 'openid');
    await grant.save();
    return grant;
  },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!doctype html><html><body><h1 id="oidc-error">${escape(out.error)}</h1>
<p>${escape(out.error_description ?? '')}</p></body></html>`;
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const providerCallback = provider.callback();
server.on('request', async (req, res) => {
  const match = /^\/interaction\/([\w-]+)(\/login)?$/.exec(new URL(req.url, issuer).pathname);
  if (!match) {
    providerCallback(req, res);
    return;
  }
  try {
    const details = await provider.interactionDetails(req, res);
    if (details.prompt.name !== 'login') {
      // consent is implied (loadExistingGrant): finish with the grant the provider already holds
      await provider.interactionFinished(req, res, { consent: {} }, { mergeWithLastSubmission: true });
      return;
    }
    if (req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(loginPage(details.uid));
      return;
    }
    const form = await readForm(req);
    const login = form.get('login') ?? '';
    const user = users[login];
    if (!user || user.password !== form.get('password')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(loginPage(details.uid, 'wrong user or password'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: login } },
                                       { mergeWithLastSubmission: false });
  } catch (err) {
    const status = err instanceof errors.SessionNotFound ? 400 : 500;
    res.writeHead(status, { 'content-type': 'text/plain' });
    res.end(String(err.message ?? err));
  }
});

process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
