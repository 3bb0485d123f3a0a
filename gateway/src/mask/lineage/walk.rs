//! The walk over sqlparser's tree that computes lineage, scope by scope.

use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    CopySource, Expr, FromTable, Function, FunctionArg, FunctionArgExpr, FunctionArguments, Ident,
    JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, Query, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, Statement, TableAlias, TableFactor, TableObject,
    TableWithJoins, UpdateTableFromKind, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{Analysis, Catalog, JsonShape, Lineage, OutColumn, StatementOut};

/// Nesting deeper than this (views of views, subqueries in subqueries) is unknown lineage.
const MAX_DEPTH: usize = 32;

/// Functions that run SQL given as text, or read a relation named by a value: what they return
/// cannot be traced to columns.
const DYNAMIC_SQL: &[&str] = &[
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "cursor_to_xml",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xml_and_xmlschema",
    "dblink",
    "dblink_exec",
    "dblink_get_result",
    "pg_stat_get_activity",
];

/// System relations whose rows hold values of user columns (statistics samples, statement texts).
const LEAKY_SYSTEM_RELATIONS: &[&str] = &[
    "pg_stats",
    "pg_statistic",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic_ext_data",
    "pg_stat_activity",
    "pg_stat_statements",
    "pg_prepared_statements",
    "pg_cursors",
    "pg_largeobject",
];

pub(super) fn analyze(sql: &str, catalog: &Catalog, path: &[String]) -> Analysis {
    let mut w = Walker {
        catalog,
        path,
        ctes: Vec::new(),
        depth: 0,
        notify: Lineage::default(),
    };
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => {
            let outputs = statements.iter().map(|s| w.statement(s)).collect();
            let touches_masked =
                catalog.any_masked() && statements.iter().any(|s| w.touches_masked(s));
            let notify_masked = if let Some(why) = &w.notify.unknown {
                Some(format!("mask.unknown_lineage ({why})"))
            } else {
                w.notify
                    .sources
                    .iter()
                    .find_map(|s| catalog.rule(*s))
                    .map(|r| format!("mask.columns[{}]", r.rule))
            };
            Analysis {
                statements: outputs,
                touches_masked,
                notify_masked,
            }
        }
        Err(_) => {
            let lower = sql.to_ascii_lowercase();
            let touched = catalog
                .masked_relations()
                .iter()
                .find(|t| mentions(&lower, t));
            let lineage = match touched {
                Some(t) => Lineage::unknown(format!(
                    "the statement cannot be parsed and names {t}, which holds a masked column"
                )),
                None if catalog.is_unavailable() => Lineage::unknown(
                    "the statement cannot be parsed and the catalog is unavailable",
                ),
                None => Lineage::default(),
            };
            let touched = touched.is_some() || catalog.is_unavailable();
            Analysis {
                touches_masked: touched,
                notify_masked: touched.then(|| "mask.unknown_lineage".to_owned()),
                statements: vec![StatementOut {
                    columns: vec![OutColumn::spread(lineage)],
                }],
            }
        }
    }
}

/// Whether `word` occurs in `text` as an identifier (not inside a longer one).
fn mentions(text: &str, word: &str) -> bool {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    text.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| text.as_bytes()[i]);
        let after = text.as_bytes().get(at + word.len()).copied();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Identifiers as PostgreSQL folds them: unquoted to lower case, quoted exactly.
fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

fn name_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => fold(i),
            other => other.to_string(),
        })
        .collect()
}

/// The columns of a relation in scope.
#[derive(Debug, Clone)]
enum Cols {
    Known(Vec<(String, Lineage)>),
    /// Columns not known by name or number; each has at most this lineage.
    Opaque(Lineage),
}

#[derive(Debug, Clone)]
struct Rel {
    /// The name it is referred to by (alias, or the relation's own name).
    name: String,
    schema: Option<String>,
    cols: Cols,
}

impl Rel {
    /// The whole row as one value (`u`, `u.*` in an expression), with its structure for json.
    fn whole_row(&self) -> Lineage {
        match &self.cols {
            Cols::Known(cols) => {
                let mut l = Lineage::default();
                for (_, c) in cols {
                    l.absorb(c);
                }
                l.json = Some(Arc::new(JsonShape::Object(cols.clone())));
                l
            }
            Cols::Opaque(l) => l.clone().derived(),
        }
    }
}

#[derive(Debug, Default)]
struct Scope<'p> {
    rels: Vec<Rel>,
    /// A `*` over these relations cannot be counted column by column (`USING`, `NATURAL` joins).
    merged_columns: bool,
    parent: Option<&'p Scope<'p>>,
}

