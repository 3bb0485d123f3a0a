//! `portcullis policy check` and `portcullis policy explain`: offline, no gateway needed.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::{ClassifyCache, Explanation, Identity, Mode, Policy, Request, TargetRef};

#[derive(clap::Subcommand, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per CLI run; boxing would only obscure the clap definition"
)]
pub enum PolicyCommand {
    /// Validate a policy file (or built-in name); errors name file, line, column and key.
    Check {
        /// A TOML policy file, or a built-in name (`default`, `observe`).
        file: String,
    },
    /// Show the verdict a policy gives a statement, and the rule that decides it.
    Explain {
        /// The agent the statement comes from (omit for an unattributed connection).
        #[arg(long)]
        agent: Option<String>,
        /// The target name.
        #[arg(long)]
        target: String,
        /// The database (rules with a `databases` selector see an empty name when omitted).
        #[arg(long, default_value = "")]
        database: String,
        /// Identity groups of the connection (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The token subject (`sub`) of the connection.
        #[arg(long)]
        subject: Option<String>,
        /// An actor of the delegation chain, current actor first (repeatable).
        #[arg(long = "actor")]
        actors: Vec<String>,
        /// The policy: a built-in name or a TOML file.
        #[arg(long, default_value = "default")]
        policy: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// A table for column lineage, `schema.table(col type, ...)` (repeatable; schema
        /// defaults to `public`, type to `text`).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// A view for column lineage, `schema.view=SELECT ...` (repeatable).
        #[arg(long = "view")]
        views: Vec<String>,
        /// The SQL, as the client would send it in a Query message.
        sql: String,
    },
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { file } => {
            let policy = super::load(&file)?;
            print!("{}", check_summary(&policy));
            Ok(())
        }
        PolicyCommand::Explain {
            agent,
            target,
            database,
            groups,
            subject,
            actors,
            policy,
            json,
            tables,
            views,
            sql,
        } => {
            let masking = crate::mask::explain::explain(&policy, &tables, &views, &sql)?;
            let policy = super::load(&policy)?;
            let id = Identity {
                agent: agent.as_deref(),
                groups: &groups,
                subject: subject.as_deref(),
                actors: &actors,
            };
            let target = TargetRef {
                name: &target,
                database: &database,
            };
            let ex = policy.explain(
                &id,
                &target,
                &Request::Query(&sql),
                &mut ClassifyCache::new(1),
            );
            if json {
                let mut v = explain_json(&policy, &ex);
                v["masking"] = serde_json::to_value(&masking).context("encoding JSON")?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).context("encoding JSON")?
                );
            } else {
                print!("{}{}", explain_text(&policy, &ex), masking.text());
            }
            Ok(())
        }
    }
}

/// The success summary of `policy check`.
pub fn check_summary(p: &Policy) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: ok: policy `{}`, mode {}, {} rule(s), unparsable = {}, default_action = {}, \
         function_call = {}, approval_timeout = {}, mask: {}",
        p.source(),
        p.name(),
        match p.mode() {
            Mode::Enforce => "enforce",
            Mode::Observe => "observe",
        },
        p.rule_count(),
        p.unparsable,
        p.default_action,
        p.function_call,
        humantime::format_duration(p.approval_timeout()),
        if p.mask_table().is_empty() {
            "none"
        } else {
            "configured"
        },
    );
    for w in p.warnings() {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// The text form of `policy explain`.
pub fn explain_text(p: &Policy, ex: &Explanation) -> String {
    let v = &ex.verdict;
    let mut s = String::new();
    let _ = writeln!(s, "policy:      {} ({})", p.name(), p.source());
    match v.shadow {
        Some(shadow) => {
            let _ = writeln!(
                s,
                "verdict:     {} (observe mode: would {})",
                v.action,
                match shadow {
                    super::Action::Allow => "allow",
                    super::Action::Approve => "hold for approval",
                    super::Action::Block => "block",
                }
            );
        }
        None => {
            let _ = writeln!(s, "verdict:     {}", v.action);
        }
    }
    let _ = writeln!(s, "rule:        {}", v.rule);
    if !v.reason.is_empty() {
        let _ = writeln!(s, "reason:      {}", v.reason);
    }
    let _ = writeln!(s, "kind:        {}", v.class.kind());
    let risks: Vec<&str> = v.class.risks().iter().map(|r| r.as_str()).collect();
    let _ = writeln!(s, "risks:       {}", none_if_empty(&risks.join(", ")));
    let _ = writeln!(
        s,
        "objects:     {}",
        none_if_empty(&v.class.objects().join(", "))
    );
    let _ = writeln!(s, "fingerprint: {:016x}", v.fingerprint);
    for (i, (stmt, sv)) in v.class.statements.iter().zip(&ex.statements).enumerate() {
        let _ = writeln!(
            s,
            "statement {}: {} -> {} (rule {})",
            i + 1,
            stmt.describe(),
            sv.action,
            sv.rule
        );
        if let Some(e) = &stmt.parse_error {
            let _ = writeln!(s, "  parse error: {e}");
        }
    }
    s
}

fn none_if_empty(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// The JSON form of `policy explain`.
pub fn explain_json(p: &Policy, ex: &Explanation) -> serde_json::Value {
    let v = &ex.verdict;
    let statements: Vec<serde_json::Value> = v
        .class
        .statements
        .iter()
        .zip(&ex.statements)
        .map(|(stmt, sv)| {
            serde_json::json!({
                "command": stmt.command,
                "kind": stmt.kind,
                "risks": sv.risks,
                "objects": stmt.objects,
                "functions": stmt.functions,
                "procedures": stmt.procedures,
                "parse_error": stmt.parse_error,
                "action": sv.action,
                "rule": &*sv.rule,
            })
        })
        .collect();
    serde_json::json!({
        "policy": p.name(),
        "source": p.source(),
        "action": v.action,
        "shadow": v.shadow,
        "rule": &*v.rule,
        "reason": v.reason,
        "kind": v.class.kind(),
        "risks": v.class.risks(),
        "objects": v.class.objects(),
        "fingerprint": format!("{:016x}", v.fingerprint),
        "statements": statements,
    })
}
