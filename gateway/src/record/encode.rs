//! Records encoded on the session's thread, straight from what it has at hand.
//!
//! A record's payload is `postcard(Entry)`, and postcard encodes a struct as its fields in
//! order, so a session encodes everything after `seq` ([`Tail`]) and the recorder puts `seq`
//! in front. Rows and column descriptions are encoded from the messages the client received
//! ([`data_row_into`], [`RowDescription`]), as `Record::Rows` and `Record::Columns` would encode
//! them, without a heap value per cell.

use serde::Serialize;

use super::types::{RequestRef, Truncation};

/// An entry without its `seq`: what follows it in the payload.
#[derive(Serialize)]
pub(crate) struct Tail<'a, R: ?Sized + Serialize> {
    pub at_us: i64,
    pub session: u64,
    pub stmt: u32,
    pub record: &'a R,
}

/// Appends a [`Tail`]'s fields before its record as postcard encodes them (zigzag and plain
/// varints), written directly: every record a session hands over starts with them, and through
/// serde they cost more than most records' own bytes.
pub(crate) fn tail_head(out: &mut Vec<u8>, at_us: i64, session: u64, stmt: u32) {
    // Into a buffer on the stack and appended at once: a push per byte cost more than the
    // bytes, five times a query.
    let mut head = [0u8; 25];
    let mut n = varint_into(&mut head, 0, zigzag(at_us));
    n = varint_into(&mut head, n, session);
    n = varint_into(&mut head, n, u64::from(stmt));
    out.extend_from_slice(&head[..n]);
}

/// Writes `v` as a varint into `buf` at `at`, which has room for its 10 bytes; returns where it
/// ends.
fn varint_into(buf: &mut [u8], mut at: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        buf[at] = v as u8 | 0x80;
        v >>= 7;
        at += 1;
    }
    buf[at] = v as u8;
    at + 1
}

/// `Record::Columns` over a RowDescription body (`int16` count, then per column its name as a C
/// string and 18 bytes, of which the type oid and the format): `count` columns, each checked with
/// [`row_description`], their names UTF-8.
pub(crate) struct RowDescription<'a> {
    pub body: &'a [u8],
    pub count: usize,
}

/// `Record::Columns`'s and `Record::Rows`'s variant indexes: the enum's order is the on-disk
/// format.
const COLUMNS: u32 = 3;
const ROWS: u32 = 4;

/// Appends `Record::Request` as postcard encodes it, from borrowed parts: a statement's text is
/// written where it lies rather than copied into a record first.
pub(crate) fn request(out: &mut Vec<u8>, request: &RequestRef<'_>) -> Result<(), String> {
    varint(out, u64::from(REQUEST));
    postcard::to_extend(request, super::Append(out))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `Record::Complete`'s variant index.
const COMPLETE: u32 = 9;

/// Appends `Record::Complete` as postcard encodes it, written directly: every statement ends
/// with one, and through serde its tag's copy and the struct cost more than its bytes.
pub(crate) fn complete(
    out: &mut Vec<u8>,
    tag: &str,
    counts: [u64; 4],
    truncated: Option<&Truncation>,
) {
    varint(out, u64::from(COMPLETE));
    varint(out, tag.len() as u64);
    out.extend_from_slice(tag.as_bytes());
    for n in counts {
        varint(out, n);
    }
    match truncated {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            varint(out, t.rows_recorded);
            varint(out, t.bytes_recorded);
        }
    }
}

/// `Record::Bundle`'s variant index.
pub(crate) const BUNDLE: u32 = 14;

/// Appends a `Record::Bundle`'s start, before its `count` records ([`bundled`]).
pub(crate) fn bundle_head(out: &mut Vec<u8>, count: usize) {
    varint(out, u64::from(BUNDLE));
    varint(out, count as u64);
}

/// Appends a `Bundled` of a record already encoded (its variant first).
pub(crate) fn bundled(out: &mut Vec<u8>, at_us: i64, record: &[u8]) {
    varint(out, zigzag(at_us));
    out.extend_from_slice(record);
}

/// The variants the index holds: session start, request, verdict, session end.
pub(crate) const INDEXED: [u32; 4] = [0, REQUEST, 2, SESSION_END];

/// `Record::Request`'s and `Record::SessionEnd`'s variant indexes.
pub(crate) const REQUEST: u32 = 1;
pub(crate) const SESSION_END: u32 = 10;

