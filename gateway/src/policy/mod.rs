//! Policy: a pure function from (identity, target, request) to a [`Verdict`].
//!
//! A [`Policy`] is an immutable snapshot compiled from TOML ([`load`]), shared as `Arc<Policy>`;
//! a reload builds a new one, and a statement already decided keeps its verdict. [`Policy::decide`]
//! does no I/O and touches no globals: the only state it uses is the caller's [`ClassifyCache`],
//! owned by one worker thread.
//!
//! # How a request is decided
//! 1. Each statement of the request is classified ([`classify`]): kind, risks, objects.
//! 2. Each statement is decided on its own:
//!    - an `unparsable` statement gets the policy's `unparsable` action;
//!    - otherwise the **first rule in file order whose selectors all match** decides (rules read
//!      like a firewall: put exceptions before the general rules);
//!    - when no rule matches, `default_action` decides (block unless configured).
//! 3. The request gets the **most severe** statement verdict (block > approve > allow), so
//!    `SELECT 1; DROP TABLE t` is blocked as a whole. Ties go to the earliest statement.
//! 4. In `observe` mode the verdict is enforced as allow and the real one is reported in
//!    [`Verdict::shadow`].
//!
//! A FunctionCall message (fast-path call by function OID) is allowed when the OID is in
//! `function_call_allow_oids` and otherwise gets the `function_call` action (block by default):
//! the OID says nothing the classifier can check.
//!
//! The driver asks [`Approvals::granted`] before holding an `approve` verdict (a live fingerprint
//! grant lets it through); a `block` verdict is never subject to grants.

pub mod approval;
pub mod classify;
pub mod cli;
mod decide;
mod file;
pub(crate) use file::de_duration;

use std::sync::Arc;
use std::time::Duration;

pub use approval::{
    ApprovalRecord, Approvals, Decision, NewApproval, PendingDecision, Scope, Status,
    print_approvals,
};
pub use classify::{Classification, ClassifyCache, Kind, Risk, RiskSet, StatementClass};
pub use decide::{Explanation, StatementVerdict};
pub use file::{PolicyError, builtin_names, load, load_str};

pub use crate::request::Request;

/// Who is asking: the identity bound to the connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity<'a> {
    /// The agent's name, when the connection could be attributed to one.
    pub agent: Option<&'a str>,
    pub groups: &'a [String],
    /// The verified token's subject, when the target checks identity.
    pub subject: Option<&'a str>,
    /// The `act` chain of a delegated token, current actor first.
    pub actors: &'a [String],
}

/// Where the request goes.
#[derive(Clone, Copy, Debug)]
pub struct TargetRef<'a> {
    pub name: &'a str,
    pub database: &'a str,
}

/// What to do with a request, from least to most severe.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    /// Hold for a human decision (see [`Approvals`]).
    Approve,
    /// Refuse with SQLSTATE 42501.
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Approve => "approve",
            Action::Block => "block",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether verdicts are enforced or only reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    /// Evaluate everything, enforce nothing: verdicts are allow, with the real one in `shadow`.
    /// HTTP requests are the exception: with no HTTP rules there is nothing to observe, and they
    /// stay refused (`http-not-supported`).
    Observe,
}

/// The decision for one request.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// What to enforce.
    pub action: Action,
    /// In observe mode: what would have happened (`Some` for every request). `None` when enforcing.
    pub shadow: Option<Action>,
    /// The rule that decided: its `name`, or `rules[N]`; or one of the built-in deciders
    /// `unparsable`, `default_action`, `function_call`, `empty`, `http-not-supported`.
    pub rule: Arc<str>,
    /// Why, for the ErrorResponse detail and logs: the rule's `reason` and a description of the
    /// deciding statement (command, kind, risks, objects; never literals). Empty for allow.
    pub reason: String,
    /// Normalized fingerprint of the whole request text (see [`Classification::fingerprint`]);
    /// scope of fingerprint approval grants.
    pub fingerprint: u64,
    /// The classification (shared with the cache).
    pub class: Arc<Classification>,
}

impl Verdict {
    /// The action the rules chose, whether or not it is enforced.
    pub fn decided(&self) -> Action {
        self.shadow.unwrap_or(self.action)
    }

    /// The ErrorResponse message for a blocked or denied statement: it names the rule;
    /// [`Verdict::reason`] (or the denial reason) goes in the detail.
    pub fn error_message(&self) -> String {
        format!("portcullis: blocked by policy rule \"{}\"", self.rule)
    }

    /// For observe-mode logs: `would block` / `would hold`, or `None` when nothing would happen.
    pub fn shadow_label(&self) -> Option<&'static str> {
        match self.shadow? {
            Action::Allow => None,
            Action::Approve => Some("would hold"),
            Action::Block => Some("would block"),
        }
    }
}

/// An immutable, compiled policy.
#[derive(Debug)]
pub struct Policy {
    name: String,
    source: String,
    mode: Mode,
    unparsable: Action,
    default_action: Action,
    function_call: Action,
    function_call_allow_oids: Vec<u32>,
    approval_timeout: Duration,
    allowed_procedures: Vec<decide::Glob>,
    rules: Vec<decide::Rule>,
    mask: toml::Table,
    builtin_rules: decide::BuiltinRules,
}

impl Policy {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it came from: a file path, or `builtin:NAME`.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How long a held statement waits for an operator before it is denied (default 5 minutes).
    pub fn approval_timeout(&self) -> Duration {
        self.approval_timeout
    }

    /// The `[mask]` table, for `crate::mask` to deserialize into its rules.
    pub fn mask_table(&self) -> &toml::Table {
        &self.mask
    }

    /// Number of rules, for summaries.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}
