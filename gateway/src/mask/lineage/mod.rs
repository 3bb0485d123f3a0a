//! Column lineage: for each output column of a statement, the source columns (schema.table.column)
//! it is computed from, and whether it is a plain reference to one of them. Pure: SQL text and a
//! [`Catalog`] snapshot in, [`Analysis`] out.
//!
//! Masking uses it so a rule follows the data rather than the output column's name: an alias, an
//! expression, a subquery, a CTE, a view, a set operation or a json constructor carries the source
//! columns along. Where the sources cannot be known (a relation missing from the snapshot, a view
//! that does not parse, dynamic SQL such as `query_to_xml`, a user-defined function, a statement the
//! parser cannot read that names a relation holding a masked column), the column's lineage is
//! *unknown*, and masking fails closed on it.

mod catalog;
mod session;
mod walk;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt as _};

use crate::policy::classify::numeric_shape_key;

pub use catalog::{CATALOG_SQL, Catalog, Relation, SourceColumn, SourceRule};
pub use session::{CatalogCache, SessionLineage};

/// An index into the [`Catalog`]'s columns.
pub type SourceId = u32;

/// Where one value comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Every source column the value is computed from (including those inside `json`), sorted.
    pub sources: Vec<SourceId>,
    /// A plain reference to a column (through aliases, subqueries, CTEs and views): the value is
    /// the source's value unchanged.
    pub direct: bool,
    /// Why the sources cannot be known, when they cannot.
    pub unknown: Option<Arc<str>>,
    /// The structure of a json value built by a json constructor, key by key.
    pub json: Option<Arc<JsonShape>>,
    /// Words of the string literals in the expression (`profile->>'ssn'`, `'{a,ssn}'`): keys it may
    /// read out of a json value, matched against name-glob rules.
    pub keys: Vec<Arc<str>>,
}

/// The structure of a constructed json value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonShape {
    /// An object with these keys (`row_to_json`, `json_build_object` with literal keys).
    Object(Vec<(String, Lineage)>),
    /// An array whose elements all have this lineage (`json_agg`).
    Array(Lineage),
}

impl Lineage {
    pub fn direct(id: SourceId) -> Lineage {
        Lineage {
            sources: vec![id],
            direct: true,
            ..Lineage::default()
        }
    }

    pub fn unknown(why: impl Into<Arc<str>>) -> Lineage {
        Lineage {
            unknown: Some(why.into()),
            ..Lineage::default()
        }
    }

    /// Adds `other`'s sources; the result is derived (not direct) and loses its json structure.
    pub fn absorb(&mut self, other: &Lineage) {
        for s in &other.sources {
            if let Err(at) = self.sources.binary_search(s) {
                self.sources.insert(at, *s);
            }
        }
        if self.unknown.is_none() {
            self.unknown.clone_from(&other.unknown);
        }
        for k in &other.keys {
            if !self.keys.contains(k) && self.keys.len() < MAX_KEYS {
                self.keys.push(k.clone());
            }
        }
        self.direct = false;
        self.json = None;
    }

    /// The same value, no longer a plain reference.
    pub fn derived(mut self) -> Lineage {
        self.direct = false;
        self.json = None;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.unknown.is_none()
    }
}

/// Literal words kept per value.
const MAX_KEYS: usize = 32;

/// One output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutColumn {
    pub name: String,
    pub lineage: Lineage,
    /// Stands for any number of columns (`*` over a relation whose columns are unknown, a statement
    /// whose output cannot be analysed): each of them has at most this lineage.
    pub spread: bool,
}

impl OutColumn {
    pub fn spread(lineage: Lineage) -> OutColumn {
        OutColumn {
            name: "*".into(),
            lineage,
            spread: true,
        }
    }
}

/// The output columns of one statement, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementOut {
    pub columns: Vec<OutColumn>,
}

impl StatementOut {
    /// The lineage of each of a result's `n` columns. A single spread entry absorbs the columns
    /// the others do not account for; when the counts cannot be reconciled every column gets the
    /// union of everything (never less masking than the truth).
    pub fn align(&self, n: usize) -> Vec<Lineage> {
        let spreads = self.columns.iter().filter(|c| c.spread).count();
        let fixed = self.columns.len() - spreads;
        if spreads == 0 && fixed == n {
            return self.columns.iter().map(|c| c.lineage.clone()).collect();
        }
        if spreads == 1 && fixed <= n {
            let mut out = Vec::with_capacity(n);
            for c in &self.columns {
                if c.spread {
                    out.extend(std::iter::repeat_n(c.lineage.clone(), n - fixed));
                } else {
                    out.push(c.lineage.clone());
                }
            }
            return out;
        }
        let mut all = Lineage::default();
        for c in &self.columns {
            all.absorb(&c.lineage);
        }
        vec![all; n]
    }
}

/// The lineage of every statement of a query text, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analysis {
    pub statements: Vec<StatementOut>,
    /// The text names a relation holding a masked column, or one whose columns are unknown
    /// (anywhere: a WHERE clause counts). Error texts of such statements lose quoted values.
    pub touches_masked: bool,
    /// The rule a `pg_notify` payload or channel derived from a masked column falls under
    /// (`mask.columns[i]`, or `mask.unknown_lineage`).
    pub notify_masked: Option<String>,
}

