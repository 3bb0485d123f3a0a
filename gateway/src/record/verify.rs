//! `portcullis recordings verify`: every block and record CRC, the order of records, every
//! checkpoint's signature and Merkle root, the segment chain, tombstones left by `prune`, and an
//! outside checkpoint against the log.

use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, NoteError, Verifier, open_checkpoint, open_note};
use super::merkle::{Frontier, Hash};
use super::segment::{Damage, Segment, list_segments};
use super::types::Entry;

pub const TOMBSTONES: &str = "tombstones.log";

/// How verification failed; each kind has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Records or checkpoints were changed, removed, reordered or forged.
    Tampered,
    /// The log is shorter than a checkpoint says it was.
    Truncated,
    /// No public key to check signatures with.
    KeyMissing,
}

impl Failure {
    pub fn exit_code(self) -> u8 {
        match self {
            Failure::Tampered => 2,
            Failure::Truncated => 3,
            Failure::KeyMissing => 4,
        }
    }
}

#[derive(Debug)]
pub struct Problem {
    pub kind: Failure,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Failure::Tampered => "TAMPERED",
            Failure::Truncated => "TRUNCATED",
            Failure::KeyMissing => "KEY MISSING",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

/// What a clean run found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    pub checkpoints: u64,
    /// Records after the last checkpoint: intact, but not yet signed.
    pub unsigned_tail: u64,
    /// Torn tails cut at a start, from the checkpoints' notes.
    pub recoveries: Vec<String>,
    /// An unfinished write at the very end (a running recorder, or a crash the next start cuts).
    pub open_tail: Option<String>,
    /// Seq the log starts at after `prune`.
    pub pruned_before: u64,
    pub external_checkpoint: Option<u64>,
}

/// A line of `tombstones.log`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tombstone {
    pub note: String,
}

/// The signed body of a tombstone.
pub fn tombstone_body(origin: &str, first_seq: u64, frontier: &[Hash], detail: &str) -> String {
    let hashes: Vec<String> = frontier.iter().map(|h| B64.encode(h)).collect();
    format!(
        "portcullis-tombstone\n{origin}\n{first_seq}\nfrontier {}\n{detail}\n",
        hashes.join(" ")
    )
}

fn parse_tombstone(body: &str) -> Option<Frontier> {
    let mut lines = body.lines();
    if lines.next()? != "portcullis-tombstone" {
        return None;
    }
    let _origin = lines.next()?;
    let first_seq: u64 = lines.next()?.parse().ok()?;
    let hashes = lines.next()?.strip_prefix("frontier")?;
    let subtrees = hashes
        .split_whitespace()
        .map(|h| {
            B64.decode(h)
                .ok()
                .and_then(|v| Hash::try_from(v.as_slice()).ok())
        })
        .collect::<Option<Vec<_>>>()?;
    Frontier::from_parts(first_seq, subtrees)
}

fn problem(kind: Failure, message: String) -> Problem {
    Problem { kind, message }
}

fn note_problem(e: NoteError, what: &str) -> Problem {
    match e {
        NoteError::UnknownKey => problem(
            Failure::Tampered,
            format!("{what} is signed by a key that is not in the public key file"),
        ),
        e => problem(Failure::Tampered, format!("{what}: {e}")),
    }
}