struct Walker<'c> {
    catalog: &'c Catalog,
    path: &'c [String],
    /// CTEs visible here, innermost last.
    ctes: Vec<(String, Vec<OutColumn>)>,
    depth: usize,
    /// Everything `pg_notify` was given.
    notify: Lineage,
}

impl Walker<'_> {
    /// Whether any relation the statement names (anywhere in it) holds a masked column or has
    /// columns the catalog does not know.
    fn touches_masked(&mut self, s: &Statement) -> bool {
        let mut ctes = Vec::new();
        let _ = s.visit(&mut CteNames(&mut ctes));
        let mut names = Vec::new();
        let _ = sqlparser::ast::visit_relations(s, |name| {
            names.push(name_parts(name));
            ControlFlow::<()>::Continue(())
        });
        names.iter().any(|parts| {
            if parts.len() == 1 && ctes.contains(&parts[0]) {
                return false;
            }
            let saved = std::mem::take(&mut self.ctes);
            let rel = self.named_relation(parts);
            self.ctes = saved;
            match &rel.cols {
                Cols::Known(cols) => cols.iter().any(|(_, l)| {
                    l.unknown.is_some() || l.sources.iter().any(|s| self.catalog.rule(*s).is_some())
                }),
                Cols::Opaque(l) => l.unknown.is_some(),
            }
        })
    }

    fn unknown(&self, why: impl FnOnce() -> String) -> Lineage {
        if self.catalog.any_masked() {
            Lineage::unknown(why())
        } else {
            Lineage::default()
        }
    }

    fn statement(&mut self, s: &Statement) -> StatementOut {
        let columns = match s {
            Statement::Query(q) => self.query(q, None),
            Statement::Insert(ins) => match &ins.returning {
                None => Vec::new(),
                Some(items) => {
                    let TableObject::TableName(name) = &ins.table else {
                        return StatementOut {
                            columns: spread(self.unknown(|| "INSERT into a table function".into())),
                        };
                    };
                    let mut rel = self.table(name, None);
                    if let Some(alias) = &ins.table_alias {
                        rel.name = fold(alias);
                    }
                    // RETURNING gives back what was inserted: each target column carries the
                    // lineage of the value written into it.
                    if let (Cols::Known(cols), Some(src)) = (&mut rel.cols, &ins.source) {
                        let values = self.query(src, None);
                        let targets: Vec<usize> = if ins.columns.is_empty() {
                            (0..cols.len()).collect()
                        } else {
                            ins.columns
                                .iter()
                                .filter_map(|c| {
                                    let c = fold(c);
                                    cols.iter().position(|(n, _)| *n == c)
                                })
                                .collect()
                        };
                        let aligned = StatementOut { columns: values }.align(targets.len());
                        for (t, v) in targets.iter().zip(&aligned) {
                            if !v.is_empty() {
                                cols[*t].1.absorb(v);
                            }
                        }
                    }
                    let scope = Scope {
                        rels: vec![rel],
                        ..Scope::default()
                    };
                    self.projection(items, &scope)
                }
            },
            Statement::Update {
                table,
                assignments,
                from,
                returning: Some(items),
                ..
            } => {
                let mut scope = Scope::default();
                self.add_from_item(table, &mut scope);
                if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) =
                    from
                {
                    for t in f {
                        self.add_from_item(t, &mut scope);
                    }
                }
                // The new values flow into the updated columns that RETURNING reads.
                let mut updates = Vec::new();
                for a in assignments {
                    let value = self.expr(&a.value, &scope);
                    if let sqlparser::ast::AssignmentTarget::ColumnName(n) = &a.target
                        && let Some(col) = name_parts(n).pop()
                    {
                        updates.push((col, value));
                    }
                }
                if let Some(Cols::Known(cols)) = scope.rels.first_mut().map(|r| &mut r.cols) {
                    for (col, value) in updates {
                        if let Some(c) = cols.iter_mut().find(|(n, _)| *n == col)
                            && !value.is_empty()
                        {
                            c.1.absorb(&value);
                        }
                    }
                }
                self.projection(items, &scope)
            }
            Statement::Delete(del) => match &del.returning {
                None => Vec::new(),
                Some(items) => {
                    let mut scope = Scope::default();
                    let (FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f)) = &del.from;
                    for t in f.iter().chain(del.using.iter().flatten()) {
                        self.add_from_item(t, &mut scope);
                    }
                    self.projection(items, &scope)
                }
            },
            Statement::Copy { source, .. } => match source {
                CopySource::Query(q) => self.query(q, None),
                CopySource::Table {
                    table_name,
                    columns,
                } => {
                    let rel = self.table(table_name, None);
                    match rel.cols {
                        Cols::Known(cols) if columns.is_empty() => named(cols),
                        Cols::Known(cols) => columns
                            .iter()
                            .map(|c| {
                                let c = fold(c);
                                let l = cols
                                    .iter()
                                    .find(|(n, _)| *n == c)
                                    .map(|(_, l)| l.clone())
                                    .unwrap_or_else(|| {
                                        self.unknown(|| format!("column {c} is not in the catalog"))
                                    });
                                OutColumn {
                                    name: c,
                                    lineage: l,
                                    spread: false,
                                }
                            })
                            .collect(),
                        Cols::Opaque(l) => vec![OutColumn::spread(l)],
                    }
                }
            },
            // Rows of a cursor or a prepared statement declared elsewhere, or a procedure's OUT
            // parameters: not traceable from this text.
            Statement::Fetch { .. } | Statement::Execute { .. } | Statement::Call(_) => {
                vec![OutColumn::spread(self.unknown(|| {
                    "rows of a cursor, prepared statement or procedure".into()
                }))]
            }
            Statement::Declare { .. } => Vec::new(),
            // SHOW, EXPLAIN and the like: output that holds no column values.
            _ => vec![OutColumn::spread(Lineage::default())],
        };
        StatementOut { columns }
    }

    fn query(&mut self, q: &Query, outer: Option<&Scope<'_>>) -> Vec<OutColumn> {
        if self.depth >= MAX_DEPTH {
            return spread(self.unknown(|| "nesting too deep to follow".into()));
        }
        self.depth += 1;
        let pushed = self.ctes.len();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                let name = fold(&cte.alias.name);
                let cols = if with.recursive {
                    self.recursive_cte(&name, &cte.query, &cte.alias, outer)
                } else {
                    let cols = self.query(&cte.query, outer);
                    rename(cols, &cte.alias)
                };
                self.ctes.push((name, cols));
            }
        }
        let out = self.set_expr(&q.body, outer);
        self.ctes.truncate(pushed);
        self.depth -= 1;
        out
    }

    /// A recursive CTE refers to itself: iterate until its columns' lineage stops growing.
    fn recursive_cte(
        &mut self,
        name: &str,
        query: &Query,
        alias: &TableAlias,
        outer: Option<&Scope<'_>>,
    ) -> Vec<OutColumn> {
        // The first pass sees the CTE as empty-lineage columns of unknown number.
        self.ctes
            .push((name.to_owned(), vec![OutColumn::spread(Lineage::default())]));
        let mut cols = rename(self.query(query, outer), alias);
        for _ in 0..8 {
            self.ctes.last_mut().expect("pushed above").1 = cols.clone();
            let next = rename(self.query(query, outer), alias);
            let merged = merge_columns(&cols, &next);
            if merged == cols {
                break;
            }
            cols = merged;
        }
        self.ctes.pop();
        cols
    }

    fn set_expr(&mut self, body: &SetExpr, outer: Option<&Scope<'_>>) -> Vec<OutColumn> {
        match body {
            SetExpr::Select(s) => {
                let mut scope = Scope {
                    parent: outer,
                    ..Scope::default()
                };
                for t in &s.from {
                    self.add_from_item(t, &mut scope);
                }
                // Filters produce no output, but may call pg_notify or dynamic SQL.
                for e in s.selection.iter().chain(&s.having) {
                    let _ = self.generic(e, &scope);
                }
                self.projection(&s.projection, &scope)
            }
            SetExpr::Query(q) => self.query(q, outer),
            SetExpr::SetOperation { left, right, .. } => {
                let l = self.set_expr(left, outer);
                let r = self.set_expr(right, outer);
                merge_columns(&l, &r)
            }
            SetExpr::Values(v) => {
                let scope = Scope {
                    parent: outer,
                    ..Scope::default()
                };
                let mut cols: Vec<OutColumn> = Vec::new();
                for row in &v.rows {
                    for (i, e) in row.iter().enumerate() {
                        let l = self.expr(e, &scope);
                        match cols.get_mut(i) {
                            Some(c) => {
                                if !l.is_empty() {
                                    c.lineage.absorb(&l)
                                }
                            }
                            None => cols.push(OutColumn {
                                name: format!("column{}", i + 1),
                                lineage: l,
                                spread: false,
                            }),
                        }
                    }
                }
                cols
            }
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                self.statement(s).columns
            }
            SetExpr::Table(t) => {
                let Some(name) = &t.table_name else {
                    return spread(self.unknown(|| "TABLE without a name".into()));
                };
                let object = ObjectName::from(
                    t.schema_name
                        .iter()
                        .map(|s| Ident::new(s.clone()))
                        .chain(std::iter::once(Ident::new(name.clone())))
                        .collect::<Vec<_>>(),
                );
                rel_columns(self.table(&object, None))
            }
        }
    }

    fn projection(&mut self, items: &[SelectItem], scope: &Scope<'_>) -> Vec<OutColumn> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e) => out.push(OutColumn {
                    name: output_name(e),
                    lineage: self.expr(e, scope),
                    spread: false,
                }),
                SelectItem::ExprWithAlias { expr, alias } => out.push(OutColumn {
                    name: fold(alias),
                    lineage: self.expr(expr, scope),
                    spread: false,
                }),
                SelectItem::Wildcard(_) => {
                    if scope.merged_columns {
                        let mut all = Lineage::default();
                        for r in &scope.rels {
                            all.absorb(&r.whole_row());
                        }
                        out.push(OutColumn::spread(all));
                    } else {
                        for r in &scope.rels {
                            out.extend(rel_columns(r.clone()));
                        }
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(name) => {
                        match find_rel(scope, &name_parts(name)) {
                            Some(r) => out.extend(rel_columns(r.clone())),
                            None => out.push(OutColumn::spread(
                                self.unknown(|| format!("{name}.* names no relation in scope")),
                            )),
                        }
                    }
                    SelectItemQualifiedWildcardKind::Expr(e) => {
                        out.push(OutColumn::spread(self.expr(e, scope).derived()))
                    }
                },
            }
        }
        out
    }

    /// Adds a FROM item (and its joins) to `scope`. Later items see earlier ones (LATERAL, and
    /// functions in FROM, which PostgreSQL treats as lateral).
    fn add_from_item(&mut self, t: &TableWithJoins, scope: &mut Scope<'_>) {
        self.factor(&t.relation, scope);
        for j in &t.joins {
            let constraint = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c) => Some(c),
                _ => None,
            };
            if matches!(
                constraint,
                Some(JoinConstraint::Using(_) | JoinConstraint::Natural)
            ) {
                scope.merged_columns = true;
            }
            self.factor(&j.relation, scope);
        }
    }

    fn factor(&mut self, f: &TableFactor, scope: &mut Scope<'_>) {
        let rel = match f {
            TableFactor::Table {
                name, alias, args, ..
            } => match args {
                None => self.table(name, alias.as_ref()),
                Some(args) => {
                    let mut l = self.function_args(&name_parts(name), &args.args, scope);
                    l = l.derived();
                    aliased(
                        Rel {
                            name: name_parts(name).pop().unwrap_or_default(),
                            schema: None,
                            cols: Cols::Opaque(l),
                        },
                        alias.as_ref(),
                    )
                }
            },
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                let cols = self.query(subquery, Some(scope));
                let cols = match alias {
                    Some(a) => rename(cols, a),
                    None => cols,
                };
                let name = alias.as_ref().map(|a| fold(&a.name)).unwrap_or_default();
                Rel {
                    name,
                    schema: None,
                    cols: known_or_opaque(cols),
                }
            }
            TableFactor::Function {
                name, args, alias, ..
            } => {
                let l = self.function_args(&name_parts(name), args, scope).derived();
                aliased(
                    Rel {
                        name: name_parts(name).pop().unwrap_or_default(),
                        schema: None,
                        cols: Cols::Opaque(l),
                    },
                    alias.as_ref(),
                )
            }
            TableFactor::UNNEST {
                alias, array_exprs, ..
            } => {
                let mut l = Lineage::default();
                for e in array_exprs {
                    l.absorb(&self.expr(e, scope));
                }
                aliased(
                    Rel {
                        name: "unnest".into(),
                        schema: None,
                        cols: Cols::Opaque(l.derived()),
                    },
                    alias.as_ref(),
                )
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => {
                self.add_from_item(table_with_joins, scope);
                return;
            }
            other => Rel {
                name: String::new(),
                schema: None,
                cols: Cols::Opaque(self.unknown(|| format!("unsupported FROM item {other}"))),
            },
        };
        scope.rels.push(rel);
    }

    /// A relation by name: a CTE, a table, or a view (expanded).
    fn table(&mut self, name: &ObjectName, alias: Option<&TableAlias>) -> Rel {
        let parts = name_parts(name);
        let rel = self.named_relation(&parts);
        aliased(rel, alias)
    }

    fn named_relation(&mut self, parts: &[String]) -> Rel {
        let last = parts.last().cloned().unwrap_or_default();
        if parts.len() == 1
            && let Some((_, cols)) = self.ctes.iter().rev().find(|(n, _)| *n == last)
        {
            return Rel {
                name: last,
                schema: None,
                cols: known_or_opaque(cols.clone()),
            };
        }
        let found = match parts {
            [t] => self.catalog.resolve(self.path, t),
            [.., s, t] => self.catalog.relation(s, t).map(|r| (s.as_str(), r)),
            [] => None,
        };
        let Some((schema, relation)) = found else {
            let system = matches!(parts, [s, _] | [_, s, _] if s == "pg_catalog" || s == "information_schema")
                || (parts.len() == 1 && (last.starts_with("pg_") || last == "information_schema"));
            let cols = if system && !LEAKY_SYSTEM_RELATIONS.contains(&last.as_str()) {
                Cols::Opaque(Lineage::default())
            } else if system {
                Cols::Opaque(self.unknown(|| format!("{last} holds values of user columns")))
            } else {
                Cols::Opaque(
                    self.unknown(|| format!("relation {} is not in the catalog", parts.join("."))),
                )
            };
            return Rel {
                name: last,
                schema: None,
                cols,
            };
        };
        let schema = schema.to_owned();
        let mut cols: Vec<(String, Lineage)> = relation
            .columns
            .iter()
            .map(|id| {
                (
                    self.catalog.column(*id).column.clone(),
                    Lineage::direct(*id),
                )
            })
            .collect();
        if let Some(def) = relation.view_sql.clone() {
            match self.view(&def) {
                Some(expanded) => {
                    let aligned = StatementOut { columns: expanded }.align(cols.len());
                    for ((_, own), via) in cols.iter_mut().zip(aligned) {
                        // The view's own column (a rule may name it) plus what it is computed from.
                        let direct = via.direct;
                        let json = via.json.clone();
                        own.absorb(&via);
                        own.direct = direct;
                        own.json = json;
                    }
                }
                None => {
                    let why = format!("view {schema}.{last} cannot be expanded");
                    for (_, own) in cols.iter_mut() {
                        own.unknown = Some(why.clone().into());
                    }
                }
            }
        }
        Rel {
            name: last,
            schema: Some(schema),
            cols: Cols::Known(cols),
        }
    }

    /// A view's output columns from its definition, in a scope of its own (no outer CTEs).
    fn view(&mut self, def: &str) -> Option<Vec<OutColumn>> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, def).ok()?;
        let [Statement::Query(q)] = statements.as_slice() else {
            return None;
        };
        let saved = std::mem::take(&mut self.ctes);
        self.depth += 1;
        let cols = self.query(q, None);
        self.depth -= 1;
        self.ctes = saved;
        Some(cols)
    }

    fn function_args(
        &mut self,
        name: &[String],
        args: &[FunctionArg],
        scope: &Scope<'_>,
    ) -> Lineage {
        let mut l = Lineage::default();
        for a in args {
            l.absorb(&self.arg(a, scope));
        }
        self.check_function(name.last().map(String::as_str).unwrap_or(""), &mut l);
        l
    }

    /// Dynamic SQL is unknown; a user-defined function may read any table, so one that takes a
    /// masked column or holds no trace of where its result comes from is unknown too.
    fn check_function(&self, name: &str, l: &mut Lineage) {
        if lifts_json(name) && !l.keys.iter().any(|k| &**k == "*") {
            l.keys.push(Arc::from("*"));
        }
        if l.unknown.is_some() || !self.catalog.any_masked() {
            return;
        }
        if DYNAMIC_SQL.contains(&name) {
            l.unknown = Some(format!("{name} runs SQL the gateway cannot see").into());
        } else if self.catalog.is_user_function(name) {
            l.unknown = Some(format!("user-defined function {name}").into());
        }
    }

    fn arg(&mut self, a: &FunctionArg, scope: &Scope<'_>) -> Lineage {
        let (FunctionArg::Unnamed(arg)
        | FunctionArg::Named { arg, .. }
        | FunctionArg::ExprNamed { arg, .. }) = a;
        match arg {
            FunctionArgExpr::Expr(e) => self.expr(e, scope),
            FunctionArgExpr::QualifiedWildcard(name) => match find_rel(scope, &name_parts(name)) {
                Some(r) => r.whole_row(),
                None => self.unknown(|| format!("{name}.* names no relation in scope")),
            },
            FunctionArgExpr::Wildcard => Lineage::default(),
        }
    }

    /// The lineage of an expression: plain references stay direct, json constructors keep their
    /// structure, everything else is derived from every column it contains.
    fn expr(&mut self, e: &Expr, scope: &Scope<'_>) -> Lineage {
        match e {
            Expr::Nested(inner) => self.expr(inner, scope),
            Expr::Identifier(id) => self.column(scope, &[], &fold(id)),
            Expr::CompoundIdentifier(parts) => {
                let parts: Vec<String> = parts.iter().map(fold).collect();
                let (col, qual) = parts.split_last().expect("compound has parts");
                self.column(scope, qual, col)
            }
            Expr::QualifiedWildcard(name, _) => match find_rel(scope, &name_parts(name)) {
                Some(r) => r.whole_row(),
                None => self.unknown(|| format!("{name}.* names no relation in scope")),
            },
            Expr::Function(f) => self.function(f, scope),
            Expr::Subquery(q) => {
                let cols = self.query(q, Some(scope));
                match cols.as_slice() {
                    [one] if !one.spread => {
                        let mut l = one.lineage.clone();
                        l.direct = false;
                        l
                    }
                    _ => {
                        let mut l = Lineage::default();
                        for c in &cols {
                            l.absorb(&c.lineage);
                        }
                        l
                    }
                }
            }
            _ => self.generic(e, scope),
        }
    }

    fn function(&mut self, f: &Function, scope: &Scope<'_>) -> Lineage {
        let parts = name_parts(&f.name);
        let name = parts.last().map(String::as_str).unwrap_or("");
        let args: &[FunctionArg] = match &f.args {
            FunctionArguments::List(list) => &list.args,
            _ => &[],
        };
        // Window and filter clauses, ORDER BY inside the call, a subquery argument: generic.
        let plain = f.over.is_none()
            && f.filter.is_none()
            && f.within_group.is_empty()
            && matches!(&f.args, FunctionArguments::List(l) if l.clauses.is_empty());
        let shape = match name {
            "row_to_json" | "to_json" | "to_jsonb" if plain && !args.is_empty() => {
                let mut first = self.arg(&args[0], scope);
                for a in &args[1..] {
                    let more = self.arg(a, scope);
                    if !more.is_empty() {
                        first.absorb(&more);
                    }
                }
                first.direct = false;
                if first.json.is_none() && !first.is_empty() {
                    first = first.derived();
                }
                Some(first)
            }
            "json_build_object" | "jsonb_build_object" if plain && args.len().is_multiple_of(2) => {
                let mut keys = Vec::new();
                let mut all = Lineage::default();
                for pair in args.chunks(2) {
                    let key = match &pair[0] {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) => {
                            match &v.value {
                                Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                                    Some(s.clone())
                                }
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let v = self.arg(&pair[1], scope);
                    match key {
                        Some(k) => {
                            all.absorb(&v);
                            keys.push((k, v));
                        }
                        None => {
                            let k = self.arg(&pair[0], scope);
                            all.absorb(&k);
                            all.absorb(&v);
                            keys.clear();
                            break;
                        }
                    }
                }
                if !keys.is_empty() && keys.len() * 2 == args.len() {
                    all.json = Some(Arc::new(JsonShape::Object(keys)));
                } else {
                    // A computed key: the structure is not known, only the union.
                    let mut rest = Lineage::default();
                    for a in args {
                        rest.absorb(&self.arg(a, scope));
                    }
                    all.absorb(&rest);
                    all.json = None;
                }
                Some(all)
            }
            "json_agg" | "jsonb_agg"
                if f.over.is_none() && f.filter.is_none() && args.len() == 1 =>
            {
                let elem = self.arg(&args[0], scope);
                let mut l = Lineage::default();
                l.absorb(&elem);
                if let FunctionArguments::List(list) = &f.args {
                    for c in &list.clauses {
                        l.absorb(&self.generic_clause(c, scope));
                    }
                }
                l.json = Some(Arc::new(JsonShape::Array(elem)));
                Some(l)
            }
            _ => None,
        };
        if let Some(mut l) = shape {
            self.check_function(name, &mut l);
            return l;
        }
        self.generic(&Expr::Function(f.clone()), scope)
    }

    /// The lineage of clauses inside a call (`ORDER BY` of an aggregate): its expressions.
    fn generic_clause(
        &mut self,
        c: &sqlparser::ast::FunctionArgumentClause,
        scope: &Scope<'_>,
    ) -> Lineage {
        let mut v = Collector {
            walker: self,
            scope,
            depth: 0,
            out: Lineage::default(),
        };
        let _ = c.visit(&mut v);
        v.out.derived()
    }

    /// Every column reference, whole-row reference and subquery output inside `e`, derived.
    fn generic(&mut self, e: &Expr, scope: &Scope<'_>) -> Lineage {
        let mut v = Collector {
            walker: self,
            scope,
            depth: 0,
            out: Lineage::default(),
        };
        let _ = e.visit(&mut v);
        v.out.derived()
    }

    /// A column reference `qual.col` (`qual` may be empty), or failing that a whole-row reference.
    fn column(&mut self, scope: &Scope<'_>, qual: &[String], col: &str) -> Lineage {
        let mut s = Some(scope);
        while let Some(sc) = s {
            if qual.is_empty() {
                let mut found: Vec<&Lineage> = Vec::new();
                let mut opaque = Lineage::default();
                let mut any_opaque = false;
                for r in &sc.rels {
                    match &r.cols {
                        Cols::Known(cols) => {
                            found.extend(cols.iter().filter(|(n, _)| n == col).map(|(_, l)| l))
                        }
                        Cols::Opaque(l) => {
                            any_opaque = true;
                            opaque.absorb(l);
                        }
                    }
                }
                match (found.as_slice(), any_opaque) {
                    ([one], false) => return (*one).clone(),
                    ([], false) => {}
                    _ => {
                        // Ambiguous to us (a USING column, or a relation of unknown columns).
                        let mut l = opaque;
                        for f in found {
                            l.absorb(f);
                        }
                        return l;
                    }
                }
                // A whole-row reference by relation name (`row_to_json(u)`).
                if let Some(r) = sc.rels.iter().find(|r| r.name == col) {
                    return r.whole_row();
                }
            } else if let Some(r) = find_rel_here(sc, qual) {
                return match &r.cols {
                    Cols::Known(cols) => match cols.iter().find(|(n, _)| n == col) {
                        Some((_, l)) => l.clone(),
                        None => self.unknown(|| {
                            format!("{}.{col} is not a column the catalog knows", qual.join("."))
                        }),
                    },
                    Cols::Opaque(l) => l.clone().derived(),
                };
            }
            s = sc.parent;
        }
        // `(u).ssn`-style field access on a composite column, or a name we cannot place.
        if let Some(first) = qual.first()
            && let Some(l) = {
                let l = self.column(scope, &[], first);
                (!l.is_empty()).then_some(l)
            }
        {
            return l.derived();
        }
        if qual.is_empty() && is_keyword_value(col) {
            return Lineage::default();
        }
        self.unknown(|| {
            let name = if qual.is_empty() {
                col.to_owned()
            } else {
                format!("{}.{col}", qual.join("."))
            };
            format!("{name} cannot be resolved")
        })
    }
}

