//! The session core's result filter, backed by the masking engine: a plan per result set from its
//! RowDescription, and a plan per `COPY ... TO STDOUT` from what the statement said.

use sqlparser::ast::{
    CopyLegacyOption, CopyOption, CopySource, CopyTarget, SelectItem, SetExpr, Statement,
};
use sqlparser::dialect::PostgreSqlDialect;

use std::sync::Arc;

use super::lineage::Lineage;
use crate::mask::lineage::{Analysis, Catalog};
use crate::mask::{Column, CopyOptions, CopyPlan, Masker, ResultPlan};
use crate::protocol::postgres::messages;
use crate::protocol::postgres::session::{Refusal, ResultFilter, ResultFormats};

/// What a `COPY ... TO STDOUT` statement says about its output format.
#[derive(Debug, Clone)]
pub struct CopyStatement {
    pub options: CopyOptions,
    pub column_names: Option<Vec<String>>,
}

/// The most [`MaskFilter`] keeps of its buffer for replaced values between rows.
const MAX_KEPT_VALUES: usize = 4096;

pub struct MaskFilter {
    masker: Masker,
    /// `None` when the policy masks nothing.
    lineage: Option<Lineage>,
    plan: Option<ResultPlan>,
    /// The replaced values of the row being masked, kept from row to row.
    values: Vec<u8>,
    /// What `plan` was made from, while it holds.
    planned_from: Option<PlanInputs>,
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
            values: Vec::new(),
            planned_from: None,
            copy: None,
            sql: String::new(),
            index: 0,
        }
    }

    /// Rules from a reload: the result in flight keeps its plan, the next one uses these.
    pub fn set_masker(&mut self, masker: Masker) {
        self.masker = masker;
        self.planned_from = None;
    }
}

/// The inputs a result plan is a function of, besides the rules. A statement answering again (a
/// prepared statement, or a text of the same shape) meets the same ones and reuses its plan, so
/// the per-result planning is paid once per statement shape rather than once per result.
struct PlanInputs {
    row_description: Vec<u8>,
    formats: ResultFormats,
    /// Held, not only compared, so that no other analysis or catalog can take their addresses.
    analysis: Arc<Analysis>,
    index: usize,
    catalog: Arc<Catalog>,
}

impl PlanInputs {
    /// `buffer`: the last inputs' bytes, so that a session whose results keep changing shape
    /// does not allocate for them each time.
    fn new(
        row_description: &[u8],
        formats: &ResultFormats,
        current: Option<&(Arc<Analysis>, usize, Arc<Catalog>)>,
        mut buffer: Vec<u8>,
    ) -> Option<PlanInputs> {
        let (analysis, index, catalog) = current?;
        buffer.clear();
        buffer.extend_from_slice(row_description);
        Some(PlanInputs {
            row_description: buffer,
            formats: formats.clone(),
            analysis: analysis.clone(),
            index: *index,
            catalog: catalog.clone(),
        })
    }

    fn fit(
        &self,
        row_description: &[u8],
        formats: &ResultFormats,
        current: Option<&(Arc<Analysis>, usize, Arc<Catalog>)>,
    ) -> bool {
        current.is_some_and(|(analysis, index, catalog)| {
            Arc::ptr_eq(analysis, &self.analysis)
                && *index == self.index
                && Arc::ptr_eq(catalog, &self.catalog)
                && row_description == self.row_description
                && *formats == self.formats
        })
    }
}

impl ResultFilter for MaskFilter {
    fn begin(&mut self, row_description: &[u8], formats: &ResultFormats) -> bool {
        if self.masker.is_noop() {
            return false;
        }
        if let (Some(plan), Some(inputs), Some(lineage)) =
            (&self.plan, &self.planned_from, &self.lineage)
            && inputs.fit(row_description, formats, lineage.borrow().current())
        {
            return !plan.is_passthrough();
        }
        let buffer = self
            .planned_from
            .take()
            .map(|inputs| inputs.row_description)
            .unwrap_or_default();
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
        self.planned_from = PlanInputs::new(row_description, formats, lineage.current(), buffer);
        inspect
    }

    fn begin_unknown(&mut self) -> bool {
        self.plan = None;
        self.planned_from = None;
        !self.masker.is_noop()
    }

