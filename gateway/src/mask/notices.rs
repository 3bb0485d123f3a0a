//! Masking of what the server says besides rows: ErrorResponse and NoticeResponse fields, and
//! NotificationResponse payloads.
//!
//! # ErrorResponse / NoticeResponse body
//! Fields of one type byte and a NUL-terminated string, ended by a zero byte. Severity (`S`, `V`),
//! SQLSTATE (`C`) and the position and source fields keep their bytes, so drivers behave as before;
//! the free-text fields (message, detail, hint, context, internal query) go through the detectors,
//! and, when the statement touched a masked column, lose every quoted or parenthesised value
//! (`invalid input syntax for type integer: "..."`, `Key (ssn)=(...) already exists`).

use super::rows::Outcome;
use super::styles::REDACTED;
use super::types::ValueKind;
use super::{MaskError, Masker};
use crate::protocol::postgres::frame::write_message;

/// Fields that carry free text that may quote data.
const TEXT_FIELDS: &[u8] = b"MDHWq";

/// SQLSTATE class of errors raised by user code (`RAISE`), whose text may hold any value unquoted.
const RAISED_CLASS: &[u8] = b"P0";

/// SQLSTATE class of data exceptions, whose detail and context may quote the input unquoted
/// (`JSON data, line 1: ...`).
const DATA_CLASS: &[u8] = b"22";

impl Masker {
    /// Masks an ErrorResponse or NoticeResponse body (`tag` E or N). `touched` says the statement
    /// referenced a masked column: quoted values are then redacted too, and text raised by user
    /// code is redacted whole. Ok(true): the rewritten message (tag, length, body) was appended
    /// to `out`.
    pub fn mask_error(
        &self,
        tag: u8,
        body: &[u8],
        touched: bool,
        out: &mut Vec<u8>,
    ) -> Result<bool, MaskError> {
        let bad = || MaskError::MalformedRow("malformed error or notice fields");
        let mut fields: Vec<(u8, &[u8])> = Vec::new();
        let mut rest = body;
        loop {
            let (&kind, after) = rest.split_first().ok_or_else(bad)?;
            if kind == 0 {
                if !after.is_empty() {
                    return Err(bad());
                }
                break;
            }
            let end = memchr::memchr(0, after).ok_or_else(bad)?;
            fields.push((kind, &after[..end]));
            rest = &after[end + 1..];
        }
        let class = |c: &[u8]| fields.iter().any(|(k, v)| *k == b'C' && v.starts_with(c));
        let raised = class(RAISED_CLASS);
        let data = class(DATA_CLASS);
        let mut changed = false;
        let mut rewritten: Vec<(u8, Vec<u8>)> = Vec::with_capacity(fields.len());
        for (kind, value) in &fields {
            let mut v = value.to_vec();
            if TEXT_FIELDS.contains(kind) {
                if touched && (raised || (data && *kind != b'M')) {
                    v = REDACTED.to_vec();
                } else if touched {
                    v = redact_quoted(&v);
                }
                v = self.scan_text(&v);
            }
            changed |= v != *value;
            rewritten.push((*kind, v));
        }
        if !changed {
            return Ok(false);
        }
        write_message(out, tag, |o| {
            for (kind, v) in &rewritten {
                o.push(*kind);
                o.extend(v.iter().filter(|&&b| b != 0));
                o.push(0);
            }
            o.push(0);
        });
        Ok(true)
    }

    /// Masks a NotificationResponse body (process id, channel, payload) through the detectors.
    pub fn mask_notification(&self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, MaskError> {
        let bad = || MaskError::MalformedRow("malformed notification");
        let pid = body.get(..4).ok_or_else(bad)?;
        let rest = &body[4..];
        let channel_end = memchr::memchr(0, rest).ok_or_else(bad)?;
        let channel = &rest[..channel_end];
        let rest = &rest[channel_end + 1..];
        let payload_end = memchr::memchr(0, rest).ok_or_else(bad)?;
        let payload = &rest[..payload_end];
        let masked_channel = self.scan_text(channel);
        let masked_payload = self.scan_text(payload);
        if masked_channel == channel && masked_payload == payload {
            return Ok(false);
        }
        write_message(out, b'A', |o| {
            o.extend_from_slice(pid);
            o.extend_from_slice(&masked_channel);
            o.push(0);
            o.extend_from_slice(&masked_payload);
            o.push(0);
        });
        Ok(true)
    }

    /// Text through the detectors (and json key rules when it is a json document).
    fn scan_text(&self, v: &[u8]) -> Vec<u8> {
        let engine = &self.engine;
        let mut scratch = Vec::new();
        let mut hits = Vec::new();
        let trimmed = v.trim_ascii_start();
        let kind = if trimmed.starts_with(b"{") || trimmed.starts_with(b"[") {
            ValueKind::Json
        } else {
            ValueKind::Text
        };
        let plan = super::rows::ColPlan::Scan(kind);
        match engine.mask_value(&plan, v, &mut scratch, &mut hits) {
            Outcome::Keep => {
                if kind == ValueKind::Json {
                    // Not json after all: scan it as text.
                    let plan = super::rows::ColPlan::Scan(ValueKind::Text);
                    scratch.clear();
                    return match engine.mask_value(&plan, v, &mut scratch, &mut hits) {
                        Outcome::Keep => v.to_vec(),
                        Outcome::Replace => scratch,
                        Outcome::Null => REDACTED.to_vec(),
                    };
                }
                v.to_vec()
            }
            Outcome::Replace if kind == ValueKind::Json && scratch.as_slice() == br#""****""# => {
                // Unparsable "json": scan as text instead of hiding the whole message.
                let plan = super::rows::ColPlan::Scan(ValueKind::Text);
                scratch.clear();
                match engine.mask_value(&plan, v, &mut scratch, &mut hits) {
                    Outcome::Keep => v.to_vec(),
                    Outcome::Replace => scratch,
                    Outcome::Null => REDACTED.to_vec(),
                }
            }
            Outcome::Replace => scratch,
            Outcome::Null => REDACTED.to_vec(),
        }
    }
}

