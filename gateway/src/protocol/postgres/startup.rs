//! The first message a client sends, before any tagged message: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest (each `Int32 length, Int32 code, ...`), or a PostgreSQL 17
//! direct-TLS ClientHello. Also the builders for the gateway's own startup packets upstream.

use super::error::{ProtocolError, Reader};

/// Protocol 3.x minor versions: 3.0, and 3.2 (PostgreSQL 18, long cancel keys). 3.1 was never a
/// server version; a client asking for it gets 3.0 behaviour, as with PostgreSQL.
pub const LATEST_MINOR: u16 = 2;
/// The cap PostgreSQL itself puts on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// Cancel keys are 4 bytes in 3.0; 3.2 allows up to 256.
pub const MAX_CANCEL_KEY_LEN: usize = 256;
/// Prefix of protocol options in the startup parameters (`_pq_.name`).
pub const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

const CANCEL_REQUEST_CODE: u32 = 1234 << 16 | 5678;
const SSL_REQUEST_CODE: u32 = 1234 << 16 | 5679;
const GSSENC_REQUEST_CODE: u32 = 1234 << 16 | 5680;
/// First byte of a TLS handshake record: a direct-TLS client starts with its ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const HEADER_LEN: usize = 8;

/// What a client's first bytes ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial<'a> {
    Startup(StartupMessage<'a>),
    /// 80877103: answer with [`super::messages::encode_ssl_response`].
    SslRequest,
    /// 80877104: answer 'N' to refuse.
    GssEncRequest,
    /// 80877102, on a fresh connection. The key is 4 bytes in 3.0, up to 256 in 3.2.
    Cancel {
        pid: u32,
        key: &'a [u8],
    },
    /// PostgreSQL 17 direct TLS: the bytes are a TLS ClientHello. Nothing is consumed (the
    /// `consumed` count is 0) so the TLS layer reads the record from the same buffer.
    DirectTls,
}

/// A StartupMessage: protocol version and the `name=value` parameters, borrowed from the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    pub major: u16,
    /// As requested by the client; see [`StartupMessage::negotiated_minor`].
    pub minor: u16,
    /// In the client's order, including `_pq_.` protocol options.
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> StartupMessage<'a> {
    /// The value of the first parameter named `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.params.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The minor version the session runs at: the client's, capped at [`LATEST_MINOR`].
    pub fn negotiated_minor(&self) -> u16 {
        self.minor.min(LATEST_MINOR)
    }

    /// Protocol options (`_pq_.*` parameters). The gateway supports none, so every one is
    /// reported back as unsupported in NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.params
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.starts_with(PROTOCOL_OPTION_PREFIX))
    }

    /// Session parameters: every parameter except `_pq_.` protocol options.
    pub fn session_params(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.params
            .iter()
            .copied()
            .filter(|(k, _)| !k.starts_with(PROTOCOL_OPTION_PREFIX))
    }

    /// True when the server must send NegotiateProtocolVersion before authentication: the client
    /// asked for a newer minor version than 3.2, or for any protocol option.
    pub fn needs_negotiation(&self) -> bool {
        self.minor > LATEST_MINOR || self.protocol_options().next().is_some()
    }
}

/// Parses the first message of a connection.
///
/// `Ok(None)` means more bytes are needed. `max_len` caps the declared length (use
/// [`MAX_STARTUP_PACKET_LEN`], as PostgreSQL does); a longer declaration is an error before
/// anything is buffered. The second value of the pair is how many bytes the message used.
pub fn parse_initial(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(Initial<'_>, usize)>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // A startup length below 10000 always starts with a zero byte, so 0x16 cannot be one.
    if first == TLS_HANDSHAKE_RECORD {
        return Ok(Some((Initial::DirectTls, 0)));
    }
    let Some(len_bytes) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let declared = i32::from_be_bytes(*len_bytes);
    let len = match usize::try_from(declared) {
        Ok(len) if (HEADER_LEN..=max_len).contains(&len) => len,
        _ => {
            return Err(ProtocolError::LengthOutOfRange {
                what: "startup packet",
                len: declared.into(),
                min: HEADER_LEN,
                max: max_len,
            });
        }
    };
    let Some(packet) = buf.get(4..len) else {
        return Ok(None);
    };
    let mut r = Reader::new(packet, "startup packet");
    let code = r.u32()?;
    let initial = match code {
        SSL_REQUEST_CODE => {
            r.finish()?;
            Initial::SslRequest
        }
        GSSENC_REQUEST_CODE => {
            r.finish()?;
            Initial::GssEncRequest
        }
        CANCEL_REQUEST_CODE => {
            let mut r = Reader::new(r.rest(), "cancel request");
            let pid = r.u32()?;
            let key = r.rest();
            if !(4..=MAX_CANCEL_KEY_LEN).contains(&key.len()) {
                return Err(ProtocolError::LengthOutOfRange {
                    what: "cancel request key",
                    len: key.len() as i64,
                    min: 4,
                    max: MAX_CANCEL_KEY_LEN,
                });
            }
            Initial::Cancel { pid, key }
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, code as u16);
            if major == 1234 {
                return Err(ProtocolError::UnsupportedRequestCode { code });
            }
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocolVersion { major, minor });
            }
            Initial::Startup(StartupMessage {
                major,
                minor,
                params: parse_params(r.rest())?,
            })
        }
    };
    Ok(Some((initial, len)))
}

