//! Column lineage for a session: its catalog snapshot (shared by sessions of the same target,
//! database and user for a TTL, read on the session's own upstream connection otherwise), and the
//! gate's lineage checks.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::daemon::Shared;
use crate::forward::conn::Stream;
use crate::forward::upstream;
use crate::mask::lineage::{CATALOG_SQL, Catalog, SessionLineage};
use crate::mask::{Masker, UnknownLineage};
use crate::protocol::core::Blocked;

/// The session's lineage state, shared by its gate and its result filter.
pub type Lineage = Rc<RefCell<SessionLineage>>;

/// The lineage state for a new session; `None` when the policy masks nothing. Runs before the
/// agent's first byte goes upstream.
pub async fn session_lineage(
    shared: &Shared,
    server: &Stream,
    masker: &Masker,
    target: &str,
    database: &str,
    user: &str,
    session: u64,
) -> Option<Lineage> {
    if masker.is_noop() {
        // Nothing to mask now, so no catalog read. Should a reload add rules, every column of
        // this session is of unknown lineage and so redacted: masking fails closed.
        let unknown = Arc::new(Catalog::unavailable());
        return Some(Rc::new(RefCell::new(SessionLineage::new(unknown))));
    }
    let catalog = if !masker.lineage_enabled() && !masker.needs_catalog() {
        Arc::new(Catalog::default())
    } else if let Some(c) = shared.catalogs.get(target, database, user, Instant::now()) {
        c
    } else {
        match upstream::side_query(server, CATALOG_SQL, shared.max_message()).await {
            Ok(rows) => {
                let mut c = Catalog::from_rows(&rows);
                masker.mark_catalog(&mut c);
                let c = Arc::new(c);
                shared
                    .catalogs
                    .put(target, database, user, Instant::now(), c.clone());
                c
            }
            Err(e) => {
                // Without it every column's lineage is unknown: masking fails closed.
                warn!(session, "catalog lookup for masking failed: {e}");
                Arc::new(Catalog::unavailable())
            }
        }
    };
    Some(Rc::new(RefCell::new(SessionLineage::new(catalog))))
}

/// Why the gate refuses a statement on lineage grounds: a `pg_notify` of a masked value, or
/// (under `mask.unknown_lineage = "block"`) an output column whose lineage cannot be decided.
pub fn refusal(masker: &Masker, lineage: &mut SessionLineage, sql: &str) -> Option<Blocked> {
    if masker.is_noop() || !masker.lineage_enabled() {
        return None;
    }
    let analysis = lineage.analysis(sql);
    if let Some(rule) = &analysis.notify_masked {
        return Some(Blocked {
            rule: rule.clone(),
            reason: "pg_notify would deliver a value derived from a masked column".into(),
            sqlstate: None,
        });
    }
    if masker.unknown_lineage() == UnknownLineage::Block
        && let Some((_, col)) = analysis.first_unknown()
    {
        let why = col.lineage.unknown.as_deref().unwrap_or("unknown");
        return Some(Blocked {
            rule: "mask.unknown_lineage".into(),
            reason: format!(
                "masking cannot tell which columns output column \"{}\" derives from: {why}",
                col.name
            ),
            sqlstate: None,
        });
    }
    None
}

/// `SET search_path ...` as the gate sees it: the new path, when the statement sets one plainly.
pub fn search_path_set(sql: &str) -> Option<Vec<String>> {
    use sqlparser::ast::{Expr, Set, Statement, Value};
    let statements =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .ok()?;
    statements.iter().rev().find_map(|s| match s {
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) if variable.to_string().eq_ignore_ascii_case("search_path") => Some(
            values
                .iter()
                .filter_map(|v| match v {
                    Expr::Identifier(i) if i.quote_style.is_some() => Some(i.value.clone()),
                    Expr::Identifier(i) => Some(i.value.to_ascii_lowercase()),
                    Expr::Value(v) => match &v.value {
                        Value::SingleQuotedString(s) => Some(s.clone()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_statements_are_read() {
        assert_eq!(
            search_path_set("SET search_path TO app, \"Public\""),
            Some(vec!["app".to_owned(), "Public".to_owned()])
        );
        assert_eq!(
            search_path_set("set search_path = 'x'"),
            Some(vec!["x".to_owned()])
        );
        assert_eq!(search_path_set("SET work_mem = '1MB'"), None);
    }
}