/// Appends `Record::Rows`' head as postcard encodes it: the variant index and the number of rows
/// ([`data_row_into`]) that follow.
pub(crate) fn rows_head(out: &mut Vec<u8>, count: usize) {
    varint(out, u64::from(ROWS));
    varint(out, count as u64);
}

/// Appends a DataRow body (`int16` count, then `int32` length and bytes per value, -1 for NULL)
/// as one row of `Record::Rows`, the way postcard encodes it: the cell count, then a byte per
/// `Option` and a value's length and bytes. Written directly, in the one pass that checks the
/// body: wide results are mostly cells, and through serde a cell cost a few dozen calls. Returns
/// the row's value bytes; `None`, with nothing appended, on a body that does not check.
pub(crate) fn data_row_into(body: &[u8], out: &mut Vec<u8>) -> Option<u64> {
    let start = out.len();
    let encoded = encode_cells(body, out);
    if encoded.is_none() {
        out.truncate(start);
    }
    encoded
}

/// The longest value [`encode_cells`] copies as a fixed-size chunk.
const SHORT: usize = 16;

/// [`data_row_into`]'s encoding, which may stop with part of the row appended.
fn encode_cells(body: &[u8], out: &mut Vec<u8>) -> Option<u64> {
    let (cells, mut rest) = body.split_first_chunk::<2>()?;
    let cells = i16::from_be_bytes(*cells).max(0);
    // postcard spends at most 2 bytes more per cell than the wire (a tag, and a length of up to
    // 5 bytes for the wire's 4), and 1 more on the count; and a short value's copy below writes
    // up to 16 bytes before it is trimmed: one reservation for the row.
    out.reserve(body.len() + 2 * cells as usize + 1 + SHORT);
    varint(out, cells as u64);
    let mut values = 0u64;
    for _ in 0..cells {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            out.push(0);
            rest = tail;
            continue;
        }
        let len = len as usize;
        let (value, after) = tail.split_at_checked(len)?;
        if len < 0x80 {
            out.extend_from_slice(&[1, len as u8]);
        } else {
            out.push(1);
            varint(out, len as u64);
        }
        // Most values are short: one fixed-size copy of the bytes from the value on, trimmed to
        // the value, costs less than a call to memcpy per cell.
        match tail.first_chunk::<SHORT>() {
            Some(chunk) if len <= SHORT => {
                out.extend_from_slice(chunk);
                out.truncate(out.len() - (SHORT - len));
            }
            _ => out.extend_from_slice(value),
        }
        rest = after;
        values += len as u64;
    }
    Some(values)
}

/// postcard's signed integers, before their varint: 0, -1, 1, -2, ... as 0, 1, 2, 3, ... (the
/// same number whatever the integer's width).
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of postcard's zigzag encoding of a signed integer.
fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// An entry's fields after its `seq` as [`tail_head`] writes them, then the record's variant:
/// `(at_us, session, stmt, variant, record)`, `record` starting with its variant.
pub(crate) fn take_head(tail: &[u8]) -> Option<(i64, u64, u32, u32, &[u8])> {
    let (at_us, rest) = take_varint(tail)?;
    let (session, rest) = take_varint(rest)?;
    let (stmt, record) = take_varint(rest)?;
    let (variant, _) = take_varint(record)?;
    Some((
        unzigzag(at_us),
        session,
        u32::try_from(stmt).ok()?,
        u32::try_from(variant).ok()?,
        record,
    ))
}

