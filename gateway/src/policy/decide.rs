//! Rule matching: the pure part of [`Policy::decide`].

use std::sync::Arc;

use serde::Serialize;

use super::classify::{Classification, ClassifyCache, Kind, Risk, RiskSet, StatementClass};
use super::{Action, Identity, Mode, Policy, Request, TargetRef, Verdict};

/// A shell-style pattern: `*` matches any run of characters, `?` one character; everything else
/// matches itself (case-sensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("empty pattern (use \"*\" to match anything)".into());
        }
        if let Some(c) = pattern.chars().find(|c| matches!(c, '[' | ']' | '{' | '}')) {
            return Err(format!(
                "`{c}` is not supported in patterns (only `*` and `?`)"
            ));
        }
        Ok(Glob(pattern.to_owned()))
    }

    pub fn matches(&self, text: &str) -> bool {
        let p = self.0.as_bytes();
        if p == b"*" {
            return true;
        }
        if !p.iter().any(|b| matches!(b, b'*' | b'?')) {
            return self.0 == text;
        }
        glob_match(&self.0, text)
    }
}

/// Iterative wildcard match with single-star backtracking: linear in practice, never recursive.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn any_match(globs: &[Glob], text: &str) -> bool {
    globs.iter().any(|g| g.matches(text))
}

/// A compiled rule. Every selector given must match; an absent selector matches everything.
#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    /// Matches only connections attributed to an agent whose name matches.
    pub agents: Option<Vec<Glob>>,
    /// Matches when the identity has any of these groups.
    pub groups: Option<Vec<String>>,
    /// Matches when the token's subject (`sub`) matches.
    pub subjects: Option<Vec<Glob>>,
    /// Matches when any actor of the `act` chain matches (delegated sessions only).
    pub actors: Option<Vec<Glob>>,
    pub targets: Option<Vec<Glob>>,
    pub databases: Option<Vec<Glob>>,
    pub kinds: Option<Vec<Kind>>,
    /// Matches when the statement has any of these risks.
    pub risks: Option<RiskSet>,
    /// Matches when the statement touches at least one object and every object matches.
    pub objects: Option<Vec<Glob>>,
    /// Matches when any object touched matches.
    pub touches: Option<Vec<Glob>>,
    pub action: Action,
    pub reason: Option<String>,
}

impl Rule {
    fn matches(
        &self,
        id: &Identity,
        target: &TargetRef,
        stmt: &StatementClass,
        risks: RiskSet,
    ) -> bool {
        if let Some(a) = &self.agents
            && !id.agent.is_some_and(|agent| any_match(a, agent))
        {
            return false;
        }
        if let Some(g) = &self.groups
            && !id.groups.iter().any(|x| g.contains(x))
        {
            return false;
        }
        if let Some(s) = &self.subjects
            && !id.subject.is_some_and(|sub| any_match(s, sub))
        {
            return false;
        }
        if let Some(a) = &self.actors
            && !id.actors.iter().any(|x| any_match(a, x))
        {
            return false;
        }
        if let Some(t) = &self.targets
            && !any_match(t, target.name)
        {
            return false;
        }
        if let Some(d) = &self.databases
            && !any_match(d, target.database)
        {
            return false;
        }
        if let Some(k) = &self.kinds
            && !k.contains(&stmt.kind)
        {
            return false;
        }
        if let Some(r) = self.risks
            && !r.intersects(risks)
        {
            return false;
        }
        if let Some(o) = &self.objects
            && (stmt.objects.is_empty() || !stmt.objects.iter().all(|x| any_match(o, x)))
        {
            return false;
        }
        if let Some(o) = &self.touches
            && !stmt.objects.iter().any(|x| any_match(o, x))
        {
            return false;
        }
        true
    }

    /// True when the rule has no selector: every rule after it is unreachable.
    pub fn is_catch_all(&self) -> bool {
        self.agents.is_none()
            && self.groups.is_none()
            && self.subjects.is_none()
            && self.actors.is_none()
            && self.targets.is_none()
            && self.databases.is_none()
            && self.kinds.is_none()
            && self.risks.is_none()
            && self.objects.is_none()
            && self.touches.is_none()
    }
}

/// Names of the deciders that are not rules, allocated once per policy.
#[derive(Debug)]
pub struct BuiltinRules {
    pub unparsable: Arc<str>,
    pub default_action: Arc<str>,
    pub function_call: Arc<str>,
    pub empty: Arc<str>,
    /// Every HTTP request, until HTTP rules exist.
    pub http: Arc<str>,
}

