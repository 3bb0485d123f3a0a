//! The session core's gate, backed by the policy: a pure decision per request, then the effects a
//! decision has (logging a shadow verdict, opening an approval request).

use std::cell::RefCell;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use futures_channel::oneshot;
use tracing::{info, warn};

use super::lineage::{self, Freshness, Lineage, PendingCatalog};
use crate::daemon::Shared;
use crate::identify::{PendingIdentity, SessionIdentity};
use crate::idp::{IdentityError, VerifiedIdentity};
use crate::metrics::SessionInfo;
use crate::policy::approval::{Decision, NewApproval, PendingDecision};
use crate::policy::{Action, ClassifyCache, Identity, Policy, Risk, TargetRef, Verdict};
use crate::protocol::core::{Blocked, Disposition, Gate, Request};
use crate::route::Target;
use crate::service::metrics::VerdictCounters;

thread_local! {
    /// One classification cache per worker thread: sessions on a runtime share it, with no lock.
    static CACHE: RefCell<ClassifyCache> = RefCell::new(ClassifyCache::new(4096));
}

/// Statements longer than this are not classified on the I/O worker, where parsing megabytes
/// would stall every session on it: they wait for the classifier thread instead.
pub const INLINE_CLASSIFY_MAX: usize = 256 * 1024;

/// Large statements queued for the classifier thread at most; past it they are refused.
const CLASSIFY_QUEUE: usize = 64;

/// What the gate is waiting for before it can answer.
pub enum Held {
    /// An operator's decision.
    Approval {
        id: u64,
        rule: String,
        decision: PendingDecision,
    },
    /// A large statement's verdict, from the classifier thread.
    Classifying {
        verdict: oneshot::Receiver<Verdict>,
        request: OwnedRequest,
    },
    /// The session's token expired: a fresh identity from its token source, before the request
    /// is decided (then with [`PolicyGate::renewed`] and [`Gate::check`] again).
    Renewing {
        identity: PendingIdentity,
        request: OwnedRequest,
    },
    /// The session's catalog is stale: it is read again before the request is analysed (then
    /// with [`PolicyGate::catalog_read`] and [`Gate::check`] again).
    Catalog {
        read: PendingCatalog,
        /// The cache and policy generations when the read began.
        generations: (u64, u64),
        request: OwnedRequest,
    },
}

/// A request kept whole while something is computed elsewhere.
pub enum OwnedRequest {
    /// A Query, or a Parse of the prepared statement named `statement`.
    Statement {
        sql: Arc<str>,
        statement: Option<String>,
    },
    /// A fast-path FunctionCall, by function OID.
    FunctionCall(u32),
    Http {
        method: String,
        authority: String,
        path: String,
    },
}

impl OwnedRequest {
    fn of(request: &Request<'_>) -> OwnedRequest {
        match *request {
            Request::Query(sql) => OwnedRequest::Statement {
                sql: Arc::from(sql),
                statement: None,
            },
            Request::Parse { statement, sql } => OwnedRequest::Statement {
                sql: Arc::from(sql),
                statement: Some(statement.to_owned()),
            },
            Request::FunctionCall { oid } => OwnedRequest::FunctionCall(oid),
            Request::Http {
                method,
                authority,
                path,
            } => OwnedRequest::Http {
                method: method.to_owned(),
                authority: authority.to_owned(),
                path: path.to_owned(),
            },
        }
    }

    pub fn as_request(&self) -> Request<'_> {
        match self {
            OwnedRequest::Statement {
                sql,
                statement: Some(statement),
            } => Request::Parse { statement, sql },
            OwnedRequest::Statement {
                sql,
                statement: None,
            } => Request::Query(sql),
            OwnedRequest::FunctionCall(oid) => Request::FunctionCall { oid: *oid },
            OwnedRequest::Http {
                method,
                authority,
                path,
            } => Request::Http {
                method,
                authority,
                path,
            },
        }
    }
}

/// One large statement for the classifier thread.
struct ClassifyJob {
    policy: Arc<Policy>,
    agent: Option<String>,
    who: Option<Arc<VerifiedIdentity>>,
    target: String,
    database: String,
    sql: Arc<str>,
    statement: Option<String>,
    reply: oneshot::Sender<Verdict>,
}

