//! Masking inside json and jsonb values: by path, and by detector inside string (and number) values.
//!
//! simd-json validates the document and decodes its strings (SIMD, in place). A cursor over the
//! original text follows the tape in document order to find each value's byte span, so only masked
//! values are rewritten: everything else, including number precision, key order and spacing, stays
//! byte-identical. simd-json decodes a string in place at its own position; each string's position is
//! checked against the cursor, and any disagreement fails closed (the value is redacted whole).

use memchr::memmem;
use simd_json::{Node, StaticNode};

use super::config::{MaskRules, Style};
use super::detectors::Hit;
use super::rows::JsonKey;
use super::styles::{self, REDACTED};
use super::{Engine, MaskError};

/// Deeper documents are redacted whole rather than walked.
const MAX_DEPTH: usize = 256;

/// A compiled `[[mask.json]]` rule.
#[derive(Debug, Clone)]
pub(crate) struct PathRule {
    steps: Vec<PathStep>,
    style: Style,
    /// `"key"` for the last named key of the path: a document without it cannot match.
    required_key: Option<memmem::Finder<'static>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathStep {
    Child(Selector),
    /// `..sel`: `sel` at any depth below.
    Descendant(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Key(String),
    Index(usize),
    Any,
}

/// Where the walker is: the keys and indexes from the root.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

pub(crate) fn compile_path_rules(rules: &MaskRules) -> Result<Vec<PathRule>, MaskError> {
    rules
        .json
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let steps = parse_path(&rule.path).map_err(|why| {
                MaskError::Config(format!("mask.json[{i}].path: {why} in `{}`", rule.path))
            })?;
            let required_key = steps.iter().rev().find_map(|s| match s {
                PathStep::Child(Selector::Key(k)) | PathStep::Descendant(Selector::Key(k)) => {
                    Some(memmem::Finder::new(&encode_string(k)).into_owned())
                }
                _ => None,
            });
            Ok(PathRule {
                steps,
                style: rule.style.unwrap_or(rules.default_style),
                required_key,
            })
        })
        .collect()
}

/// `$`, `.key`, `.*`, `['key']`, `["key"]`, `[0]`, `[*]`, and `..` before any of them.
fn parse_path(path: &str) -> Result<Vec<PathStep>, String> {
    let rest = path
        .trim()
        .strip_prefix('$')
        .ok_or("a path starts with `$`")?;
    let mut s = rest.as_bytes();
    let mut steps = Vec::new();
    while !s.is_empty() {
        let descendant = s.starts_with(b"..");
        s = if descendant { &s[2..] } else { s };
        let selector = if let Some(after) = s.strip_prefix(b"[") {
            let close = after
                .iter()
                .position(|&b| b == b']')
                .ok_or("unclosed `[`")?;
            let inner = std::str::from_utf8(&after[..close])
                .map_err(|_| "not UTF-8")?
                .trim();
            s = &after[close + 1..];
            if inner == "*" {
                Selector::Any
            } else if let Some(q) = inner.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
                Selector::Key(q.to_owned())
            } else if let Some(q) = inner.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                Selector::Key(q.to_owned())
            } else {
                Selector::Index(
                    inner
                        .parse()
                        .map_err(|_| format!("`[{inner}]` is not an index, `*` or a quoted key"))?,
                )
            }
        } else {
            let after = if descendant {
                s
            } else {
                s.strip_prefix(b".").ok_or("expected `.` or `[`")?
            };
            let len = after
                .iter()
                .position(|&b| b == b'.' || b == b'[')
                .unwrap_or(after.len());
            if len == 0 {
                return Err("empty key".into());
            }
            let name = std::str::from_utf8(&after[..len]).map_err(|_| "not UTF-8")?;
            s = &after[len..];
            if name == "*" {
                Selector::Any
            } else {
                Selector::Key(name.to_owned())
            }
        };
        steps.push(if descendant {
            PathStep::Descendant(selector)
        } else {
            PathStep::Child(selector)
        });
    }
    Ok(steps)
}

fn selects(sel: &Selector, step: &Step<'_>) -> bool {
    match (sel, step) {
        (Selector::Any, _) => true,
        (Selector::Key(k), Step::Key(s)) => k == s,
        (Selector::Index(i), Step::Index(j)) => i == j,
        _ => false,
    }
}

