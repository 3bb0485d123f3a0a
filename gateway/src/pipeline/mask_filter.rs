//! The session core's result filter, backed by the masking engine: a plan per result set from its
//! RowDescription, and a plan per `COPY ... TO STDOUT` from what the statement said.

use sqlparser::ast::{
    CopyLegacyOption, CopyOption, CopySource, CopyTarget, SelectItem, SetExpr, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;

use super::lineage::Lineage;
use crate::mask::{Column, CopyOptions, CopyPlan, Masker, ResultPlan};
use crate::protocol::postgres::messages;
use crate::protocol::postgres::session::{Refusal, ResultFilter, ResultFormats};

/// What a `COPY ... TO STDOUT` statement says about its output format.
#[derive(Debug, Clone)]
pub struct CopyStatement {
    pub options: CopyOptions,
    pub column_names: Option<Vec<String>>,
}

pub struct MaskFilter {
    masker: Masker,
    /// `None` when the policy masks nothing.
    lineage: Option<Lineage>,
    plan: Option<ResultPlan>,
    copy: Option<CopyPlan>,
    /// The statement being answered (text and index in its Query), for COPY options.
    sql: String,
    index: usize,
}

impl MaskFilter {
    pub fn new(masker: Masker, lineage: Option<Lineage>) -> Self {
        MaskFilter {
            masker,
            lineage,
            plan: None,
            copy: None,
            sql: String::new(),
            index: 0,
        }
    }

    /// Rules from a reload: the result in flight keeps its plan, the next one uses these.
    pub fn set_masker(&mut self, masker: Masker) {
        self.masker = masker;
    }
}

impl ResultFilter for MaskFilter {
    fn begin(&mut self, row_description: &[u8], formats: &ResultFormats) -> bool {
        if self.masker.is_noop() {
            return false;
        }
        let Ok(fields) = messages::parse_row_description(row_description) else {
            // Columns unknown: every value is withheld (see data_row).
            self.plan = None;
            return true;
        };
        let cols: Vec<Column<'_>> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| Column {
                name: f.name,
                table_oid: f.table_oid,
                attnum: f.attnum,
                type_oid: f.type_oid,
                format: formats.of(i, f.format),
            })
            .collect();
        // Each column's rule follows its source columns; a column from a table the catalog did
        // not list (created since) is redacted when `table` rules exist: the engine fails closed.
        let Some(lineage) = &self.lineage else {
            return false;
        };
        let lineage = lineage.borrow();
        let out = lineage.current_output();
        let plan = self
            .masker
            .plan_lineage(&cols, Some(&*out), lineage.catalog());
        let inspect = !plan.is_passthrough();
        self.plan = Some(plan);
        inspect
    }

    fn begin_unknown(&mut self) -> bool {
        self.plan = None;
        !self.masker.is_noop()
    }

    fn data_row(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal> {
        match &self.plan {
            Some(plan) => plan.mask_data_row(body, out).map_err(Refusal::from),
            None => null_row(body, out).map(|()| true),
        }
    }

    fn copy_out(&mut self, body: &[u8]) -> bool {
        let Some(lineage) = &self.lineage else {
            return false;
        };
        if self.masker.is_noop() {
            self.copy = None;
            return false;
        }
        let statement = copy_statement(&self.sql, self.index);
        let (format, column_formats) = match parse_copy_out(body) {
            Some(v) => v,
            None => {
                self.copy = None;
                return true;
            }
        };
        let (options, names) = match statement {
            Some(s) => (s.options, s.column_names),
            None => (CopyOptions::text(), None),
        };
        let plan = if self.masker.lineage_enabled() {
            let lineage = lineage.borrow();
            let out = lineage.current_output();
            self.masker.copy_plan_lineage(
                format,
                &column_formats,
                &out,
                lineage.catalog(),
                &options,
            )
        } else {
            self.masker
                .copy_plan(format, &column_formats, names.as_deref(), &options)
        };
        let inspect = !plan.is_passthrough();
        self.copy = Some(plan);
        inspect
    }

    fn copy_data(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal> {
        match &self.copy {
            Some(plan) => plan.mask_copy_data(body, out).map_err(Refusal::from),
            None => Err("COPY output whose shape the gateway cannot read".into()),
        }
    }

    fn statement(&mut self, sql: Option<&str>, index: usize) {
        let Some(lineage) = &self.lineage else {
            return;
        };
        self.sql.clear();
        self.sql.push_str(sql.unwrap_or(""));
        self.index = index;
        lineage.borrow_mut().set_current(sql, index);
    }

    fn notice(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal> {
        let Some(lineage) = &self.lineage else {
            return Ok(false);
        };
        // With no rule nothing is masked, even though this session's catalog is all unknown.
        if self.masker.is_noop() {
            return Ok(false);
        }
        let masked = if tag == b'A' {
            self.masker.mask_notification(body, out)
        } else {
            let touched = lineage.borrow().current_touches_masked();
            self.masker.mask_error(tag, body, touched, out)
        };
        masked.map_err(Refusal::from)
    }
}

/// A DataRow with every value NULL: what a row of unknown columns becomes. NULL is valid for
/// every type and format, so the client still decodes the row.
fn null_row(body: &[u8], out: &mut Vec<u8>) -> Result<(), Refusal> {
    let count = body.get(..2).ok_or("DataRow without a column count")?;
    let n = u16::from_be_bytes([count[0], count[1]]);
    crate::protocol::postgres::frame::write_message(out, b'D', |o| {
        o.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            o.extend_from_slice(&(-1i32).to_be_bytes());
        }
    });
    Ok(())
}

/// CopyOutResponse: overall format and per-column formats.
fn parse_copy_out(body: &[u8]) -> Option<(u8, Vec<i16>)> {
    let format = *body.first()?;
    let n = i16::from_be_bytes([*body.get(1)?, *body.get(2)?]);
    let mut formats = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n.max(0) as usize {
        let at = 3 + 2 * i;
        formats.push(i16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    }
    Some((format, formats))
}

/// Reads what the `index`th statement of `sql` says about its output, when it is a
/// `COPY ... TO STDOUT`.
pub fn copy_statement(sql: &str, index: usize) -> Option<CopyStatement> {
    let statements = sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    statements.get(index).and_then(|s| match s {
        Statement::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } => {
            let mut o = CopyOptions::text();
            let mut csv = false;
            let mut header = false;
            let mut delimiter = None;
            let mut null = None;
            let mut quote = None;
            let mut escape = None;
            for opt in options {
                match opt {
                    CopyOption::Format(f) => csv = f.value.eq_ignore_ascii_case("csv"),
                    CopyOption::Header(h) => header = *h,
                    CopyOption::Delimiter(c) => delimiter = Some(*c as u8),
                    CopyOption::Null(n) => null = Some(n.as_bytes().to_vec()),
                    CopyOption::Quote(c) => quote = Some(*c as u8),
                    CopyOption::Escape(c) => escape = Some(*c as u8),
                    _ => {}
                }
            }
            for opt in legacy_options {
                match opt {
                    CopyLegacyOption::Csv(_) => csv = true,
                    CopyLegacyOption::Delimiter(c) => delimiter = Some(*c as u8),
                    CopyLegacyOption::Null(n) => null = Some(n.as_bytes().to_vec()),
                    _ => {}
                }
            }
            if csv {
                o = CopyOptions::csv();
            }
            o.header = header && csv;
            if let Some(d) = delimiter {
                o.delimiter = d;
            }
            if let Some(n) = null {
                o.null = n;
            }
            if let Some(q) = quote {
                o.quote = q;
                o.escape = escape.unwrap_or(q);
            } else if let Some(e) = escape {
                o.escape = e;
            }
            let column_names = match source {
                CopySource::Table {
                    table_name,
                    columns,
                } => {
                    let parts: Vec<String> = table_name
                        .0
                        .iter()
                        .map(|p| p.to_string().trim_matches('"').to_owned())
                        .collect();
                    o.table = match parts.as_slice() {
                        [t] => Some(("public".to_owned(), t.clone())),
                        [s, t] => Some((s.clone(), t.clone())),
                        _ => None,
                    };
                    (!columns.is_empty()).then(|| columns.iter().map(|c| c.value.clone()).collect())
                }
                CopySource::Query(q) => match q.body.as_ref() {
                    SetExpr::Select(select) => select
                        .projection
                        .iter()
                        .map(|item| match item {
                            SelectItem::UnnamedExpr(sqlparser::ast::Expr::Identifier(i)) => {
                                Some(i.value.clone())
                            }
                            SelectItem::UnnamedExpr(sqlparser::ast::Expr::CompoundIdentifier(
                                parts,
                            )) => parts.last().map(|i| i.value.clone()),
                            SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                            _ => None,
                        })
                        .collect(),
                    _ => None,
                },
            };
            Some(CopyStatement {
                options: o,
                column_names,
            })
        }
        _ => None,
    })
}
