//! Rules that hold for derived values: a column rule matches the *source* columns an output column
//! is computed from (its [lineage](super::lineage)), not the output column's name.
//!
//! - a plain reference to a masked column keeps the rule's style;
//! - any other value computed from one is redacted whole (a partial style of a computed value
//!   means nothing);
//! - json built by a constructor from a row or object holding a masked column has the values under
//!   that key masked, and the rest of the document stays;
//! - a column of unknown lineage is redacted (the gate blocks it first under
//!   `mask.unknown_lineage = "block"`).

use std::sync::Arc;

use super::config::{Selector, Style};
use super::lineage::{Catalog, JsonShape, Lineage, SourceColumn, SourceRule, StatementOut};
use super::rows::{self, ColPlan, Column, ColumnOrigin, JsonKey, ResultPlan};
use super::types::{self, ValueKind};
use super::{CopyOptions, CopyPlan, Masker};

/// What lineage says about one output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No masked source: name and detector rules alone decide.
    Clean,
    /// A plain reference to a column `mask.columns[rule]` matches: that rule's style.
    Rule { rule: usize, style: Style },
    /// Computed from a column `mask.columns[rule]` matches: redacted whole.
    Derived { rule: usize },
    /// Json built from masked columns: the values under these keys are masked.
    JsonKeys {
        rule: usize,
        keys: Vec<(String, Style)>,
    },
    /// The sources cannot be known: redacted whole.
    Unknown(Arc<str>),
    /// Computed from a json column in a way that may lift a masked key's value out of its key:
    /// json output is walked with the key rules, anything else is redacted whole.
    /// `lifted`: a function that takes values out of their keys (`jsonb_each_text`).
    FromJson { lifted: bool },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Clean => f.write_str("no column rule (detectors only)"),
            Verdict::Rule { rule, style } => {
                write!(f, "mask.columns[{rule}], style {style:?}")
            }
            Verdict::Derived { rule } => {
                write!(f, "mask.columns[{rule}] on a derived value: redacted whole")
            }
            Verdict::JsonKeys { rule, keys } => {
                write!(f, "mask.columns[{rule}] inside json: keys ")?;
                for (i, (k, s)) in keys.iter().enumerate() {
                    write!(f, "{}{k:?} ({s:?})", if i > 0 { ", " } else { "" })?;
                }
                Ok(())
            }
            Verdict::Unknown(why) => write!(f, "mask.unknown_lineage: {why}"),
            Verdict::FromJson { .. } => {
                f.write_str("computed from a json column: json key rules, else redacted")
            }
        }
    }
}

impl Masker {
    /// The first column rule (file order) a catalog column matches: by its name, its table, or
    /// its type.
    pub fn source_rule(&self, col: &SourceColumn) -> Option<SourceRule> {
        self.engine
            .columns
            .iter()
            .enumerate()
            .find(|(_, r)| match &r.selector {
                Selector::Name(glob) => glob.matches(col.column.as_bytes()),
                Selector::TableColumn {
                    schema,
                    table,
                    column,
                } => {
                    col.table.eq_ignore_ascii_case(table)
                        && schema
                            .as_ref()
                            .is_none_or(|s| col.schema.eq_ignore_ascii_case(s))
                        && column.matches(col.column.as_bytes())
                }
                Selector::Type(oid) => *oid == col.type_oid,
            })
            .map(|(rule, r)| SourceRule {
                rule,
                style: r.style,
            })
    }

    /// The first name-glob rule matching a json key, when `mask.json_keys` is on.
    fn name_rule(&self, key: &[u8]) -> Option<usize> {
        self.engine.json_key_rule(key)?;
        self.engine
            .columns
            .iter()
            .position(|r| matches!(&r.selector, Selector::Name(g) if g.matches(key)))
    }

    /// Records in `catalog` which rule each of its columns matches.
    pub fn mark_catalog(&self, catalog: &mut Catalog) {
        catalog.mark_rules(|c| self.source_rule(c));
    }

