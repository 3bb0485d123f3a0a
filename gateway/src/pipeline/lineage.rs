//! Column lineage for a session: its catalog snapshot (shared by sessions of the same target,
//! database and user for a TTL, read on the session's own upstream connection otherwise), and the
//! gate's lineage checks.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::daemon::Shared;
use crate::forward::conn::Stream;
use crate::forward::upstream::{self, UpstreamError};
use crate::identify::SessionIdentity;
use crate::mask::lineage::{CATALOG_SQL, Catalog, SessionLineage};
use crate::mask::{Masker, UnknownLineage};
use crate::protocol::core::Blocked;
use crate::route::Target;

/// The session's lineage state, shared by its gate and its result filter.
pub type Lineage = Rc<RefCell<SessionLineage>>;

/// A catalog being read on a connection of its own, while the statement that needs it waits.
pub type PendingCatalog = Pin<Box<dyn Future<Output = Result<Arc<Catalog>, UpstreamError>>>>;

/// The shared cache's key for a session's snapshot: target, database, effective upstream user.
pub type CatalogKey = (String, String, String);

/// How fresh a session's catalog is: it is read again at the session's next statement after DDL
/// went through it, after `mask.catalog_ttl`, after another session's DDL, or after a reload.
#[derive(Debug)]
pub struct Freshness {
    pub key: CatalogKey,
    read_at: Instant,
    /// `mask.catalog_ttl` of the policy at `policy_generation`: a reload makes it stale anyway.
    ttl: Duration,
    cache_generation: u64,
    policy_generation: u64,
    ddl_seen: bool,
}

impl Freshness {
    pub fn new(
        key: CatalogKey,
        shared: &Shared,
        masker: &Masker,
        policy_generation: u64,
    ) -> Freshness {
        Freshness {
            key,
            read_at: Instant::now(),
            ttl: masker.catalog_ttl(),
            cache_generation: shared.catalogs.generation(),
            policy_generation,
            ddl_seen: false,
        }
    }

    /// DDL went through this session: what `*`, views and tables mean may have changed.
    pub fn ddl_seen(&mut self) {
        self.ddl_seen = true;
    }

    /// Two atomic loads and a clock read: this runs before every statement.
    pub fn is_stale(&self, now: Instant, cache: u64, policy: u64) -> bool {
        self.ddl_seen
            || now.saturating_duration_since(self.read_at) >= self.ttl
            || cache != self.cache_generation
            || policy != self.policy_generation
    }

    /// A catalog read (or taken from another session) at `read_at`, when the generations were these.
    pub fn refreshed(&mut self, read_at: Instant, ttl: Duration, cache: u64, policy: u64) {
        *self = Freshness {
            key: std::mem::take(&mut self.key),
            read_at,
            ttl,
            cache_generation: cache,
            policy_generation: policy,
            ddl_seen: false,
        };
    }

    /// A snapshot another session read after ours, when no DDL of our own is pending.
    pub fn adoptable(
        &self,
        shared: &Shared,
        now: Instant,
        ttl: Duration,
    ) -> Option<(Instant, Arc<Catalog>)> {
        if self.ddl_seen {
            return None;
        }
        let (target, database, user) = &self.key;
        shared
            .catalogs
            .get(target, database, user, now, ttl)
            .filter(|(at, _)| *at > self.read_at)
    }
}

/// The lineage state for a new session. Runs before the agent's first byte goes upstream.
pub async fn session_lineage(
    shared: &Shared,
    server: &Stream,
    masker: &Masker,
    key: &CatalogKey,
    session: u64,
) -> Lineage {
    if masker.is_noop() {
        // Nothing to mask now, so no catalog read. Should a reload add rules, the session reads
        // the catalog at its next statement; until then every column is of unknown lineage.
        let unknown = Arc::new(Catalog::unavailable());
        return Rc::new(RefCell::new(SessionLineage::new(unknown)));
    }
    let (target, database, user) = key;
    let ttl = masker.catalog_ttl();
    let catalog = if !masker.lineage_enabled() && !masker.needs_catalog() {
        Arc::new(Catalog::default())
    } else if let Some((_, c)) = shared
        .catalogs
        .get(target, database, user, Instant::now(), ttl)
    {
        c
    } else {
        match upstream::side_query(server, CATALOG_SQL, shared.max_message()).await {
            Ok(rows) => marked(shared, masker, key, &rows),
            Err(e) => {
                // Without it every column's lineage is unknown: masking fails closed.
                warn!(session, "catalog lookup for masking failed: {e}");
                Arc::new(Catalog::unavailable())
            }
        }
    };
    Rc::new(RefCell::new(SessionLineage::new(catalog)))
}

/// The catalog from its rows, each column marked with the rule it matches, and shared.
fn marked(
    shared: &Shared,
    masker: &Masker,
    key: &CatalogKey,
    rows: &[Vec<Option<String>>],
) -> Arc<Catalog> {
    let mut c = Catalog::from_rows(rows);
    masker.mark_catalog(&mut c);
    let c = Arc::new(c);
    let (target, database, user) = key;
    shared.catalogs.put(
        (target, database, user),
        Instant::now(),
        masker.catalog_ttl(),
        c.clone(),
    );
    c
}

/// Reads the catalog again on a connection of its own, logged in as the session is: the
/// session's upstream may be busy answering earlier statements.
pub fn read_catalog(
    shared: Arc<Shared>,
    target: Arc<Target>,
    who: Option<SessionIdentity>,
    key: CatalogKey,
) -> PendingCatalog {
    Box::pin(async move {
        let max = shared.max_message();
        let login = super::upstream_login(&target, who.as_ref());
        let params = [("application_name", "portcullis catalog")];
        let up = upstream::connect(&target, login, &params, 0, max).await?;
        let rows = upstream::side_query(&up.stream, CATALOG_SQL, max).await;
        let mut terminate = Vec::new();
        crate::protocol::postgres::messages::encode_terminate(&mut terminate);
        let _ = up.stream.write_all(terminate).await;
        Ok(marked(&shared, &shared.masker(), &key, &rows?))
    })
}

/// A catalog that is a copy of `shared`'s, marked by the rules in force now (a reload may have
/// changed them since it was read).
pub fn remarked(masker: &Masker, catalog: &Catalog) -> Arc<Catalog> {
    let mut c = catalog.clone();
    masker.mark_catalog(&mut c);
    Arc::new(c)
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
    // This runs on every allowed statement: parse only a text that can name the setting, plainly
    // or (`U&"..."`) through escapes.
    let bytes = sql.as_bytes();
    let named = |at: usize, needle: &[u8]| {
        bytes
            .get(at..at + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    };
    let candidate = memchr::memchr2_iter(b's', b'S', bytes).any(|i| named(i, b"search_path"))
        || memchr::memchr_iter(b'&', bytes).any(|i| i > 0 && named(i - 1, b"u&"));
    if !candidate {
        return None;
    }
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
        assert_eq!(
            search_path_set("SET SEARCH_PATH TO app"),
            Some(vec!["app".to_owned()])
        );
        assert_eq!(search_path_set("SELECT 1 FROM t WHERE a = 'search'"), None);
    }
}
