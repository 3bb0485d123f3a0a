// A real OpenID provider for Portcullis tests: npm's oidc-provider, with RFC 8693 token exchange
// registered through its documented registerGrantType extension, plus a /test/* control API
// (mint tokens, rotate keys, change the exchange's behaviour, read counters).
//
// Environment: PORT, STATE_DIR (keys persist here across restarts), CLIENT_SECRET.
import { createServer } from 'node:http';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

import Provider, { errors } from 'oidc-provider';
import { createLocalJWKSet, jwtVerify } from 'jose';

const PORT = Number(process.env.PORT);
const STATE_DIR = process.env.STATE_DIR;
const ISSUER = `http://127.0.0.1:${PORT}`;
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const KEYS_FILE = path.join(STATE_DIR, 'keys.json');
const CLIENT_KEY_FILE = path.join(STATE_DIR, 'client-key.pem');

const stats = { exchanges: 0, jwks: 0, discovery: 0 };
const behaviour = { ttl: 120, aud: null, iss: null, refuse: null };

function newKid() {
  return crypto.randomBytes(8).toString('hex');
}

// A fresh signing pair: RSA for RS256, EC P-256 for ES256.
function newKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  return [
    { ...rsa.export({ format: 'jwk' }), kid: newKid(), alg: 'RS256', use: 'sig' },
    { ...ec.export({ format: 'jwk' }), kid: newKid(), alg: 'ES256', use: 'sig' },
  ];
}

function loadKeys() {
  if (fs.existsSync(KEYS_FILE)) return JSON.parse(fs.readFileSync(KEYS_FILE, 'utf8'));
  const keys = newKeys();
  fs.writeFileSync(KEYS_FILE, JSON.stringify(keys), { mode: 0o600 });
  return keys;
}

// The gateway's private_key_jwt key: made here, its PEM left for the test to configure.
function clientPublicJwk() {
  if (!fs.existsSync(CLIENT_KEY_FILE)) {
    const pair = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
    fs.writeFileSync(CLIENT_KEY_FILE, pair.privateKey.export({ type: 'pkcs8', format: 'pem' }), {
      mode: 0o600,
    });
  }
  const priv = crypto.createPrivateKey(fs.readFileSync(CLIENT_KEY_FILE));
  return { ...crypto.createPublicKey(priv).export({ format: 'jwk' }), alg: 'ES256', use: 'sig' };
}

let keys = loadKeys();
const publicOf = (jwk) => {
  const { d, p, q, dp, dq, qi, ...pub } = jwk;
  return pub;
};

function b64(data) {
  return Buffer.from(typeof data === 'string' ? data : JSON.stringify(data)).toString('base64url');
}

// Signs compact JWS by hand so tests can ask for headers a JOSE library would refuse to make.
function sign(alg, header, claims) {
  const pick = (a) => keys.find((k) => k.alg === a);
  let key;
  let h;
  if (alg === 'HS256-public-key') {
    // The classic confusion attack: HMAC keyed with the RSA public key's PEM.
    key = pick('RS256');
    h = { alg: 'HS256', kid: key.kid, typ: 'JWT', ...header };
  } else if (alg === 'none') {
    h = { alg: 'none', typ: 'JWT', ...header };
  } else {
    key = pick(alg);
    h = { alg, kid: key.kid, typ: 'JWT', ...header };
  }
  const input = `${b64(h)}.${b64(claims)}`;
  let sig = '';
  if (alg === 'HS256-public-key') {
    const pem = crypto.createPublicKey({ key: publicOf(key), format: 'jwk' }).export({
      type: 'spki',
      format: 'pem',
    });
    sig = crypto.createHmac('sha256', pem).update(input).digest('base64url');
  } else if (alg !== 'none') {
    const priv = crypto.createPrivateKey({ key, format: 'jwk' });
    const opts = alg === 'ES256' ? { key: priv, dsaEncoding: 'ieee-p1363' } : priv;
    sig = crypto.sign('sha256', Buffer.from(input), opts).toString('base64url');
  }
  return `${input}.${sig}`;
}

// Claims with defaults; a null value in `overrides` removes the claim.
function claimsWith(defaults, overrides = {}) {
  const c = { ...defaults, ...overrides };
  for (const [k, v] of Object.entries(c)) if (v === null) delete c[k];
  return c;
}

// oidc-provider keeps an error's detail out of the response (error_description is fixed per
// class); a real IdP says why it refused, and the tests check that the gateway passes that on.
function invalidGrant(description) {
  const e = new errors.InvalidGrant(description);
  e.error_description = description;
  return e;
}

async function verifyOwn(token, what) {
  try {
    const set = createLocalJWKSet({ keys: keys.map(publicOf) });
    const { payload } = await jwtVerify(token, set, { issuer: ISSUER, algorithms: ['RS256', 'ES256'] });
    if (!payload.sub) throw new Error('no sub');
    return payload;
  } catch (e) {
    throw invalidGrant(`${what} is invalid (${e.code || e.message})`);
  }
}

