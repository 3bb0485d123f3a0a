//! `COPY ... TO STDOUT`: the server sends one CopyData message per row.
//!
//! CopyOutResponse says only text-or-binary and the column count, so the driver passes what the
//! statement says in [`CopyOptions`] (`FORMAT csv`, `DELIMITER`, `QUOTE`, `ESCAPE`, `NULL`, `HEADER`,
//! the source table for `COPY table TO`, and column types when it knows them). Rules this COPY cannot
//! evaluate refuse it: name rules without column names, `table` rules without the source table, type
//! rules without column types. Columns of unknown type are scanned by the detectors as text.
//!
//! - **Text and CSV**: fields are split by the delimiter (text: backslash escapes; CSV: quotes). A field
//!   holding escapes or quotes is decoded before the detectors see it, and every replaced field is
//!   encoded again, so a mask can never break the row's syntax.
//! - **Binary**: tuples have the DataRow field layout. Text-like columns (known types) are rewritten as
//!   in DataRows; a column rule or a detector hit on any other column makes the field NULL. The header
//!   (first message) and trailer pass through. Binary rows are rebuilt in a fresh buffer (one
//!   allocation per message; binary COPY is rare).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::config::Selector;
use super::rows::{self, ColPlan, ColumnOrigin, Outcome};
use super::types;
use super::{Engine, MaskError, Masker};

/// What the COPY statement says about its output. [`CopyOptions::text`] and [`CopyOptions::csv`] give
/// PostgreSQL's defaults for each format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// `FORMAT csv` (otherwise text; binary comes from CopyOutResponse).
    pub csv: bool,
    /// Text: tab. CSV: comma.
    pub delimiter: u8,
    /// CSV only. Default `"`.
    pub quote: u8,
    /// CSV only. Default: the quote character.
    pub escape: u8,
    /// Text: `\N`. CSV: empty (unquoted).
    pub null: Vec<u8>,
    /// `HEADER`: the first row holds column names and passes unmasked.
    pub header: bool,
    /// (schema, table) of `COPY table TO STDOUT`; `None` for `COPY (query) TO STDOUT`.
    pub table: Option<(String, String)>,
    /// Column type OIDs, when the driver knows them.
    pub column_types: Option<Vec<u32>>,
}

impl CopyOptions {
    pub fn text() -> CopyOptions {
        CopyOptions {
            csv: false,
            delimiter: b'\t',
            quote: b'"',
            escape: b'"',
            null: b"\\N".to_vec(),
            header: false,
            table: None,
            column_types: None,
        }
    }

    pub fn csv() -> CopyOptions {
        CopyOptions {
            csv: true,
            delimiter: b',',
            null: Vec::new(),
            ..CopyOptions::text()
        }
    }
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions::text()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Passthrough,
    Text,
    Binary,
    Refuse(&'static str),
}

/// The masking decision for one `COPY ... TO STDOUT`.
#[derive(Debug)]
pub struct CopyPlan {
    engine: Arc<Engine>,
    mode: Mode,
    cols: Vec<ColPlan>,
    options: CopyOptions,
    header_pending: AtomicBool,
}

impl Masker {
    /// Plans a COPY from its CopyOutResponse (`format` 0 text / 1 binary, per-column formats) and the
    /// column names of the statement when known.
    pub fn copy_plan(
        &self,
        format: u8,
        column_formats: &[i16],
        column_names: Option<&[String]>,
        options: &CopyOptions,
    ) -> CopyPlan {
        let engine = &self.engine;
        let plan = |mode, cols| CopyPlan {
            engine: Arc::clone(engine),
            mode,
            cols,
            options: options.clone(),
            header_pending: AtomicBool::new(options.header),
        };
        if self.is_noop() {
            return plan(Mode::Passthrough, Vec::new());
        }
        let n = column_formats.len();
        let has = |f: fn(&Selector) -> bool| engine.columns.iter().any(|r| f(&r.selector));
        let names = column_names.filter(|names| names.len() == n);
        let types = options.column_types.as_deref().filter(|t| t.len() == n);
        let refusal = if has(|s| matches!(s, Selector::Name(_))) && names.is_none() {
            Some("the policy masks columns by name and the COPY column names are unknown")
        } else if has(|s| matches!(s, Selector::TableColumn { .. }))
            && (names.is_none() || options.table.is_none())
        {
            Some("the policy masks table columns and the COPY source table is unknown")
        } else if has(|s| matches!(s, Selector::Type(_))) && types.is_none() {
            Some("the policy masks columns by type and the COPY column types are unknown")
        } else {
            None
        };
        if let Some(why) = refusal {
            return plan(Mode::Refuse(why), Vec::new());
        }
        let binary = format != 0;
        let cols: Vec<ColPlan> = (0..n)
            .map(|i| {
                let name = names.map_or(&[][..], |names| names[i].as_bytes());
                let type_oid = types.map_or(0, |t| t[i]);
                let origin = options.table.as_ref().map(|(schema, table)| ColumnOrigin {
                    schema: schema.clone(),
                    table: table.clone(),
                    column: String::from_utf8_lossy(name).into_owned(),
                });
                rows::column_plan(
                    engine,
                    types::value_kind(type_oid, binary),
                    name,
                    type_oid,
                    origin.as_ref(),
                )
            })
            .collect();
        self.copy_plan_from(binary, cols, options)
    }