fn path_matches(steps: &[PathStep], path: &[Step<'_>]) -> bool {
    match steps.split_first() {
        None => path.is_empty(),
        Some((PathStep::Child(sel), rest)) => path
            .split_first()
            .is_some_and(|(step, tail)| selects(sel, step) && path_matches(rest, tail)),
        Some((PathStep::Descendant(sel), rest)) => {
            (0..path.len()).any(|k| selects(sel, &path[k]) && path_matches(rest, &path[k + 1..]))
        }
    }
}

/// The document could not be parsed or followed: the caller redacts it whole.
#[derive(Debug)]
pub(crate) struct Unparsable;

/// Masks the JSON document `text`. `Ok(false)`: nothing to change. `Ok(true)`: the masked document was
/// appended to `out`.
pub(crate) fn mask_json(
    engine: &Engine,
    text: &[u8],
    keys: &[JsonKey],
    out: &mut Vec<u8>,
) -> Result<bool, Unparsable> {
    if keys.is_empty() && !needs_walk(engine, text) {
        return Ok(false);
    }
    // simd-json rejects numbers beyond 64 bits (`1e400`, 30-digit integers), which json and jsonb
    // allow. Only strings and structure matter here, so on failure such numbers become `0` plus
    // padding (same length, same offsets) and the document is parsed again; anything else still fails.
    let mut first = text.to_vec();
    let mut second = Vec::new();
    let first_base = first.as_ptr() as usize;
    let (tape, base) = match simd_json::to_tape(&mut first) {
        Ok(tape) => (tape, first_base),
        Err(_) => {
            second.extend_from_slice(text);
            neutralize_numbers(&mut second);
            let base = second.as_ptr() as usize;
            (
                simd_json::to_tape(&mut second).map_err(|_| Unparsable)?,
                base,
            )
        }
    };
    let mut walker = Walker {
        engine,
        keys,
        raw: text,
        base,
        nodes: &tape.0,
        idx: 0,
        cur: 0,
        path: Vec::new(),
        edits: Vec::new(),
        buf: Vec::new(),
        hits: Vec::new(),
    };
    walker.value(0, false)?;
    walker.skip();
    if walker.cur != text.len() && !text[walker.cur..].iter().all(u8::is_ascii_whitespace) {
        return Err(Unparsable);
    }
    if walker.edits.is_empty() {
        return Ok(false);
    }
    let mut last = 0;
    for e in &walker.edits {
        out.extend_from_slice(&text[last..e.start]);
        out.extend_from_slice(&walker.buf[e.rep.0..e.rep.1]);
        last = e.end;
    }
    out.extend_from_slice(&text[last..]);
    Ok(true)
}

/// Whether the document must be parsed: a path rule may match, or a detector may hit. A backslash
/// means escapes could hide a key or a value from a raw scan, so such documents are always parsed.
fn needs_walk(engine: &Engine, text: &[u8]) -> bool {
    let escaped = memchr::memchr(b'\\', text).is_some();
    if engine.json_keys_may_match(text) {
        return true;
    }
    let path_may_match = engine.json.iter().any(|r| {
        escaped
            || r.required_key
                .as_ref()
                .is_none_or(|f| f.find(text).is_some())
    });
    path_may_match || (!engine.scanner.is_empty() && (escaped || engine.scanner.finds_any(text)))
}

/// Replaces each number token outside strings with `0` and spaces of the same length. Tokens that
/// are not valid JSON numbers are left alone, so an invalid document stays invalid.
fn neutralize_numbers(doc: &mut [u8]) {
    let mut i = 0;
    while i < doc.len() {
        match doc[i] {
            b'"' => {
                i += 1;
                loop {
                    match doc
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        None => return,
                        Some(k) if doc[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k + 1;
                            break;
                        }
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let len = doc[i..]
                    .iter()
                    .take_while(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .count();
                if is_json_number(&doc[i..i + len]) {
                    doc[i] = b'0';
                    doc[i + 1..i + len].fill(b' ');
                }
                i += len;
            }
            _ => i += 1,
        }
    }
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn is_json_number(t: &[u8]) -> bool {
    let digits = |t: &[u8]| t.iter().take_while(|b| b.is_ascii_digit()).count();
    let t = t.strip_prefix(b"-").unwrap_or(t);
    let int = digits(t);
    if int == 0 || (int > 1 && t[0] == b'0') {
        return false;
    }
    let mut rest = &t[int..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = digits(frac);
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    if let Some(exp) = rest.strip_prefix(b"e").or_else(|| rest.strip_prefix(b"E")) {
        let exp = exp
            .strip_prefix(b"+")
            .or_else(|| exp.strip_prefix(b"-"))
            .unwrap_or(exp);
        let n = digits(exp);
        if n == 0 {
            return false;
        }
        rest = &exp[n..];
    }
    rest.is_empty()
}

struct Edit {
    start: usize,
    end: usize,
    /// Replacement bytes, in `Walker::buf`.
    rep: (usize, usize),
}

struct Walker<'t> {
    engine: &'t Engine,
    /// Keys masked at any depth for this value (from its lineage).
    keys: &'t [JsonKey],
    raw: &'t [u8],
    /// Address of the buffer simd-json decoded in place; string positions are relative to it.
    base: usize,
    nodes: &'t [Node<'t>],
    idx: usize,
    cur: usize,
    path: Vec<Step<'t>>,
    edits: Vec<Edit>,
    buf: Vec<u8>,
    hits: Vec<Hit>,
}

impl<'t> Walker<'t> {
    fn value(&mut self, depth: usize, quiet: bool) -> Result<(), Unparsable> {
        if depth > MAX_DEPTH {
            return Err(Unparsable);
        }
        let node = *self.nodes.get(self.idx).ok_or(Unparsable)?;
        self.idx += 1;
        self.skip();
        let start = self.cur;
        let rule = if quiet { None } else { self.rule_for_path() };
        let inner_quiet = quiet || rule.is_some();
        match node {
            Node::String(s) => {
                let end = self.string_end(start, s)?;
                self.cur = end;
                match rule {
                    Some(style) => self.replace_whole(start, end, style, Some(s.as_bytes())),
                    None if !quiet => self.scan_value(start, end, s.as_bytes()),
                    None => {}
                }
            }
            Node::Static(value) => {
                let len = self.raw[start..]
                    .iter()
                    .take_while(|b| !matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'))
                    .count();
                if len == 0 {
                    return Err(Unparsable);
                }
                let end = start + len;
                self.cur = end;
                match rule {
                    Some(style) => self.replace_whole(start, end, style, None),
                    // Numbers too: a card number stored as a JSON number is still a card number.
                    None if !quiet
                        && matches!(
                            value,
                            StaticNode::I64(_) | StaticNode::U64(_) | StaticNode::F64(_)
                        ) =>
                    {
                        let lexeme = &self.raw[start..end];
                        self.scan_value(start, end, lexeme);
                    }
                    None => {}
                }
            }
            Node::Object { len, .. } => {
                self.expect(b'{')?;
                for _ in 0..len {
                    let Some(&Node::String(key)) = self.nodes.get(self.idx) else {
                        return Err(Unparsable);
                    };
                    self.idx += 1;
                    self.skip();
                    self.cur = self.string_end(self.cur, key)?;
                    self.path.push(Step::Key(key));
                    self.value(depth + 1, inner_quiet)?;
                    self.path.pop();
                }
                self.skip();
                self.expect(b'}')?;
                if let Some(style) = rule {
                    self.replace_whole(start, self.cur, style, None);
                }
            }
            Node::Array { len, .. } => {
                self.expect(b'[')?;
                for i in 0..len {
                    self.path.push(Step::Index(i));
                    self.value(depth + 1, inner_quiet)?;
                    self.path.pop();
                }
                self.skip();
                self.expect(b']')?;
                if let Some(style) = rule {
                    self.replace_whole(start, self.cur, style, None);
                }
            }
        }
        Ok(())
    }

    fn rule_for_path(&self) -> Option<Style> {
        let by_path = self
            .engine
            .json
            .iter()
            .find(|r| path_matches(&r.steps, &self.path))
            .map(|r| r.style);
        by_path.or_else(|| {
            let Some(Step::Key(key)) = self.path.last() else {
                return None;
            };
            self.keys
                .iter()
                .find(|(k, _)| **k == **key)
                .map(|(_, style)| *style)
                .or_else(|| self.engine.json_key_rule(key.as_bytes()))
        })
    }

    /// Skips whitespace and the `,` / `:` between values.
    fn skip(&mut self) {
        while self
            .raw
            .get(self.cur)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b',' | b':'))
        {
            self.cur += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), Unparsable> {
        if self.raw.get(self.cur) != Some(&b) {
            return Err(Unparsable);
        }
        self.cur += 1;
        Ok(())
    }

    /// The string token at `start` (its opening quote), checked against simd-json's decoded `s`;
    /// returns the offset after its closing quote.
    fn string_end(&self, start: usize, s: &str) -> Result<usize, Unparsable> {
        if self.raw.get(start) != Some(&b'"') {
            return Err(Unparsable);
        }
        if !s.is_empty() && (s.as_ptr() as usize).wrapping_sub(self.base) != start + 1 {
            return Err(Unparsable);
        }
        let mut i = start + 1;
        loop {
            let k = memchr::memchr2(b'"', b'\\', self.raw.get(i..).ok_or(Unparsable)?)
                .ok_or(Unparsable)?;
            if self.raw[i + k] == b'"' {
                return Ok(i + k + 1);
            }
            i += k + 2;
        }
    }

    /// Detectors over a string's decoded content (or a number's lexeme).
    fn scan_value(&mut self, start: usize, end: usize, content: &[u8]) {
        let engine = self.engine;
        self.hits.clear();
        engine.scanner.scan(content, &mut self.hits);
        if self.hits.is_empty() {
            return;
        }
        let from = self.buf.len();
        if engine.detector_style == Style::Null {
            self.buf.extend_from_slice(b"null");
        } else {
            let mut masked = Vec::with_capacity(content.len());
            styles::rewrite_spans(
                content,
                self.hits.iter().map(|h| (h.start, h.end)),
                engine.detector_style,
                &engine.hasher,
                &mut masked,
            );
            self.buf.extend_from_slice(&encode_string_bytes(&masked));
        }
        self.edits.push(Edit {
            start,
            end,
            rep: (from, self.buf.len()),
        });
    }

    /// Replaces the whole value `raw[start..end]`; `decoded` is the string content for strings.
    fn replace_whole(&mut self, start: usize, end: usize, style: Style, decoded: Option<&[u8]>) {
        // Edits inside this value (from its children) are superseded.
        while self.edits.last().is_some_and(|e| e.start >= start) {
            self.edits.pop();
        }
        let from = self.buf.len();
        let value = decoded.unwrap_or(&self.raw[start..end]);
        match style {
            Style::Null => self.buf.extend_from_slice(b"null"),
            Style::Redact => {
                self.buf.push(b'"');
                self.buf.extend_from_slice(REDACTED);
                self.buf.push(b'"');
            }
            Style::Partial | Style::KeyedHash => {
                let mut masked = Vec::new();
                styles::replace_text(style, value, &self.engine.hasher, &mut masked);
                self.buf.extend_from_slice(&encode_string_bytes(&masked));
            }
        }
        self.edits.push(Edit {
            start,
            end,
            rep: (from, self.buf.len()),
        });
    }
}

fn encode_string(s: &str) -> Vec<u8> {
    encode_string_bytes(s.as_bytes())
}

/// A JSON string literal for `s` (quotes, backslashes and control characters escaped).
pub(crate) fn encode_string_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => {
                let mut hex = [0u8; 2];
                styles::hex(&[b], &mut hex);
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&hex);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::config::{DetectorKind, JsonRule};

    fn engine(detectors: &[DetectorKind], paths: &[(&str, Option<Style>)]) -> Engine {
        let rules = MaskRules {
            detectors: detectors.to_vec(),
            json: paths
                .iter()
                .map(|(p, s)| JsonRule {
                    path: (*p).into(),
                    style: *s,
                })
                .collect(),
            ..MaskRules::default()
        };
        Engine::new(&rules, Some(b"test-key-0123456789")).unwrap()
    }

    fn masked(e: &Engine, doc: &str) -> Option<String> {
        let mut out = Vec::new();
        match mask_json(e, doc.as_bytes(), &[], &mut out) {
            Ok(true) => Some(String::from_utf8(out).unwrap()),
            Ok(false) => None,
            Err(Unparsable) => Some("<unparsable>".into()),
        }
    }

    #[test]
    fn paths_parse() {
        use PathStep::*;
        use Selector::*;
        assert_eq!(parse_path("$").unwrap(), vec![]);
        assert_eq!(
            parse_path("$.user.email").unwrap(),
            vec![Child(Key("user".into())), Child(Key("email".into()))]
        );
        assert_eq!(
            parse_path("$..email[0]['a b'][*].*").unwrap(),
            vec![
                Descendant(Key("email".into())),
                Child(Index(0)),
                Child(Key("a b".into())),
                Child(Any),
                Child(Any)
            ]
        );
        assert!(parse_path("user.email").is_err());
        assert!(parse_path("$.a[x]").is_err());
        assert!(parse_path("$.").is_err());
    }

    #[test]
    fn masks_by_path_and_keeps_the_rest_byte_identical() {
        let e = engine(
            &[],
            &[
                ("$.user.email", None),
                ("$.user.card", Some(Style::Partial)),
                ("$..ssn", Some(Style::Null)),
            ],
        );
        let doc = r#"{"id": 12345678901234567890.123456789, "user": {"email": "a@b.io", "card": "4111111111111111", "x": [1, {"ssn": "123-45-6789"}]}}"#;
        assert_eq!(
            masked(&e, doc).unwrap(),
            r#"{"id": 12345678901234567890.123456789, "user": {"email": "****", "card": "************1111", "x": [1, {"ssn": null}]}}"#
        );
        // No such key anywhere: the document is not even parsed.
        assert_eq!(masked(&e, r#"{"name": "x"}"#), None);
    }

    #[test]
    fn masks_whole_objects_and_arrays() {
        let e = engine(
            &[DetectorKind::Email],
            &[("$.profile", None), ("$.tags[1]", None)],
        );
        assert_eq!(
            masked(
                &e,
                r#"{"profile":{"email":"a@b.io","n":[1,2]},"tags":["x","y@z.io","z"]}"#
            )
            .unwrap(),
            r#"{"profile":"****","tags":["x","****","z"]}"#
        );
        let root = engine(&[], &[("$", Some(Style::Null))]);
        assert_eq!(masked(&root, "[1,2]").unwrap(), "null");
    }

    #[test]
    fn detectors_apply_inside_strings_numbers_and_escapes() {
        let e = engine(
            &[
                DetectorKind::Email,
                DetectorKind::Card,
                DetectorKind::Secret,
            ],
            &[],
        );
        assert_eq!(
            masked(&e, r#"{"note": "mail alice@example.com today", "n": 4111111111111111, "ok": 4111111111111112}"#).unwrap(),
            r#"{"note": "mail **** today", "n": "****", "ok": 4111111111111112}"#
        );
        // An escape hides the '@' from a raw scan; the parsed value still gets masked.
        assert_eq!(
            masked(&e, r#"["alice\u0040example.com"]"#).unwrap(),
            r#"["****"]"#
        );
        // JSON inside a JSON string.
        assert_eq!(
            masked(&e, r#"{"cfg": "{\"password\": \"hunter2\"}"}"#).unwrap(),
            r#"{"cfg": "{\"password\": \"****\"}"}"#
        );
        assert_eq!(masked(&e, r#"{"note": "nothing here", "n": 42}"#), None);
        assert_eq!(masked(&e, r#"{"a\"b": "c\nd"}"#), None);
    }

    #[test]
    fn numbers_beyond_64_bits_are_walked_not_redacted() {
        let e = engine(&[DetectorKind::Email], &[]);
        for (doc, want) in [
            (
                r#"{"big": 123456789012345678901234567890, "m": "a@b.io"}"#,
                r#"{"big": 123456789012345678901234567890, "m": "****"}"#,
            ),
            (
                r#"{"f": 1e400, "m": "a@b.io"}"#,
                r#"{"f": 1e400, "m": "****"}"#,
            ),
            (
                r#"{"f": 3.14159265358979323846264338327950288, "m": "a@b.io"}"#,
                r#"{"f": 3.14159265358979323846264338327950288, "m": "****"}"#,
            ),
            (
                r#"{"n": -18446744073709551617, "m": "a@b.io"}"#,
                r#"{"n": -18446744073709551617, "m": "****"}"#,
            ),
        ] {
            assert_eq!(masked(&e, doc).unwrap(), want, "{doc}");
        }
    }

    #[test]
    fn paths_match_numbers_beyond_64_bits() {
        let e = engine(&[], &[("$..n", None)]);
        assert_eq!(
            masked(&e, r#"{"n": 12345678901234567890123, "plan": "gold"}"#).unwrap(),
            r#"{"n": "****", "plan": "gold"}"#
        );
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-0", "12", "1.5", "-1.5e10", "1E+2", "3e-7"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in ["-", "01", "1.", ".5", "1e", "1-2", "--1", "1.2.3"] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn unparsable_documents_fail_closed() {
        let e = engine(&[DetectorKind::Email], &[]);
        assert_eq!(masked(&e, r#"{"a": "x@y.io""#).unwrap(), "<unparsable>");
        assert_eq!(
            masked(&e, r#"{"a": "x@y.io", "n": 01}"#).unwrap(),
            "<unparsable>"
        );
        assert_eq!(
            masked(&e, r#"{"a": "x@y.io", "n": 1-2}"#).unwrap(),
            "<unparsable>"
        );
        let deep = format!("{}\"a@b.io\"{}", "[".repeat(300), "]".repeat(300));
        assert_eq!(masked(&e, &deep).unwrap(), "<unparsable>");
    }

    #[test]
    fn keyed_hash_of_a_json_string_equals_the_text_column_hash() {
        let e = engine(&[], &[("$.email", Some(Style::KeyedHash))]);
        let out = masked(&e, r#"{"email":"a\u0040b.io"}"#).unwrap();
        let expected = e.hasher.hex16(b"a@b.io");
        assert_eq!(
            out,
            format!(
                r#"{{"email":"{}"}}"#,
                std::str::from_utf8(&expected).unwrap()
            )
        );
    }
}
