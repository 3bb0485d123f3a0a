//! The identity service of one target: its own threads talk to the IdP; callers (compio tasks)
//! get a future that a channel completes.
//!
//! A request goes: token source read (on a service thread) → identity cache → exchange or
//! validate → cache. A cache hit for a presented token is answered on the caller's thread
//! without a hop. Nothing here blocks the caller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Instant, SystemTime};

use futures_channel::oneshot;
use futures_util::FutureExt as _;

use super::config::{IdentityMode, TargetIdentity};
use super::http::{ClientCredentials, Endpoints, IdpHttp};
use super::keys::{KeyStore, Need};
use super::token::{Token, TokenSource};
use super::validate::{self, Expectations};
use super::{IdentityError, VerifiedIdentity};

type Answer = Result<Arc<VerifiedIdentity>, IdentityError>;

/// A handle on a target's identity service. Cheap to clone; the threads stop when the last
/// handle is dropped.
#[derive(Clone)]
pub struct IdentityService {
    inner: Arc<Inner>,
    jobs: mpsc::Sender<Job>,
}

struct Job {
    subject: TokenSource,
    actor: Option<TokenSource>,
    reply: oneshot::Sender<Answer>,
}

struct Inner {
    cfg: TargetIdentity,
    http: IdpHttp,
    creds: ClientCredentials,
    endpoints: Mutex<Option<Arc<Endpoints>>>,
    keys: KeyStore,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    counters: Counters,
}

/// (hash of subject token, hash of actor token, audience).
#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey([u8; 32], Option<[u8; 32]>, String);

struct Cached {
    identity: Arc<VerifiedIdentity>,
    valid_until: SystemTime,
}

#[derive(Default)]
struct Counters {
    exchanges: AtomicU64,
    validations: AtomicU64,
    cache_hits: AtomicU64,
    jwks_fetches: AtomicU64,
    failures: Mutex<HashMap<&'static str, u64>>,
}

/// Counts since start, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Exchanges that the IdP answered with a token.
    pub exchanges: u64,
    /// Tokens verified (exchanged or presented).
    pub validations: u64,
    pub cache_hits: u64,
    pub jwks_fetches: u64,
    /// Refusals by [`IdentityError::check`].
    pub failures: Vec<(&'static str, u64)>,
}

