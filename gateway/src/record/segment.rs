//! The on-disk format. A recording directory holds append-only segment files `NNNNNNNN.seg`:
//!
//! ```text
//! segment := "PCREC001" u32:len header[len] u32:crc32c(header)  block*
//! header  := postcard(SegmentHeader)       first seq and the Merkle frontier before it
//! block   := "PCB1" u32:zlen u32:rawlen u64:first_seq u32:count i64:last_at_us
//!            u32:crc32c(the 32 bytes before it || data)  data[zlen] = zstd(record*)
//! record  := u32:len u32:crc32c(payload) payload[len]     payload = postcard(Entry)
//! ```
//!
//! A checkpoint block (`"PCK1"`, same header, tree size in `first_seq`, the signed note as data)
//! follows the data blocks it covers, so checkpoints roll and sync with the records.
//!
//! All integers are little-endian. The Merkle leaves are the record payloads. A record may be a
//! `Record::Bundle`: one statement's records that reached the recorder together, each with its
//! own time, hashed and framed once.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::merkle::Hash;

pub const SEGMENT_MAGIC: &[u8; 8] = b"PCREC001";
pub const BLOCK_MAGIC: &[u8; 4] = b"PCB1";
/// A signed checkpoint: same header, `first_seq` is the tree size, data is the note, uncompressed.
pub const CHECKPOINT_MAGIC: &[u8; 4] = b"PCK1";
pub const BLOCK_HEADER: usize = 36;
pub const SEGMENT_EXT: &str = "seg";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentHeader {
    pub number: u32,
    pub first_seq: u64,
    pub created_us: i64,
    /// The Merkle frontier over every record before `first_seq`.
    pub frontier: Vec<Hash>,
}

pub fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("{number:08}.{SEGMENT_EXT}"))
}

/// The segments of a directory, in order.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().and_then(|x| x.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        if let Some(n) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
        {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

pub fn encode_header(h: &SegmentHeader) -> Vec<u8> {
    let body = postcard::to_stdvec(h).expect("header encodes");
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(SEGMENT_MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out
}

/// Appends one framed record to a block's raw buffer.
pub fn frame_record(raw: &mut Vec<u8>, payload: &[u8]) {
    let at = raw.len();
    raw.extend_from_slice(&[0; RECORD_HEADER]);
    raw.extend_from_slice(payload);
    frame_in_place(raw, at);
}

/// A record's length and CRC32C, before its payload.
pub const RECORD_HEADER: usize = 8;

/// Frames the record written at `at`: `RECORD_HEADER` bytes left for its header, then its
/// payload to the end of `raw`. The recorder writes payloads in place this way, without a copy.
pub fn frame_in_place(raw: &mut [u8], at: usize) {
    let (head, payload) = raw[at..].split_at_mut(RECORD_HEADER);
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
}

/// A compressed block with its header, ready to append. The writer keeps one compressor: a new
/// one per block set zstd's tables up again, and streaming into it copied the input twice.
pub fn encode_block(
    zstd: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
    first_seq: u64,
    count: u32,
    last_at_us: i64,
) -> std::io::Result<Vec<u8>> {
    // Compressed into the spare room after the header, which is never zeroed first: a block's
    // bound is about its raw size, a megabyte of memset per block for nothing.
    let mut out = Vec::with_capacity(BLOCK_HEADER + zstd::zstd_safe::compress_bound(raw.len()));
    out.resize(BLOCK_HEADER, 0);
    let mut room = std::io::Cursor::new(out);
    room.set_position(BLOCK_HEADER as u64);
    zstd.compress_to_buffer(raw, &mut room)?;
    let mut out = room.into_inner();
    finish_block(
        &mut out,
        BLOCK_MAGIC,
        raw.len() as u32,
        first_seq,
        count,
        last_at_us,
    );
    Ok(out)
}

/// A checkpoint block holding a signed note for tree size `size`.
pub fn encode_checkpoint(note: &str, size: u64, at_us: i64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_HEADER];
    out.extend_from_slice(note.as_bytes());
    finish_block(&mut out, CHECKPOINT_MAGIC, 0, size, 0, at_us);
    out
}

fn finish_block(
    out: &mut [u8],
    magic: &[u8; 4],
    raw_len: u32,
    first_seq: u64,
    count: u32,
    last_at_us: i64,
) {
    let zlen = (out.len() - BLOCK_HEADER) as u32;
    out[0..4].copy_from_slice(magic);
    out[4..8].copy_from_slice(&zlen.to_le_bytes());
    out[8..12].copy_from_slice(&raw_len.to_le_bytes());
    out[12..20].copy_from_slice(&first_seq.to_le_bytes());
    out[20..24].copy_from_slice(&count.to_le_bytes());
    out[24..32].copy_from_slice(&last_at_us.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..32]), &out[BLOCK_HEADER..]);
    out[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Why a segment could not be read past some offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a block: a write that never finished.
    Torn { offset: u64 },
    /// Bytes that are there but wrong.
    Corrupt { offset: u64, what: String },
}

#[derive(Debug)]
pub struct Block<'a> {
    /// A checkpoint block rather than records.
    pub is_checkpoint: bool,
    pub offset: u64,
    pub first_seq: u64,
    pub count: u32,
    pub last_at_us: i64,
    raw_len: u32,
    data: &'a [u8],
}

