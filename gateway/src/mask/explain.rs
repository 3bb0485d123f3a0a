//! `portcullis policy explain`, masking part: each output column's lineage and the mask that
//! applies to it, against a catalog described on the command line.

use serde::Serialize;

use super::Masker;
use super::config::Selector;
use super::lineage::{self, Catalog, SourceColumn};
use super::types;

/// One output column, explained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnExplanation {
    /// 1-based statement number in the text.
    pub statement: usize,
    pub column: String,
    pub lineage: String,
    pub mask: String,
}

impl Masker {
    /// Explains how each output column of `sql` is masked, given `catalog`.
    pub fn explain_columns(&self, catalog: &Catalog, sql: &str) -> Vec<ColumnExplanation> {
        let analysis = lineage::analyze(sql, catalog, catalog.search_path());
        let mut out = Vec::new();
        for (i, statement) in analysis.statements.iter().enumerate() {
            for col in &statement.columns {
                let verdict = if self.lineage_enabled() {
                    self.verdict(&col.lineage, catalog)
                } else {
                    super::Verdict::Clean
                };
                let by_name = self.engine.columns.iter().position(
                    |r| matches!(&r.selector, Selector::Name(g) if g.matches(col.name.as_bytes())),
                );
                let mask = match (&verdict, by_name) {
                    (super::Verdict::Clean, Some(rule)) => {
                        format!("mask.columns[{rule}] (by the output column's name)")
                    }
                    (super::Verdict::Clean, None) if !self.engine.scanner.is_empty() => {
                        "detectors only".to_owned()
                    }
                    (super::Verdict::Clean, None) => "none".to_owned(),
                    (v, _) => v.to_string(),
                };
                out.push(ColumnExplanation {
                    statement: i + 1,
                    column: if col.spread {
                        "* (columns not known by name)".to_owned()
                    } else {
                        col.name.clone()
                    },
                    lineage: lineage::describe(&col.lineage, catalog),
                    mask,
                });
            }
        }
        out
    }
}

/// A catalog from `--table 'schema.table(col type, ...)'` and `--view 'schema.view=SELECT ...'`
/// specs (schema defaults to `public`, type to `text`), with `masker`'s rules marked.
pub fn catalog_from_specs(
    masker: &Masker,
    tables: &[String],
    views: &[String],
) -> Result<Catalog, String> {
    let mut catalog = Catalog::default();
    catalog.set_search_path(vec!["public".into()]);
    let mut oid = 16384;
    let split_name = |name: &str| -> (String, String) {
        match name.trim().split_once('.') {
            Some((s, t)) => (s.trim().to_owned(), t.trim().to_owned()),
            None => ("public".to_owned(), name.trim().to_owned()),
        }
    };
    for spec in tables {
        let (name, cols) = spec
            .split_once('(')
            .and_then(|(n, rest)| Some((n, rest.trim_end().strip_suffix(')')?)))
            .ok_or_else(|| format!("--table {spec:?}: expected `schema.table(col type, ...)`"))?;
        let (schema, table) = split_name(name);
        oid += 1;
        for (i, col) in cols.split(',').enumerate() {
            let mut words = col.split_whitespace();
            let column = words
                .next()
                .ok_or_else(|| format!("--table {spec:?}: empty column"))?;
            let type_name = words.collect::<Vec<_>>().join(" ");
            let type_oid = if type_name.is_empty() {
                types::TEXT
            } else {
                types::oid_by_name(&type_name).ok_or_else(|| {
                    format!(
                        "--table {spec:?}: unknown type `{type_name}` (known: {})",
                        types::known_names()
                    )
                })?
            };
            catalog.add_column(SourceColumn {
                schema: schema.clone(),
                table: table.clone(),
                column: column.to_owned(),
                type_oid,
                table_oid: oid,
                attnum: i as i16 + 1,
            });
        }
    }
    for spec in views {
        let (name, sql) = spec
            .split_once('=')
            .ok_or_else(|| format!("--view {spec:?}: expected `schema.view=SELECT ...`"))?;
        let (schema, view) = split_name(name);
        let analysis = lineage::analyze(sql, &catalog, catalog.search_path());
        let cols = analysis
            .statements
            .first()
            .filter(|s| s.columns.iter().all(|c| !c.spread))
            .ok_or_else(|| format!("--view {spec:?}: its columns cannot be listed"))?
            .columns
            .clone();
        oid += 1;
        for (i, c) in cols.iter().enumerate() {
            catalog.add_column(SourceColumn {
                schema: schema.clone(),
                table: view.clone(),
                column: c.name.clone(),
                type_oid: 0,
                table_oid: oid,
                attnum: i as i16 + 1,
            });
        }
        catalog.set_view(&schema, &view, sql);
    }
    masker.mark_catalog(&mut catalog);
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskRules;

    #[test]
    fn explains_lineage_and_mask_per_column() {
        let m = Masker::new(&MaskRules::builtin_pii()).unwrap();
        let c = catalog_from_specs(
            &m,
            &["users(id int, name, ssn)".into()],
            &["v=SELECT ssn AS s FROM users".into()],
        )
        .unwrap();
        let ex = m.explain_columns(&c, "SELECT ssn AS x, upper(name), id, s FROM users, v");
        assert_eq!(ex[0].column, "x");
        assert_eq!(ex[0].lineage, "direct public.users.ssn");
        assert!(ex[0].mask.contains("mask.columns[3]"), "{ex:?}");
        assert!(ex[1].mask.contains("detectors"), "{ex:?}");
        assert!(ex[3].lineage.contains("public.users.ssn"), "{ex:?}");
        assert!(ex[3].mask.contains("mask.columns[3]"), "{ex:?}");
        assert!(catalog_from_specs(&m, &["bad".into()], &[]).is_err());
        assert!(
            catalog_from_specs(&m, &["t(a inett)".into()], &[])
                .unwrap_err()
                .contains("inett")
        );
    }
}

/// The masking part of `policy explain`: per output column, and what the gate refuses.
#[derive(Debug, Clone, Serialize)]
pub struct MaskingExplanation {
    pub columns: Vec<ColumnExplanation>,
    /// The rule and reason when masking makes the gate refuse the statement.
    pub refused: Option<(String, String)>,
}

impl MaskingExplanation {
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        if let Some((rule, reason)) = &self.refused {
            let _ = writeln!(s, "masking:     block (rule {rule}): {reason}");
        }
        for c in &self.columns {
            let _ = writeln!(
                s,
                "column {}.{}: {} <- {}; mask: {}",
                c.statement, c.column, c.column, c.lineage, c.mask
            );
        }
        s
    }
}

/// Loads `policy`'s masking rules and explains `sql` against the described catalog.
pub fn explain(
    policy: &str,
    tables: &[String],
    views: &[String],
    sql: &str,
) -> anyhow::Result<MaskingExplanation> {
    let (_, masker) = crate::daemon::load_policy(policy)?;
    let catalog = catalog_from_specs(&masker, tables, views).map_err(|e| anyhow::anyhow!(e))?;
    let mut session = lineage::SessionLineage::new(std::sync::Arc::new(catalog.clone()));
    let refused =
        crate::pipeline::lineage::refusal(&masker, &mut session, sql).map(|b| (b.rule, b.reason));
    Ok(MaskingExplanation {
        columns: masker.explain_columns(&catalog, sql),
        refused,
    })
}
