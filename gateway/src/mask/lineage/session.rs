//! A session's lineage state, and the catalog snapshots sessions share.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Analysis, Catalog, LineageCache, StatementOut};

/// What one session knows for lineage: its catalog snapshot, its analyses by statement text, and
/// the statement the server is answering now. Shared by the session's gate and result filter (one
/// thread).
#[derive(Debug)]
pub struct SessionLineage {
    catalog: Arc<Catalog>,
    path: Vec<String>,
    cache: LineageCache,
    /// The statement being answered, with the catalog it was analysed against: a catalog read
    /// again meanwhile must not reinterpret its column ids.
    current: Option<(Arc<Analysis>, usize, Arc<Catalog>)>,
}

/// Analyses kept per session.
const SESSION_CACHE: usize = 1024;

impl SessionLineage {
    pub fn new(catalog: Arc<Catalog>) -> SessionLineage {
        SessionLineage {
            path: catalog.search_path().to_vec(),
            catalog,
            cache: LineageCache::new(SESSION_CACHE),
            current: None,
        }
    }

    /// The catalog of the statement being answered (the session's, when none is).
    pub fn catalog(&self) -> &Catalog {
        self.current.as_ref().map_or(&self.catalog, |(_, _, c)| c)
    }

    /// A catalog read again (after DDL, its TTL, or a reload): later statements are analysed
    /// against it. The search path the session set stays.
    pub fn replace_catalog(&mut self, catalog: Arc<Catalog>) {
        self.catalog = catalog;
        self.cache.clear();
    }

    /// The analysis of `sql` (cached by its text).
    pub fn analysis(&mut self, sql: &str) -> Arc<Analysis> {
        self.cache.analysis(sql, &self.catalog, &self.path)
    }

    /// `SET search_path` changes how unqualified names resolve from now on.
    pub fn set_search_path(&mut self, path: Vec<String>) {
        if path != self.path {
            self.path = path;
            self.cache.clear();
        }
    }

    /// The statement being answered: its analysis, its index there, and the catalog it was
    /// analysed against (`None`: not known).
    pub fn current(&self) -> Option<&(Arc<Analysis>, usize, Arc<Catalog>)> {
        self.current.as_ref()
    }

    /// The statement the server answers now (`None`: not known).
    pub fn set_current(&mut self, sql: Option<&str>, index: usize) {
        self.current = sql.map(|sql| (self.analysis(sql), index, self.catalog.clone()));
    }

    /// The current statement's text was seen: its output columns. Unknown statement: everything
    /// is unknown when anything is masked.
    pub fn current_output(&self) -> Cow<'_, StatementOut> {
        match &self.current {
            Some((a, i, catalog)) => a.statement(*i, catalog),
            None => Cow::Owned(super::unknown_statement(&self.catalog)),
        }
    }

    /// Whether the current statement touches a relation holding a masked column (or one whose
    /// columns are unknown).
    pub fn current_touches_masked(&self) -> bool {
        match &self.current {
            Some((a, _, _)) => a.touches_masked,
            None => self.catalog.any_masked(),
        }
    }
}

/// (target, database, user).
type SnapshotKey = (String, String, String);

/// Catalog snapshots shared by sessions of one (target, database, user), for a TTL (the policy's
/// `mask.catalog_ttl`), dropped when a session runs DDL through the gateway.
#[derive(Debug, Default)]
pub struct CatalogCache {
    entries: Mutex<HashMap<SnapshotKey, (Instant, Arc<Catalog>)>>,
    /// Bumped by every invalidation, so that live sessions know their snapshot may be stale.
    generation: AtomicU64,
}

impl CatalogCache {
    /// The snapshot read at most `ttl` ago, with the time it was read.
    pub fn get(
        &self,
        target: &str,
        database: &str,
        user: &str,
        now: Instant,
        ttl: Duration,
    ) -> Option<(Instant, Arc<Catalog>)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (at, catalog) = entries.get(&(target.into(), database.into(), user.into()))?;
        (now.saturating_duration_since(*at) < ttl).then(|| (*at, catalog.clone()))
    }

    pub fn put(
        &self,
        (target, database, user): (&str, &str, &str),
        now: Instant,
        ttl: Duration,
        catalog: Arc<Catalog>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
        entries.insert(
            (target.into(), database.into(), user.into()),
            (now, catalog),
        );
    }

    /// DDL ran on `target`/`database`: every user's snapshot of it is stale.
    pub fn invalidate(&self, target: &str, database: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(t, d, _), _| !(t == target && d == database));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes whenever a snapshot is invalidated.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_expire_and_ddl_drops_them() {
        let cache = CatalogCache::default();
        let ttl = Duration::from_secs(10);
        let t0 = Instant::now();
        cache.put(("t", "db", "u"), t0, ttl, Arc::new(Catalog::default()));
        let nine = t0 + Duration::from_secs(9);
        assert_eq!(
            cache.get("t", "db", "u", nine, ttl).map(|(at, _)| at),
            Some(t0)
        );
        let ten = t0 + Duration::from_secs(10);
        assert!(cache.get("t", "db", "u", ten, ttl).is_none());
        assert!(cache.get("t", "db", "other", t0, ttl).is_none());
        let before = cache.generation();
        cache.invalidate("t", "db");
        assert!(cache.get("t", "db", "u", t0, ttl).is_none());
        assert_ne!(cache.generation(), before, "live sessions can tell");
    }

    #[test]
    fn an_unknown_statement_is_unknown_only_when_something_is_masked() {
        let s = SessionLineage::new(Arc::new(Catalog::default()));
        assert!(s.current_output().columns[0].lineage.unknown.is_none());
        assert!(!s.current_touches_masked());
    }
}