/// json functions that take values out of their keys (`jsonb_each_text`, `jsonb_path_query`).
fn lifts_json(name: &str) -> bool {
    name.starts_with("json")
        && ["each", "path", "elements", "populate", "to_record", "keys"]
            .iter()
            .any(|w| name.contains(w))
}

/// Identifiers the parser may hand back for SQL keywords that are values.
fn is_keyword_value(name: &str) -> bool {
    matches!(
        name,
        "current_user"
            | "session_user"
            | "current_role"
            | "user"
            | "current_date"
            | "current_time"
            | "current_timestamp"
            | "localtime"
            | "localtimestamp"
            | "current_catalog"
            | "current_schema"
            | "true"
            | "false"
            | "null"
            | "default"
    )
}

/// Collects references inside a generic expression, evaluating subqueries in their own scope.
struct Collector<'a, 'c, 's, 'p> {
    walker: &'a mut Walker<'c>,
    scope: &'s Scope<'p>,
    /// How many queries deep the visit is: references inside a subquery belong to its scope.
    depth: usize,
    out: Lineage,
}

impl Visitor for Collector<'_, '_, '_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            for c in self.walker.query(q, Some(self.scope)) {
                self.out.absorb(&c.lineage);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Value(v) => {
                if let Value::SingleQuotedString(s)
                | Value::EscapedStringLiteral(s)
                | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString {
                    value: s,
                    ..
                }) = &v.value
                {
                    let mut words = Lineage::default();
                    if s.contains(['*', '$']) {
                        words.keys.push(Arc::from("*"));
                    }
                    words.keys.extend(
                        s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .filter(|w| !w.is_empty())
                            .take(8)
                            .map(Arc::from),
                    );
                    self.out.absorb(&words);
                }
            }
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::QualifiedWildcard(..) => {
                let l = self.walker.expr(e, self.scope);
                self.out.absorb(&l);
            }
            Expr::Function(f) => {
                let parts = name_parts(&f.name);
                if let FunctionArguments::List(list) = &f.args {
                    for a in &list.args {
                        if let FunctionArg::Unnamed(FunctionArgExpr::QualifiedWildcard(_)) = a {
                            let l = self.walker.arg(a, self.scope);
                            self.out.absorb(&l);
                        }
                    }
                }
                let name = parts.last().map(String::as_str).unwrap_or("");
                // Functions that lift values out of their keys.
                if lifts_json(name) {
                    let mut marker = Lineage::default();
                    marker.keys.push(Arc::from("*"));
                    self.out.absorb(&marker);
                }
                if name == "pg_notify" {
                    let mut given = Lineage::default();
                    if let FunctionArguments::List(list) = &f.args {
                        for a in &list.args {
                            given.absorb(&self.walker.arg(a, self.scope));
                        }
                    }
                    self.walker.notify.absorb(&given);
                }
                // The call's own arguments are visited next; decide on what is known so far plus them.
                let mut args = Lineage::default();
                if let FunctionArguments::List(list) = &f.args {
                    for a in &list.args {
                        args.absorb(&self.walker.arg(a, self.scope));
                    }
                }
                self.walker.check_function(name, &mut args);
                if args.unknown.is_some() {
                    self.out.absorb(&args);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Collects the names of CTEs defined anywhere in a statement.
struct CteNames<'a>(&'a mut Vec<String>);

impl Visitor for CteNames<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            self.0
                .extend(with.cte_tables.iter().map(|c| fold(&c.alias.name)));
        }
        ControlFlow::Continue(())
    }
}