    /// A COPY plan from per-column plans.
    pub(crate) fn copy_plan_from(
        &self,
        binary: bool,
        cols: Vec<ColPlan>,
        options: &CopyOptions,
    ) -> CopyPlan {
        let mode = if self.is_noop() || cols.iter().all(|c| *c == ColPlan::Pass) {
            Mode::Passthrough
        } else if binary {
            Mode::Binary
        } else {
            Mode::Text
        };
        CopyPlan {
            engine: Arc::clone(&self.engine),
            mode,
            cols,
            options: options.clone(),
            header_pending: AtomicBool::new(options.header),
        }
    }
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyPlan {
    /// Nothing in this COPY can change: forward CopyData untouched.
    pub fn is_passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// `data` is a CopyData payload. `Ok(false)`: forward it untouched. `Ok(true)`: a complete CopyData
    /// message (`d`, length, payload) was appended to `out`. Errors: a row that does not match the
    /// COPY's shape, or a COPY the policy cannot evaluate ([`MaskError::CopyRefused`]).
    pub fn mask_copy_data(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool, MaskError> {
        match self.mode {
            Mode::Passthrough => Ok(false),
            Mode::Refuse(why) => Err(MaskError::CopyRefused(why)),
            Mode::Binary => self.mask_binary(data, out),
            Mode::Text => {
                if self.header_pending.swap(false, Ordering::Relaxed) {
                    return Ok(false);
                }
                self.mask_text_row(data, out)
            }
        }
    }

    fn mask_text_row(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool, MaskError> {
        let bad = MaskError::MalformedCopy;
        let line = data
            .strip_suffix(b"\n")
            .ok_or(bad("row does not end with a newline"))?;
        let engine = &*self.engine;
        let mut scratch = Vec::new();
        let mut hits = Vec::new();

        // Pass 1: the first field that changes.
        let mut pos = 0;
        let mut first = None;
        for (i, col) in self.cols.iter().enumerate() {
            let end = self.field_end(line, pos)?;
            if *col != ColPlan::Pass {
                let outcome =
                    self.mask_field(engine, col, &line[pos..end], &mut scratch, &mut hits);
                if !matches!(outcome, Outcome::Keep) {
                    first = Some((i, pos, end, outcome));
                    break;
                }
            }
            pos = self.next_field(line, end, i + 1 == self.cols.len())?;
        }
        let Some((first, first_pos, first_end, outcome)) = first else {
            return if pos == line.len() {
                Ok(false)
            } else {
                Err(bad("more fields than columns"))
            };
        };

        // Pass 2: copy the clean prefix, write the changed fields, encoded.
        let msg_start = out.len();
        out.push(b'd');
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&line[..first_pos]);
        self.write_text_field(out, &outcome, &[], &scratch);
        let mut pos = self
            .next_field(line, first_end, first + 1 == self.cols.len())
            .inspect_err(|_| out.truncate(msg_start))?;
        for (i, col) in self.cols.iter().enumerate().skip(first + 1) {
            out.push(self.options.delimiter);
            let end = self
                .field_end(line, pos)
                .inspect_err(|_| out.truncate(msg_start))?;
            let raw = &line[pos..end];
            scratch.clear();
            let outcome = if *col == ColPlan::Pass {
                Outcome::Keep
            } else {
                self.mask_field(engine, col, raw, &mut scratch, &mut hits)
            };
            self.write_text_field(out, &outcome, raw, &scratch);
            pos = self
                .next_field(line, end, i + 1 == self.cols.len())
                .inspect_err(|_| out.truncate(msg_start))?;
        }
        if pos != line.len() {
            out.truncate(msg_start);
            return Err(bad("more fields than columns"));
        }
        out.push(b'\n');
        let len = u32::try_from(out.len() - msg_start - 1)
            .ok()
            .filter(|&l| l <= i32::MAX as u32)
            .ok_or(bad("masked row too long"))?;
        out[msg_start + 1..msg_start + 5].copy_from_slice(&len.to_be_bytes());
        Ok(true)
    }

    /// After the field ending at `end`: the start of the next one (skipping the delimiter), or the
    /// line's end after the last field.
    fn next_field(&self, line: &[u8], end: usize, last: bool) -> Result<usize, MaskError> {
        if last {
            return Ok(end);
        }
        if line.get(end) != Some(&self.options.delimiter) {
            return Err(MaskError::MalformedCopy("fewer fields than columns"));
        }
        Ok(end + 1)
    }

    /// End of the field starting at `start`.
    fn field_end(&self, line: &[u8], start: usize) -> Result<usize, MaskError> {
        let o = &self.options;
        let rest = &line[start..];
        if !o.csv {
            let mut i = 0;
            while let Some(k) = memchr::memchr2(o.delimiter, b'\\', &rest[i..]) {
                if rest[i + k] == o.delimiter {
                    return Ok(start + i + k);
                }
                i += k + 2;
                if i >= rest.len() {
                    return Ok(line.len());
                }
            }
            return Ok(line.len());
        }
        if rest.first() != Some(&o.quote) {
            return Ok(start + memchr::memchr(o.delimiter, rest).unwrap_or(rest.len()));
        }
        let mut i = 1;
        loop {
            let k = memchr::memchr2(o.quote, o.escape, &rest[i..])
                .ok_or(MaskError::MalformedCopy("unterminated CSV quote"))?;
            let at = i + k;
            let next = rest.get(at + 1).copied();
            if rest[at] == o.escape
                && (next == Some(o.quote) || (o.escape != o.quote && next == Some(o.escape)))
            {
                i = at + 2;
            } else if rest[at] == o.quote {
                return Ok(start + at + 1);
            } else {
                i = at + 1;
            }
        }
    }

    /// Masks one raw field. A replacement is left *decoded* in `scratch`; the writer encodes it.
    fn mask_field(
        &self,
        engine: &Engine,
        col: &ColPlan,
        raw: &[u8],
        scratch: &mut Vec<u8>,
        hits: &mut Vec<super::detectors::Hit>,
    ) -> Outcome {
        let o = &self.options;
        let quoted = o.csv && raw.first() == Some(&o.quote);
        if !quoted && raw == o.null.as_slice() {
            return Outcome::Keep;
        }
        let value: Cow<'_, [u8]> = if o.csv {
            if quoted {
                csv_decode(raw, o.quote, o.escape)
            } else {
                Cow::Borrowed(raw)
            }
        } else {
            text_decode(raw)
        };
        engine.mask_value(col, &value, scratch, hits)
    }

    fn write_text_field(&self, out: &mut Vec<u8>, outcome: &Outcome, raw: &[u8], decoded: &[u8]) {
        let o = &self.options;
        match outcome {
            Outcome::Keep => out.extend_from_slice(raw),
            Outcome::Null => out.extend_from_slice(&o.null),
            Outcome::Replace if o.csv => {
                out.push(o.quote);
                for &b in decoded {
                    if b == o.quote || (b == o.escape && o.escape != o.quote) {
                        out.push(o.escape);
                    }
                    out.push(b);
                }
                out.push(o.quote);
            }
            Outcome::Replace => {
                for &b in decoded {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        0x08 => out.extend_from_slice(b"\\b"),
                        0x0b => out.extend_from_slice(b"\\v"),
                        0x0c => out.extend_from_slice(b"\\f"),
                        d if d == o.delimiter => {
                            out.push(b'\\');
                            out.push(d);
                        }
                        _ => out.push(b),
                    }
                }
            }
        }
    }