impl Block<'_> {
    /// The signed note of a checkpoint block.
    pub fn note(&self) -> Option<&str> {
        self.is_checkpoint
            .then(|| std::str::from_utf8(self.data).ok())
            .flatten()
    }

    pub fn end(&self) -> u64 {
        self.offset + (BLOCK_HEADER + self.data.len()) as u64
    }

    /// The record payloads, each checked against its CRC.
    pub fn records(&self) -> Result<Vec<Vec<u8>>, Damage> {
        let corrupt = |what: String| Damage::Corrupt {
            offset: self.offset,
            what,
        };
        let raw = decompress(self.data, self.raw_len as usize)
            .map_err(|e| corrupt(format!("block does not decompress: {e}")))?;
        // Each record takes a header at least: a count that says more is damage, found below.
        let mut out = Vec::with_capacity((self.count as usize).min(raw.len() / RECORD_HEADER));
        let mut at = 0usize;
        while at < raw.len() {
            let Some(head) = raw.get(at..at + 8) else {
                return Err(corrupt("record header cut short".into()));
            };
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
            let Some(payload) = raw.get(at + 8..at + 8 + len) else {
                return Err(corrupt(format!("record {} cut short", out.len())));
            };
            if crc32c::crc32c(payload) != crc {
                return Err(corrupt(format!(
                    "record seq {} fails its CRC",
                    self.first_seq + out.len() as u64
                )));
            }
            out.push(payload.to_vec());
            at += 8 + len;
        }
        if out.len() != self.count as usize {
            return Err(corrupt(format!(
                "block says {} records, holds {}",
                self.count,
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The largest block a reader decompresses into room reserved up front. The writer's blocks are
/// about `commit_bytes` (1 MiB by default); a header claiming more (forged, since its CRC holds)
/// gets room only as the data really decompresses, up to what it claims.
const RESERVED_BLOCK: usize = 64 << 20;

/// A block's `raw_len` bytes of records from its zstd `data`.
fn decompress(data: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    if raw_len <= RESERVED_BLOCK {
        return zstd::bulk::decompress(data, raw_len);
    }
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::Decoder::with_buffer(data)?
        .take(raw_len as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > raw_len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the block holds more than its header says",
        ));
    }
    Ok(out)
}

/// A segment file read whole.
pub struct Segment {
    pub path: PathBuf,
    pub header: SegmentHeader,
    /// Where the first block starts.
    pub data_start: u64,
    bytes: Vec<u8>,
}

impl Segment {
    pub fn open(path: &Path) -> Result<Segment, (std::io::Error, Option<Damage>)> {
        let bytes = std::fs::read(path).map_err(|e| (e, None))?;
        Segment::parse(path.to_owned(), bytes)
    }

    /// A segment from the bytes of the file at `path`.
    pub fn parse(
        path: PathBuf,
        bytes: Vec<u8>,
    ) -> Result<Segment, (std::io::Error, Option<Damage>)> {
        let bad = |what: &str| {
            (
                std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned()),
                Some(Damage::Corrupt {
                    offset: 0,
                    what: what.to_owned(),
                }),
            )
        };
        if bytes.get(..8) != Some(SEGMENT_MAGIC.as_slice()) {
            return Err(bad("not a segment (bad magic)"));
        }
        let Some(len) = bytes.get(8..12) else {
            return Err(bad("segment header cut short"));
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(12..12 + len) else {
            return Err(bad("segment header cut short"));
        };
        let Some(crc) = bytes.get(12 + len..16 + len) else {
            return Err(bad("segment header cut short"));
        };
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(bad("segment header fails its CRC"));
        }
        let header: SegmentHeader =
            postcard::from_bytes(body).map_err(|_| bad("segment header does not decode"))?;
        Ok(Segment {
            path,
            header,
            data_start: (16 + len) as u64,
            bytes,
        })
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() <= self.data_start
    }

    /// The block at `offset`, `Ok(None)` at the end of the file.
    pub fn block_at(&self, offset: u64) -> Result<Option<Block<'_>>, Damage> {
        let at = offset as usize;
        if at == self.bytes.len() {
            return Ok(None);
        }
        let Some(h) = self.bytes.get(at..at + BLOCK_HEADER) else {
            return Err(Damage::Torn { offset });
        };
        let is_checkpoint = &h[..4] == CHECKPOINT_MAGIC;
        if &h[..4] != BLOCK_MAGIC && !is_checkpoint {
            // A host that lost power may leave the file longer than what reached it,
            // zero-filled: that is a write that never finished too.
            if self.bytes[at..].iter().all(|&b| b == 0) {
                return Err(Damage::Torn { offset });
            }
            return Err(Damage::Corrupt {
                offset,
                what: "no block starts here".into(),
            });
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let zlen = u32_at(4) as usize;
        let Some(data) = self.bytes.get(at + BLOCK_HEADER..at + BLOCK_HEADER + zlen) else {
            return Err(Damage::Torn { offset });
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..32]), data);
        if crc != u32_at(32) {
            return Err(Damage::Corrupt {
                offset,
                what: "block fails its CRC".into(),
            });
        }
        Ok(Some(Block {
            is_checkpoint,
            offset,
            first_seq: u64::from_le_bytes(h[12..20].try_into().unwrap()),
            count: u32_at(20),
            last_at_us: i64::from_le_bytes(h[24..32].try_into().unwrap()),
            raw_len: u32_at(8),
            data,
        }))
    }

    /// Every block in order; stops at the first damage, which it returns with the blocks before.
    pub fn blocks(&self) -> (Vec<Block<'_>>, Option<Damage>) {
        let mut out = Vec::new();
        let mut at = self.data_start;
        loop {
            match self.block_at(at) {
                Ok(None) => return (out, None),
                Ok(Some(b)) => {
                    at = b.end();
                    out.push(b);
                }
                Err(d) => return (out, Some(d)),
            }
        }
    }
}
