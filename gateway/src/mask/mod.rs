//! Masking of sensitive result fields: pure functions over wire bytes, no I/O.
//!
//! The driver compiles a policy's `[mask]` table once into a [`Masker`] (immutable, shared by every
//! session through an `Arc`), then per result set:
//!
//! 1. on RowDescription, [`Masker::plan`] (or [`Masker::plan_with_origin`]) decides per column: pass,
//!    mask whole (a column rule), or scan (detectors, json paths). A [`ResultPlan`] that
//!    [`is_passthrough`](ResultPlan::is_passthrough) means DataRows are forwarded unparsed;
//! 2. per DataRow, [`ResultPlan::mask_data_row`] either says "clean" (`Ok(false)`: forward the original
//!    bytes, nothing was copied or allocated) or appends the rewritten DataRow message to `out`;
//! 3. for `COPY ... TO STDOUT`, [`Masker::copy_plan`] and [`CopyPlan::mask_copy_data`] do the same per
//!    CopyData row.
//!
//! Fail closed: a masked column whose value cannot be rewritten type-correctly becomes NULL, json that
//! cannot be parsed is redacted whole, and malformed rows are errors (the driver ends the session).
//! Error messages never contain field data.
//!
//! Speed: see `prefilter.rs` — SIMD passes find candidates, exact detectors run only on those.

mod config;
mod copy;
mod derived;
mod detectors;
pub mod explain;
mod json;
pub mod lineage;
mod notices;
mod prefilter;
mod rows;
mod styles;
mod types;

use std::sync::Arc;

pub use config::{ColumnRule, DetectorKind, JsonRule, MaskRules, Style, UnknownLineage};
pub use copy::{CopyOptions, CopyPlan};
pub use derived::Verdict;
pub use explain::{ColumnExplanation, catalog_from_specs};
pub use rows::{Column, ColumnOrigin, ResultPlan};

use config::CompiledColumnRule;
use json::PathRule;
use prefilter::Scanner;
use styles::Hasher;