/// The classifier thread's queue, started on first use.
fn classifier() -> &'static SyncSender<ClassifyJob> {
    static QUEUE: OnceLock<SyncSender<ClassifyJob>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<ClassifyJob>(CLASSIFY_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("portcullis-classify".into())
            .spawn(move || {
                // Texts this long are never cached; a tiny cache keeps the type happy.
                let mut cache = ClassifyCache::new(1);
                for job in rx {
                    let request = match &job.statement {
                        Some(statement) => Request::Parse {
                            statement,
                            sql: &job.sql,
                        },
                        None => Request::Query(&job.sql),
                    };
                    let id = policy_identity(job.agent.as_deref(), job.who.as_deref());
                    let target = TargetRef {
                        name: &job.target,
                        database: &job.database,
                    };
                    let verdict = job.policy.decide(&id, &target, &request, &mut cache);
                    let _ = job.reply.send(verdict);
                }
            });
        if let Err(e) = spawned {
            // The queue's receiver is gone with the closure: every large statement is refused.
            warn!("cannot start the classifier thread: {e}");
        }
        tx
    })
}

pub struct PolicyGate {
    pub shared: Arc<Shared>,
    pub session: u64,
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub target: String,
    pub database: String,
    /// Set when `check` returned Hold; the driver takes it and waits.
    pub held: Option<Held>,
    /// The rule behind the last verdict, for the recording.
    pub last_rule: Option<Arc<str>>,
    /// The session's column lineage, shared with its result filter; `None` when the session
    /// masks nothing.
    pub lineage: Option<Lineage>,
    /// Who the IdP says the session is; rules select on its subject, groups and actors.
    pub identity: Option<SessionIdentity>,
    pub info: Option<Arc<SessionInfo>>,
    /// Where the session's catalog is read again from, and how fresh it is.
    pub catalog: Option<(Arc<Target>, Freshness)>,
    counters: VerdictCounters,
}

/// The policy's view of a session: its agent and, when verified, its subject, groups and actors.
fn policy_identity<'a>(agent: Option<&'a str>, who: Option<&'a VerifiedIdentity>) -> Identity<'a> {
    Identity {
        agent,
        groups: who.map_or(&[], |w| &w.groups),
        subject: who.map(|w| w.subject.as_str()),
        actors: who.map_or(&[], |w| &w.actors),
    }
}

impl PolicyGate {
    pub fn new(
        shared: &Arc<Shared>,
        session: u64,
        identity: &crate::identify::Identity,
        target: &Target,
        lineage: Option<Lineage>,
    ) -> Self {
        PolicyGate {
            lineage,
            shared: shared.clone(),
            session,
            agent: identity.peer.agent.clone(),
            pid: identity.peer.pid,
            target: target.config.name.clone(),
            database: target.config.upstream.database.clone(),
            held: None,
            last_rule: None,
            identity: None,
            info: None,
            catalog: None,
            counters: VerdictCounters::default(),
        }
    }

    /// Reads the session's catalog again when it goes stale (see [`Freshness`]).
    pub fn with_catalog(mut self, target: Arc<Target>, freshness: Freshness) -> Self {
        self.catalog = Some((target, freshness));
        self
    }

    /// Holds the request while the session's catalog is read again, once it is stale; a fresher
    /// snapshot another session read is taken without waiting.
    fn catalog_due(&mut self, request: &Request<'_>) -> Option<Disposition> {
        let lineage = self.lineage.as_ref()?;
        let (target, freshness) = self.catalog.as_mut()?;
        let now = Instant::now();
        let generations = (
            self.shared.catalogs.generation(),
            self.shared.policy_generation(),
        );
        if !freshness.is_stale(now, generations.0, generations.1) {
            return None;
        }
        let masker = self.shared.masker();
        let ttl = masker.catalog_ttl();
        if masker.is_noop() || !(masker.lineage_enabled() || masker.needs_catalog()) {
            // Nothing to read the catalog for: look again after the TTL or a reload.
            freshness.refreshed(now, ttl, generations.0, generations.1);
            return None;
        }
        if let Some((at, catalog)) = freshness.adoptable(&self.shared, now, ttl) {
            let catalog = lineage::remarked(&masker, &catalog);
            lineage.borrow_mut().replace_catalog(catalog);
            freshness.refreshed(at, ttl, generations.0, generations.1);
            return None;
        }
        let read = lineage::read_catalog(
            self.shared.clone(),
            target.clone(),
            self.identity.clone(),
            freshness.key.clone(),
        );
        self.held = Some(Held::Catalog {
            read,
            generations,
            request: OwnedRequest::of(request),
        });
        Some(Disposition::Hold)
    }

    /// The catalog read again. One that could not be read leaves every column of unknown
    /// lineage until the next try, a TTL later: masking fails closed.
    pub fn catalog_read(
        &mut self,
        read: Result<Arc<crate::mask::lineage::Catalog>, crate::forward::upstream::UpstreamError>,
        (cache, policy): (u64, u64),
    ) {
        let (Some(lineage), Some((_, freshness))) = (&self.lineage, &mut self.catalog) else {
            return;
        };
        let catalog = read.unwrap_or_else(|e| {
            warn!(
                session = self.session,
                "catalog lookup for masking failed: {e}"
            );
            Arc::new(crate::mask::lineage::Catalog::unavailable())
        });
        lineage.borrow_mut().replace_catalog(catalog);
        let ttl = self.shared.masker().catalog_ttl();
        freshness.refreshed(Instant::now(), ttl, cache, policy);
    }

