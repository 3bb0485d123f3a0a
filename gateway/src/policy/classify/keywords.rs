//! The keyword fallback: classes for the few statements sqlparser cannot parse, from their
//! leading keywords, never less strict than a full parse.

use super::split::is_trivia;
use super::*;

/// Classes for statements sqlparser cannot parse, from their leading keywords. Only commands whose
/// keywords alone fix a verdict at least as strict as a full parse would are recognised.
pub(super) fn classify_by_keywords(frag: &[TokenWithSpan]) -> Option<StatementClass> {
    let words: Vec<String> = frag
        .iter()
        .filter(|t| !is_trivia(&t.token))
        .take(3)
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            _ => String::new(),
        })
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let role_word = |s: &str| matches!(s, "ROLE" | "USER" | "GROUP");
    let c = |command, kind, risk: Option<Risk>| {
        let mut c = StatementClass::new(command, kind);
        if let Some(r) = risk {
            c.risks.insert(r);
        }
        Some(c.finish())
    };
    match w(0) {
        "DO" => c("DO", Kind::Admin, Some(Risk::DoBlock)),
        // SET [SESSION | LOCAL] SESSION AUTHORIZATION ...
        "SET"
            if (w(1) == "SESSION" && w(2) == "AUTHORIZATION")
                || (matches!(w(1), "SESSION" | "LOCAL") && w(2) == "SESSION") =>
        {
            c(
                "SET SESSION AUTHORIZATION",
                Kind::Session,
                Some(Risk::SetSessionAuthorization),
            )
        }
        // SET [SESSION | LOCAL] ROLE TO ... (the generic form sqlparser does not take)
        "SET" if w(1) == "ROLE" || (matches!(w(1), "SESSION" | "LOCAL") && w(2) == "ROLE") => {
            c("SET ROLE", Kind::Session, Some(Risk::SetRole))
        }
        // Back to the login's own role: refused where the gateway set one for the identity.
        "RESET" if w(1) == "ROLE" || (w(1) == "SESSION" && w(2) == "AUTHORIZATION") => {
            c("RESET ROLE", Kind::Session, Some(Risk::ResetRole))
        }
        // Any other RESET returns a setting to its session default: it cannot raise privileges.
        "RESET" => c("RESET", Kind::Session, None),
        "ALTER" if w(1) == "SYSTEM" => c("ALTER SYSTEM", Kind::Admin, Some(Risk::Alter)),
        "ALTER" if role_word(w(1)) || w(1) == "DEFAULT" => {
            c("ALTER ROLE", Kind::Dcl, Some(Risk::Alter))
        }
        "ALTER" => c("ALTER", Kind::Ddl, Some(Risk::Alter)),
        "CREATE" if role_word(w(1)) => c("CREATE ROLE", Kind::Dcl, None),
        "CREATE" | "COMMENT" | "SECURITY" | "IMPORT" => c("CREATE", Kind::Ddl, None),
        "DROP" if role_word(w(1)) || w(1) == "OWNED" => c("DROP ROLE", Kind::Dcl, Some(Risk::Drop)),
        "DROP" => c("DROP", Kind::Ddl, Some(Risk::Drop)),
        "REASSIGN" => c("REASSIGN OWNED", Kind::Dcl, None),
        "GRANT" => c("GRANT", Kind::Dcl, Some(Risk::Grant)),
        "REVOKE" => c("REVOKE", Kind::Dcl, Some(Risk::Revoke)),
        "TRUNCATE" => c("TRUNCATE", Kind::Write, Some(Risk::Truncate)),
        "LOCK" => c("LOCK", Kind::Write, None),
        "REFRESH" => c("REFRESH MATERIALIZED VIEW", Kind::Write, None),
        "CHECKPOINT" | "LOAD" | "CLUSTER" | "REINDEX" | "VACUUM" | "ANALYZE" => {
            c("ADMIN", Kind::Admin, None)
        }
        _ => None,
    }
}