    fn mask_binary(&self, data: &[u8], out: &mut Vec<u8>) -> Result<bool, MaskError> {
        let bad = MaskError::MalformedCopy;
        let engine = &*self.engine;
        let mut pos = 0;
        if data.starts_with(BINARY_SIGNATURE) {
            let ext = data.get(15..19).ok_or(bad("truncated binary header"))?;
            let ext = u32::from_be_bytes(ext.try_into().expect("4 bytes")) as usize;
            pos = 19usize
                .checked_add(ext)
                .filter(|&p| p <= data.len())
                .ok_or(bad("truncated binary header"))?;
        }
        let mut payload = data[..pos].to_vec();
        let mut changed = false;
        let mut scratch = Vec::new();
        let mut hits = Vec::new();
        while pos < data.len() {
            let count = data.get(pos..pos + 2).ok_or(bad("truncated tuple"))?;
            let count = i16::from_be_bytes(count.try_into().expect("2 bytes"));
            payload.extend_from_slice(&data[pos..pos + 2]);
            pos += 2;
            if count == -1 {
                continue; // trailer
            }
            if usize::try_from(count).ok() != Some(self.cols.len()) {
                return Err(bad("tuple column count differs from CopyOutResponse"));
            }
            for col in &self.cols {
                let (value, next) = rows::read_field(data, pos, bad)?;
                match value {
                    Some((a, b)) if *col != ColPlan::Pass => {
                        scratch.clear();
                        let outcome = engine.mask_value(col, &data[a..b], &mut scratch, &mut hits);
                        changed |= !matches!(outcome, Outcome::Keep);
                        rows::write_field(&mut payload, &outcome, &data[a..b], &scratch)
                            .map_err(|_| bad("masked field too long"))?;
                    }
                    _ => payload.extend_from_slice(&data[pos..next]),
                }
                pos = next;
            }
        }
        if !changed {
            return Ok(false);
        }
        let len = u32::try_from(payload.len() + 4)
            .ok()
            .filter(|&l| l <= i32::MAX as u32)
            .ok_or(bad("masked row too long"))?;
        out.push(b'd');
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(true)
    }
}

/// Decodes COPY text escapes: `\b \f \n \r \t \v \\`, octal `\NNN`, hex `\xHH`, `\c` → `c`.
fn text_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr(b'\\', raw).is_none() {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' || i == raw.len() {
            out.push(b);
            continue;
        }
        let c = raw[i];
        i += 1;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// The content of a quoted CSV field.
fn csv_decode(raw: &[u8], quote: u8, escape: u8) -> Cow<'_, [u8]> {
    let inner = &raw[1..raw.len().saturating_sub(1).max(1)];
    if memchr::memchr2(quote, escape, inner).is_none() {
        return Cow::Borrowed(inner);
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        if inner[i] == escape
            && i + 1 < inner.len()
            && (inner[i + 1] == quote || inner[i + 1] == escape)
        {
            i += 1;
        }
        out.push(inner[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::config::MaskRules;

    fn masker(toml_rules: &str) -> Masker {
        let rules: MaskRules = toml::from_str(toml_rules).unwrap();
        Masker {
            engine: Arc::new(Engine::new(&rules, Some(b"0123456789abcdef")).unwrap()),
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    fn run(plan: &CopyPlan, row: &str) -> Option<String> {
        let mut out = Vec::new();
        if plan.mask_copy_data(row.as_bytes(), &mut out).unwrap() {
            assert_eq!(out[0], b'd');
            assert_eq!(
                u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
                out.len() - 1
            );
            Some(String::from_utf8(out[5..].to_vec()).unwrap())
        } else {
            assert!(out.is_empty());
            None
        }
    }

    #[test]
    fn text_rows_are_masked_field_by_field() {
        let m = masker("detectors = [\"email\", \"secret\"]\n[[columns]]\nname = \"ssn\"");
        let n = names(&["id", "note", "ssn"]);
        let plan = m.copy_plan(0, &[0, 0, 0], Some(&n), &CopyOptions::text());
        assert_eq!(
            run(&plan, "1\tall fine\t\\N\n"),
            None,
            "clean row, NULL ssn stays NULL"
        );
        assert_eq!(
            run(&plan, "2\tmail a@b.io\\tnow\t123-45-6789\n").unwrap(),
            "2\tmail ****\\tnow\t\\N\n",
            "unknown type: NULL"
        );
        // An escape hides the value from a raw scan; the decoded field is masked and re-encoded.
        assert_eq!(
            run(&plan, "3\tpassword:\\thunter2\t\\N\n").unwrap(),
            "3\tpassword:\\t****\t\\N\n"
        );
    }

    #[test]
    fn csv_rows_with_quotes_and_header() {
        let m = masker("detectors = [\"email\"]\n[[columns]]\nname = \"secret\"\nstyle = \"null\"");
        let n = names(&["id", "note", "secret"]);
        let options = CopyOptions {
            header: true,
            ..CopyOptions::csv()
        };
        let plan = m.copy_plan(0, &[0, 0, 0], Some(&n), &options);
        assert_eq!(run(&plan, "id,note,secret\n"), None, "header passes");
        assert_eq!(run(&plan, "1,plain,\n"), None);
        assert_eq!(
            run(&plan, "2,\"x, \"\"a@b.io\"\"\nline\",s3\n").unwrap(),
            "2,\"x, \"\"****\"\"\nline\",\n"
        );
        assert_eq!(run(&plan, "3,a@b.io,\"\"\n").unwrap(), "3,\"****\",\n");
    }

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        let by_name = masker("[[columns]]\nname = \"ssn\"");
        let plan = by_name.copy_plan(0, &[0], None, &CopyOptions::text());
        assert!(matches!(
            plan.mask_copy_data(b"x\n", &mut Vec::new()),
            Err(MaskError::CopyRefused(_))
        ));
        let by_type = masker("[[columns]]\ntype = \"inet\"");
        let plan = by_type.copy_plan(0, &[0], Some(&names(&["a"])), &CopyOptions::text());
        assert!(matches!(
            plan.mask_copy_data(b"x\n", &mut Vec::new()),
            Err(MaskError::CopyRefused(_))
        ));
        let with_types = CopyOptions {
            column_types: Some(vec![types::INET]),
            ..CopyOptions::text()
        };
        let plan = by_type.copy_plan(0, &[0], Some(&names(&["a"])), &with_types);
        assert_eq!(run(&plan, "10.0.0.1\n").unwrap(), "\\N\n");
        let by_table = masker("[[columns]]\ntable = \"public.users\"\ncolumn = \"email\"");
        let plan = by_table.copy_plan(0, &[0], Some(&names(&["email"])), &CopyOptions::text());
        assert!(plan.mask_copy_data(b"x\n", &mut Vec::new()).is_err());
        let from_users = CopyOptions {
            table: Some(("public".into(), "users".into())),
            ..CopyOptions::text()
        };
        let plan = by_table.copy_plan(0, &[0], Some(&names(&["email"])), &from_users);
        assert_eq!(
            run(&plan, "a@b.io\n").unwrap(),
            "\\N\n",
            "type unknown: NULL"
        );
        let typed = CopyOptions {
            column_types: Some(vec![types::TEXT]),
            ..from_users
        };
        let plan = by_table.copy_plan(0, &[0], Some(&names(&["email"])), &typed);
        assert_eq!(run(&plan, "a@b.io\n").unwrap(), "****\n");
    }

    #[test]
    fn malformed_text_rows() {
        let m = masker("detectors = [\"email\"]");
        let plan = m.copy_plan(0, &[0, 0], None, &CopyOptions::text());
        for bad in ["a\tb", "a\n", "a\tb\tc\n", "a@b.io\tb\tc\n"] {
            assert!(
                plan.mask_copy_data(bad.as_bytes(), &mut Vec::new())
                    .is_err(),
                "{bad:?}"
            );
        }
        let csv = m.copy_plan(0, &[0, 0], None, &CopyOptions::csv());
        assert!(csv.mask_copy_data(b"\"open,b\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn binary_copy_nulls_hits_and_keeps_header() {
        let m = masker("detectors = [\"email\"]");
        let plan = m.copy_plan(1, &[1, 1], None, &CopyOptions::text());
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        let tuple = |a: &[u8], b: &[u8]| {
            let mut t = 2i16.to_be_bytes().to_vec();
            for v in [a, b] {
                t.extend_from_slice(&(v.len() as i32).to_be_bytes());
                t.extend_from_slice(v);
            }
            t
        };
        data.extend_from_slice(&tuple(b"\0\0\0\x07", b"clean"));
        assert!(!plan.mask_copy_data(&data, &mut Vec::new()).unwrap());
        let dirty = tuple(b"\0\0\0\x07", b"a@b.io");
        let mut out = Vec::new();
        assert!(plan.mask_copy_data(&dirty, &mut out).unwrap());
        assert_eq!(
            &out[5..],
            &[
                &2i16.to_be_bytes()[..],
                &4i32.to_be_bytes(),
                b"\0\0\0\x07",
                &(-1i32).to_be_bytes()
            ]
            .concat()
        );
        assert!(
            !plan
                .mask_copy_data(&(-1i16).to_be_bytes(), &mut Vec::new())
                .unwrap(),
            "trailer"
        );
    }

    #[test]
    fn decoders() {
        assert_eq!(&*text_decode(b"a\\tb\\\\c\\101\\x41\\N"), b"a\tb\\cAAN");
        assert_eq!(&*csv_decode(b"\"a\"\"b\"", b'"', b'"'), b"a\"b");
        assert_eq!(&*csv_decode(b"\"ab\"", b'"', b'"'), b"ab");
    }
}