/// Checks the directory. `external` is a checkpoint note kept elsewhere (e.g. shipped off the
/// host); an `Err` of `anyhow` is an I/O failure, a `Problem` a finding.
pub fn verify(
    dir: &Path,
    verifiers: &[Verifier],
    external: Option<&str>,
) -> anyhow::Result<Result<Report, Problem>> {
    if verifiers.is_empty() {
        return Ok(Err(problem(
            Failure::KeyMissing,
            "no public key: pass --pubkey with the recorder's `.pub` file".into(),
        )));
    }
    let mut report = Report::default();
    let external = match external {
        None => None,
        Some(note) => match open_checkpoint(note, verifiers) {
            Ok(cp) => Some(cp),
            Err(e) => return Ok(Err(note_problem(e, "the given checkpoint"))),
        },
    };
    // The newest tombstone says where the log now starts.
    let mut start = Frontier::default();
    if let Ok(text) = std::fs::read_to_string(dir.join(TOMBSTONES)) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(t) = serde_json::from_str::<Tombstone>(line) else {
                return Ok(Err(problem(
                    Failure::Tampered,
                    format!("{TOMBSTONES}: unreadable line"),
                )));
            };
            let body = match open_note(&t.note, verifiers) {
                Ok(b) => b,
                Err(e) => return Ok(Err(note_problem(e, "a tombstone"))),
            };
            match parse_tombstone(body) {
                Some(f) if f.size() >= start.size() => start = f,
                Some(_) => {}
                None => {
                    return Ok(Err(problem(
                        Failure::Tampered,
                        "a tombstone is malformed".into(),
                    )));
                }
            }
        }
    }
    report.pruned_before = start.size();
    let mut tree = start;
    let mut external_root: Option<Hash> = None;
    let mut last_checkpoint: Option<Checkpoint> = None;
    let segments = list_segments(dir).with_context(|| format!("reading {}", dir.display()))?;
    let count = segments.len();
    for (i, (number, path)) in segments.iter().enumerate() {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let last = i + 1 == count;
        let seg = match Segment::open(path) {
            Ok(s) => s,
            Err((_, Some(_))) if last && std::fs::metadata(path)?.len() < 4096 => {
                report.open_tail = Some(format!("{name}: header not written yet"));
                break;
            }
            Err((_, Some(d))) => {
                return Ok(Err(problem(
                    Failure::Tampered,
                    format!(
                        "{name}: {}; first bad record: seq {}",
                        damage(&d),
                        tree.size()
                    ),
                )));
            }
            Err((e, None)) => return Err(e).with_context(|| format!("reading {name}")),
        };
        report.segments += 1;
        report.bytes += seg.len();
        let h = &seg.header;
        if h.number != *number
            || h.first_seq != tree.size()
            || h.frontier.as_slice() != tree.subtrees()
        {
            let why = if h.first_seq > tree.size() {
                format!(
                    "records {}..{} are missing before it (a deleted segment?)",
                    tree.size(),
                    h.first_seq
                )
            } else {
                "it does not continue the log before it (a replaced segment?)".into()
            };
            return Ok(Err(problem(
                Failure::Tampered,
                format!("{name}: {why}; first bad record: seq {}", tree.size()),
            )));
        }
        let (blocks, damage_at) = seg.blocks();
        for b in &blocks {
            if let Some(note) = b.note() {
                let cp = match open_checkpoint(note, verifiers) {
                    Ok(cp) => cp,
                    Err(e) => {
                        return Ok(Err(note_problem(
                            e,
                            &format!("{name}: the checkpoint at offset {}", b.offset),
                        )));
                    }
                };
                if cp.size != tree.size() || cp.root != tree.root() {
                    return Ok(Err(problem(
                        Failure::Tampered,
                        format!(
                            "{name}: the checkpoint at offset {} (size {}) does not match the \
                             records before it; first bad record: seq {} or earlier",
                            b.offset,
                            cp.size,
                            cp.size.min(tree.size()).saturating_sub(1)
                        ),
                    )));
                }
                report.checkpoints += 1;
                report.recoveries.extend(
                    cp.extensions
                        .iter()
                        .filter(|e| e.starts_with("recovered "))
                        .cloned(),
                );
                last_checkpoint = Some(cp);
                continue;
            }
            if b.first_seq != tree.size() {
                return Ok(Err(problem(
                    Failure::Tampered,
                    format!(
                        "{name}: the block at offset {} starts at seq {}, expected {} (blocks \
                         reordered or removed); first bad record: seq {}",
                        b.offset,
                        b.first_seq,
                        tree.size(),
                        tree.size()
                    ),
                )));
            }
            let records = match b.records() {
                Ok(r) => r,
                Err(d) => {
                    return Ok(Err(problem(
                        Failure::Tampered,
                        format!(
                            "{name}: {}; first bad record: seq {}",
                            damage(&d),
                            b.first_seq
                        ),
                    )));
                }
            };
            for payload in records {
                let seq = tree.size();
                match postcard::from_bytes::<Entry>(&payload) {
                    Ok(e) if e.seq == seq => {}
                    _ => {
                        return Ok(Err(problem(
                            Failure::Tampered,
                            format!(
                                "{name}: record seq {seq} is not the record that belongs there"
                            ),
                        )));
                    }
                }
                tree.push_leaf(&payload);
                if external.as_ref().is_some_and(|c| c.size == tree.size()) {
                    external_root = Some(tree.root());
                }
            }
        }
        if let Some(d) = damage_at {
            match d {
                Damage::Torn { offset } if last => {
                    report.open_tail = Some(format!(
                        "{name}: {} bytes of an unfinished write at offset {offset}",
                        seg.len() - offset
                    ));
                }
                d => {
                    return Ok(Err(problem(
                        Failure::Tampered,
                        format!(
                            "{name}: {}; first bad record: seq {}",
                            damage(&d),
                            tree.size()
                        ),
                    )));
                }
            }
        }
    }
    report.records = tree.size() - report.pruned_before;
    let signed = last_checkpoint
        .as_ref()
        .map_or(report.pruned_before, |c| c.size);
    report.unsigned_tail = tree.size() - signed;
    if let Some(cp) = external {
        report.external_checkpoint = Some(cp.size);
        if cp.size > tree.size() {
            return Ok(Err(problem(
                Failure::Truncated,
                format!(
                    "the log holds {} records but the given checkpoint covers {}: records {}.. \
                     are gone",
                    tree.size(),
                    cp.size,
                    tree.size()
                ),
            )));
        }
        // A checkpoint from before the last prune can only have its signature checked.
        if cp.size > report.pruned_before && external_root != Some(cp.root) {
            return Ok(Err(problem(
                Failure::Tampered,
                format!(
                    "the log's first {} records do not match the given checkpoint; first bad \
                     record: seq {} or earlier",
                    cp.size,
                    cp.size - 1
                ),
            )));
        }
    }
    Ok(Ok(report))
}

fn damage(d: &Damage) -> String {
    match d {
        Damage::Torn { offset } => format!("cut short at offset {offset}"),
        Damage::Corrupt { offset, what } => format!("{what} (offset {offset})"),
    }
}