impl IdentityService {
    /// Loads the client credentials and starts the threads. The IdP is not contacted until the
    /// first request, so a gateway starts while its IdP is down (and refuses until it is up).
    pub fn start(cfg: TargetIdentity) -> Result<IdentityService, IdentityError> {
        cfg.check().map_err(IdentityError::Config)?;
        let inner = Arc::new(Inner {
            http: IdpHttp::new(&cfg)?,
            creds: ClientCredentials::load(&cfg)?,
            endpoints: Mutex::new(None),
            keys: KeyStore::new(cfg.jwks_min_refresh, cfg.jwks_max_age),
            cache: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            cfg,
        });
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..inner.cfg.threads {
            let (inner, rx) = (inner.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("idp-{n}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { break };
                        let answer = inner.resolve(&job.subject, job.actor.as_ref());
                        let _ = job.reply.send(answer);
                    }
                })
                .map_err(|e| IdentityError::Config(format!("starting IdP threads: {e}")))?;
        }
        Ok(IdentityService { inner, jobs })
    }

    /// The session's identity from its token (and, when delegating, the actor's token).
    ///
    /// Never blocks: a cached identity for a presented token is ready at once; everything else
    /// (reading a token file, HTTP to the IdP) runs on the service's threads.
    pub fn identify(
        &self,
        subject: TokenSource,
        actor: Option<TokenSource>,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let cached = match (&subject, &actor) {
            (TokenSource::Presented(s), None) => self.inner.cached(s, None),
            (TokenSource::Presented(s), Some(TokenSource::Presented(a))) => {
                self.inner.cached(s, Some(a))
            }
            _ => None,
        };
        let (reply, answer) = oneshot::channel();
        match cached {
            Some(identity) => {
                let _ = reply.send(Ok(identity));
            }
            None => {
                let job = Job {
                    subject,
                    actor,
                    reply,
                };
                // A send error drops the reply: the receiver then reports Stopped.
                let _ = self.jobs.send(job);
            }
        }
        answer.map(|r| r.unwrap_or(Err(IdentityError::Stopped)))
    }

    /// [`identify`](Self::identify) on the calling thread. For the CLI, tests and benches only:
    /// it blocks on the file system and the network.
    pub fn identify_blocking(&self, subject: &TokenSource, actor: Option<&TokenSource>) -> Answer {
        self.inner.resolve(subject, actor)
    }

    pub fn settings(&self) -> &TargetIdentity {
        &self.inner.cfg
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let mut failures: Vec<_> = c
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        failures.sort();
        Stats {
            exchanges: c.exchanges.load(Ordering::Relaxed),
            validations: c.validations.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            jwks_fetches: c.jwks_fetches.load(Ordering::Relaxed),
            failures,
        }
    }

    /// Drops every cached identity (tests and `sessions kill`).
    pub fn forget_all(&self) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Inner {
    fn key(&self, subject: &Token, actor: Option<&Token>) -> CacheKey {
        CacheKey(
            subject.sha256(),
            actor.map(Token::sha256),
            self.cfg.audience.clone(),
        )
    }

    fn cached(&self, subject: &Token, actor: Option<&Token>) -> Option<Arc<VerifiedIdentity>> {
        let key = self.key(subject, actor);
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let hit = cache
            .get(&key)
            .filter(|c| SystemTime::now() < c.valid_until)
            .map(|c| c.identity.clone());
        if hit.is_some() {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    fn resolve(&self, subject: &TokenSource, actor: Option<&TokenSource>) -> Answer {
        let answer = self.resolve_inner(subject, actor);
        match &answer {
            Ok(id) => tracing::debug!(
                subject = %id.subject, groups = ?id.groups, actors = ?id.actors,
                jti = ?id.jti, token_sha256 = %id.token_hash, "identity established"
            ),
            Err(e) => {
                *self
                    .counters
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e.check())
                    .or_default() += 1;
                tracing::warn!(check = e.check(), error = %e, "identity refused");
            }
        }
        answer
    }

    fn resolve_inner(&self, subject: &TokenSource, actor: Option<&TokenSource>) -> Answer {
        let subject = subject.load()?;
        let actor = actor.map(TokenSource::load).transpose()?;
        if let Some(hit) = self.cached(&subject, actor.as_ref()) {
            return Ok(hit);
        }
        let identity = match self.cfg.mode {
            IdentityMode::Exchange => {
                let endpoints = self.endpoints()?;
                let issued = self.http.exchange(
                    &self.cfg,
                    &endpoints,
                    &self.creds,
                    &subject,
                    actor.as_ref(),
                )?;
                self.counters.exchanges.fetch_add(1, Ordering::Relaxed);
                self.verify(&issued)?
            }
            IdentityMode::Validate => {
                let mut id = self.verify(&subject)?;
                if let Some(actor) = &actor {
                    let by = self.verify(actor)?;
                    id.actors.insert(0, by.subject);
                    id.expires_at = id.expires_at.min(by.expires_at);
                }
                id
            }
        };
        let identity = Arc::new(identity);
        self.remember(self.key(&subject, actor.as_ref()), identity.clone());
        Ok(identity)
    }

    /// Signature and claims of a token, with the key its `kid` names (refreshing the JWKS once
    /// when the `kid` is new).
    fn verify(&self, token: &Token) -> Result<VerifiedIdentity, IdentityError> {
        let header = validate::parse_header(token.expose())?;
        let mut keys = self
            .keys
            .keys(Need::Current, Instant::now(), || self.fetch_jwks())?;
        if validate::select_key(&keys, &header)?.is_none() {
            keys = self
                .keys
                .keys(Need::UnknownKid, Instant::now(), || self.fetch_jwks())?;
        }
        let key =
            validate::select_key(&keys, &header)?.ok_or_else(|| IdentityError::UnknownKey {
                kid: header.kid.clone().unwrap_or_default(),
            })?;
        let expect = Expectations {
            issuer: &self.cfg.issuer,
            audience: &self.cfg.audience,
            leeway: self.cfg.leeway,
            groups_claim: &self.cfg.groups_claim,
        };
        let id = validate::verify(token.expose(), &header, key, &expect, SystemTime::now())?;
        self.counters.validations.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn fetch_jwks(&self) -> Result<Vec<jsonwebtoken::jwk::Jwk>, IdentityError> {
        let endpoints = self.endpoints()?;
        self.counters.jwks_fetches.fetch_add(1, Ordering::Relaxed);
        self.http.jwks(&endpoints.jwks_uri)
    }

    /// Discovery, once; a failure is retried by the next request.
    fn endpoints(&self) -> Result<Arc<Endpoints>, IdentityError> {
        let mut slot = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &*slot {
            return Ok(e.clone());
        }
        let found = Arc::new(self.http.discover(&self.cfg.issuer)?);
        *slot = Some(found.clone());
        Ok(found)
    }

    fn remember(&self, key: CacheKey, identity: Arc<VerifiedIdentity>) {
        let now = SystemTime::now();
        let lifetime = identity
            .expires_at
            .duration_since(identity.issued_at.unwrap_or(now))
            .unwrap_or_default();
        let margin = self.cfg.refresh_before.min(lifetime / 4);
        let valid_until = identity.expires_at - margin;
        if valid_until <= now {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cfg.cache_entries {
            cache.retain(|_, c| c.valid_until > now);
        }
        if cache.len() >= self.cfg.cache_entries
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, c)| c.valid_until)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(
            key,
            Cached {
                identity,
                valid_until,
            },
        );
    }
}