/// The fingerprint of every HTTP request: they are all refused alike, so none is worth an
/// approval grant of its own.
const HTTP_FINGERPRINT: u64 = 1 << 62;

impl Default for BuiltinRules {
    fn default() -> Self {
        BuiltinRules {
            unparsable: Arc::from("unparsable"),
            default_action: Arc::from("default_action"),
            function_call: Arc::from("function_call"),
            empty: Arc::from("empty"),
            http: Arc::from("http-not-supported"),
        }
    }
}

/// How one statement of a request was decided.
#[derive(Clone, Debug, Serialize)]
pub struct StatementVerdict {
    pub action: Action,
    #[serde(serialize_with = "ser_arc_str")]
    pub rule: Arc<str>,
    /// The risks rules saw (`call` is dropped when every procedure is allow-listed).
    pub risks: RiskSet,
}

fn ser_arc_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// A verdict with the per-statement decisions behind it, for `policy explain`.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub verdict: Verdict,
    pub statements: Vec<StatementVerdict>,
}

struct Decided<'p> {
    action: Action,
    rule: &'p Arc<str>,
    reason: Option<&'p str>,
    risks: RiskSet,
}

impl Policy {
    /// Decides a request. Pure: no I/O; the cache only memoizes classification.
    pub fn decide(
        &self,
        id: &Identity,
        target: &TargetRef,
        req: &Request,
        cache: &mut ClassifyCache,
    ) -> Verdict {
        let class = match req {
            Request::Query(sql) | Request::Parse { sql, .. } => cache.classify(sql),
            Request::FunctionCall { oid } => return self.function_call(*oid),
            Request::Http { method, .. } => return self.http(method),
        };
        let mut worst: Option<(usize, Decided)> = None;
        for (i, stmt) in class.statements.iter().enumerate() {
            let d = self.decide_statement(id, target, stmt);
            if worst.as_ref().is_none_or(|(_, w)| d.action > w.action) {
                worst = Some((i, d));
            }
        }
        self.verdict(class, worst)
    }

    /// [`Policy::decide`] with the decision for every statement.
    pub fn explain(
        &self,
        id: &Identity,
        target: &TargetRef,
        req: &Request,
        cache: &mut ClassifyCache,
    ) -> Explanation {
        let verdict = self.decide(id, target, req, cache);
        let statements = verdict
            .class
            .statements
            .iter()
            .map(|stmt| {
                let d = self.decide_statement(id, target, stmt);
                StatementVerdict {
                    action: d.action,
                    rule: d.rule.clone(),
                    risks: d.risks,
                }
            })
            .collect();
        Explanation {
            verdict,
            statements,
        }
    }

