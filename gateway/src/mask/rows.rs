//! Result sets: the per-column plan built on RowDescription, and DataRow rewriting.
//!
//! # DataRow body
//! `Int16` column count, then per column `Int32` length (-1 = NULL) and that many bytes.

use std::sync::Arc;

use super::config::{Selector, Style};
use super::detectors::Hit;
use super::json::{self, Unparsable};
use super::styles::{self, REDACTED};
use super::types::{self, ValueKind};
use super::{Engine, MaskError, Masker};

/// One RowDescription field, as the driver decoded it.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    pub name: &'a [u8],
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Where a result column comes from, per the catalog (`pg_namespace.nspname`, `pg_class.relname`,
/// `pg_attribute.attname`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnOrigin {
    pub schema: String,
    pub table: String,
    pub column: String,
}

/// What happens to one column's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ColPlan {
    /// Forwarded as is.
    Pass,
    /// A column rule: every non-NULL value is replaced.
    Whole { style: Style, kind: ValueKind },
    /// Detectors (and json paths for json kinds) decide per value.
    Scan(ValueKind),
    /// A json value built from masked columns: the values under these keys (at any depth) are
    /// masked in their style, and detectors and path rules run over the rest.
    JsonKeys(ValueKind, Arc<[JsonKey]>),
}

/// A json key whose values are masked, and how.
pub(crate) type JsonKey = (Box<str>, Style);

/// The masking decision for one result set. Cheap to build; holds an `Arc` to the compiled rules.
#[derive(Debug, Clone)]
pub struct ResultPlan {
    engine: Arc<Engine>,
    cols: Vec<ColPlan>,
    passthrough: bool,
}

/// What masking did to one value.
pub(crate) enum Outcome {
    Keep,
    /// The new value was appended to the scratch buffer.
    Replace,
    Null,
}