fn find_rel<'a>(scope: &'a Scope<'_>, qual: &[String]) -> Option<&'a Rel> {
    let mut s = Some(scope);
    while let Some(sc) = s {
        if let Some(r) = find_rel_here(sc, qual) {
            return Some(r);
        }
        s = sc.parent;
    }
    None
}

fn find_rel_here<'a>(sc: &'a Scope<'_>, qual: &[String]) -> Option<&'a Rel> {
    let (name, schema) = match qual {
        [t] => (t, None),
        [.., s, t] => (t, Some(s)),
        [] => return None,
    };
    sc.rels
        .iter()
        .find(|r| r.name == *name && schema.is_none_or(|s| r.schema.as_deref() == Some(s.as_str())))
}

fn aliased(mut rel: Rel, alias: Option<&TableAlias>) -> Rel {
    if let Some(a) = alias {
        rel.name = fold(&a.name);
        rel.schema = None;
        if let Cols::Known(cols) = &mut rel.cols {
            for (c, new) in cols.iter_mut().zip(&a.columns) {
                c.0 = fold(&new.name);
            }
        }
    }
    rel
}

fn rename(mut cols: Vec<OutColumn>, alias: &TableAlias) -> Vec<OutColumn> {
    for (c, new) in cols.iter_mut().filter(|c| !c.spread).zip(&alias.columns) {
        c.name = fold(&new.name);
    }
    cols
}

