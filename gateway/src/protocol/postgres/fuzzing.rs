//! Entry points for the cargo-fuzz targets in `fuzz/`: each `fuzz/fuzzers/NAME.rs` is one line
//! calling the function of the same name here. Each takes arbitrary bytes and must neither panic
//! nor break the invariants it asserts. A new target is a function here, a one-line file there
//! and a `[[bin]]` entry in `fuzz/Cargo.toml`.

use super::auth::{ChannelBinding, UpstreamAuth};
use super::messages::{
    encode_row_description, parse_auth_request, parse_backend_key_data, parse_error_fields,
    parse_negotiate_protocol_version, parse_parameter_status, parse_ready_for_query,
    parse_row_description,
};
use super::startup::{
    Initial, MAX_STARTUP_PACKET_LEN, encode_cancel, encode_ssl_request, encode_startup,
    parse_initial,
};

/// `parse_initial` on arbitrary bytes; whatever it accepts must re-encode to the same message.
pub fn startup(data: &[u8]) {
    let Ok(Some((initial, used))) = parse_initial(data, MAX_STARTUP_PACKET_LEN) else {
        return;
    };
    assert!(used <= data.len());
    let mut again = Vec::new();
    match &initial {
        Initial::Startup(s) => encode_startup(s.major, s.minor, &s.params, &mut again),
        Initial::Cancel { pid, key } => encode_cancel(*pid, key, &mut again),
        Initial::SslRequest => encode_ssl_request(&mut again),
        // No builder: the gateway never sends these.
        Initial::GssEncRequest => again.extend_from_slice(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]),
        Initial::DirectTls => {
            assert_eq!(used, 0, "direct TLS must leave the ClientHello unread");
            return;
        }
    }
    assert_eq!(&again[..], &data[..used], "re-encoding changed {initial:?}");
}

/// Splits the input into backend messages (`tag`, `u16` body length, body, with the length
/// capped by what is left), runs every backend parser on each body, and feeds the sequence to
/// an [`UpstreamAuth`] whose configuration the first byte picks.
pub fn backend_messages(data: &[u8]) {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let password = (config & 1 == 0).then_some(&b"fuzz-password"[..]);
    let binding = if config & 2 == 0 {
        ChannelBinding::None
    } else {
        ChannelBinding::TlsServerEndPoint(vec![config; 32])
    };
    let mut auth = UpstreamAuth::new("fuzz", password, binding);
    let mut out = Vec::new();
    let mut auth_over = false;
    for (tag, body) in tagged_chunks(rest) {
        let _ = parse_error_fields(body);
        let _ = parse_backend_key_data(body);
        let _ = parse_parameter_status(body);
        let _ = parse_negotiate_protocol_version(body);
        let _ = parse_auth_request(body);
        let _ = parse_ready_for_query(body);
        if let Ok(fields) = parse_row_description(body) {
            let mut again = Vec::new();
            encode_row_description(&fields, &mut again);
            assert_eq!(&again[5..], body, "row description did not round-trip");
        }

        if !auth_over {
            out.clear();
            auth_over = auth.on_message(tag, body, &mut out).is_err();
        }
    }
}