impl Masker {
    /// Plans a result set. `resolve` maps (table OID, attnum) to (schema, table); it is called only
    /// when [`needs_catalog`](Masker::needs_catalog), for columns that come from a table.
    ///
    /// `table` + `column` rules then match the column *name as the result reports it*, so an alias
    /// (`SELECT email AS e FROM users`) evades them: prefer [`plan_with_origin`](Masker::plan_with_origin),
    /// whose resolver also returns the catalog column name.
    pub fn plan(
        &self,
        cols: &[Column<'_>],
        resolve: &dyn Fn(u32, i16) -> Option<(String, String)>,
    ) -> ResultPlan {
        self.plan_columns(cols, |c| {
            resolve(c.table_oid, c.attnum).map(|(schema, table)| ColumnOrigin {
                schema,
                table,
                column: String::from_utf8_lossy(c.name).into_owned(),
            })
        })
    }

    /// Plans a result set; `resolve` maps (table OID, attnum) to the column's catalog origin. A column
    /// that comes from a table (`table_oid != 0`) whose origin cannot be resolved while `table` rules
    /// exist is redacted: masking cannot decide, so it fails closed.
    pub fn plan_with_origin(
        &self,
        cols: &[Column<'_>],
        resolve: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
    ) -> ResultPlan {
        self.plan_columns(cols, |c| resolve(c.table_oid, c.attnum))
    }

    fn plan_columns(
        &self,
        cols: &[Column<'_>],
        origin_of: impl Fn(&Column<'_>) -> Option<ColumnOrigin>,
    ) -> ResultPlan {
        let engine = &self.engine;
        let needs_catalog = self.needs_catalog();
        let cols: Vec<ColPlan> = cols
            .iter()
            .map(|c| {
                let kind = types::value_kind(c.type_oid, c.format != 0);
                let origin = (needs_catalog && c.table_oid != 0).then(|| origin_of(c));
                if let Some(None) = origin {
                    return ColPlan::Whole {
                        style: Style::Redact,
                        kind,
                    };
                }
                column_plan(engine, kind, c.name, c.type_oid, origin.flatten().as_ref())
            })
            .collect();
        let passthrough = cols.iter().all(|c| *c == ColPlan::Pass);
        ResultPlan {
            engine: Arc::clone(engine),
            cols,
            passthrough,
        }
    }
}

/// The plan for one column: the first matching column rule, else detectors/json rules by kind.
pub(crate) fn column_plan(
    engine: &Engine,
    kind: ValueKind,
    name: &[u8],
    type_oid: u32,
    origin: Option<&ColumnOrigin>,
) -> ColPlan {
    let rule = engine.columns.iter().find(|r| match &r.selector {
        Selector::Name(glob) => {
            glob.matches(name) || origin.is_some_and(|o| glob.matches(o.column.as_bytes()))
        }
        Selector::TableColumn {
            schema,
            table,
            column,
        } => origin.is_some_and(|o| {
            o.table.eq_ignore_ascii_case(table)
                && schema
                    .as_ref()
                    .is_none_or(|s| o.schema.eq_ignore_ascii_case(s))
                && column.matches(o.column.as_bytes())
        }),
        Selector::Type(oid) => *oid == type_oid,
    });
    if let Some(rule) = rule {
        return ColPlan::Whole {
            style: rule.style,
            kind,
        };
    }
    let scan = match kind {
        ValueKind::Json | ValueKind::JsonbBinary => {
            !engine.scanner.is_empty() || !engine.json.is_empty()
        }
        ValueKind::Text | ValueKind::Embedded { .. } => !engine.scanner.is_empty(),
        _ => false,
    };
    if scan {
        ColPlan::Scan(kind)
    } else {
        ColPlan::Pass
    }
}

/// A field of a field list: `(value range or None for NULL, offset after it)`.
type Field = (Option<(usize, usize)>, usize);

pub(crate) fn read_field(
    data: &[u8],
    pos: usize,
    malformed: fn(&'static str) -> MaskError,
) -> Result<Field, MaskError> {
    let len = data
        .get(pos..pos + 4)
        .ok_or_else(|| malformed("truncated field length"))?;
    let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
    let start = pos + 4;
    if len == -1 {
        return Ok((None, start));
    }
    let len = usize::try_from(len).map_err(|_| malformed("negative field length"))?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| malformed("field runs past the message"))?;
    Ok((Some((start, end)), end))
}

/// Appends a field (length + bytes, or -1) for `outcome` to `out`.
pub(crate) fn write_field(
    out: &mut Vec<u8>,
    outcome: &Outcome,
    original: &[u8],
    scratch: &[u8],
) -> Result<(), MaskError> {
    match outcome {
        Outcome::Null => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Outcome::Keep | Outcome::Replace => {
            let bytes = if matches!(outcome, Outcome::Keep) {
                original
            } else {
                scratch
            };
            let len = i32::try_from(bytes.len())
                .map_err(|_| MaskError::MalformedRow("masked field too long"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
    Ok(())
}

impl ResultPlan {
    /// Lets `f` change each column's plan, then recomputes whether the result passes through.
    pub(crate) fn refine(&mut self, mut f: impl FnMut(usize, &mut ColPlan)) {
        for (i, c) in self.cols.iter_mut().enumerate() {
            f(i, c);
        }
        self.passthrough = self.cols.iter().all(|c| *c == ColPlan::Pass);
    }

    /// Nothing in this result can ever change: forward DataRows untouched and unparsed.
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    /// `body` is a DataRow message body (after the `D` tag and the length). `Ok(false)`: the row is
    /// clean, forward the original bytes (nothing was copied). `Ok(true)`: a complete rewritten DataRow
    /// message (tag, length, body) was appended to `out`. A row that does not match the RowDescription
    /// is an error.
    pub fn mask_data_row(&self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, MaskError> {
        self.mask_data_row_in(body, out, &mut Vec::new())
    }

    /// [`Self::mask_data_row`] with the caller's buffer for replaced values, which it keeps from
    /// row to row: a masked row then allocates nothing of its own.
    pub fn mask_data_row_in(
        &self,
        body: &[u8],
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<bool, MaskError> {
        let bad = MaskError::MalformedRow;
        let count = body.get(..2).ok_or(bad("truncated column count"))?;
        if usize::from(u16::from_be_bytes(count.try_into().expect("2 bytes"))) != self.cols.len() {
            return Err(bad("column count differs from RowDescription"));
        }
        let engine = &*self.engine;
        scratch.clear();
        let mut hits = Vec::new();

        // Pass 1: find the first field that changes, without copying anything.
        let mut pos = 2;
        let mut first = None;
        for (i, col) in self.cols.iter().enumerate() {
            let (value, next) = read_field(body, pos, bad)?;
            if *col != ColPlan::Pass
                && let Some((a, b)) = value
            {
                let outcome = engine.mask_value(col, &body[a..b], scratch, &mut hits);
                if !matches!(outcome, Outcome::Keep) {
                    first = Some((i, pos, next, outcome));
                    break;
                }
            }
            pos = next;
        }
        let Some((first, first_pos, mut pos, outcome)) = first else {
            return if pos == body.len() {
                Ok(false)
            } else {
                Err(bad("bytes after the last field"))
            };
        };

        // Pass 2: copy the clean prefix, write the changed field, mask the rest.
        let msg_start = out.len();
        out.push(b'D');
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&body[..first_pos]);
        write_field(out, &outcome, &[], scratch)?;
        for col in &self.cols[first + 1..] {
            let (value, next) = read_field(body, pos, bad)?;
            match value {
                Some((a, b)) if *col != ColPlan::Pass => {
                    scratch.clear();
                    let outcome = engine.mask_value(col, &body[a..b], scratch, &mut hits);
                    write_field(out, &outcome, &body[a..b], scratch)?;
                }
                _ => out.extend_from_slice(&body[pos..next]),
            }
            pos = next;
        }
        if pos != body.len() {
            out.truncate(msg_start);
            return Err(bad("bytes after the last field"));
        }
        let len = u32::try_from(out.len() - msg_start - 1)
            .ok()
            .filter(|&l| l <= i32::MAX as u32)
            .ok_or(bad("masked row too long"))?;
        out[msg_start + 1..msg_start + 5].copy_from_slice(&len.to_be_bytes());
        Ok(true)
    }
}

impl Engine {
    /// Masks one non-NULL value under `col`. A replacement is appended to `scratch`.
    ///
    /// Inlined for its common case, a plain text value the detectors find clean: wide rows are
    /// mostly short such values, and two calls per value (to the plan's and the kind's match)
    /// cost a fifth of the value's scan.
    #[inline(always)]
    pub(crate) fn mask_value(
        &self,
        col: &ColPlan,
        v: &[u8],
        scratch: &mut Vec<u8>,
        hits: &mut Vec<Hit>,
    ) -> Outcome {
        if matches!(col, ColPlan::Scan(ValueKind::Text)) {
            return self.scan_text(v, scratch, hits);
        }
        self.mask_other_value(col, v, scratch, hits)
    }

    /// A plain text value through the detectors.
    #[inline(always)]
    fn scan_text(&self, v: &[u8], scratch: &mut Vec<u8>, hits: &mut Vec<Hit>) -> Outcome {
        hits.clear();
        self.scanner.scan(v, hits);
        if hits.is_empty() {
            Outcome::Keep
        } else {
            self.text_hits(v, hits, scratch)
        }
    }

    /// What a text value with detector hits becomes.
    #[inline(never)]
    fn text_hits(&self, v: &[u8], hits: &[Hit], scratch: &mut Vec<u8>) -> Outcome {
        if self.detector_style == Style::Null {
            Outcome::Null
        } else {
            self.rewrite_hits(v, hits, scratch)
        }
    }

    /// [`Self::mask_value`] for every plan but a plain text scan.
    #[inline(never)]
    fn mask_other_value(
        &self,
        col: &ColPlan,
        v: &[u8],
        scratch: &mut Vec<u8>,
        hits: &mut Vec<Hit>,
    ) -> Outcome {
        match col {
            ColPlan::Pass => Outcome::Keep,
            ColPlan::Whole { style, kind } => self.whole_value(*style, *kind, v, scratch),
            ColPlan::Scan(kind) => self.scan_value(*kind, v, scratch, hits, &[]),
            ColPlan::JsonKeys(kind, keys) => self.scan_value(*kind, v, scratch, hits, keys),
        }
    }

    fn scan_value(
        &self,
        kind: ValueKind,
        v: &[u8],
        scratch: &mut Vec<u8>,
        hits: &mut Vec<Hit>,
        keys: &[JsonKey],
    ) -> Outcome {
        match kind {
            ValueKind::Text => self.scan_text(v, scratch, hits),
            ValueKind::Embedded { binary } => {
                hits.clear();
                self.scanner.scan(v, hits);
                if hits.is_empty() {
                    // Backslash escapes inside quoted elements could split a match: look at the
                    // unescaped text too, and drop the value if it hides something.
                    let hidden = !binary && memchr::memchr(b'\\', v).is_some() && {
                        let unescaped: Vec<u8> = unescape_backslashes(v);
                        self.scanner.finds_any(&unescaped)
                    };
                    return if hidden { Outcome::Null } else { Outcome::Keep };
                }
                // Binary layouts carry lengths, and a span holding a quote or backslash could change
                // the text syntax: those values are dropped whole.
                let syntax = hits
                    .iter()
                    .any(|h| v[h.start..h.end].iter().any(|&b| b == b'"' || b == b'\\'));
                if binary || syntax || self.detector_style == Style::Null {
                    Outcome::Null
                } else {
                    self.rewrite_hits(v, hits, scratch)
                }
            }
            ValueKind::Json => match json::mask_json(self, v, keys, scratch) {
                Ok(false) => Outcome::Keep,
                Ok(true) => Outcome::Replace,
                Err(Unparsable) => {
                    scratch.clear();
                    redacted_json(scratch);
                    Outcome::Replace
                }
            },
            ValueKind::JsonbBinary => {
                scratch.push(1);
                let result = match v.split_first() {
                    Some((1, text)) => json::mask_json(self, text, keys, scratch),
                    _ => Err(Unparsable),
                };
                match result {
                    Ok(false) => {
                        scratch.clear();
                        Outcome::Keep
                    }
                    Ok(true) => Outcome::Replace,
                    Err(Unparsable) => {
                        scratch.truncate(1);
                        redacted_json(scratch);
                        Outcome::Replace
                    }
                }
            }
            // Plans only scan the kinds above.
            _ => Outcome::Keep,
        }
    }

    /// `v` with each detector hit rewritten in the detectors' style, into `scratch`.
    fn rewrite_hits(&self, v: &[u8], hits: &[Hit], scratch: &mut Vec<u8>) -> Outcome {
        styles::rewrite_spans(
            v,
            hits.iter().map(|h| (h.start, h.end)),
            self.detector_style,
            &self.hasher,
            scratch,
        );
        Outcome::Replace
    }

    /// A column rule's replacement, type-appropriate; NULL where no valid value of the type can be made.
    pub(crate) fn whole_value(
        &self,
        style: Style,
        kind: ValueKind,
        v: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Outcome {
        if style == Style::Null {
            return Outcome::Null;
        }
        match kind {
            ValueKind::Text => styles::replace_text(style, v, &self.hasher, scratch),
            ValueKind::Json => self.whole_json(style, v, scratch),
            ValueKind::JsonbBinary => match v.split_first() {
                Some((1, text)) => {
                    scratch.push(1);
                    self.whole_json(style, text, scratch);
                }
                _ => {
                    scratch.push(1);
                    redacted_json(scratch);
                }
            },
            ValueKind::Int { bytes, binary } if style == Style::KeyedHash => {
                let Some(canonical) = int_text(v, bytes, binary) else {
                    return Outcome::Null;
                };
                // Non-negative and within the type: the top (8 * bytes - 1) bits of the digest.
                let h = self.hasher.u64(canonical.as_bytes()) >> (64 - (8 * u32::from(bytes) - 1));
                if binary {
                    scratch.extend_from_slice(&h.to_be_bytes()[8 - usize::from(bytes)..]);
                } else {
                    scratch.extend_from_slice(h.to_string().as_bytes());
                }
            }
            ValueKind::NumericText if style == Style::KeyedHash => {
                scratch.extend_from_slice((self.hasher.u64(v) >> 1).to_string().as_bytes());
            }
            ValueKind::Uuid { binary } if style == Style::KeyedHash => {
                let canonical = if binary {
                    if v.len() != 16 {
                        return Outcome::Null;
                    }
                    uuid_text(v.try_into().expect("16 bytes"))
                } else {
                    v.to_ascii_lowercase()
                };
                let mut id: [u8; 16] = self.hasher.digest(&canonical)[..16]
                    .try_into()
                    .expect("16 bytes");
                // RFC 9562 version 8 (custom), variant 10.
                id[6] = (id[6] & 0x0f) | 0x80;
                id[8] = (id[8] & 0x3f) | 0x80;
                if binary {
                    scratch.extend_from_slice(&id);
                } else {
                    scratch.extend_from_slice(&uuid_text(&id));
                }
            }
            _ => return Outcome::Null,
        }
        Outcome::Replace
    }

    fn whole_json(&self, style: Style, text: &[u8], scratch: &mut Vec<u8>) {
        match style {
            Style::Partial | Style::KeyedHash => {
                let mut masked = Vec::new();
                styles::replace_text(style, text, &self.hasher, &mut masked);
                scratch.extend_from_slice(&json::encode_string_bytes(&masked));
            }
            Style::Redact | Style::Null => redacted_json(scratch),
        }
    }
}

fn redacted_json(out: &mut Vec<u8>) {
    out.push(b'"');
    out.extend_from_slice(REDACTED);
    out.push(b'"');
}

/// The decimal text of an integer value (text format: as sent; binary: big-endian of `bytes`).
fn int_text(v: &[u8], bytes: u8, binary: bool) -> Option<String> {
    if !binary {
        return std::str::from_utf8(v).ok().map(|s| s.trim().to_owned());
    }
    let n: i64 = match (bytes, v.len()) {
        (2, 2) => i16::from_be_bytes(v.try_into().ok()?).into(),
        (4, 4) => i32::from_be_bytes(v.try_into().ok()?).into(),
        (8, 8) => i64::from_be_bytes(v.try_into().ok()?),
        _ => return None,
    };
    Some(n.to_string())
}

fn uuid_text(id: &[u8; 16]) -> Vec<u8> {
    let mut hex = [0u8; 32];
    styles::hex(id, &mut hex);
    let mut out = Vec::with_capacity(36);
    for (i, chunk) in [
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32],
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            out.push(b'-');
        }
        out.extend_from_slice(chunk);
    }
    out
}

/// Drops each backslash and keeps the character it escapes (array and record text escaping).
pub(crate) fn unescape_backslashes(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut escaped = false;
    for &b in v {
        if b == b'\\' && !escaped {
            escaped = true;
        } else {
            out.push(b);
            escaped = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::config::{DetectorKind, JsonRule, MaskRules};
    use crate::mask::types::*;
    use crate::testing::data_row_body;

    fn masker(rules: MaskRules) -> Masker {
        let rules = MaskRules {
            hash_key_env: None,
            ..rules
        };
        Masker {
            engine: Arc::new(Engine::new(&rules, Some(b"0123456789abcdef")).unwrap()),
        }
    }

    fn col(name: &str, type_oid: u32, format: i16) -> Column<'_> {
        Column {
            name: name.as_bytes(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            format,
        }
    }

    /// The fields of a DataRow message produced by `mask_data_row`.
    fn fields(msg: &[u8]) -> Vec<Option<Vec<u8>>> {
        assert_eq!(msg[0], b'D');
        let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, msg.len() - 1, "length field covers the message");
        let body = &msg[5..];
        let n = u16::from_be_bytes(body[..2].try_into().unwrap());
        let mut pos = 2;
        (0..n)
            .map(|_| {
                let (v, next) = read_field(body, pos, MaskError::MalformedRow).unwrap();
                pos = next;
                v.map(|(a, b)| body[a..b].to_vec())
            })
            .collect()
    }

    fn mask(plan: &ResultPlan, body: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
        let mut out = b"prefix".to_vec();
        let changed = plan.mask_data_row(body, &mut out).unwrap();
        if changed {
            assert_eq!(&out[..6], b"prefix", "appends, keeps what was there");
            Some(fields(&out[6..]))
        } else {
            assert_eq!(out, b"prefix", "clean rows write nothing");
            None
        }
    }

    fn no_catalog(_: u32, _: i16) -> Option<(String, String)> {
        None
    }

    #[test]
    fn clean_rows_pass_untouched_and_pii_is_rewritten() {
        let m = masker(MaskRules::builtin_pii());
        let cols = [
            col("id", INT8, 0),
            col("comment", TEXT, 0),
            col("email", VARCHAR, 0),
            col("n", INT4, 1),
        ];
        let plan = m.plan(&cols, &no_catalog);
        assert!(!plan.is_passthrough());
        assert_eq!(plan.cols[0], ColPlan::Pass);

        let clean = data_row_body(&[
            Some(b"1"),
            Some(b"all good, order 4521"),
            None,
            Some(&[0, 0, 0, 7]),
        ]);
        assert_eq!(mask(&plan, &clean), None);

        let dirty = data_row_body(&[
            Some(b"2"),
            Some(b"call 415-555-0123 now"),
            Some(b"bob@example.com"),
            Some(&[0, 0, 0, 7]),
        ]);
        let masked = mask(&plan, &dirty).unwrap();
        assert_eq!(
            masked,
            vec![
                Some(b"2".to_vec()),
                Some(b"call **** now".to_vec()),
                Some(b"****".to_vec()),
                Some(vec![0, 0, 0, 7])
            ]
        );
    }

    #[test]
    fn column_rules_by_name_type_and_table() {
        let rules: MaskRules = toml::from_str(
            r#"
            detectors = ["email"]
            [[columns]]
            name = "*ssn*"
            [[columns]]
            table = "public.users"
            column = "phone"
            style = "partial"
            [[columns]]
            type = "inet"
            [[columns]]
            name = "user_id"
            style = "keyed_hash"
            "#,
        )
        .unwrap();
        let m = masker(rules);
        assert!(m.needs_catalog());
        let cols = [
            col("customer_ssn", TEXT, 0),
            Column {
                table_oid: 5000,
                attnum: 3,
                ..col("p", TEXT, 0)
            }, // aliased users.phone
            col("addr", INET, 0),
            col("user_id", INT8, 1),
            col("other", INT4, 0),
        ];
        let plan = m.plan_with_origin(&cols, &|oid, attnum| {
            (oid == 5000 && attnum == 3).then(|| ColumnOrigin {
                schema: "public".into(),
                table: "users".into(),
                column: "phone".into(),
            })
        });
        let body = data_row_body(&[
            Some(b"123-45-6789"),
            Some(b"+1 415 555 0123"),
            Some(b"10.0.0.1"),
            Some(&42i64.to_be_bytes()),
            Some(b"7"),
        ]);
        let out = mask(&plan, &body).unwrap();
        assert_eq!(out[0].as_deref(), Some(&b"****"[..]));
        assert_eq!(out[1].as_deref(), Some(&b"+* *** *** 0123"[..]));
        assert_eq!(out[2], None, "non-text types are redacted to NULL");
        let hashed = out[3].as_ref().unwrap();
        assert_eq!(hashed.len(), 8, "keyed hash keeps the int8 binary width");
        assert_ne!(hashed, &42i64.to_be_bytes());
        assert_eq!(out[4].as_deref(), Some(&b"7"[..]));
    }

    #[test]
    fn keyed_hash_of_an_int_is_the_same_in_text_and_binary() {
        let m =
            masker(toml::from_str("[[columns]]\nname = \"uid\"\nstyle = \"keyed_hash\"").unwrap());
        let text = m.plan(&[col("uid", INT8, 0)], &no_catalog);
        let binary = m.plan(&[col("uid", INT8, 1)], &no_catalog);
        let t = mask(&text, &data_row_body(&[Some(b"42")])).unwrap()[0]
            .clone()
            .unwrap();
        let b = mask(&binary, &data_row_body(&[Some(&42i64.to_be_bytes())])).unwrap()[0]
            .clone()
            .unwrap();
        let t: i64 = std::str::from_utf8(&t).unwrap().parse().unwrap();
        assert_eq!(t, i64::from_be_bytes(b.try_into().unwrap()));
        assert!(t >= 0);
    }

    #[test]
    fn unresolvable_origin_fails_closed() {
        let m =
            masker(toml::from_str("[[columns]]\ntable = \"users\"\ncolumn = \"email\"").unwrap());
        let plan = m.plan(
            &[
                Column {
                    table_oid: 77,
                    attnum: 1,
                    ..col("x", INT4, 0)
                },
                col("y", INT4, 0),
            ],
            &no_catalog,
        );
        let out = mask(&plan, &data_row_body(&[Some(b"5"), Some(b"6")])).unwrap();
        assert_eq!(out, vec![None, Some(b"6".to_vec())]);
    }

    #[test]
    fn passthrough_when_nothing_can_change() {
        let m = masker(MaskRules::builtin_pii());
        assert!(
            m.plan(
                &[col("id", INT8, 0), col("at", TIMESTAMPTZ, 1)],
                &no_catalog
            )
            .is_passthrough()
        );
        assert!(
            !m.plan(&[col("id", INT8, 0), col("note", TEXT, 1)], &no_catalog)
                .is_passthrough()
        );
        assert!(
            masker(MaskRules::default())
                .plan(&[col("note", TEXT, 0)], &no_catalog)
                .is_passthrough()
        );
    }

    #[test]
    fn binary_text_like_and_jsonb() {
        let rules = MaskRules {
            detectors: vec![DetectorKind::Email],
            json: vec![JsonRule {
                path: "$.ssn".into(),
                style: None,
            }],
            ..MaskRules::default()
        };
        let m = masker(rules);
        let plan = m.plan(
            &[
                col("t", TEXT, 1),
                col("j", JSONB, 1),
                col("jt", JSONB, 0),
                col("bad", JSONB, 1),
            ],
            &no_catalog,
        );
        let body = data_row_body(&[
            Some(b"to a@b.io"),
            Some(b"\x01{\"ssn\": \"123-45-6789\", \"e\": \"x@y.io\"}"),
            Some(b"{\"k\": 1}"),
            Some(b"\x02{}"),
        ]);
        let out = mask(&plan, &body).unwrap();
        assert_eq!(out[0].as_deref(), Some(&b"to ****"[..]));
        assert_eq!(
            out[1].as_deref(),
            Some(&b"\x01{\"ssn\": \"****\", \"e\": \"****\"}"[..])
        );
        assert_eq!(out[2].as_deref(), Some(&b"{\"k\": 1}"[..]));
        assert_eq!(
            out[3].as_deref(),
            Some(&b"\x01\"****\""[..]),
            "unknown jsonb version fails closed"
        );
    }

    #[test]
    fn embedded_text_in_arrays_and_binary_containers() {
        let m = masker(MaskRules {
            detectors: vec![DetectorKind::Email],
            ..MaskRules::default()
        });
        let plan = m.plan(
            &[
                col("a", 1009, 0),
                col("b", 1009, 1),
                col("c", 1009, 0),
                col("d", 16400, 0),
            ],
            &no_catalog,
        );
        let body = data_row_body(&[
            Some(b"{x,a@b.io}"),
            Some(b"\0\0\0\x01...a@b.io"),
            Some(b"{\"a\\@b.io\"}"),
            Some(b"(1,c@d.io)"),
        ]);
        let out = mask(&plan, &body).unwrap();
        assert_eq!(out[0].as_deref(), Some(&b"{x,****}"[..]));
        assert_eq!(out[1], None, "binary containers with a hit become NULL");
        assert_eq!(out[2], None, "a match hidden by escapes drops the value");
        assert_eq!(out[3].as_deref(), Some(&b"(1,****)"[..]));
    }

    #[test]
    fn null_style_and_partial_for_detectors() {
        let m = masker(MaskRules {
            detectors: vec![DetectorKind::Card],
            default_style: Style::Null,
            ..MaskRules::default()
        });
        let plan = m.plan(&[col("t", TEXT, 0)], &no_catalog);
        assert_eq!(
            mask(&plan, &data_row_body(&[Some(b"4111111111111111")])).unwrap(),
            vec![None]
        );
        let m = masker(MaskRules {
            detectors: vec![DetectorKind::Card],
            default_style: Style::Partial,
            ..MaskRules::default()
        });
        let plan = m.plan(&[col("t", TEXT, 0)], &no_catalog);
        assert_eq!(
            mask(&plan, &data_row_body(&[Some(b"card 4111-1111-1111-1111.")])).unwrap(),
            vec![Some(b"card ****-****-****-1111.".to_vec())]
        );
    }

    #[test]
    fn malformed_rows_are_errors() {
        let m = masker(MaskRules::builtin_pii());
        let plan = m.plan(&[col("t", TEXT, 0), col("u", TEXT, 0)], &no_catalog);
        let mut out = Vec::new();
        let good = data_row_body(&[Some(b"a"), Some(b"b")]);
        for bad in [
            &good[..1],
            &good[..good.len() - 1],
            &data_row_body(&[Some(b"a")])[..],
            &[good.clone(), vec![0]].concat()[..],
            &[0, 2, 0xff, 0xff, 0xff, 0xfe][..],
        ] {
            assert!(plan.mask_data_row(bad, &mut out).is_err(), "{bad:?}");
        }
        // Malformed after a masked field: nothing half-written stays in `out`.
        let dirty = [data_row_body(&[Some(b"a@b.io"), Some(b"b")]), vec![9]].concat();
        assert!(plan.mask_data_row(&dirty, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn uuid_keyed_hash_is_a_uuid() {
        let m =
            masker(toml::from_str("[[columns]]\ntype = \"uuid\"\nstyle = \"keyed_hash\"").unwrap());
        let plan = m.plan(&[col("id", UUID, 0)], &no_catalog);
        let out = mask(
            &plan,
            &data_row_body(&[Some(b"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")]),
        )
        .unwrap();
        let text = String::from_utf8(out[0].clone().unwrap()).unwrap();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "8");
        let plan_bin = m.plan(&[col("id", UUID, 1)], &no_catalog);
        let raw: [u8; 16] = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        let bin = mask(&plan_bin, &data_row_body(&[Some(&raw)])).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(
            uuid_text(&bin.try_into().unwrap()),
            text.as_bytes(),
            "same uuid in both formats"
        );
    }
}