// The IdP side of RFC 8693: check the subject (and actor) token, issue a short-lived access
// token for the requested audience, record delegation in `act`.
async function tokenExchange(ctx) {
  const p = ctx.oidc.params;
  if (behaviour.refuse) throw invalidGrant(behaviour.refuse);
  if (p.requested_token_type && p.requested_token_type !== ACCESS_TOKEN) {
    throw new errors.InvalidRequest('requested_token_type must be an access token');
  }
  if (!p.subject_token || !p.subject_token_type) {
    throw new errors.InvalidRequest('subject_token and subject_token_type are required');
  }
  const audience = p.audience || p.resource;
  if (!audience) throw new errors.InvalidTarget('audience is required');
  const subject = await verifyOwn(p.subject_token, 'subject_token');
  const actor = p.actor_token ? await verifyOwn(p.actor_token, 'actor_token') : null;
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    iss: behaviour.iss || ISSUER,
    sub: subject.sub,
    aud: behaviour.aud || audience,
    iat: now,
    exp: now + behaviour.ttl,
    jti: crypto.randomUUID(),
    client_id: ctx.oidc.client.clientId,
  };
  if (subject.groups) claims.groups = subject.groups;
  const act = actor ? { sub: actor.sub, ...(subject.act ? { act: subject.act } : {}) } : subject.act;
  if (act) claims.act = act;
  stats.exchanges += 1;
  ctx.body = {
    access_token: sign('RS256', {}, claims),
    issued_token_type: ACCESS_TOKEN,
    token_type: 'N_A',
    expires_in: behaviour.ttl,
  };
}

function makeProvider() {
  const grant = { grant_types: [TOKEN_EXCHANGE], response_types: [], redirect_uris: [] };
  const provider = new Provider(ISSUER, {
    clients: [
      {
        client_id: 'portcullis',
        client_secret: process.env.CLIENT_SECRET,
        token_endpoint_auth_method: 'client_secret_basic',
        ...grant,
      },
      {
        client_id: 'portcullis-jwt',
        token_endpoint_auth_method: 'private_key_jwt',
        token_endpoint_auth_signing_alg: 'ES256',
        jwks: { keys: [clientPublicJwk()] },
        ...grant,
      },
    ],
    jwks: { keys },
    clientAuthMethods: ['client_secret_basic', 'private_key_jwt'],
    features: { devInteractions: { enabled: false } },
    cookies: { keys: [crypto.randomBytes(16).toString('hex')] },
  });
  provider.registerGrantType(
    TOKEN_EXCHANGE,
    tokenExchange,
    ['audience', 'resource', 'scope', 'requested_token_type', 'subject_token',
      'subject_token_type', 'actor_token', 'actor_token_type'],
    ['audience', 'resource'],
  );
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return provider;
}

let provider = makeProvider();
let handler = provider.callback();

function readJson(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      try { resolve(body ? JSON.parse(body) : {}); } catch (e) { reject(e); }
    });
  });
}

async function control(req, res) {
  const send = (code, obj) => {
    const text = JSON.stringify(obj);
    res.writeHead(code, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
    });
    res.end(text);
  };
  const body = await readJson(req);
  const now = Math.floor(Date.now() / 1000);
  switch (req.url) {
    case '/test/mint': {
      // A token as the IdP would issue it to a user or an agent (iss, iat, exp, jti filled in).
      const claims = claimsWith(
        { iss: ISSUER, iat: now, exp: now + (body.ttl ?? 300), jti: crypto.randomUUID() },
        body.claims,
      );
      return send(200, { token: sign(body.alg || 'RS256', body.header || {}, claims) });
    }
    case '/test/rotate': {
      keys = body.keep_old ? [...newKeys(), ...keys] : newKeys();
      fs.writeFileSync(KEYS_FILE, JSON.stringify(keys), { mode: 0o600 });
      provider = makeProvider();
      handler = provider.callback();
      return send(200, { kids: keys.map((k) => k.kid) });
    }
    case '/test/behaviour':
      Object.assign(behaviour, body);
      return send(200, behaviour);
    case '/test/stats':
      return send(200, stats);
    default:
      return send(404, { error: 'no such control' });
  }
}

const server = createServer((req, res) => {
  if (req.url.startsWith('/test/')) {
    control(req, res).catch((e) => {
      res.writeHead(500);
      res.end(String(e));
    });
    return;
  }
  if (req.url.startsWith('/jwks')) stats.jwks += 1;
  if (req.url.startsWith('/.well-known/openid-configuration')) stats.discovery += 1;
  handler(req, res);
});
server.listen(PORT, '127.0.0.1', () => console.log(`listening ${ISSUER}`));