/// The session core on arbitrary client and server bytes, fed in chunks the first byte chooses,
/// with a gate that blocks every other request: it must never panic, never consume more than it
/// was given, and only ever forward ranges inside its input.
pub fn session(data: &[u8]) {
    use super::session::{
        Blocked, Disposition, Gate, NoFilter, Output, Progress, Request, Seg, Session,
    };

    struct Alternate(bool);
    impl Gate for Alternate {
        fn check(&mut self, _: &Request<'_>) -> Disposition {
            self.0 = !self.0;
            if self.0 {
                Disposition::Allow
            } else {
                Disposition::Block(Blocked {
                    rule: "fuzz".into(),
                    reason: "every other".into(),
                    sqlstate: None,
                })
            }
        }
    }

    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (client, server) = rest.split_at(rest.len() * usize::from(split) / 256);
    let chunk = 1 + usize::from(split % 64);
    let mut core = Session::new(1 << 16);
    let mut gate = Alternate(false);
    for (input, is_client) in [(client, true), (server, false)] {
        let mut pending: Vec<u8> = Vec::new();
        for piece in input.chunks(chunk) {
            pending.extend_from_slice(piece);
            let mut out = Output::default();
            let progress = if is_client {
                core.on_frontend(&pending, &mut gate, &mut out)
            } else {
                core.on_backend(&pending, &mut NoFilter, &mut out)
            };
            let consumed = match progress {
                Ok(
                    Progress::Continue { consumed }
                    | Progress::Hold { consumed }
                    | Progress::Terminate { consumed },
                ) => consumed,
                Err(_) => break,
            };
            assert!(consumed <= pending.len());
            for seg in out.segments() {
                match seg {
                    Seg::Input(r) => {
                        assert!(r.end <= consumed, "forwarded bytes it did not consume")
                    }
                    Seg::Scratch(r) => assert!(r.end <= out.scratch().len()),
                }
            }
            pending.drain(..consumed);
        }
    }
}

/// Splits fuzz input into tagged chunks: a tag byte, a big-endian `u16` length (capped by what is
/// left) and that many bytes, until fewer than three bytes remain.
fn tagged_chunks(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let [tag, hi, lo, tail @ ..] = rest else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (body, next) = tail.split_at(len);
        rest = next;
        Some((*tag, body))
    })
}

/// Frames arbitrary bytes as backend messages (a real frame header each, as the upstream sends
/// them) and yields each whole one; stops at the first incomplete or out-of-range frame.
fn backend_frames(data: &[u8]) -> impl Iterator<Item = (u8, &[u8], &[u8])> {
    use super::frame::{Next, next_frame};
    let mut rest = data;
    std::iter::from_fn(move || match next_frame(rest, 1 << 20) {
        Ok(Next::Frame(f)) => {
            let (msg, next) = rest.split_at(f.wire_len());
            rest = next;
            Some((f.tag, f.body, msg))
        }
        _ => None,
    })
}

/// The upstream's startup after AuthenticationOk, on arbitrary bytes: whatever the hello accepts
/// must give the client a well-formed answer or a clean error, never a panic.
pub fn upstream_hello(data: &[u8]) {
    use super::frame::Frame;
    use super::hello::{HelloStep, UpstreamHello, encode_client_hello};
    let mut hello = UpstreamHello::default();
    for (tag, body, msg) in backend_frames(data) {
        match hello.on_message(&Frame { tag, body }, msg) {
            Ok(HelloStep::More) => continue,
            Ok(HelloStep::Ready) => {
                let (relay, pid, key) = hello.finish();
                let mut out = Vec::new();
                if encode_client_hello(&relay, pid, &key, &mut out).is_ok() {
                    // The answer is whole messages, ReadyForQuery last.
                    let ends = backend_frames(&out).map(|(_, _, m)| m.len()).sum::<usize>();
                    assert_eq!(ends, out.len(), "client hello is not whole messages");
                    assert_eq!(
                        out[out.len() - 6],
                        b'Z',
                        "client hello must end in ReadyForQuery"
                    );
                }
                return;
            }
            Ok(HelloStep::Refused { .. }) | Err(_) => return,
        }
    }
}

/// A side query's answer (the catalog read) on arbitrary backend messages.
pub fn side_query(data: &[u8]) {
    use super::side_query::{SideQuery, SideStep};
    let mut query = SideQuery::default();
    for (tag, body, _) in backend_frames(data) {
        match query.on_message(tag, body) {
            Ok(SideStep::More) => {}
            Ok(SideStep::Done(_) | SideStep::Failed { .. }) | Err(_) => return,
        }
    }
}