    /// Decides by the session's verified identity, and renews it in `info` when it expires.
    pub fn with_identity(mut self, identity: SessionIdentity, info: Arc<SessionInfo>) -> Self {
        self.identity = Some(identity);
        self.info = Some(info);
        self
    }

    /// Takes the identity renewed after its token expired; an error ends the session.
    pub fn renewed(&mut self, fresh: Arc<VerifiedIdentity>) -> Result<(), IdentityError> {
        let Some(identity) = &mut self.identity else {
            return Ok(());
        };
        identity.renewed(fresh.clone())?;
        info!(session = self.session, subject = %fresh.subject, token_sha256 = %fresh.token_hash, "identity renewed");
        if let Some(info) = &self.info {
            info.set_identity(fresh);
        }
        Ok(())
    }

    /// Where the gateway chose the upstream role for the session's identity, the agent may not
    /// change or undo it, whatever the policy says.
    fn role_escape(&self, verdict: &Verdict) -> Option<Disposition> {
        let identity = self.identity.as_ref()?;
        if identity.role == crate::idp::UpstreamRole::TargetLogin {
            return None;
        }
        let changes_role = [
            Risk::SetRole,
            Risk::SetSessionAuthorization,
            Risk::ResetRole,
        ];
        let risks = verdict.class.risks();
        if !changes_role.iter().any(|r| risks.contains(*r)) {
            return None;
        }
        warn!(session = self.session, subject = %identity.verified.subject, "statement blocked: it changes the role mapped for the identity");
        Some(Disposition::Block(Blocked {
            rule: "identity-role".into(),
            reason: "the session's upstream role is mapped from its identity and cannot be \
                     changed or reset"
                .into(),
            sqlstate: None,
        }))
    }

    /// Holds the request while the session's identity is renewed, once its token has expired:
    /// the next statement after expiry re-reads the token source.
    fn renewal_due(&mut self, request: &Request<'_>) -> Option<Disposition> {
        let identity = self.identity.as_ref()?;
        if SystemTime::now() < identity.verified.expires_at {
            return None;
        }
        self.held = Some(Held::Renewing {
            identity: crate::identify::verify(&identity.service, &identity.tokens),
            request: OwnedRequest::of(request),
        });
        Some(Disposition::Hold)
    }

    /// What the operator's decision means for the held statement.
    pub fn outcome(rule: &str, decision: Decision) -> Disposition {
        match decision {
            Decision::Approved { .. } => Disposition::Allow,
            Decision::Denied { reason } => Disposition::Block(Blocked {
                rule: rule.to_owned(),
                reason,
                sqlstate: None,
            }),
        }
    }
}

impl PolicyGate {
    /// Sends a large statement to the classifier thread and holds it until the verdict is back.
    /// A full queue or a stopped thread refuses it: never waved through unclassified.
    fn classify_elsewhere(&mut self, policy: Arc<Policy>, request: &Request<'_>) -> Disposition {
        let (sql, statement) = match *request {
            Request::Query(sql) => (sql, None),
            Request::Parse { statement, sql } => (sql, Some(statement.to_owned())),
            Request::FunctionCall { .. } | Request::Http { .. } => {
                unreachable!("only statements are large")
            }
        };
        let sql: Arc<str> = Arc::from(sql);
        let (reply, verdict) = oneshot::channel();
        let job = ClassifyJob {
            policy,
            agent: self.agent.clone(),
            who: self.identity.as_ref().map(|i| i.verified.clone()),
            target: self.target.clone(),
            database: self.database.clone(),
            sql: sql.clone(),
            statement: statement.clone(),
            reply,
        };
        let refused = match classifier().try_send(job) {
            Ok(()) => {
                self.held = Some(Held::Classifying {
                    verdict,
                    request: OwnedRequest::Statement { sql, statement },
                });
                return Disposition::Hold;
            }
            Err(TrySendError::Full(_)) => "too many large statements are waiting to be classified",
            Err(TrySendError::Disconnected(_)) => "the classifier thread is not running",
        };
        warn!(
            session = self.session,
            bytes = sql.len(),
            "large statement refused: {refused}"
        );
        Disposition::Block(Blocked {
            rule: "classifier".into(),
            reason: format!("statement of {} bytes not classified: {refused}", sql.len()),
            sqlstate: None,
        })
    }