fn known_or_opaque(cols: Vec<OutColumn>) -> Cols {
    if cols.iter().any(|c| c.spread) {
        let mut all = Lineage::default();
        for c in &cols {
            all.absorb(&c.lineage);
        }
        Cols::Opaque(all)
    } else {
        Cols::Known(cols.into_iter().map(|c| (c.name, c.lineage)).collect())
    }
}

fn rel_columns(rel: Rel) -> Vec<OutColumn> {
    match rel.cols {
        Cols::Known(cols) => named(cols),
        Cols::Opaque(l) => vec![OutColumn::spread(l)],
    }
}

fn named(cols: Vec<(String, Lineage)>) -> Vec<OutColumn> {
    cols.into_iter()
        .map(|(name, lineage)| OutColumn {
            name,
            lineage,
            spread: false,
        })
        .collect()
}

fn spread(l: Lineage) -> Vec<OutColumn> {
    vec![OutColumn::spread(l)]
}

/// Column by column union of two branches (set operations, recursive CTE passes).
fn merge_columns(l: &[OutColumn], r: &[OutColumn]) -> Vec<OutColumn> {
    let same_shape = l.len() == r.len() && l.iter().zip(r).all(|(a, b)| a.spread == b.spread);
    if same_shape {
        return l
            .iter()
            .zip(r)
            .map(|(a, b)| {
                let mut c = a.clone();
                if a.lineage != b.lineage {
                    c.lineage.absorb(&b.lineage);
                }
                c
            })
            .collect();
    }
    let mut all = Lineage::default();
    for c in l.iter().chain(r) {
        all.absorb(&c.lineage);
    }
    vec![OutColumn::spread(all)]
}

/// The name PostgreSQL gives an unaliased output column (enough for `explain`).
fn output_name(e: &Expr) -> String {
    match e {
        Expr::Identifier(i) => fold(i),
        Expr::CompoundIdentifier(p) => p.last().map(fold).unwrap_or_default(),
        Expr::Function(f) => name_parts(&f.name).pop().unwrap_or_default(),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => output_name(expr),
        _ => "?column?".into(),
    }
}