/// The pool's reset and health check, on arbitrary answers: the first byte picks how many
/// queries were sent (1 to 3), the rest are backend messages. Never a panic, and an answer is
/// whole only after one ReadyForQuery per query; one that [`Answer::clean`] accepts came with no
/// ErrorResponse and left the session idle, so a connection is pooled only then.
pub fn housekeeping(data: &[u8]) {
    use super::housekeeping::Housekeeping;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let queries = usize::from(pick % 3) + 1;
    let mut core = Housekeeping::new(queries);
    let (mut ready, mut errors) = (0, 0);
    for (tag, body, _) in backend_frames(rest) {
        let step = core.on_message(tag, body);
        match (tag, &step) {
            (b'Z', Ok(_)) => ready += 1,
            (b'E', Ok(_)) => errors += 1,
            _ => {}
        }
        match step {
            Ok(None) => assert!(ready < queries, "every ReadyForQuery came, yet no answer"),
            Ok(Some(answer)) => {
                assert_eq!(ready, queries, "an answer before every ReadyForQuery");
                let tags: Vec<&str> = answer.tags.iter().map(String::as_str).collect();
                if answer.clean(&tags) {
                    assert_eq!(errors, 0, "clean despite an ErrorResponse: {answer:?}");
                    assert_eq!(answer.status, b'I', "clean outside idle: {answer:?}");
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Masking of what an upstream sends. The input describes a result's columns (types, formats and
/// names picked from lists that reach every masking plan: column rules in each style, json rules,
/// detectors, binary values, arrays), then backend messages (`tag`, `u16` body length, body):
/// DataRows, CopyData (text, CSV or binary, as the first byte picks), ErrorResponse and
/// NoticeResponse, NotificationResponse. Masking may refuse a message, never panic; a rewritten
/// message must be whole, and a DataRow must keep its column count, its NULLs and the values of the
/// columns no rule or detector can touch.
///
/// Returns how many messages masking rewrote.
pub fn mask_results(data: &[u8]) -> usize {
    use crate::mask::{Column, CopyOptions, Masker};
    use std::sync::OnceLock;

    /// (type OID, whether no rule in `RULES` and no detector can change its values).
    const TYPES: [(u32, bool); 12] = [
        (25, false),    // text
        (1043, false),  // varchar
        (114, false),   // json
        (3802, false),  // jsonb
        (23, true),     // int4
        (20, false),    // int8 (a `type` rule)
        (1700, false),  // numeric (a `type` rule)
        (2950, true),   // uuid
        (1009, false),  // text[]
        (17, true),     // bytea
        (869, false),   // inet (a `type` rule)
        (16384, false), // a user-defined type: scanned as text with syntax
    ];
    /// (name, whether no column rule matches it).
    const NAMES: [(&str, bool); 8] = [
        ("id", true),
        ("note", true),
        ("email", false),
        ("card_number", false),
        ("api_token", false),
        ("user_hash", false),
        ("gone", false),
        ("doc", true),
    ];
    const RULES: &str = r#"
        detectors = ["email", "phone", "card", "ssn", "iban", "ipv4", "ipv6", "aws_key", "jwt",
                     "private_key", "bearer", "secret"]
        [[columns]]
        name = "*email*"
        style = "partial"
        [[columns]]
        name = "*card_number*"
        style = "partial"
        [[columns]]
        name = "*token*"
        [[columns]]
        name = "*hash*"
        style = "keyed_hash"
        [[columns]]
        name = "gone"
        style = "null"
        [[columns]]
        type = "int8"
        style = "keyed_hash"
        [[columns]]
        type = "numeric"
        style = "keyed_hash"
        [[columns]]
        type = "inet"
        [[json]]
        path = "$.a"
        style = "partial"
        [[json]]
        path = "$..secret"
        [[json]]
        path = "$.list[*]"
        style = "keyed_hash"
    "#;
    static MASKER: OnceLock<Masker> = OnceLock::new();
    let masker = MASKER.get_or_init(|| {
        let rules = toml::from_str(RULES).expect("the fuzz rules parse");
        Masker::new(&rules).expect("the fuzz rules compile")
    });

    let Some((&shape, rest)) = data.split_first() else {
        return 0;
    };
    let ncols = usize::from(shape % 6) + 1;
    let Some((picks, rest)) = rest.split_at_checked(ncols) else {
        return 0;
    };
    let (mut cols, mut names, mut untouchable) = (Vec::new(), Vec::new(), Vec::new());
    for &p in picks {
        // Low nibble: the type; the next three bits: the name; the top bit: binary format.
        let (type_oid, plain_type) = TYPES[usize::from(p & 0x0f) % TYPES.len()];
        let (name, plain_name) = NAMES[usize::from(p >> 4 & 7)];
        cols.push(Column {
            name: name.as_bytes(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            format: i16::from(p & 0x80 != 0),
        });
        names.push(name.to_owned());
        untouchable.push(plain_type && plain_name);
    }
    let plan = masker.plan(&cols, &|_, _| None);
    let formats: Vec<i16> = cols.iter().map(|c| c.format).collect();
    let (copy_format, options) = match shape / 64 {
        0 => (0, CopyOptions::text()),
        1 => (0, CopyOptions::csv()),
        2 => (
            0,
            CopyOptions {
                header: true,
                ..CopyOptions::csv()
            },
        ),
        _ => (1, CopyOptions::text()),
    };
    let copy = masker.copy_plan(copy_format, &formats, Some(&names), &options);

    let mut out = Vec::new();
    let mut rewrites = 0;
    for (tag, body) in tagged_chunks(rest) {
        out.clear();
        let rewritten = match tag {
            b'D' => {
                let Ok(changed) = plan.mask_data_row(body, &mut out) else {
                    continue;
                };
                if changed {
                    check_masked_row(body, &out, &untouchable);
                }
                changed
            }
            b'd' => copy.mask_copy_data(body, &mut out).unwrap_or(false),
            b'E' | b'N' => masker
                .mask_error(tag, body, body.len() % 2 == 0, &mut out)
                .unwrap_or(false),
            b'A' => masker.mask_notification(body, &mut out).unwrap_or(false),
            _ => false,
        };
        if rewritten {
            let declared = u32::from_be_bytes(out[1..5].try_into().expect("4 bytes"));
            assert_eq!(
                declared as usize,
                out.len() - 1,
                "a rewritten message's length"
            );
            rewrites += 1;
        }
    }
    rewrites
}

/// `masked` (a whole DataRow message) against the `original` body it came from.
fn check_masked_row(original: &[u8], masked: &[u8], untouchable: &[bool]) {
    fn fields(body: &[u8]) -> Vec<Option<&[u8]>> {
        let count = u16::from_be_bytes(body[..2].try_into().expect("2 bytes"));
        let mut pos = 2;
        let fields = (0..count)
            .map(|_| {
                let len = i32::from_be_bytes(body[pos..pos + 4].try_into().expect("4 bytes"));
                pos += 4;
                usize::try_from(len).ok().map(|len| {
                    pos += len;
                    &body[pos - len..pos]
                })
            })
            .collect();
        assert_eq!(pos, body.len(), "a DataRow's fields fill its body");
        fields
    }
    assert_eq!(masked[0], b'D');
    let before = fields(original);
    let after = fields(&masked[5..]);
    assert_eq!(before.len(), after.len(), "masking kept the column count");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if b.is_none() {
            assert!(a.is_none(), "column {i}: a NULL stays NULL");
        }
        if untouchable[i] {
            assert_eq!(b, a, "column {i}: no rule or detector applies");
        }
    }
}

/// A recording segment as `recordings verify`, `show` and `export` read one: its header and
/// Merkle frontier, every block, each block's records and their entries, checkpoint notes, and
/// each entry rendered as a transcript line, a JSON line and an OCSF event. With the first byte
/// even the rest is the file as it is; odd, the rest describes a header body and blocks that
/// `sealed_segment` frames with valid CRCs, as a forger would, so the input gets past them to
/// zstd, postcard and the renderers. Damage must come out as an error, never a panic.
pub fn recording_segment(data: &[u8]) {
    use crate::record::checkpoint::{open_checkpoint, parse_body};
    use crate::record::cli::{Ocsf, Transcript, jsonl};
    use crate::record::merkle::Frontier;
    use crate::record::segment::Segment;
    use crate::record::types::Entry;

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        sealed_segment(rest)
    };
    let Ok(seg) = Segment::parse("fuzz.seg".into(), file) else {
        return;
    };
    let mut tree = Frontier::from_parts(seg.header.first_seq, seg.header.frontier.clone());
    let (blocks, _damage) = seg.blocks();
    let mut transcript = Transcript::default();
    let mut ocsf = Ocsf::default();
    for block in &blocks {
        if let Some(note) = block.note() {
            let _ = open_checkpoint(note, &[]);
            let _ = parse_body(note);
            continue;
        }
        let Ok(records) = block.records() else {
            continue;
        };
        for payload in records {
            if let Some(tree) = tree.as_mut() {
                tree.push_leaf(&payload);
            }
            let Ok(entry) = postcard::from_bytes::<Entry>(&payload) else {
                continue;
            };
            for e in entry.unbundle() {
                transcript.entry(&e);
                let _ = jsonl(&e);
                ocsf.entry(&e);
            }
        }
    }
    transcript.finish();
    if let Some(tree) = tree {
        tree.root();
    }
}

/// A segment file from `spec`: a `u8` length and that many bytes of header body, then blocks
/// (`kind`, `u16` length, payload). An even `kind` is a data block whose payload is records, each
/// a `u8` length and its bytes; an odd one a checkpoint block whose note is the payload. Every
/// CRC is computed, so only what the CRCs cover is arbitrary.
fn sealed_segment(spec: &[u8]) -> Vec<u8> {
    use crate::record::segment::{SEGMENT_MAGIC, encode_block, encode_checkpoint, frame_record};

    let (header, rest) = match spec.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    let mut file = SEGMENT_MAGIC.to_vec();
    file.extend_from_slice(&(header.len() as u32).to_le_bytes());
    file.extend_from_slice(header);
    file.extend_from_slice(&crc32c::crc32c(header).to_le_bytes());
    let mut zstd = zstd::bulk::Compressor::new(1).expect("a level-1 compressor");
    let mut seq = 0u64;
    for (kind, payload) in tagged_chunks(rest) {
        if kind & 1 == 1 {
            let note = String::from_utf8_lossy(payload);
            file.extend_from_slice(&encode_checkpoint(&note, seq, i64::from(kind)));
            continue;
        }
        let mut raw = Vec::new();
        let mut count = 0u32;
        let mut records = payload;
        while let [n, more @ ..] = records {
            let (record, after) = more.split_at(usize::from(*n).min(more.len()));
            frame_record(&mut raw, record);
            count += 1;
            records = after;
        }
        // Bit 1: a count that disagrees with the records, as a forged header would say.
        let claimed = count + u32::from(kind & 2 != 0);
        let at_us = i64::from(kind) << 56;
        if let Ok(block) = encode_block(&mut zstd, &raw, seq, claimed, at_us) {
            file.extend_from_slice(&block);
        }
        seq += u64::from(count);
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::postgres::messages::{encode_auth_ok, encode_error};
    use crate::testing::data_row_body;

    /// The targets' invariants hold on well-formed seeds, so CI runs them without a fuzzer.
    #[test]
    fn session_target_survives_pseudo_random_bytes() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [0usize, 1, 7, 64, 300, 4096] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            session(&data);
        }
        // A well-formed pipeline, as a seed.
        let mut seed = vec![128];
        seed.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        seed.extend_from_slice(b"Z\0\0\0\x05I");
        session(&seed);
    }

    /// Every input of the committed corpora (minimized after each campaign, and with every
    /// crash found kept as a regression seed) goes through its target again.
    #[test]
    fn committed_corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 8] = [
            ("startup", startup),
            ("backend_messages", backend_messages),
            ("session", session),
            ("upstream_hello", upstream_hello),
            ("side_query", side_query),
            ("housekeeping", housekeeping),
            ("mask_results", |data| {
                mask_results(data);
            }),
            ("recording_segment", recording_segment),
        ];
        let mut replayed = 0;
        for (name, target) in targets {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e} (the corpus is committed)", dir.display()));
            for entry in entries {
                let path = entry.unwrap().path();
                target(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no corpus under {}", root.display());
    }

    /// `prefix`, then `chunks` as [`tagged_chunks`] reads them back.
    fn tagged(mut prefix: Vec<u8>, chunks: &[(u8, &[u8])]) -> Vec<u8> {
        for (tag, body) in chunks {
            prefix.push(*tag);
            prefix.extend_from_slice(&(body.len() as u16).to_be_bytes());
            prefix.extend_from_slice(body);
        }
        prefix
    }

    /// `mask_results` inputs: the columns `picks` names, then the messages.
    fn mask_seed(shape: u8, picks: &[u8], messages: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let messages: Vec<(u8, &[u8])> = messages.iter().map(|(t, b)| (*t, &b[..])).collect();
        tagged([&[shape][..], picks].concat(), &messages)
    }

    /// Every masking plan on values it changes, then the same inputs with bytes overwritten: the
    /// invariants hold in CI without a fuzzer, and on more than well-formed messages.
    #[test]
    fn mask_target_survives_its_seeds_mutated() {
        // Picks: type index in the low nibble, name index in bits 4-6, binary in bit 7.
        let (text, json, int8, text_array, jsonb, int4) = (0x00, 0x02, 0x05, 0x08, 0x03, 0x04);
        let (note, email, token, hash, gone, doc) = (0x10, 0x20, 0x40, 0x50, 0x60, 0x70);
        let picks = [
            text | note,
            text | email,
            json | doc,
            int8 | hash,
            text_array | note,
            jsonb | doc | 0x80,
        ];
        let row = data_row_body(&[
            Some(b"call 555-123-4567 or mail bob@example.com"),
            Some(b"alice@example.com"),
            Some(br#"{"a":"4111 1111 1111 1111","x":{"secret":"s3cr3t"},"list":[1,2]}"#),
            Some(b"9007199254740993"),
            Some(br#"{"plain","carol@example.com"}"#),
            Some(b"\x01{\"a\":\"hidden\"}"),
        ]);
        let nulls = data_row_body(&[None; 6]);
        let mut error = Vec::new();
        encode_error(
            "ERROR",
            "23505",
            "duplicate key",
            Some("Key (email)=(dave@example.com) already exists."),
            None,
            &mut error,
        );
        let text_copy = b"1\talice@example.com\t{}\t42\t{}\t\\N\n".to_vec();
        let csv_copy = b"1,alice@example.com,\"{\"\"a\"\":1}\",42,{},\n".to_vec();
        let notify = [&7i32.to_be_bytes()[..], b"chan\0erin@example.com\0"].concat();
        let messages = |copy: Vec<u8>| {
            vec![
                (b'D', row.clone()),
                (b'D', nulls.clone()),
                (b'd', copy),
                (b'E', error[5..].to_vec()),
                (b'A', notify.clone()),
            ]
        };
        let seeds = [
            mask_seed(5, &picks, &messages(text_copy.clone())),
            mask_seed(64 + 5, &picks, &messages(csv_copy.clone())),
            mask_seed(128 + 5, &picks, &messages(csv_copy)),
            mask_seed(192 + 5, &picks, &messages(text_copy)),
            mask_seed(
                1,
                &[int4 | note, text | token],
                &[(b'D', data_row_body(&[Some(b"42"), Some(b"t")]))],
            ),
            mask_seed(
                0,
                &[int4 | gone],
                &[(b'D', data_row_body(&[Some(&7i32.to_be_bytes())]))],
            ),
        ];
        // The seeds reach the rewriting paths: a rewritten row, error and notification each.
        assert!(
            mask_results(&seeds[0]) >= 3,
            "the first seed's messages are masked"
        );
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in &seeds {
            mask_results(seed);
            for _ in 0..3000 {
                let mut mutated = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % mutated.len() as u64) as usize;
                    mutated[at] = next() as u8;
                }
                mask_results(&mutated);
                mutated.truncate((next() % mutated.len() as u64) as usize);
                mask_results(&mutated);
            }
        }
    }

    /// A segment the recorder wrote for a session with a statement, its result and an error,
    /// and the records of the same session sealed from a spec, each then mutated: the readers'
    /// invariants hold in CI without a fuzzer.
    #[test]
    fn recording_target_survives_a_real_segment_mutated() {
        use crate::record::segment::{Segment, list_segments};
        use crate::record::types::{
            Bytes, Column, Notice, Request, RequestKind, SessionStart, Verdict,
        };
        use crate::record::{Recorder, config::RecordingConfig};

        let state = tempfile::tempdir().unwrap();
        let cfg = RecordingConfig {
            origin: Some("fuzz/seed".into()),
            ..Default::default()
        };
        let recorder = Recorder::start(&cfg, state.path()).unwrap();
        let handle = recorder.handle();
        let mut s = handle
            .begin(SessionStart {
                agent: Some("planner".into()),
                target: "main".into(),
                database: "shop".into(),
                upstream_user: "app".into(),
                ..Default::default()
            })
            .unwrap();
        s.request(Request {
            kind: RequestKind::Query,
            statement: None,
            text: "SELECT id, email FROM customers".into(),
            params: vec![Some(Bytes(b"42".to_vec())), None],
        })
        .unwrap();
        s.verdict(Verdict::allow(None)).unwrap();
        s.columns(vec![Column {
            name: "email".into(),
            type_oid: 25,
            format: 0,
        }])
        .unwrap();
        s.rows(vec![vec![Some(Bytes(b"a***@example.com".to_vec())), None]])
            .unwrap();
        s.complete("SELECT 1", 30, 60, std::time::Duration::from_micros(250))
            .unwrap();
        s.error(Notice {
            severity: "ERROR".into(),
            code: "42P01".into(),
            message: "relation \"orders\" does not exist".into(),
            detail: None,
        })
        .unwrap();
        s.end("client closed").unwrap();
        handle.flush().wait().unwrap();
        recorder.shutdown();

        let dir = state.path().join("recordings");
        let (_, path) = list_segments(&dir).unwrap().pop().expect("a segment");
        let file = std::fs::read(&path).unwrap();
        let seg = Segment::parse(path, file.clone()).unwrap();
        let (blocks, damage) = seg.blocks();
        assert_eq!(damage, None);
        // The same records as a spec for `sealed_segment`: header, then one data block.
        let header_len = u32::from_le_bytes(file[8..12].try_into().unwrap()) as usize;
        let mut spec = vec![u8::try_from(header_len).expect("a short header")];
        spec.extend_from_slice(&file[12..12 + header_len]);
        let mut records = Vec::new();
        for block in blocks.iter().filter(|b| !b.is_checkpoint) {
            for payload in block.records().unwrap() {
                records.push(u8::try_from(payload.len()).expect("a short record"));
                records.extend_from_slice(&payload);
            }
        }
        assert!(!records.is_empty(), "the segment holds records");
        let note = blocks.iter().find_map(|b| b.note()).expect("a checkpoint");
        let spec = tagged(spec, &[(0, &records), (1, note.as_bytes())]);

        let raw = [&[0u8][..], &file].concat();
        let sealed = [&[1u8][..], &spec].concat();
        let mut x: u64 = 0x853c_49e6_748f_ea9b;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in [raw, sealed] {
            recording_segment(&seed);
            for _ in 0..2000 {
                let mut mutated = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = 1 + (next() % (mutated.len() as u64 - 1)) as usize;
                    mutated[at] = next() as u8;
                }
                recording_segment(&mutated);
                mutated.truncate(1 + (next() % mutated.len() as u64) as usize);
                recording_segment(&mutated);
            }
        }
        // Times past year 9999 (a forged record) render, rather than abort the reader.
        assert!(crate::record::cli::time(i64::MAX).contains("after the epoch"));
        // A header cut inside its length field is damage, not a panic.
        assert!(Segment::parse("cut.seg".into(), file[..10].to_vec()).is_err());
    }

    #[test]
    fn targets_accept_their_seeds() {
        let mut seed = Vec::new();
        encode_startup(3, 2, &[("user", "u"), ("_pq_.x", "1")], &mut seed);
        startup(&seed);
        for seed in [
            &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f][..],
            &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30],
            &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 1, 2, 3, 4],
            &[0x16, 3, 1],
        ] {
            startup(seed);
        }

        // Config byte 0 (password, no binding), then md5 request, AuthenticationOk, an error.
        let mut seed = vec![0u8];
        let mut push = |tag: u8, body: &[u8]| {
            seed.push(tag);
            seed.extend_from_slice(&(body.len() as u16).to_be_bytes());
            seed.extend_from_slice(body);
        };
        push(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
        let mut ok = Vec::new();
        encode_auth_ok(&mut ok);
        push(b'R', &ok[5..]);
        let mut err = Vec::new();
        encode_error("FATAL", "28P01", "no", None, None, &mut err);
        push(b'E', &err[5..]);
        push(
            b'T',
            &[
                0, 1, b'a', 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
            ],
        );
        backend_messages(&seed);
    }

    #[test]
    fn upstream_targets_take_a_real_startup_and_garbage() {
        // ParameterStatus, BackendKeyData, ReadyForQuery: a server's usual hello.
        let mut hello = Vec::new();
        hello.extend_from_slice(b"S\0\0\0\x19client_encoding\0UTF8\0");
        hello.extend_from_slice(b"K\0\0\0\x0c\0\0\0\x07\0\0\0\x2a");
        hello.extend_from_slice(b"Z\0\0\0\x05I");
        upstream_hello(&hello);
        let mut core = crate::protocol::postgres::hello::UpstreamHello::default();
        let steps: Vec<_> = backend_frames(&hello)
            .map(|(tag, body, msg)| {
                core.on_message(&crate::protocol::postgres::frame::Frame { tag, body }, msg)
                    .unwrap()
            })
            .collect();
        assert_eq!(steps.len(), 3, "the seed is three whole messages");
        assert_eq!(steps[2], crate::protocol::postgres::hello::HelloStep::Ready);
        // Short ReadyForQuery, unknown tags, truncation: errors, not panics.
        upstream_hello(b"Z\0\0\0\x04");
        upstream_hello(b"X\0\0\0\x05IZ\0\0\0\x05I");
        upstream_hello(&hello[..hello.len() - 2]);
        let mut rows = Vec::new();
        rows.extend_from_slice(b"D\0\0\0\x0b\0\x01\0\0\0\x01x");
        rows.extend_from_slice(b"D\0\0\0\x06\0\x05");
        rows.extend_from_slice(b"Z\0\0\0\x05I");
        side_query(&rows);
        side_query(b"E\0\0\0\x05\0Z\0\0\0\x05I");

        // A reset's answer: ROLLBACK and DISCARD ALL, each with its ReadyForQuery.
        let mut reset = vec![1u8];
        reset.extend_from_slice(b"C\0\0\0\x0dROLLBACK\0Z\0\0\0\x05I");
        reset.extend_from_slice(b"C\0\0\0\x10DISCARD ALL\0Z\0\0\0\x05I");
        housekeeping(&reset);
        let mut core = crate::protocol::postgres::housekeeping::Housekeeping::new(2);
        let answers: Vec<_> = backend_frames(&reset[1..])
            .map(|(tag, body, _)| core.on_message(tag, body).unwrap())
            .collect();
        let last = answers
            .last()
            .unwrap()
            .as_ref()
            .expect("the seed is a whole answer");
        assert!(last.clean(&["ROLLBACK", "DISCARD ALL"]));
        // Cut short, an error inside, an unknown message: no panic.
        housekeeping(&reset[..reset.len() - 3]);
        housekeeping(b"\0E\0\0\0\x05\0Z\0\0\0\x05I");
        housekeeping(b"\0W\0\0\0\x05\0");
    }
}