/// Reads a varint from the front of `b` as [`varint`] writes it, and the bytes after it. `None`
/// past the end of `b`, or past the ten bytes a `u64` takes at most.
///
/// A varint of at most eight bytes with eight to read is taken from one word: the recorder reads
/// a time (eight bytes) and three small numbers at the head of every record a session hands over,
/// and a byte at a time that was about 190 instructions a record (`callgrind`, `record_query`).
pub(crate) fn take_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    if let [first @ 0..0x80, rest @ ..] = b {
        return Some((u64::from(*first), rest));
    }
    if let Some(word) = b.first_chunk::<8>() {
        let word = u64::from_le_bytes(*word);
        let ends = !word & 0x8080_8080_8080_8080;
        if ends != 0 {
            let len = ends.trailing_zeros() as usize / 8 + 1;
            let bytes = match len {
                8 => word,
                _ => word & ((1 << (8 * len)) - 1),
            };
            // Each byte's seven bits, then pairs of them, then fours, then all eight packed.
            let mut v = bytes & 0x7f7f_7f7f_7f7f_7f7f;
            v = (v & 0x007f_007f_007f_007f) | ((v & 0x7f00_7f00_7f00_7f00) >> 1);
            v = (v & 0x0000_3fff_0000_3fff) | ((v & 0x3fff_0000_3fff_0000) >> 2);
            v = (v & 0x0000_0000_0fff_ffff) | ((v & 0x0fff_ffff_0000_0000) >> 4);
            return Some((v, &b[len..]));
        }
    }
    let mut v = 0u64;
    for (i, &byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// postcard's unsigned varint: seven bits a byte, least significant first. Pushed a byte at a
/// time: one varint through [`varint_into`]'s buffer and a copy measured slower (callgrind,
/// `record_query`); the buffer pays only for [`tail_head`]'s three at once.
pub(crate) fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl RowDescription<'_> {
    /// Appends `Record::Columns` as postcard encodes it (a column's name with its length, the
    /// type oid as a varint, the format as a zigzag varint), written directly as
    /// [`data_row_into`] writes rows: through serde a column cost a few dozen calls. `None` on a
    /// body that does not check (`out` is then partly written).
    pub fn write(&self, out: &mut Vec<u8>) -> Option<()> {
        out.reserve(self.body.len() + 8);
        varint(out, u64::from(COLUMNS));
        varint(out, self.count as u64);
        let mut rest = self.body.get(2..)?;
        for _ in 0..self.count {
            let (column, len) = column(rest)?;
            varint(out, column.name.len() as u64);
            out.extend_from_slice(column.name.as_bytes());
            varint(out, u64::from(column.type_oid));
            varint(out, zigzag(column.format.into()));
            rest = &rest[len..];
        }
        Some(())
    }
}

/// A column as the wire describes it.
struct ColumnRef<'a> {
    name: &'a str,
    type_oid: u32,
    format: i16,
}

/// The column at the start of `b` and its length in the body.
fn column(b: &[u8]) -> Option<(ColumnRef<'_>, usize)> {
    let end = memchr::memchr(0, b)?;
    let name = std::str::from_utf8(&b[..end]).ok()?;
    let f: &[u8; 18] = b.get(end + 1..end + 19)?.try_into().ok()?;
    let column = ColumnRef {
        name,
        type_oid: u32::from_be_bytes([f[6], f[7], f[8], f[9]]),
        format: i16::from_be_bytes([f[16], f[17]]),
    };
    Some((column, end + 19))
}

/// A RowDescription body's column count, once every column is checked whole with a UTF-8 name;
/// `None` sends the caller to a lossy copy.
pub(crate) fn row_description(body: &[u8]) -> Option<usize> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?).max(0) as usize;
    let mut rest = &body[2..];
    for _ in 0..n {
        let (_, len) = column(rest)?;
        rest = &rest[len..];
    }
    Some(n)
}

