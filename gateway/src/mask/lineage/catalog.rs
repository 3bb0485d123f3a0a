//! The catalog snapshot lineage resolves names against: relations and their columns (behind `*`
//! and `t.*`), view definitions, user-defined functions, the search_path, and which source columns
//! a mask rule matches.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use super::{Analysis, SourceId};

/// One catalog query, so a snapshot costs one round trip. Row kinds: `c` a column (relation OID,
/// attnum, schema, relation, column, type OID, relkind), `v` a view's definition, `f` a
/// user-defined function, `s` a schema of the search_path (in order).
pub const CATALOG_SQL: &str = "SELECT 'c', c.oid::text, a.attnum::text, n.nspname::text, \
    c.relname::text, a.attname::text, a.atttypid::text, c.relkind::text, NULL::text \
    FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f') \
    AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    UNION ALL SELECT 'v', c.oid::text, NULL, n.nspname::text, c.relname::text, NULL, NULL, \
    c.relkind::text, pg_catalog.pg_get_viewdef(c.oid) \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    UNION ALL SELECT DISTINCT 'f', NULL, NULL, n.nspname::text, p.proname::text, NULL, NULL, NULL, NULL \
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
    UNION ALL SELECT 's', s.i::text, NULL, s.n::text, NULL, NULL, NULL, NULL, NULL \
    FROM unnest(pg_catalog.current_schemas(false)) WITH ORDINALITY AS s(n, i)";

/// A column of a relation, as the catalog names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub schema: String,
    pub table: String,
    pub column: String,
    pub type_oid: u32,
    pub table_oid: u32,
    pub attnum: i16,
}

impl std::fmt::Display for SourceColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// The mask rule a source column matches: its index in `[[mask.columns]]` and its style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRule {
    pub rule: usize,
    pub style: crate::mask::Style,
}

#[derive(Debug, Clone, Default)]
pub struct Relation {
    pub columns: Vec<SourceId>,
    /// The definition of a view or materialized view.
    pub view_sql: Option<String>,
}

/// An immutable snapshot of what lineage needs from the upstream catalog.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    columns: Vec<SourceColumn>,
    relations: HashMap<(String, String), Relation>,
    by_attnum: HashMap<(u32, i16), SourceId>,
    user_functions: HashSet<String>,
    search_path: Vec<String>,
    rules: Vec<Option<SourceRule>>,
    /// Lower-cased names of relations holding a masked column, for statements that cannot be parsed.
    masked_relations: Vec<String>,
    /// The catalog could not be read: every relation is unknown.
    unavailable: bool,
    /// Analyses made against this snapshot by any session holding it.
    analyses: SharedAnalyses,
}

/// Analyses by search path, then by the key a session's [`LineageCache`](super::LineageCache)
/// gives them. A snapshot is shared by every session of one target, database and user, so a new
/// session's statements need no parse when another session has seen their shape: agents that
/// connect per task run the same few statements again and again.
#[derive(Default)]
struct SharedAnalyses(Mutex<HashMap<Vec<String>, AnalysesByKey>>);

type AnalysesByKey = HashMap<Arc<str>, Arc<Analysis>>;

/// Shapes kept per snapshot; past this the memo starts over.
const SHARED_ANALYSES: usize = 4096;

impl SharedAnalyses {
    /// Forgets everything: the snapshot changed under the analyses.
    fn clear(&mut self) {
        if let Ok(map) = self.0.get_mut() {
            map.clear();
        }
    }
}

/// A copy is made to be changed (marked again after a reload): it starts with no analyses.
impl Clone for SharedAnalyses {
    fn clone(&self) -> Self {
        SharedAnalyses::default()
    }
}

impl fmt::Debug for SharedAnalyses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAnalyses")
    }
}

impl Catalog {
    /// A snapshot for when the catalog could not be read: masking fails closed on every column.
    pub fn unavailable() -> Catalog {
        Catalog {
            unavailable: true,
            ..Catalog::default()
        }
    }

    /// Builds a snapshot from the rows of [`CATALOG_SQL`] (text values, NULL as `None`).
    /// Malformed rows are skipped: a relation missing from the snapshot is treated as unknown.
    pub fn from_rows(rows: &[Vec<Option<String>>]) -> Catalog {
        let mut cat = Catalog::default();
        let mut cols: Vec<(i16, SourceColumn)> = Vec::new();
        let mut views = Vec::new();
        let mut path: Vec<(u32, String)> = Vec::new();
        for row in rows {
            let field = |i: usize| row.get(i).and_then(|v| v.as_deref());
            match field(0) {
                Some("c") => {
                    let (Some(oid), Some(att), Some(s), Some(t), Some(c), Some(ty)) = (
                        field(1).and_then(|v| v.parse().ok()),
                        field(2).and_then(|v| v.parse().ok()),
                        field(3),
                        field(4),
                        field(5),
                        field(6).and_then(|v| v.parse().ok()),
                    ) else {
                        continue;
                    };
                    cols.push((
                        att,
                        SourceColumn {
                            schema: s.to_owned(),
                            table: t.to_owned(),
                            column: c.to_owned(),
                            type_oid: ty,
                            table_oid: oid,
                            attnum: att,
                        },
                    ));
                }
                Some("v") => {
                    if let (Some(s), Some(t), Some(def)) = (field(3), field(4), field(8)) {
                        views.push((s.to_owned(), t.to_owned(), def.to_owned()));
                    }
                }
                Some("f") => {
                    if let Some(name) = field(4) {
                        cat.user_functions.insert(name.to_owned());
                    }
                }
                Some("s") => {
                    if let (Some(i), Some(s)) = (field(1).and_then(|v| v.parse().ok()), field(3)) {
                        path.push((i, s.to_owned()));
                    }
                }
                _ => {}
            }
        }
        cols.sort_by_key(|c| (c.1.table_oid, c.0));
        for (_, col) in cols {
            cat.add_column(col);
        }
        for (s, t, def) in views {
            if let Some(rel) = cat.relations.get_mut(&(s, t)) {
                rel.view_sql = Some(def);
            }
        }
        path.sort();
        cat.search_path = path.into_iter().map(|(_, s)| s).collect();
        cat
    }