    /// What a verdict means for this request: allow, block, or hold for an operator (then
    /// [`PolicyGate::held`] says what to wait for).
    pub fn act(&mut self, request: &Request<'_>, verdict: Verdict) -> Disposition {
        if let Some(blocked) = self.role_escape(&verdict) {
            return blocked;
        }
        self.counters
            .count(&self.target, &verdict.rule, verdict.action);
        self.last_rule = Some(verdict.rule.clone());
        if let Some(shadow) = verdict.shadow.filter(|a| *a != Action::Allow) {
            let would = if shadow == Action::Block {
                "would block"
            } else {
                "would hold for approval"
            };
            info!(session = self.session, rule = %verdict.rule, reason = %verdict.reason, "observe: {would}");
        }
        if verdict.action == Action::Allow
            && let (Some(state), Some(sql)) = (&self.lineage, request.sql())
        {
            if verdict.class.kind() == crate::policy::Kind::Ddl {
                // What `*`, views and masked tables mean may have changed for every session.
                self.shared
                    .catalogs
                    .invalidate(&self.target, &self.database);
                if let Some((_, freshness)) = &mut self.catalog {
                    freshness.ddl_seen();
                }
            }
            if let Some(path) = lineage::search_path_set(sql) {
                state.borrow_mut().set_search_path(path);
            }
            let masker = self.shared.masker();
            if let Some(b) = lineage::refusal(&masker, &mut state.borrow_mut(), sql) {
                warn!(session = self.session, rule = %b.rule, reason = %b.reason, "statement blocked by masking");
                return Disposition::Block(b);
            }
        }
        match verdict.action {
            Action::Allow => Disposition::Allow,
            Action::Block => {
                warn!(session = self.session, agent = self.agent.as_deref().unwrap_or("-"), target = %self.target, rule = %verdict.rule, reason = %verdict.reason, "statement blocked");
                Disposition::Block(Blocked {
                    rule: verdict.rule.to_string(),
                    reason: verdict.reason,
                    sqlstate: None,
                })
            }
            Action::Approve => {
                if self.shared.approvals.granted(
                    verdict.fingerprint,
                    self.agent.as_deref(),
                    &self.target,
                ) {
                    info!(session = self.session, rule = %verdict.rule, "statement allowed by a standing approval");
                    return Disposition::Allow;
                }
                let sql = request.to_string();
                let who = self.identity.as_ref().map(|i| &i.verified);
                let new = NewApproval {
                    agent: self.agent.clone(),
                    subject: who.map(|w| w.subject.clone()),
                    actors: who.map(|w| w.actors.clone()).unwrap_or_default(),
                    pid: self.pid,
                    target: self.target.clone(),
                    database: self.database.clone(),
                    sql,
                    rule: verdict.rule.to_string(),
                    fingerprint: verdict.fingerprint,
                };
                match self
                    .shared
                    .approvals
                    .request(new, self.shared.policy().approval_timeout())
                {
                    Ok((id, decision)) => {
                        info!(session = self.session, agent = self.agent.as_deref().unwrap_or("-"), target = %self.target, approval = id, rule = %verdict.rule, "statement held for approval");
                        self.held = Some(Held::Approval {
                            id,
                            rule: verdict.rule.to_string(),
                            decision,
                        });
                        Disposition::Hold
                    }
                    // No store, no approval: refuse rather than let it through.
                    Err(e) => {
                        warn!(session = self.session, "approval store unavailable: {e:#}");
                        let full = e.is::<crate::policy::approval::TooManyPending>();
                        Disposition::Block(Blocked {
                            rule: verdict.rule.to_string(),
                            reason: if full {
                                format!("needs approval, but {e}")
                            } else {
                                format!(
                                    "needs approval, but the approval store is unavailable: {e:#}"
                                )
                            },
                            // Past the cap on waiting requests: a limit (54000), not a rule.
                            sqlstate: full
                                .then_some(crate::protocol::postgres::session::SQLSTATE_LIMIT),
                        })
                    }
                }
            }
        }
    }
}

impl Gate for PolicyGate {
    fn check(&mut self, request: &Request<'_>) -> Disposition {
        if let Some(renewing) = self.renewal_due(request) {
            return renewing;
        }
        if let Some(reading) = self.catalog_due(request) {
            return reading;
        }
        let policy = self.shared.policy();
        if let Some(sql) = request.sql()
            && sql.len() > INLINE_CLASSIFY_MAX
        {
            return self.classify_elsewhere(policy, request);
        }
        let who = self.identity.as_ref().map(|i| &*i.verified);
        let id = policy_identity(self.agent.as_deref(), who);
        let target = TargetRef {
            name: &self.target,
            database: &self.database,
        };
        let verdict = CACHE.with(|c| policy.decide(&id, &target, request, &mut c.borrow_mut()));
        self.act(request, verdict)
    }
}
