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
    let Some((&config, mut rest)) = data.split_first() else {
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
    while let [tag, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (body, next) = tail.split_at(len);
        rest = next;

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
            auth_over = auth.on_message(*tag, body, &mut out).is_err();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::postgres::messages::{encode_auth_ok, encode_error};

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
        let targets: [(&str, Target); 5] = [
            ("startup", startup),
            ("backend_messages", backend_messages),
            ("session", session),
            ("upstream_hello", upstream_hello),
            ("side_query", side_query),
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
    }
}