    /// Appends a column to its relation (in attnum order); returns its id.
    pub fn add_column(&mut self, col: SourceColumn) -> SourceId {
        self.analyses.clear();
        let id = self.columns.len() as SourceId;
        self.by_attnum.insert((col.table_oid, col.attnum), id);
        self.relations
            .entry((col.schema.clone(), col.table.clone()))
            .or_default()
            .columns
            .push(id);
        self.columns.push(col);
        self.rules.push(None);
        id
    }

    /// Sets a relation's view definition (tests and [`from_rows`](Catalog::from_rows)).
    pub fn set_view(&mut self, schema: &str, name: &str, sql: &str) {
        self.analyses.clear();
        if let Some(rel) = self
            .relations
            .get_mut(&(schema.to_owned(), name.to_owned()))
        {
            rel.view_sql = Some(sql.to_owned());
        }
    }

    pub fn add_user_function(&mut self, name: &str) {
        self.analyses.clear();
        self.user_functions.insert(name.to_owned());
    }

    pub fn set_search_path(&mut self, path: Vec<String>) {
        self.analyses.clear();
        self.search_path = path;
    }

    pub fn search_path(&self) -> &[String] {
        &self.search_path
    }

    /// Records which rule each source column matches (`rule_of` gets the column, returns the
    /// first matching rule), and which relations hold a masked column.
    pub fn mark_rules(&mut self, rule_of: impl Fn(&SourceColumn) -> Option<SourceRule>) {
        self.analyses.clear();
        let mut masked = HashSet::new();
        for (id, col) in self.columns.iter().enumerate() {
            self.rules[id] = rule_of(col);
            if self.rules[id].is_some() {
                masked.insert(col.table.to_ascii_lowercase());
            }
        }
        self.masked_relations = masked.into_iter().collect();
        self.masked_relations.sort();
    }

    /// An analysis another session made of `key` under `path`.
    pub(super) fn shared_analysis(&self, path: &[String], key: &str) -> Option<Arc<Analysis>> {
        let map = self.analyses.0.lock().ok()?;
        map.get(path)?.get(key).cloned()
    }

    /// Offers an analysis to the other sessions holding this snapshot.
    pub(super) fn share_analysis(&self, path: &[String], key: &str, analysis: &Arc<Analysis>) {
        let Ok(mut map) = self.analyses.0.lock() else {
            return;
        };
        if map.values().map(HashMap::len).sum::<usize>() >= SHARED_ANALYSES {
            map.clear();
        }
        let by_key = match map.get_mut(path) {
            Some(by_key) => by_key,
            None => map.entry(path.to_vec()).or_default(),
        };
        by_key.insert(key.into(), analysis.clone());
    }

    pub fn column(&self, id: SourceId) -> &SourceColumn {
        &self.columns[id as usize]
    }

    pub fn rule(&self, id: SourceId) -> Option<SourceRule> {
        self.rules.get(id as usize).copied().flatten()
    }

    pub fn any_masked(&self) -> bool {
        self.unavailable || !self.masked_relations.is_empty()
    }

    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    pub fn masked_relations(&self) -> &[String] {
        &self.masked_relations
    }

    /// The source column a RowDescription field names by (table OID, attnum).
    pub fn by_attnum(&self, table_oid: u32, attnum: i16) -> Option<SourceId> {
        self.by_attnum.get(&(table_oid, attnum)).copied()
    }

    pub fn relation(&self, schema: &str, name: &str) -> Option<&Relation> {
        self.relations.get(&(schema.to_owned(), name.to_owned()))
    }

    /// An unqualified relation name through `search_path` (first schema that has it).
    pub fn resolve<'a>(
        &'a self,
        path: &'a [String],
        name: &str,
    ) -> Option<(&'a str, &'a Relation)> {
        path.iter().find_map(|schema| {
            self.relations
                .get(&(schema.clone(), name.to_owned()))
                .map(|r| (schema.as_str(), r))
        })
    }

    pub fn is_user_function(&self, name: &str) -> bool {
        self.user_functions.contains(name)
    }
}