/// `name\0value\0 ... \0`: pairs up to an empty name, which must be the last byte.
fn parse_params(body: &[u8]) -> Result<Vec<(&str, &str)>, ProtocolError> {
    let mut r = Reader::new(body, "startup parameters");
    let mut params = Vec::new();
    loop {
        let name = r.cstr()?;
        if name.is_empty() {
            break;
        }
        params.push((name, r.cstr()?));
    }
    r.finish()?;
    Ok(params)
}

/// Appends a StartupMessage. Strings are cut at an interior NUL (see the module docs of
/// `messages`); parameter names must not be empty, since an empty name ends the list.
pub fn encode_startup(major: u16, minor: u16, params: &[(&str, &str)], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(u32::from(major) << 16 | u32::from(minor)).to_be_bytes());
    for (name, value) in params {
        super::error::put_cstr(name.as_bytes(), out);
        super::error::put_cstr(value.as_bytes(), out);
    }
    out.push(0);
    write_untagged_len(at, out);
}

/// Appends an SSLRequest.
pub fn encode_ssl_request(out: &mut Vec<u8>) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
}

/// Appends a CancelRequest for backend `pid` with its secret `key` (as BackendKeyData gave it).
pub fn encode_cancel(pid: u32, key: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    write_untagged_len(at, out);
}