    fn data_row(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal> {
        match &self.plan {
            Some(plan) => {
                let masked = plan.mask_data_row_in(body, out, &mut self.values);
                // A large value's replacement is not held under an idle session.
                if self.values.capacity() > MAX_KEPT_VALUES {
                    self.values = Vec::new();
                }
                masked.map_err(Refusal::from)
            }
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::mask::lineage::SessionLineage;
    use crate::mask::{ColumnRule, DetectorKind, MaskRules, catalog_from_specs};
    use crate::protocol::postgres::messages::{FieldDesc, encode_row_description};

    /// One text column named `x`, from no table: the same description for whatever it selects.
    fn x_column() -> Vec<u8> {
        let mut msg = Vec::new();
        let field = FieldDesc {
            name: b"x",
            table_oid: 0,
            attnum: 0,
            type_oid: 25,
            type_len: -1,
            type_mod: -1,
            format: 0,
        };
        encode_row_description(&[field], &mut msg);
        msg[5..].to_vec()
    }

    fn row(value: &str) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value.as_bytes());
        body
    }

    fn masker(rules: MaskRules) -> Masker {
        Masker::new(&rules).unwrap()
    }

    fn filter(masker: &Masker) -> MaskFilter {
        let catalog =
            catalog_from_specs(masker, &["users(name, ssn, contact)".into()], &[]).unwrap();
        let lineage = Rc::new(RefCell::new(SessionLineage::new(Arc::new(catalog))));
        MaskFilter::new(masker.clone(), Some(lineage))
    }

    /// What the client gets for one row of `value` answering `sql`.
    fn answer(filter: &mut MaskFilter, sql: &str, value: &str) -> String {
        filter.statement(Some(sql), 0);
        let body = row(value);
        if !filter.begin(&x_column(), &ResultFormats::Described) {
            return value.to_owned();
        }
        let mut out = Vec::new();
        if !filter.data_row(&body, &mut out).unwrap() {
            return value.to_owned();
        }
        assert_eq!(out[0], b'D', "a whole DataRow message");
        let values = messages::parse_data_row(&out[5..]).unwrap();
        String::from_utf8_lossy(values[0].unwrap_or(b"NULL")).into_owned()
    }

    /// An agent primes the reused plan with a harmless statement of the same result shape, then
    /// reads a masked column under the same name: the plan follows the statement, not the shape.
    #[test]
    fn a_plan_made_for_one_statement_is_not_reused_for_another_of_the_same_shape() {
        let m = masker(MaskRules {
            columns: vec![ColumnRule {
                name: Some("ssn".into()),
                ..ColumnRule::default()
            }],
            ..MaskRules::default()
        });
        let mut f = filter(&m);
        for _ in 0..2 {
            assert_eq!(
                answer(&mut f, "SELECT name AS x FROM users", "alice"),
                "alice"
            );
        }
        for _ in 0..2 {
            let ssn = answer(&mut f, "SELECT ssn AS x FROM users", "123-45-6789");
            assert!(!ssn.contains("6789"), "{ssn}");
        }
        assert_eq!(
            answer(&mut f, "SELECT name AS x FROM users", "alice"),
            "alice"
        );
    }

    /// A reload that adds a detector applies to the live session's next result of the statement
    /// it has been running all along, and whose plan it would otherwise reuse.
    #[test]
    fn a_reload_replans_the_statement_a_session_keeps_running() {
        let only_passwords = MaskRules {
            columns: vec![ColumnRule {
                name: Some("*password*".into()),
                ..ColumnRule::default()
            }],
            ..MaskRules::default()
        };
        let with_email = MaskRules {
            detectors: vec![DetectorKind::Email],
            ..only_passwords.clone()
        };
        let mut f = filter(&masker(only_passwords));
        let sql = "SELECT contact AS x FROM users";
        for _ in 0..2 {
            assert_eq!(answer(&mut f, sql, "bob@example.com"), "bob@example.com");
        }
        f.set_masker(masker(with_email));
        let after = answer(&mut f, sql, "bob@example.com");
        assert!(!after.contains("bob@"), "{after}");
    }
}