    fn decide_statement<'p>(
        &'p self,
        id: &Identity,
        target: &TargetRef,
        stmt: &StatementClass,
    ) -> Decided<'p> {
        let mut risks = stmt.risks;
        if risks.contains(Risk::Unparsable) {
            return Decided {
                action: self.unparsable,
                rule: &self.builtin_rules.unparsable,
                reason: None,
                risks,
            };
        }
        if risks.contains(Risk::Call)
            && stmt
                .procedures
                .iter()
                .all(|p| any_match(&self.allowed_procedures, p))
        {
            risks = risks.without(Risk::Call);
        }
        match self
            .rules
            .iter()
            .find(|r| r.matches(id, target, stmt, risks))
        {
            Some(r) => Decided {
                action: r.action,
                rule: &r.name,
                reason: r.reason.as_deref(),
                risks,
            },
            None => Decided {
                action: self.default_action,
                rule: &self.builtin_rules.default_action,
                reason: None,
                risks,
            },
        }
    }

    fn verdict(&self, class: Arc<Classification>, worst: Option<(usize, Decided)>) -> Verdict {
        let Some((i, d)) = worst else {
            // An empty query: PostgreSQL answers EmptyQueryResponse.
            return self.finish(
                Action::Allow,
                self.builtin_rules.empty.clone(),
                String::new(),
                class,
            );
        };
        let reason = if d.action == Action::Allow {
            String::new()
        } else {
            let stmt = &class.statements[i];
            let what = if stmt.risks.contains(Risk::Unparsable) {
                "SQL that the policy cannot parse"
            } else {
                stmt.describe()
            };
            let mut r = String::with_capacity(128);
            if let Some(reason) = d.reason {
                r.push_str(reason);
                r.push_str(": ");
            } else if d.rule == &self.builtin_rules.default_action {
                r.push_str("no rule matched: ");
            }
            if class.statements.len() > 1 {
                use std::fmt::Write as _;
                let _ = write!(r, "statement {} of {}: ", i + 1, class.statements.len());
            }
            r.push_str(what);
            r
        };
        self.finish(d.action, d.rule.clone(), reason, class)
    }

    fn function_call(&self, oid: u32) -> Verdict {
        let (action, reason) = if self.function_call_allow_oids.contains(&oid) {
            (Action::Allow, String::new())
        } else {
            (
                self.function_call,
                format!(
                    "fast-path function call of OID {oid}, which is not in function_call_allow_oids"
                ),
            )
        };
        let class = Classification {
            statements: vec![StatementClass::function_call(oid)],
            fingerprint: u64::from(oid) | 1 << 63,
        };
        self.finish(
            action,
            self.builtin_rules.function_call.clone(),
            reason,
            Arc::new(class),
        )
    }

    /// An HTTP request. Policy has no HTTP rules yet, so it cannot tell a harmless one from any
    /// other: every one is refused, in observe mode too (nothing was decided to observe).
    fn http(&self, method: &str) -> Verdict {
        let class = Classification {
            statements: vec![StatementClass::http()],
            fingerprint: HTTP_FINGERPRINT,
        };
        let reason = format!(
            "HTTP request ({method}): the gateway has no HTTP policy rules yet, so it refuses every \
             HTTP request"
        );
        Verdict {
            action: Action::Block,
            shadow: (self.mode == Mode::Observe).then_some(Action::Block),
            rule: self.builtin_rules.http.clone(),
            reason,
            fingerprint: class.fingerprint,
            class: Arc::new(class),
        }
    }

    fn finish(
        &self,
        action: Action,
        rule: Arc<str>,
        reason: String,
        class: Arc<Classification>,
    ) -> Verdict {
        let (action, shadow) = match self.mode {
            Mode::Enforce => (action, None),
            Mode::Observe => (Action::Allow, Some(action)),
        };
        Verdict {
            action,
            shadow,
            rule,
            reason,
            fingerprint: class.fingerprint,
            class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(g("*").matches(""));
        assert!(g("claude-*").matches("claude-code"));
        assert!(!g("claude-*").matches("gpt"));
        assert!(g("public.*").matches("public.users"));
        assert!(!g("public.*").matches("secret.users"));
        assert!(g("*.audit_*").matches("app.audit_log"));
        assert!(g("a?c").matches("abc"));
        assert!(!g("a?c").matches("ac"));
        assert!(g("*a*b*").matches("xxaxxbxx"));
        assert!(!g("*a*b").matches("xxaxxbxx"));
        assert!(g("exact").matches("exact"));
        assert!(!g("exact").matches("Exact"));
        assert!(g("é*").matches("école"));
        assert!(Glob::new("").is_err());
        assert!(Glob::new("a[bc]").is_err());
    }

    /// No HTTP rules exist yet: a policy that allows every statement, or only observes, still
    /// refuses an HTTP request, by a rule that says so.
    #[test]
    fn http_requests_are_refused_until_http_rules_exist() {
        let id = Identity::default();
        let target = TargetRef {
            name: "api",
            database: "",
        };
        let get = Request::Http {
            method: "GET",
            authority: "api.example.com",
            path: "/v1/users",
        };
        for (text, shadow) in [
            ("default_action = \"allow\"\n", None),
            (
                "mode = \"observe\"\ndefault_action = \"allow\"\n",
                Some(Action::Block),
            ),
        ] {
            let policy = crate::policy::load_str(text, "test.toml", None).unwrap();
            let mut cache = ClassifyCache::new(1);
            let sql = policy.decide(&id, &target, &Request::Query("SELECT 1"), &mut cache);
            assert_eq!(sql.decided(), Action::Allow, "{text}");
            let v = policy.decide(&id, &target, &get, &mut cache);
            assert_eq!((v.action, &*v.rule), (Action::Block, "http-not-supported"));
            assert_eq!(v.shadow, shadow);
            assert_eq!(
                v.reason,
                "HTTP request (GET): the gateway has no HTTP policy rules yet, so it refuses \
                 every HTTP request"
            );
            assert_eq!(
                v.error_message(),
                "portcullis: blocked by policy rule \"http-not-supported\""
            );
            assert_eq!(v.class.statements[0].describe(), "HTTP (admin)");
        }
    }
}