fn write_untagged_len(at: usize, out: &mut [u8]) {
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_startup(3, minor, params, &mut out);
        out
    }

    fn parse(buf: &[u8]) -> Result<Option<(Initial<'_>, usize)>, ProtocolError> {
        parse_initial(buf, MAX_STARTUP_PACKET_LEN)
    }

    /// Every strict prefix of a valid message asks for more bytes.
    fn assert_needs_more_at_every_split(buf: &[u8]) {
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn startup_3_0_round_trip() {
        let buf = startup_bytes(0, &[("user", "alice"), ("database", "app")]);
        let expected_len = 4 + 4 + "user\0alice\0database\0app\0\0".len();
        assert_eq!(buf.len(), expected_len);
        assert_eq!(&buf[..4], &(expected_len as i32).to_be_bytes());
        let (msg, used) = parse(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let Initial::Startup(s) = msg else {
            panic!("not a startup: {msg:?}")
        };
        assert_eq!((s.major, s.minor, s.negotiated_minor()), (3, 0, 0));
        assert_eq!(s.get("user"), Some("alice"));
        assert_eq!(s.get("database"), Some("app"));
        assert_eq!(s.get("options"), None);
        assert!(!s.needs_negotiation());
        assert_needs_more_at_every_split(&buf);
    }

    #[test]
    fn startup_3_2_with_protocol_options() {
        let buf = startup_bytes(
            2,
            &[
                ("user", "u"),
                ("_pq_.future", "1"),
                ("application_name", ""),
            ],
        );
        let Initial::Startup(s) = parse(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(s.negotiated_minor(), 2);
        assert_eq!(s.protocol_options().collect::<Vec<_>>(), ["_pq_.future"]);
        assert_eq!(
            s.session_params().collect::<Vec<_>>(),
            [("user", "u"), ("application_name", "")]
        );
        assert!(s.needs_negotiation());
    }

    #[test]
    fn newer_minor_negotiates_down_and_3_1_behaves_as_3_0() {
        let buf = startup_bytes(7, &[("user", "u")]);
        let Initial::Startup(s) = parse(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!((s.minor, s.negotiated_minor()), (7, 2));
        assert!(s.needs_negotiation());

        let buf = startup_bytes(1, &[("user", "u")]);
        let Initial::Startup(s) = parse(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(s.negotiated_minor(), 1);
        assert!(!s.needs_negotiation());
    }

    #[test]
    fn startup_without_params_is_just_the_terminator() {
        let buf = startup_bytes(0, &[]);
        assert_eq!(buf.len(), 9);
        let Initial::Startup(s) = parse(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert!(s.params.is_empty());
    }

    #[test]
    fn trailing_bytes_after_the_message_are_not_consumed() {
        let mut buf = startup_bytes(0, &[("user", "u")]);
        let len = buf.len();
        buf.extend_from_slice(b"Qnext");
        assert_eq!(parse(&buf).unwrap().unwrap().1, len);
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        let mut buf = Vec::new();
        encode_ssl_request(&mut buf);
        assert_eq!(buf, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(parse(&buf), Ok(Some((Initial::SslRequest, 8))));
        assert_needs_more_at_every_split(&buf);

        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(parse(&gss), Ok(Some((Initial::GssEncRequest, 8))));
        assert_needs_more_at_every_split(&gss);

        let mut long = buf.clone();
        long[3] = 9;
        long.push(0);
        assert!(matches!(
            parse(&long),
            Err(ProtocolError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn cancel_with_3_0_and_3_2_keys() {
        for key_len in [4usize, 32, 256] {
            let key: Vec<u8> = (0..key_len).map(|i| i as u8).collect();
            let mut buf = Vec::new();
            encode_cancel(4242, &key, &mut buf);
            assert_eq!(buf.len(), 12 + key_len);
            assert_eq!(
                parse(&buf),
                Ok(Some((
                    Initial::Cancel {
                        pid: 4242,
                        key: &key
                    },
                    buf.len()
                )))
            );
            assert_needs_more_at_every_split(&buf);
        }
        // 3.0 wire bytes, as libpq sends them.
        let buf = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 7, 1, 2, 3, 4];
        assert_eq!(
            parse(&buf),
            Ok(Some((
                Initial::Cancel {
                    pid: 7,
                    key: &[1, 2, 3, 4]
                },
                16
            )))
        );
    }

    #[test]
    fn cancel_key_length_is_bounded() {
        for key_len in [0usize, 3, 257] {
            let mut buf = Vec::new();
            encode_cancel(1, &vec![9; key_len], &mut buf);
            assert!(
                matches!(
                    parse(&buf),
                    Err(ProtocolError::LengthOutOfRange {
                        what: "cancel request key",
                        ..
                    })
                ),
                "key of {key_len} bytes"
            );
        }
        // Too short to even hold the pid.
        let buf = [0, 0, 0, 10, 0x04, 0xd2, 0x16, 0x2e, 0, 0];
        assert_eq!(
            parse(&buf),
            Err(ProtocolError::Truncated {
                what: "cancel request"
            })
        );
    }

    #[test]
    fn direct_tls_client_hello_is_detected_without_consuming() {
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        assert_eq!(parse(&hello), Ok(Some((Initial::DirectTls, 0))));
        assert_eq!(parse(&hello[..1]), Ok(Some((Initial::DirectTls, 0))));
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn lengths_out_of_range_are_rejected_before_buffering() {
        for declared in [i32::MIN, -1, 0, 4, 7, 10_001, i32::MAX] {
            let mut buf = declared.to_be_bytes().to_vec();
            buf.extend_from_slice(&[0, 3, 0, 0]);
            assert!(
                matches!(
                    parse(&buf[..4]),
                    Err(ProtocolError::LengthOutOfRange { len, .. }) if len == i64::from(declared)
                ),
                "length {declared}"
            );
        }
        // The cap is the caller's: a legal startup is refused under a tighter one.
        let buf = startup_bytes(0, &[("user", "someone")]);
        assert!(matches!(
            parse_initial(&buf, 12),
            Err(ProtocolError::LengthOutOfRange { max: 12, .. })
        ));
    }

    #[test]
    fn unsupported_versions_and_codes() {
        let mut v2 = startup_bytes(0, &[("user", "u")]);
        v2[4..8].copy_from_slice(&(2u32 << 16).to_be_bytes());
        let err = parse(&v2).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::UnsupportedProtocolVersion { major: 2, minor: 0 }
        );
        assert_eq!(err.sqlstate(), "0A000");
        assert!(err.to_string().contains("3.0 to 3.2"), "{err}");

        let unknown = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x31];
        assert_eq!(
            parse(&unknown),
            Err(ProtocolError::UnsupportedRequestCode { code: 80877105 })
        );
    }

    #[test]
    fn malformed_parameter_lists() {
        type Expectation = fn(&ProtocolError) -> bool;
        let cases: &[(&[u8], Expectation)] = &[
            // no terminator at all
            (b"", |e| matches!(e, ProtocolError::MissingNul { .. })),
            // name without a NUL
            (b"user", |e| matches!(e, ProtocolError::MissingNul { .. })),
            // name without a value
            (b"user\0", |e| matches!(e, ProtocolError::MissingNul { .. })),
            // value without the list terminator
            (b"user\0u\0", |e| {
                matches!(e, ProtocolError::MissingNul { .. })
            }),
            // bytes after the terminator
            (b"user\0u\0\0x", |e| {
                matches!(e, ProtocolError::TrailingBytes { .. })
            }),
            // not UTF-8
            (b"user\0\xff\0\0", |e| {
                matches!(e, ProtocolError::InvalidUtf8 { .. })
            }),
        ];
        for (params, is_expected) in cases {
            let mut buf = ((8 + params.len()) as i32).to_be_bytes().to_vec();
            buf.extend_from_slice(&(3u32 << 16).to_be_bytes());
            buf.extend_from_slice(params);
            let err = parse(&buf).unwrap_err();
            assert!(is_expected(&err), "{params:?}: {err:?}");
            assert_eq!(err.sqlstate(), "08P01");
        }
    }

    #[test]
    fn encoders_cut_interior_nul() {
        let buf = startup_bytes(0, &[("user", "a\0b")]);
        let Initial::Startup(s) = parse(&buf).unwrap().unwrap().0 else {
            panic!()
        };
        assert_eq!(s.get("user"), Some("a"));
    }
}