/// Replaces what is inside `"..."` and `(...)` with `****`.
fn redact_quoted(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let close = match v[i] {
            b'"' => v[i + 1..]
                .iter()
                .position(|&b| b == b'"')
                .map(|p| i + 1 + p),
            b'(' => {
                let mut depth = 0usize;
                v[i..]
                    .iter()
                    .position(|&b| {
                        match b {
                            b'(' => depth += 1,
                            b')' => depth -= 1,
                            _ => {}
                        }
                        depth == 0
                    })
                    .map(|p| i + p)
            }
            _ => None,
        };
        match close {
            Some(end) => {
                out.push(v[i]);
                out.extend_from_slice(REDACTED);
                out.push(v[end]);
                i = end + 1;
            }
            None => {
                out.push(v[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::MaskRules;
    use crate::protocol::postgres::messages;

    fn error(code: &str, message: &str, detail: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        messages::encode_error("ERROR", code, message, detail, None, &mut out);
        out[5..].to_vec()
    }

    #[test]
    fn quoted_values_go_when_the_statement_touched_a_masked_column() {
        let m = Masker::new(&MaskRules::builtin_pii()).unwrap();
        let body = error(
            "22P02",
            "invalid input syntax for type integer: \"secretvalue\"",
            Some("Key (ssn)=(secretvalue) already exists."),
        );
        let mut out = Vec::new();
        assert!(
            !m.mask_error(b'E', &body, false, &mut out).unwrap(),
            "no data, not touched"
        );
        assert!(m.mask_error(b'E', &body, true, &mut out).unwrap());
        let f = messages::parse_error_fields(&out[5..]).unwrap();
        assert_eq!(f.code, "22P02");
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.message, "invalid input syntax for type integer: \"****\"");
        assert_eq!(
            f.detail,
            Some("****"),
            "a data exception's detail may quote input bare"
        );
        let body = error(
            "23505",
            "duplicate key",
            Some("Key (ssn)=(secretvalue) already exists."),
        );
        out.clear();
        assert!(m.mask_error(b'E', &body, true, &mut out).unwrap());
        let f = messages::parse_error_fields(&out[5..]).unwrap();
        assert_eq!(f.detail, Some("Key (****)=(****) already exists."));
    }

    #[test]
    fn detectors_run_on_every_text_field_and_raised_text_goes_whole() {
        let m = Masker::new(&MaskRules::builtin_pii()).unwrap();
        let body = error("XX000", "mail alice@example.com now", None);
        let mut out = Vec::new();
        assert!(m.mask_error(b'N', &body, false, &mut out).unwrap());
        assert_eq!(out[0], b'N');
        assert!(!String::from_utf8_lossy(&out).contains("alice@example.com"));
        let body = error("P0001", "value is 123456789", Some("raw 123456789"));
        out.clear();
        assert!(m.mask_error(b'E', &body, true, &mut out).unwrap());
        assert!(!String::from_utf8_lossy(&out).contains("123456789"));
        assert!(m.mask_error(b'E', b"M", false, &mut out).is_err());
    }

    #[test]
    fn notifications_pass_through_detectors() {
        let m = Masker::new(&MaskRules::builtin_pii()).unwrap();
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0card 4111 1111 1111 1111\0");
        let mut out = Vec::new();
        assert!(m.mask_notification(&body, &mut out).unwrap());
        assert!(!String::from_utf8_lossy(&out).contains("4111 1111 1111 1111"));
        let mut clean = 7i32.to_be_bytes().to_vec();
        clean.extend_from_slice(b"chan\0hello\0");
        assert!(!m.mask_notification(&clean, &mut out).unwrap());
        // A json payload with a masked key.
        let mut js = 7i32.to_be_bytes().to_vec();
        js.extend_from_slice(b"chan\0{\"ssn\": \"078-05-1120x\", \"a\": 1}\0");
        out.clear();
        assert!(m.mask_notification(&js, &mut out).unwrap());
        assert!(
            !String::from_utf8_lossy(&out).contains("078-05-1120x"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
}