/// Why masking could not be set up, or a row could not be masked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaskError {
    /// The `[mask]` table is invalid; the message names the key (`mask.columns[2].type`).
    #[error("{0}")]
    Config(String),
    /// The keyed-hash key could not be read. Never contains the key.
    #[error("mask hash key: {0}")]
    HashKey(String),
    /// A DataRow does not match its RowDescription or is truncated.
    #[error("malformed DataRow: {0}")]
    MalformedRow(&'static str),
    /// A CopyData row does not match its CopyOutResponse.
    #[error("malformed COPY data: {0}")]
    MalformedCopy(&'static str),
    /// The policy has rules this COPY cannot evaluate (e.g. type rules without column types).
    #[error("COPY TO STDOUT refused by masking: {0}")]
    CopyRefused(&'static str),
}

impl From<MaskError> for crate::protocol::postgres::session::Refusal {
    fn from(e: MaskError) -> Self {
        Self(e.to_string().into())
    }
}

/// Compiled `[mask]` rules. Immutable; `Send + Sync`; clone is an `Arc` clone.
#[derive(Debug, Clone)]
pub struct Masker {
    engine: Arc<Engine>,
}

/// The compiled rules that plans share.
#[derive(Debug)]
pub(crate) struct Engine {
    scanner: Scanner,
    detector_style: Style,
    hasher: Hasher,
    columns: Vec<CompiledColumnRule>,
    json: Vec<PathRule>,
    /// `mask.json_keys`: the literal part of each name glob, a cheap test before walking json.
    json_key_literals: Option<Vec<Vec<u8>>>,
    lineage: bool,
    unknown_lineage: UnknownLineage,
    catalog_ttl: std::time::Duration,
}

impl Engine {
    fn new(rules: &MaskRules, key: Option<&[u8]>) -> Result<Engine, MaskError> {
        let columns = config::compile_column_rules(rules)?;
        let json = json::compile_path_rules(rules)?;
        let hasher = match key {
            Some(key) => Hasher::new(key),
            None => {
                let key: [u8; 32] = rand::random();
                Hasher::new(&key)
            }
        };
        let json_key_literals = rules.json_keys.then(|| {
            columns
                .iter()
                .filter_map(|r| match &r.selector {
                    config::Selector::Name(glob) => Some(glob.longest_literal().to_vec()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        });
        Ok(Engine {
            scanner: Scanner::new(&rules.detectors),
            detector_style: rules.default_style,
            hasher,
            columns,
            json,
            json_key_literals: json_key_literals.filter(|l| !l.is_empty()),
            lineage: !rules.danger_disable_lineage,
            unknown_lineage: rules.unknown_lineage,
            catalog_ttl: rules.catalog_ttl,
        })
    }

    /// The style of the first name-glob rule matching a json object key (`mask.json_keys`).
    pub(crate) fn json_key_rule(&self, key: &[u8]) -> Option<Style> {
        self.json_key_literals.as_ref()?;
        self.columns.iter().find_map(|r| match &r.selector {
            config::Selector::Name(glob) if glob.matches(key) => Some(r.style),
            _ => None,
        })
    }

    /// Whether a json document may hold a key a name-glob rule matches (escapes could hide one).
    pub(crate) fn json_keys_may_match(&self, text: &[u8]) -> bool {
        let Some(literals) = &self.json_key_literals else {
            return false;
        };
        memchr::memchr(b'\\', text).is_some()
            || literals.iter().any(|l| contains_ignore_case(text, l))
    }
}

fn contains_ignore_case(text: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return true;
    };
    memchr::memchr2_iter(first.to_ascii_lowercase(), first.to_ascii_uppercase(), text).any(|at| {
        text.get(at..at + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    })
}

/// The shortest key accepted for the keyed hash.
const MIN_KEY_LEN: usize = 16;

fn read_hash_key(rules: &MaskRules) -> Result<Option<Vec<u8>>, MaskError> {
    let key = match (&rules.hash_key_env, &rules.hash_key_file) {
        (Some(_), Some(_)) => {
            return Err(MaskError::Config(
                "mask: set `hash_key_env` or `hash_key_file`, not both".into(),
            ));
        }
        (Some(var), None) => std::env::var_os(var)
            .ok_or_else(|| {
                MaskError::HashKey(format!(
                    "mask.hash_key_env: environment variable {var} is not set"
                ))
            })?
            .into_encoded_bytes(),
        (None, Some(path)) => {
            let mut key = std::fs::read(path).map_err(|e| {
                MaskError::HashKey(format!(
                    "mask.hash_key_file: cannot read {}: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
            if key.last() == Some(&b'\n') {
                key.pop();
            }
            key
        }
        (None, None) => return Ok(None),
    };
    if key.len() < MIN_KEY_LEN {
        return Err(MaskError::HashKey(format!(
            "the key must be at least {MIN_KEY_LEN} bytes"
        )));
    }
    Ok(Some(key))
}

impl Masker {
    /// Compiles `rules`, reading the keyed-hash key (a random per-process key when none is configured).
    pub fn new(rules: &MaskRules) -> Result<Masker, MaskError> {
        let key = read_hash_key(rules)?;
        Ok(Masker {
            engine: Arc::new(Engine::new(rules, key.as_deref())?),
        })
    }

    /// No rule and no detector: every plan is a passthrough.
    pub fn is_noop(&self) -> bool {
        let e = &self.engine;
        e.scanner.is_empty() && e.columns.is_empty() && e.json.is_empty()
    }

    /// Whether column lineage decides masking (`mask.danger_disable_lineage` turns it off).
    pub fn lineage_enabled(&self) -> bool {
        self.engine.lineage && !self.engine.columns.is_empty()
    }

    /// `mask.catalog_ttl`.
    pub fn catalog_ttl(&self) -> std::time::Duration {
        self.engine.catalog_ttl
    }

    /// `mask.unknown_lineage`.
    pub fn unknown_lineage(&self) -> UnknownLineage {
        self.engine.unknown_lineage
    }

    /// True when `table` + `column` rules exist: the driver must resolve (table OID, attnum).
    pub fn needs_catalog(&self) -> bool {
        self.engine
            .columns
            .iter()
            .any(|r| matches!(r.selector, config::Selector::TableColumn { .. }))
    }

    /// `text` with every detector hit redacted, or `None` when the detectors find nothing: what
    /// a recording keeps of a request's text and bind parameters.
    pub fn redact_detected(&self, text: &[u8]) -> Option<Vec<u8>> {
        let e = &self.engine;
        let mut hits = Vec::new();
        e.scanner.scan(text, &mut hits);
        if hits.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        styles::rewrite_spans(
            text,
            hits.iter().map(|h| (h.start, h.end)),
            Style::Redact,
            &e.hasher,
            &mut out,
        );
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masker_is_send_sync_and_reports_its_needs() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Masker>();
        send_sync::<ResultPlan>();
        send_sync::<CopyPlan>();
        assert!(Masker::new(&MaskRules::default()).unwrap().is_noop());
        let builtin = Masker::new(&MaskRules::builtin_pii()).unwrap();
        assert!(!builtin.is_noop());
        assert!(!builtin.needs_catalog());
        let rules: MaskRules =
            toml::from_str("[[columns]]\ntable = \"users\"\ncolumn = \"email\"").unwrap();
        assert!(Masker::new(&rules).unwrap().needs_catalog());
    }

    #[test]
    fn hash_key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let rules = MaskRules {
            hash_key_file: Some(file.clone()),
            ..MaskRules::default()
        };
        assert_eq!(
            read_hash_key(&rules).unwrap().unwrap(),
            b"0123456789abcdef0123"
        );

        std::fs::write(&file, "short").unwrap();
        let err = read_hash_key(&rules).unwrap_err().to_string();
        assert!(
            err.contains("at least 16") && !err.contains("short"),
            "{err}"
        );

        let rules = MaskRules {
            hash_key_env: Some("PORTCULLIS_TEST_UNSET_MASK_KEY".into()),
            ..MaskRules::default()
        };
        assert!(
            read_hash_key(&rules)
                .unwrap_err()
                .to_string()
                .contains("PORTCULLIS_TEST_UNSET_MASK_KEY")
        );

        let rules = MaskRules {
            hash_key_env: Some("X".into()),
            hash_key_file: Some(file),
            ..MaskRules::default()
        };
        assert!(matches!(read_hash_key(&rules), Err(MaskError::Config(_))));
    }

    /// Deterministic random inputs (xorshift): whatever the bytes, masking returns `Ok` or `Err` and
    /// never panics, and detector spans stay in bounds, sorted and disjoint.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Bytes biased towards what the detectors look at.
        fn text(&mut self, max: usize) -> Vec<u8> {
            const ALPHABET: &[u8] =
                b"0123456789 -.()+@:=_/\\\"'{}[],;aAbBeEfFkKsSxXyYjJrRpPIN\t\n\xff\xc3\xa9";
            const PIECES: &[&str] = &[
                "4111 1111 1111 1111",
                "eyJ",
                "AKIA",
                "Bearer ",
                "-----BEGIN RSA PRIVATE KEY-----",
                "-----END",
                "password=",
                "://",
                "::",
                "GB82",
                "ghp_",
                "xoxb-",
                "sk-",
                "@example.com",
                "\\u0040",
                "1e400",
            ];
            let len = self.below(max + 1);
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                if self.below(8) == 0 {
                    out.extend_from_slice(PIECES[self.below(PIECES.len())].as_bytes());
                } else {
                    out.push(ALPHABET[self.below(ALPHABET.len())]);
                }
            }
            out
        }
    }

    #[test]
    fn random_text_never_panics_and_spans_are_sane() {
        let scanner = prefilter::Scanner::new(&DetectorKind::ALL);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut hits = Vec::new();
        for _ in 0..20_000 {
            let text = rng.text(200);
            hits.clear();
            scanner.scan(&text, &mut hits);
            let mut last_end = 0;
            for h in &hits {
                assert!(h.start < h.end && h.end <= text.len(), "{h:?} in {text:?}");
                assert!(h.start >= last_end, "overlap in {text:?}");
                last_end = h.end;
            }
        }
    }

    #[test]
    fn random_rows_json_and_copy_never_panic() {
        let rules: MaskRules = toml::from_str(
            r#"
            detectors = ["email", "card", "phone", "ipv6", "secret", "private_key", "jwt"]
            [[columns]]
            name = "w*"
            style = "partial"
            [[json]]
            path = "$..a[*]"
            style = "keyed_hash"
            "#,
        )
        .unwrap();
        let masker = Masker {
            engine: Arc::new(Engine::new(&rules, Some(b"0123456789abcdef")).unwrap()),
        };
        let cols = [
            rows::Column {
                name: b"t",
                table_oid: 0,
                attnum: 0,
                type_oid: types::TEXT,
                format: 0,
            },
            rows::Column {
                name: b"j",
                table_oid: 0,
                attnum: 0,
                type_oid: types::JSONB,
                format: 1,
            },
            rows::Column {
                name: b"k",
                table_oid: 0,
                attnum: 0,
                type_oid: types::JSON,
                format: 0,
            },
            rows::Column {
                name: b"w",
                table_oid: 0,
                attnum: 0,
                type_oid: types::UUID,
                format: 1,
            },
            rows::Column {
                name: b"a",
                table_oid: 0,
                attnum: 0,
                type_oid: 1009,
                format: 0,
            },
        ];
        let plan = masker.plan(&cols, &|_, _| None);
        let text_copy = masker.copy_plan(0, &[0; 5], None, &CopyOptions::text());
        let csv_copy = masker.copy_plan(0, &[0; 5], None, &CopyOptions::csv());
        let binary_copy = masker.copy_plan(1, &[1; 5], None, &CopyOptions::text());
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut out = Vec::new();
        for round in 0..5_000 {
            // A well-formed row of random values, then a few corrupted bytes in some rounds.
            let mut body = 5u16.to_be_bytes().to_vec();
            for field in 0..5 {
                let value = match (field, rng.below(4)) {
                    (1, 0) => {
                        [&[1u8][..], br#"{"a": [1, "x@y.io"], "b": {"a": {"c": 2}}}"#].concat()
                    }
                    (2, 0) => br#"[{"a": "4111111111111111"}, 1e400, "\u0040"]"#.to_vec(),
                    _ => rng.text(60),
                };
                if rng.below(10) == 0 {
                    body.extend_from_slice(&(-1i32).to_be_bytes());
                } else {
                    body.extend_from_slice(&(value.len() as i32).to_be_bytes());
                    body.extend_from_slice(&value);
                }
            }
            if round % 3 == 0 {
                for _ in 0..=rng.below(3) {
                    let at = rng.below(body.len());
                    body[at] = rng.next() as u8;
                }
            }
            if round % 7 == 0 {
                body.truncate(rng.below(body.len() + 1));
            }
            out.clear();
            let _ = plan.mask_data_row(&body, &mut out);
            let line = [rng.text(120), b"\n".to_vec()].concat();
            for copy in [&text_copy, &csv_copy] {
                out.clear();
                let _ = copy.mask_copy_data(&line, &mut out);
            }
            out.clear();
            let _ = binary_copy.mask_copy_data(&body, &mut out);
            let mut scratch = Vec::new();
            let _ = json::mask_json(&masker.engine, &rng.text(80), &[], &mut scratch);
        }
    }
}
