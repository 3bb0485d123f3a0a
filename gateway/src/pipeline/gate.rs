//! The session core's gate, backed by the policy: a pure decision per request, then the effects a
//! decision has (logging a shadow verdict, opening an approval request).

use std::cell::RefCell;
use std::sync::Arc;

use tracing::{info, warn};

use super::lineage::{self, Lineage};
use crate::daemon::Shared;
use crate::policy::approval::{Decision, NewApproval, PendingDecision};
use crate::policy::{Action, ClassifyCache, Identity, TargetRef};
use crate::protocol::core::{Blocked, Disposition, Gate, Request};
use crate::route::Target;

thread_local! {
    /// One classification cache per worker thread: sessions on a runtime share it, with no lock.
    static CACHE: RefCell<ClassifyCache> = RefCell::new(ClassifyCache::new(4096));
}

/// A statement the gate is holding for an operator.
pub struct Held {
    pub id: u64,
    pub rule: String,
    pub decision: PendingDecision,
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
    /// The session's column lineage, shared with its result filter; `None` when the session
    /// masks nothing.
    pub lineage: Option<Lineage>,
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
        }
    }

    /// What the operator's decision means for the held statement.
    pub fn outcome(rule: &str, decision: Decision) -> Disposition {
        match decision {
            Decision::Approved => Disposition::Allow,
            Decision::Denied { reason } => Disposition::Block(Blocked {
                rule: rule.to_owned(),
                reason,
            }),
        }
    }
}

impl Gate for PolicyGate {
    fn check(&mut self, request: &Request<'_>) -> Disposition {
        let id = Identity {
            agent: self.agent.as_deref(),
            groups: &[],
        };
        let target = TargetRef {
            name: &self.target,
            database: &self.database,
        };
        let policy = self.shared.policy();
        let verdict = CACHE.with(|c| policy.decide(&id, &target, request, &mut c.borrow_mut()));
        crate::service::metrics::verdict(&self.target, &verdict.rule, verdict.action);
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
                let sql = match *request {
                    Request::Query(sql) | Request::Parse { sql, .. } => sql.to_owned(),
                    Request::FunctionCall { oid } => {
                        format!("-- fast-path FunctionCall of function OID {oid}")
                    }
                };
                let new = NewApproval {
                    agent: self.agent.clone(),
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
                    .request(new, policy.approval_timeout())
                {
                    Ok((id, decision)) => {
                        info!(session = self.session, agent = self.agent.as_deref().unwrap_or("-"), target = %self.target, approval = id, rule = %verdict.rule, "statement held for approval");
                        self.held = Some(Held {
                            id,
                            rule: verdict.rule.to_string(),
                            decision,
                        });
                        Disposition::Hold
                    }
                    // No store, no approval: refuse rather than let it through.
                    Err(e) => {
                        warn!(session = self.session, "approval store unavailable: {e:#}");
                        Disposition::Block(Blocked {
                            rule: verdict.rule.to_string(),
                            reason: "needs approval, but the approval store is unavailable".into(),
                        })
                    }
                }
            }
        }
    }
}