    /// What the rules make of a value with this lineage.
    pub fn verdict(&self, l: &Lineage, catalog: &Catalog) -> Verdict {
        if let Some(why) = &l.unknown {
            return Verdict::Unknown(why.clone());
        }
        let Some(first) = l.sources.iter().find_map(|s| catalog.rule(*s)) else {
            // A value read out of a column by a key a name rule matches (`profile->>'ssn'`).
            if !l.sources.is_empty()
                && let Some(rule) = l.keys.iter().find_map(|k| self.name_rule(k.as_bytes()))
            {
                return Verdict::Derived { rule };
            }
            // Computed from a json column: its keys may name masked fields. A plain key lookup
            // (`->> 'nick'`) is clean; anything else keeps the json rules (json output) or goes.
            let from_json = !l.direct
                && self.engine.json_key_literals.is_some()
                && l.sources
                    .iter()
                    .any(|s| matches!(catalog.column(*s).type_oid, types::JSON | types::JSONB));
            let lifted = l.keys.iter().any(|k| &**k == "*");
            if from_json && (l.keys.is_empty() || lifted) {
                return Verdict::FromJson { lifted };
            }
            return Verdict::Clean;
        };
        if let Some(shape) = &l.json {
            let mut keys = Vec::new();
            if json_keys(shape, catalog, &mut keys) && !keys.is_empty() {
                return Verdict::JsonKeys {
                    rule: first.rule,
                    keys,
                };
            }
            return Verdict::Derived { rule: first.rule };
        }
        if l.direct {
            Verdict::Rule {
                rule: first.rule,
                style: first.style,
            }
        } else {
            Verdict::Derived { rule: first.rule }
        }
    }