/// The first DataRow body at the start of `b`, checked: its length and its values' bytes.
pub(crate) fn data_row(b: &[u8]) -> Option<(usize, u64)> {
    let n = i16::from_be_bytes(b.get(..2)?.try_into().ok()?);
    let mut at = 2;
    let mut values = 0u64;
    for _ in 0..n.max(0) {
        let len = i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len >= 0 {
            at = at.checked_add(len as usize).filter(|&end| end <= b.len())?;
            values += len as u64;
        }
    }
    Some((at, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Bytes, Entry, Record};
    use crate::testing::data_row_body;

    #[test]
    fn rows_from_datarows_and_a_tail_encode_as_the_entry_does() {
        let rows: Vec<Vec<Option<&[u8]>>> = vec![
            vec![Some(b"1"), None, Some(b"")],
            vec![],
            vec![Some(&[0xff; 300][..]), Some(b"a\0b")],
        ];
        let bodies: Vec<Vec<u8>> = rows.iter().map(|r| data_row_body(r)).collect();
        let entry = Entry {
            seq: 1 << 40,
            at_us: -5,
            session: 77,
            stmt: 300,
            record: Record::Rows(
                rows.iter()
                    .map(|r| r.iter().map(|c| c.map(Bytes::from)).collect())
                    .collect(),
            ),
        };
        let mut ours = postcard::to_stdvec(&entry.seq).unwrap();
        ours.extend(postcard::to_stdvec(&(entry.at_us, entry.session, entry.stmt)).unwrap());
        rows_head(&mut ours, rows.len());
        for (body, row) in bodies.iter().zip(&rows) {
            let values = row.iter().flatten().map(|v| v.len() as u64).sum();
            assert_eq!(data_row_into(body, &mut ours), Some(values));
        }
        assert_eq!(ours, postcard::to_stdvec(&entry).unwrap());
        assert_eq!(postcard::from_bytes::<Entry>(&ours).unwrap(), entry);
        // A body cut short anywhere is refused with nothing appended, never read past its end.
        for body in &bodies {
            for cut in 0..body.len() {
                let mut out = vec![7];
                assert_eq!(data_row_into(&body[..cut], &mut out), None, "cut at {cut}");
                assert_eq!(out, [7]);
            }
        }
    }

    #[test]
    fn a_complete_encodes_as_serde_does() {
        use crate::record::types::Complete;
        for (tag, truncated) in [
            ("SELECT 3", None),
            ("", None),
            (
                "INSERT 0 300",
                Some(Truncation {
                    rows_recorded: 1 << 40,
                    bytes_recorded: 127,
                }),
            ),
        ] {
            let c = Complete {
                tag: tag.into(),
                rows: 300,
                bytes_in: 0,
                bytes_out: u64::MAX,
                latency_us: 16_384,
                truncated,
            };
            let mut ours = Vec::new();
            complete(
                &mut ours,
                &c.tag,
                [c.rows, c.bytes_in, c.bytes_out, c.latency_us],
                c.truncated.as_ref(),
            );
            let record = Record::Complete(c);
            assert_eq!(ours, postcard::to_stdvec(&record).unwrap(), "{tag}");
        }
    }

    #[test]
    fn varints_read_back_as_postcard_writes_them_and_never_past_their_end() {
        let values = [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            1 << 56,
            u64::MAX,
        ];
        for v in values {
            let mut b = postcard::to_stdvec(&v).unwrap();
            b.push(0xaa);
            assert_eq!(take_varint(&b), Some((v, &[0xaa][..])), "{v}");
            for cut in 0..b.len() - 1 {
                assert_eq!(take_varint(&b[..cut]), None, "{v} cut at {cut}");
            }
        }
        for v in [0, -1, 1, i64::MIN, i64::MAX, 1_764_633_600_000_000] {
            let b = postcard::to_stdvec(&v).unwrap();
            assert_eq!(take_varint(&b).map(|(z, _)| unzigzag(z)), Some(v), "{v}");
        }
        assert_eq!(take_varint(&[0x80; 11]), None, "longer than a u64 takes");
        // Every length, followed by bytes that would continue a varint, or end one, or nothing.
        for bits in 0..64 {
            for v in [1u64 << bits, (1u64 << bits) - 1, (1u64 << bits) | 0x55] {
                for after in [&[][..], &[0xff; 9], &[0x01; 9], &[0x80, 0x00]] {
                    let mut b = postcard::to_stdvec(&v).unwrap();
                    b.extend_from_slice(after);
                    assert_eq!(take_varint(&b), Some((v, after)), "{v:#x} then {after:?}");
                }
            }
        }
    }

    #[test]
    fn a_tails_head_encodes_as_serde_does_and_reads_back() {
        for (at_us, session, stmt) in [
            (0, 0, 0),
            (1_764_633_600_000_000, 77, 300),
            (-5, u64::MAX, u32::MAX),
            (i64::MIN, 1 << 35, 128),
            (i64::MAX, 127, 16_383),
        ] {
            let mut ours = Vec::new();
            tail_head(&mut ours, at_us, session, stmt);
            let tail = Tail {
                at_us,
                session,
                stmt,
                record: &(),
            };
            assert_eq!(
                ours,
                postcard::to_stdvec(&tail).unwrap(),
                "{at_us} {session} {stmt}"
            );
            // With a record after it (its variant first), read back as written.
            ours.extend_from_slice(&[REQUEST as u8, 7]);
            let record = &ours[ours.len() - 2..];
            assert_eq!(
                take_head(&ours),
                Some((at_us, session, stmt, REQUEST, record))
            );
            for cut in 0..ours.len() - 2 {
                assert_eq!(take_head(&ours[..cut]), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_bundle_encodes_as_serde_does_and_reads_back_as_its_records_with_their_times() {
        use crate::record::{Bundled, Complete, Verdict};
        let records = [
            (
                1_764_633_600_000_000,
                Record::Verdict(Verdict::allow(Some("r".into()))),
            ),
            (-3, Record::Rows(vec![vec![Some(Bytes::from("x")), None]])),
            (
                i64::MAX,
                Record::Complete(Complete {
                    tag: "SELECT 1".into(),
                    rows: 1,
                    bytes_in: 2,
                    bytes_out: 3,
                    latency_us: 4,
                    truncated: None,
                }),
            ),
        ];
        let entry = Entry {
            seq: 300,
            at_us: records[0].0,
            session: 9,
            stmt: 128,
            record: Record::Bundle(
                records
                    .iter()
                    .map(|(at_us, record)| Bundled {
                        at_us: *at_us,
                        record: record.clone(),
                    })
                    .collect(),
            ),
        };
        let mut ours = postcard::to_stdvec(&entry.seq).unwrap();
        tail_head(&mut ours, entry.at_us, entry.session, entry.stmt);
        bundle_head(&mut ours, records.len());
        for (at_us, record) in &records {
            bundled(&mut ours, *at_us, &postcard::to_stdvec(record).unwrap());
        }
        assert_eq!(ours, postcard::to_stdvec(&entry).unwrap());
        let read: Vec<Entry> = postcard::from_bytes::<Entry>(&ours)
            .unwrap()
            .unbundle()
            .collect();
        let expected: Vec<Entry> = records
            .iter()
            .map(|(at_us, record)| Entry {
                seq: 300,
                at_us: *at_us,
                session: 9,
                stmt: 128,
                record: record.clone(),
            })
            .collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_row_description_encodes_as_its_columns_do_and_is_checked_first() {
        // Formats are 0 or 1 on the wire, but any i16 must encode as serde's zigzag would.
        let columns = [
            ("id", 20u32, 0i16),
            ("naïve name", 25, 1),
            ("", 1700, 0),
            ("odd", u32::MAX, -2),
            ("wide", 16_384, i16::MIN),
            ("max", 0, i16::MAX),
        ];
        let mut body = (columns.len() as i16).to_be_bytes().to_vec();
        for (name, oid, format) in columns {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0xaa; 6]);
            body.extend_from_slice(&oid.to_be_bytes());
            body.extend_from_slice(&[0xbb; 6]);
            body.extend_from_slice(&format.to_be_bytes());
        }
        let owned = Record::Columns(
            columns
                .iter()
                .map(|&(name, type_oid, format)| crate::record::Column {
                    name: name.into(),
                    type_oid,
                    format,
                })
                .collect(),
        );
        let count = row_description(&body).unwrap();
        let mut ours = Vec::new();
        RowDescription { body: &body, count }
            .write(&mut ours)
            .unwrap();
        assert_eq!(ours, postcard::to_stdvec(&owned).unwrap());
        for cut in 0..body.len() {
            assert_eq!(row_description(&body[..cut]), None, "cut at {cut}");
        }
        // Half of the 'ï': a name that is not UTF-8 is left to the lossy copy.
        let mut broken = body.clone();
        let at = broken.iter().position(|&b| b == 0xc3).unwrap();
        broken[at + 1] = b'x';
        assert_eq!(row_description(&broken), None);
    }

    #[test]
    fn variant_indexes_are_the_records_on_disk() {
        use crate::record::{SessionStart, Verdict};
        let index = |r: &Record| postcard::to_stdvec(r).unwrap()[0] as u32;
        let indexed = [
            Record::SessionStart(SessionStart::default()),
            Record::Request(crate::record::Request {
                kind: crate::record::RequestKind::Query,
                statement: None,
                text: String::new(),
                params: vec![],
            }),
            Record::Verdict(Verdict::allow(None)),
            Record::SessionEnd {
                reason: String::new(),
            },
        ];
        assert_eq!(indexed.each_ref().map(index), INDEXED);
        assert_eq!(index(&Record::Rows(vec![])), ROWS);
        assert_eq!(index(&Record::Columns(vec![])), COLUMNS);
    }

    #[test]
    fn a_datarow_is_checked_before_it_is_read() {
        assert_eq!(
            data_row(&data_row_body(&[Some(b"ab"), None])),
            Some((12, 2))
        );
        let whole = data_row_body(&[Some(b"abc")]);
        for cut in 0..whole.len() {
            assert_eq!(data_row(&whole[..cut]), None, "cut at {cut}");
        }
        let mut lying = data_row_body(&[Some(b"abc")]);
        lying[2..6].copy_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(data_row(&lying), None);
    }
}
