//! Reading entries back, for the index catch-up and the operator commands. Integrity is
//! `verify`'s job; this stops at the first damage with an error.

use std::path::Path;

use anyhow::{Context as _, bail};

use super::segment::{Segment, list_segments};
use super::types::Entry;

/// Calls `f` with every entry whose seq is in `from..until`, in order, a bundle's records one by
/// one ([`Entry::unbundle`]). `f` returns false to stop.
pub fn for_each_entry(
    dir: &Path,
    from: u64,
    until: u64,
    mut f: impl FnMut(Entry) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
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
                return Ok(());
            }
            let records = b.records().map_err(|d| {
                anyhow::anyhow!(
                    "{}: {d:?}; run `portcullis recordings verify`",
                    seg.path.display()
                )
            })?;
            for payload in records {
                let entry: Entry = postcard::from_bytes(&payload)
                    .with_context(|| format!("{}: a record does not decode", seg.path.display()))?;
                if entry.seq < from || entry.seq >= until {
                    continue;
                }
                for entry in entry.unbundle() {
                    if !f(entry)? {
                        return Ok(());
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
    Ok(())
}