    /// Plans a result set from its RowDescription and, when lineage is on, the lineage of the
    /// statement that produced it. Lineage only ever adds masking to what the column names and
    /// origins already ask for.
    pub fn plan_lineage(
        &self,
        cols: &[Column<'_>],
        lineage: Option<&StatementOut>,
        catalog: &Catalog,
    ) -> ResultPlan {
        let mut plan = self.plan_with_origin(cols, &|oid, attnum| {
            catalog
                .by_attnum(oid, attnum)
                .map(|id| origin(catalog.column(id)))
        });
        let Some(out) = lineage.filter(|_| self.lineage_enabled()) else {
            return plan;
        };
        let lineages = out.align(cols.len());
        plan.refine(|i, col| {
            let c = &cols[i];
            let kind = types::value_kind(c.type_oid, c.format != 0);
            let mut verdict = self.verdict(&lineages[i], catalog);
            // The server's own word on where a column comes from is a backstop for the analysis.
            if verdict == Verdict::Clean
                && let Some(rule) = catalog
                    .by_attnum(c.table_oid, c.attnum)
                    .and_then(|id| catalog.rule(id))
            {
                verdict = Verdict::Rule {
                    rule: rule.rule,
                    style: rule.style,
                };
            }
            apply(col, verdict, kind);
        });
        plan
    }

    /// Plans a `COPY ... TO STDOUT` from its CopyOutResponse and the statement's lineage: column
    /// names and types come from the catalog (or the query's output names), so no Describe is needed.
    pub fn copy_plan_lineage(
        &self,
        format: u8,
        column_formats: &[i16],
        out: &StatementOut,
        catalog: &Catalog,
        options: &CopyOptions,
    ) -> CopyPlan {
        let binary = format != 0;
        let n = column_formats.len();
        let lineages = out.align(n);
        let names: Vec<&str> = if out.columns.len() == n && out.columns.iter().all(|c| !c.spread) {
            out.columns.iter().map(|c| c.name.as_str()).collect()
        } else {
            vec![""; n]
        };
        let cols = lineages
            .iter()
            .zip(names)
            .map(|(l, name)| {
                let source =
                    (l.direct && l.sources.len() == 1).then(|| catalog.column(l.sources[0]));
                let type_oid = source.map_or(0, |s| s.type_oid);
                let kind = types::value_kind(type_oid, binary);
                let origin = source.map(origin);
                let mut col = rows::column_plan(
                    &self.engine,
                    kind,
                    name.as_bytes(),
                    type_oid,
                    origin.as_ref(),
                );
                let verdict = if self.lineage_enabled() {
                    self.verdict(l, catalog)
                } else {
                    Verdict::Clean
                };
                apply(&mut col, verdict, kind);
                col
            })
            .collect();
        self.copy_plan_from(binary, cols, options)
    }
}

fn origin(c: &SourceColumn) -> ColumnOrigin {
    ColumnOrigin {
        schema: c.schema.clone(),
        table: c.table.clone(),
        column: c.column.clone(),
    }
}

/// Tightens a column's plan by a lineage verdict (never loosens it).
fn apply(col: &mut ColPlan, verdict: Verdict, kind: ValueKind) {
    if matches!(col, ColPlan::Whole { .. }) {
        return;
    }
    *col = match verdict {
        Verdict::Clean => return,
        Verdict::Rule { style, .. } => ColPlan::Whole { style, kind },
        Verdict::JsonKeys { keys, .. }
            if matches!(kind, ValueKind::Json | ValueKind::JsonbBinary) =>
        {
            let keys: Vec<JsonKey> = keys.into_iter().map(|(k, s)| (k.into(), s)).collect();
            ColPlan::JsonKeys(kind, keys.into())
        }
        // Json, or json cast to text: walked with the key rules (text that is not json is redacted).
        Verdict::FromJson { lifted: false }
            if matches!(
                kind,
                ValueKind::Json | ValueKind::JsonbBinary | ValueKind::Text
            ) =>
        {
            let kind = if kind == ValueKind::Text {
                ValueKind::Json
            } else {
                kind
            };
            ColPlan::JsonKeys(kind, Arc::from(Vec::new()))
        }
        Verdict::JsonKeys { .. }
        | Verdict::Derived { .. }
        | Verdict::Unknown(_)
        | Verdict::FromJson { .. } => ColPlan::Whole {
            style: Style::Redact,
            kind,
        },
    };
}

/// The keys of a constructed json value whose values hold a masked column. False when a masked
/// value sits where no key names it (an array of masked scalars): the document is redacted whole.
fn json_keys(shape: &JsonShape, catalog: &Catalog, out: &mut Vec<(String, Style)>) -> bool {
    match shape {
        JsonShape::Object(entries) => {
            for (key, l) in entries {
                let rule = l.sources.iter().find_map(|s| catalog.rule(*s));
                if l.unknown.is_none() && rule.is_none() {
                    continue;
                }
                let nested_ok = match &l.json {
                    Some(inner) => json_keys(inner, catalog, out),
                    None => false,
                };
                if !nested_ok {
                    let style = match rule {
                        Some(r) if l.direct && l.unknown.is_none() => r.style,
                        _ => Style::Redact,
                    };
                    out.push((key.clone(), style));
                }
            }
            true
        }
        JsonShape::Array(elem) => match &elem.json {
            Some(inner) => json_keys(inner, catalog, out),
            None => {
                elem.unknown.is_none() && !elem.sources.iter().any(|s| catalog.rule(*s).is_some())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskRules;
    use crate::mask::lineage::{self, SourceColumn};

    fn setup() -> (Masker, Catalog) {
        let rules: MaskRules = toml::from_str(
            r#"
            [[columns]]
            name = "*ssn*"
            style = "partial"
            [[columns]]
            table = "public.users"
            column = "email"
            style = "keyed_hash"
            [[columns]]
            type = "inet"
            "#,
        )
        .unwrap();
        let masker = Masker::new(&rules).unwrap();
        let mut c = Catalog::default();
        for (i, (col, ty)) in [
            ("id", 23),
            ("email", 25),
            ("ssn", 25),
            ("ip", 869),
            ("name", 25),
        ]
        .into_iter()
        .enumerate()
        {
            c.add_column(SourceColumn {
                schema: "public".into(),
                table: "users".into(),
                column: col.into(),
                type_oid: ty,
                table_oid: 10,
                attnum: i as i16 + 1,
            });
        }
        c.set_search_path(vec!["public".into()]);
        masker.mark_catalog(&mut c);
        (masker, c)
    }

    fn verdicts(sql: &str) -> Vec<Verdict> {
        let (m, c) = setup();
        let a = lineage::analyze(sql, &c, c.search_path());
        a.statements[0]
            .columns
            .iter()
            .map(|col| m.verdict(&col.lineage, &c))
            .collect()
    }

    #[test]
    fn rules_match_the_source_not_the_name() {
        let v = verdicts("SELECT ssn AS a, email AS b, ip AS c, name AS ssn_like, id FROM users");
        assert_eq!(
            v[0],
            Verdict::Rule {
                rule: 0,
                style: Style::Partial
            }
        );
        assert_eq!(
            v[1],
            Verdict::Rule {
                rule: 1,
                style: Style::KeyedHash
            }
        );
        assert_eq!(
            v[2],
            Verdict::Rule {
                rule: 2,
                style: Style::Redact
            }
        );
        assert_eq!(
            v[3],
            Verdict::Clean,
            "the name rule on the output name is the plan's business"
        );
        assert_eq!(v[4], Verdict::Clean);
        let v = verdicts("SELECT upper(email), host(ip), id + 1 FROM users");
        assert_eq!(v[0], Verdict::Derived { rule: 1 });
        assert_eq!(v[1], Verdict::Derived { rule: 2 });
        assert_eq!(v[2], Verdict::Clean);
    }

    #[test]
    fn json_from_rows_masks_by_key() {
        let v = verdicts(
            "SELECT row_to_json(u), json_build_object('x', email, 'n', name), json_agg(u), \
             json_agg(ssn), row_to_json(u)::text FROM users u",
        );
        match &v[0] {
            Verdict::JsonKeys { keys, .. } => {
                let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(names, ["email", "ssn", "ip"]);
                assert_eq!(
                    keys[1].1,
                    Style::Partial,
                    "a plain reference keeps its style"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&v[1], Verdict::JsonKeys { keys, .. } if keys.len() == 1 && keys[0].0 == "x")
        );
        assert!(matches!(&v[2], Verdict::JsonKeys { keys, .. } if keys.len() == 3));
        assert_eq!(
            v[3],
            Verdict::Derived { rule: 0 },
            "an array of masked scalars"
        );
        assert_eq!(
            v[4],
            Verdict::Derived { rule: 1 },
            "json cast to text is a derivation"
        );
    }

    #[test]
    fn plans_tighten_and_never_loosen() {
        let (m, c) = setup();
        let a = lineage::analyze(
            "SELECT ssn AS a, upper(name), row_to_json(u) FROM users u",
            &c,
            c.search_path(),
        );
        let cols = [
            Column {
                name: b"a",
                table_oid: 10,
                attnum: 3,
                type_oid: 25,
                format: 0,
            },
            Column {
                name: b"upper",
                table_oid: 0,
                attnum: 0,
                type_oid: 25,
                format: 0,
            },
            Column {
                name: b"row_to_json",
                table_oid: 0,
                attnum: 0,
                type_oid: 114,
                format: 0,
            },
        ];
        let plan = m.plan_lineage(&cols, Some(&a.statements[0]), &c);
        let mut out = Vec::new();
        let mut body = 3u16.to_be_bytes().to_vec();
        let doc = br#"{"id":1,"email":"a@b.c","ssn":"123-45-6789","ip":"1.2.3.4","name":"al"}"#;
        for v in [&b"123-45-6789"[..], b"AL", doc] {
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v);
        }
        assert!(plan.mask_data_row(&body, &mut out).unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("123-45-6789") && !text.contains("a@b.c") && !text.contains("1.2.3.4"),
            "{text}"
        );
        assert!(text.contains("***-**-6789"), "partial style kept: {text}");
        assert!(
            text.contains(r#""name":"al""#),
            "the rest of the document stays: {text}"
        );
        assert!(text.contains("AL"), "upper(name) is clean: {text}");
        // Lineage off: the alias evades the name rule (what the differential test relies on).
        let off: MaskRules =
            toml::from_str("danger_disable_lineage = true\n[[columns]]\nname = \"*ssn*\"").unwrap();
        let m = Masker::new(&off).unwrap();
        let plan = m.plan_lineage(&cols[..1], Some(&a.statements[0]), &Catalog::default());
        assert!(plan.is_passthrough());
    }

    #[test]
    fn copy_plans_from_lineage_without_names_from_the_server() {
        let (m, c) = setup();
        let a = lineage::analyze("COPY users TO STDOUT", &c, c.search_path());
        let plan = m.copy_plan_lineage(0, &[0; 5], &a.statements[0], &c, &CopyOptions::text());
        let mut out = Vec::new();
        assert!(
            plan.mask_copy_data(b"1\ta@b.c\t123-45-6789\t1.2.3.4\tal\n", &mut out)
                .unwrap()
        );
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("a@b.c") && !text.contains("123-45-6789") && !text.contains("1.2.3.4"),
            "{text}"
        );
        assert!(text.contains("\tal\n"), "{text}");
        let a = lineage::analyze(
            "COPY (SELECT id, name FROM users) TO STDOUT",
            &c,
            c.search_path(),
        );
        let plan = m.copy_plan_lineage(0, &[0; 2], &a.statements[0], &c, &CopyOptions::text());
        assert!(plan.is_passthrough());
    }
}