impl Analysis {
    /// The output of the `index`th statement; past the end (the server ran more statements than the
    /// parser saw), everything is unknown when anything is masked.
    pub fn statement(&self, index: usize, catalog: &Catalog) -> Cow<'_, StatementOut> {
        match self.statements.get(index) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(unknown_statement(catalog)),
        }
    }

    /// A reason to refuse the statement under `unknown_lineage = "block"`: the first output column
    /// of unknown lineage, or a derived one of a masked source that passed through an unknown
    /// function.
    pub fn first_unknown(&self) -> Option<(usize, &OutColumn)> {
        self.statements.iter().enumerate().find_map(|(i, s)| {
            s.columns
                .iter()
                .find(|c| c.lineage.unknown.is_some())
                .map(|c| (i, c))
        })
    }
}

/// The output of a statement the gateway could not see: unknown when anything is masked.
pub fn unknown_statement(catalog: &Catalog) -> StatementOut {
    let lineage = if catalog.any_masked() {
        Lineage::unknown("a result the gateway cannot pair with a statement text")
    } else {
        Lineage::default()
    };
    StatementOut {
        columns: vec![OutColumn::spread(lineage)],
    }
}

/// Computes the lineage of every statement in `sql`.
pub fn analyze(sql: &str, catalog: &Catalog, search_path: &[String]) -> Analysis {
    walk::analyze(sql, catalog, search_path)
}

/// Renders a lineage for operators (`portcullis policy explain`).
pub fn describe(lineage: &Lineage, catalog: &Catalog) -> String {
    let mut s = String::new();
    if let Some(why) = &lineage.unknown {
        let _ = write!(s, "unknown ({why})");
        return s;
    }
    if lineage.sources.is_empty() {
        return "no source column".into();
    }
    s.push_str(if lineage.direct {
        "direct "
    } else {
        "derived from "
    });
    for (i, id) in lineage.sources.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{}", catalog.column(*id));
    }
    if lineage.json.is_some() {
        s.push_str(" (json, masked by key)");
    }
    s
}

/// Bounded cache of analyses by exact statement text, for one catalog snapshot (a new snapshot
/// starts a new cache). Owned by one session; the statement text is the key because lineage can
/// depend on literals (`json_build_object('ssn', ...)` keys).
#[derive(Debug, Default)]
pub struct LineageCache {
    /// By statement shape where numbers can be told apart from the rest, else by text.
    map: HashMap<Arc<str>, Arc<Analysis>>,
    capacity: usize,
    key: String,
    /// The text asked for last and its analysis: a prepared statement's executions, and a
    /// client repeating a query, ask for one text again and again, and comparing it costs less
    /// than its shape key and a hash of that.
    last_text: String,
    last: Option<Arc<Analysis>>,
}

/// Texts longer than this are not kept as [`LineageCache`]'s last text.
const MAX_LAST_TEXT: usize = 1024;

/// Texts longer than this are analysed every time instead of filling the cache.
const MAX_CACHED_TEXT: usize = 16 * 1024;

impl LineageCache {
    pub fn new(capacity: usize) -> LineageCache {
        LineageCache {
            map: HashMap::new(),
            capacity: capacity.max(1),
            key: String::new(),
            last_text: String::new(),
            last: None,
        }
    }

    /// The analysis of `sql`. Texts that differ only in numeric literals share one: a number
    /// decides no column's sources. Except as a json or array subscript (`-> 0`, `[1]`), where it
    /// picks a path, so such texts are keyed whole.
    pub fn analysis(&mut self, sql: &str, catalog: &Catalog, path: &[String]) -> Arc<Analysis> {
        if let Some(a) = &self.last
            && self.last_text == sql
        {
            return a.clone();
        }
        let a = self.analysis_by_key(sql, catalog, path);
        self.last = (sql.len() <= MAX_LAST_TEXT).then(|| {
            self.last_text.clear();
            self.last_text.push_str(sql);
            a.clone()
        });
        a
    }

    fn analysis_by_key(&mut self, sql: &str, catalog: &Catalog, path: &[String]) -> Arc<Analysis> {
        let key = if !has_subscript(sql) && numeric_shape_key(sql, &mut self.key) {
            self.key.as_str()
        } else {
            sql
        };
        if let Some(a) = self.map.get(key) {
            return a.clone();
        }
        let cacheable = key.len() <= MAX_CACHED_TEXT;
        let shared = cacheable.then(|| catalog.shared_analysis(path, key));
        let a = match shared.flatten() {
            Some(a) => a,
            None => {
                let a = Arc::new(analyze(sql, catalog, path));
                if cacheable {
                    catalog.share_analysis(path, key, &a);
                }
                a
            }
        };
        if cacheable {
            if self.map.len() >= self.capacity {
                // Statement shapes of one session are few; when they are not, start over.
                self.map.clear();
            }
            self.map.insert(key.into(), a.clone());
        }
        a
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.last = None;
    }
}

/// Whether `sql` holds `->`, `#>` or `[` anywhere, in one pass.
fn has_subscript(sql: &str) -> bool {
    let b = sql.as_bytes();
    memchr::memchr2_iter(b'>', b'[', b)
        .any(|i| b[i] == b'[' || (i > 0 && matches!(b[i - 1], b'-' | b'#')))
}
