//! Reading entries back, for the index catch-up and the operator commands. Integrity is
//! `verify`'s job; this stops at the first damage with an error.

use std::path::Path;

use anyhow::{Context as _, bail};

use super::encode::{self, BUNDLE};
use super::segment::{Segment, list_segments};
use super::types::Entry;

/// Calls `f` with every entry whose seq is in `from..until`, in order, a bundle's records one by
/// one ([`Entry::unbundle`]). `f` returns false to stop.
pub fn for_each_entry(
    dir: &Path,
    from: u64,
    until: u64,
    f: impl FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    scan(dir, from, until, None, f).map(drop)
}

/// [`for_each_entry`] for the entries whose record is one of `variants` (its index in
/// [`super::types::Record`]): others are skipped without being decoded, except inside a bundle,
/// whose records all reach `f`. Returns the seq after the last record read: where a later call
/// goes on.
pub fn for_each_entry_of(
    dir: &Path,
    from: u64,
    until: u64,
    variants: &[u32],
    f: impl FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<u64> {
    scan(dir, from, until, Some(variants), f)
}

fn scan(
    dir: &Path,
    from: u64,
    until: u64,
    variants: Option<&[u32]>,
    mut f: impl FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<u64> {
    let mut next = from;
    let segments = list_segments(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut opened = Vec::new();
    for (_, path) in &segments {
        match Segment::open(path) {
            Ok(s) => opened.push(s),
            // A segment whose header never made it to disk holds nothing.
            Err((_, Some(_))) if std::fs::metadata(path).is_ok_and(|m| m.len() < 4096) => {}
            Err((e, _)) => return Err(e).with_context(|| format!("opening {}", path.display())),
        }
    }
    for (i, seg) in opened.iter().enumerate() {
        let next_first = opened.get(i + 1).map_or(u64::MAX, |s| s.header.first_seq);
        if next_first <= from || seg.header.first_seq >= until {
            continue;
        }
        let (blocks, damage) = seg.blocks();
        for b in blocks {
            if b.is_checkpoint || b.first_seq + u64::from(b.count) <= from {
                continue;
            }
            if b.first_seq >= until {
                return Ok(next);
            }
            let records = b.records().map_err(|d| {
                anyhow::anyhow!(
                    "{}: {d:?}; run `portcullis recordings verify`",
                    seg.path.display()
                )
            })?;
            for payload in records {
                let decode_error = || format!("{}: a record does not decode", seg.path.display());
                // An entry's fields before its record, and the record's variant.
                let (seq, variant) = encode::take_varint(&payload)
                    .and_then(|(seq, tail)| Some((seq, encode::take_head(tail)?.3)))
                    .with_context(decode_error)?;
                if seq < from || seq >= until {
                    continue;
                }
                next = seq + 1;
                if variants.is_some_and(|v| !v.contains(&variant) && variant != BUNDLE) {
                    continue;
                }
                let entry: Entry = postcard::from_bytes(&payload).with_context(decode_error)?;
                for entry in entry.unbundle() {
                    if !f(entry)? {
                        return Ok(next);
                    }
                }
            }
        }
        if let Some(d) = damage {
            // The newest segment may end in a write still in flight.
            let last = i + 1 == opened.len();
            if !(last && matches!(d, super::segment::Damage::Torn { .. })) {
                bail!(
                    "{}: {d:?}; run `portcullis recordings verify`",
                    seg.path.display()
                );
            }
        }
    }
    Ok(next)
}
