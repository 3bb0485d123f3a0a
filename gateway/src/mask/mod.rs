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
//! Speed: see [`prefilter`] — SIMD passes find candidates, exact detectors run only on those.

mod config;
mod copy;
mod detectors;
mod json;
mod prefilter;
mod rows;
mod styles;
mod types;

use std::sync::Arc;

pub use config::{ColumnRule, DetectorKind, JsonRule, MaskRules, Style};
pub use copy::{CopyOptions, CopyPlan};
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
        Ok(Engine {
            scanner: Scanner::new(&rules.detectors),
            detector_style: rules.default_style,
            hasher,
            columns,
            json,
        })
    }
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

    /// True when `table` + `column` rules exist: the driver must resolve (table OID, attnum).
    pub fn needs_catalog(&self) -> bool {
        self.engine
            .columns
            .iter()
            .any(|r| matches!(r.selector, config::Selector::TableColumn { .. }))
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
}
