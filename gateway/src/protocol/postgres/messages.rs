//! Builders and parsers for the individual messages the gateway itself reads or writes: errors and
//! notices it reports to clients, the session handshake it replays to them, the frontend messages
//! it injects upstream, and the backend messages it must look inside (RowDescription for masking,
//! BackendKeyData for cancel, Authentication for upstream auth).
//!
//! Builders append one complete message (tag, length, body) to `out`. Parsers take the body of
//! one message, as framing hands it over (without tag and length), and borrow from it. Strings
//! passed to builders are cut at an interior NUL, which the protocol cannot carry, so every built
//! message stays well-formed.

use super::error::{ProtocolError, Reader, begin, finish, put_cstr};
use super::startup::MAX_CANCEL_KEY_LEN;

/// The fields of an ErrorResponse ('E') or NoticeResponse ('N').
///
/// Text fields are taken up to their first invalid UTF-8 byte: a server whose messages are in
/// another encoding still yields a usable SQLSTATE and a readable start of the message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ErrorFields<'a> {
    /// `S`: ERROR, FATAL, PANIC, WARNING, NOTICE, ... (possibly localized).
    pub severity: &'a str,
    /// `V`: the same, never localized (PostgreSQL 9.6 and later).
    pub severity_nonlocalized: Option<&'a str>,
    /// `C`: the SQLSTATE, five characters of `0-9A-Z`.
    pub code: &'a str,
    /// `M`: the primary message.
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
    pub position: Option<&'a str>,
    /// `W`: the context (call stack).
    pub context: Option<&'a str>,
    pub schema: Option<&'a str>,
    pub table: Option<&'a str>,
    pub column: Option<&'a str>,
    pub data_type: Option<&'a str>,
    pub constraint: Option<&'a str>,
}

impl ErrorFields<'_> {
    /// True for FATAL and PANIC: the server closes the connection after sending it.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self.severity_nonlocalized.unwrap_or(self.severity),
            "FATAL" | "PANIC"
        )
    }
}

/// The longest valid UTF-8 prefix of `b`.
fn text_prefix(b: &[u8]) -> &str {
    match std::str::from_utf8(b) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// Parses the body of an ErrorResponse or NoticeResponse. Unknown field types are skipped, as
/// the protocol asks; `S`, `C` and `M` are required.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields<'_>, ProtocolError> {
    const WHAT: &str = "error response";
    let mut r = Reader::new(body, WHAT);
    let mut f = ErrorFields::default();
    let (mut has_severity, mut has_code, mut has_message) = (false, false, false);
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            break;
        }
        let value = r.cstr_bytes()?;
        let text = text_prefix(value);
        match kind {
            b'S' => (f.severity, has_severity) = (text, true),
            b'V' => f.severity_nonlocalized = Some(text),
            b'C' => {
                if value.len() != 5
                    || !value
                        .iter()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
                {
                    return Err(ProtocolError::InvalidField {
                        what: WHAT,
                        reason: "SQLSTATE is not five characters of 0-9A-Z",
                    });
                }
                (f.code, has_code) = (text, true);
            }
            b'M' => (f.message, has_message) = (text, true),
            b'D' => f.detail = Some(text),
            b'H' => f.hint = Some(text),
            b'P' => f.position = Some(text),
            b'W' => f.context = Some(text),
            b's' => f.schema = Some(text),
            b't' => f.table = Some(text),
            b'c' => f.column = Some(text),
            b'd' => f.data_type = Some(text),
            b'n' => f.constraint = Some(text),
            _ => {}
        }
    }
    r.finish()?;
    for (present, field) in [
        (has_severity, "S (severity)"),
        (has_code, "C (SQLSTATE)"),
        (has_message, "M (message)"),
    ] {
        if !present {
            return Err(ProtocolError::MissingField { what: WHAT, field });
        }
    }
    Ok(f)
}

fn put_field(kind: u8, value: &str, out: &mut Vec<u8>) {
    out.push(kind);
    put_cstr(value.as_bytes(), out);
}

/// Appends an ErrorResponse ('E') with fields S and V (both `severity`, which should be ERROR or
/// FATAL), C, M, and D and H when given.
pub fn encode_error(
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
    out: &mut Vec<u8>,
) {
    encode_report(b'E', severity, code, message, detail, hint, out);
}

/// Appends a NoticeResponse ('N') of severity NOTICE.
pub fn encode_notice(code: &str, message: &str, detail: Option<&str>, out: &mut Vec<u8>) {
    encode_report(b'N', "NOTICE", code, message, detail, None, out);
}

fn encode_report(
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
    out: &mut Vec<u8>,
) {
    let at = begin(tag, out);
    put_field(b'S', severity, out);
    put_field(b'V', severity, out);
    put_field(b'C', code, out);
    put_field(b'M', message, out);
    if let Some(d) = detail {
        put_field(b'D', d, out);
    }
    if let Some(h) = hint {
        put_field(b'H', h, out);
    }
    out.push(0);
    finish(at, out);
}

/// Appends ReadyForQuery ('Z') with the transaction status: `b'I'` idle, `b'T'` in a
/// transaction, `b'E'` in a failed transaction.
pub fn encode_ready_for_query(status: u8, out: &mut Vec<u8>) {
    let at = begin(b'Z', out);
    out.push(status);
    finish(at, out);
}

/// Parses a ReadyForQuery body: the transaction status byte (`I`, `T` or `E`).
pub fn parse_ready_for_query(body: &[u8]) -> Result<u8, ProtocolError> {
    const WHAT: &str = "ready for query";
    let mut r = Reader::new(body, WHAT);
    let status = r.u8()?;
    r.finish()?;
    if !matches!(status, b'I' | b'T' | b'E') {
        return Err(ProtocolError::InvalidField {
            what: WHAT,
            reason: "transaction status is not I, T or E",
        });
    }
    Ok(status)
}

/// Appends BackendKeyData ('K'): a process id and secret key (4 bytes in 3.0, up to 256 in 3.2).
pub fn encode_backend_key_data(pid: u32, key: &[u8], out: &mut Vec<u8>) {
    let at = begin(b'K', out);
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    finish(at, out);
}

/// Parses a BackendKeyData body into the process id and the secret key (4 to 256 bytes).
pub fn parse_backend_key_data(body: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "backend key data");
    let pid = r.u32()?;
    let key = r.rest();
    if !(4..=MAX_CANCEL_KEY_LEN).contains(&key.len()) {
        return Err(ProtocolError::LengthOutOfRange {
            what: "backend key data secret key",
            len: key.len() as i64,
            min: 4,
            max: MAX_CANCEL_KEY_LEN,
        });
    }
    Ok((pid, key))
}

/// Appends AuthenticationOk ('R', code 0).
pub fn encode_auth_ok(out: &mut Vec<u8>) {
    let at = begin(b'R', out);
    out.extend_from_slice(&0i32.to_be_bytes());
    finish(at, out);
}

/// Appends AuthenticationCleartextPassword ('R', code 3): the gateway asks for a token as the
/// password.
pub fn encode_auth_cleartext_password(out: &mut Vec<u8>) {
    let at = begin(b'R', out);
    out.extend_from_slice(&3i32.to_be_bytes());
    finish(at, out);
}

/// Parses a cleartext PasswordMessage ('p') body into the password, without its NUL.
pub fn parse_password(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut r = Reader::new(body, "password message");
    let password = r.cstr_bytes()?;
    r.finish()?;
    Ok(password)
}

/// Appends ParameterStatus ('S').
pub fn encode_parameter_status(name: &str, value: &str, out: &mut Vec<u8>) {
    let at = begin(b'S', out);
    put_cstr(name.as_bytes(), out);
    put_cstr(value.as_bytes(), out);
    finish(at, out);
}

/// Parses a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut r = Reader::new(body, "parameter status");
    let name = r.cstr()?;
    let value = r.cstr()?;
    r.finish()?;
    Ok((name, value))
}

/// Appends NegotiateProtocolVersion ('v'): the newest 3.x minor version the gateway supports,
/// and the protocol options (`_pq_.*`) it does not recognise. On the wire the version is the full
/// `major << 16 | minor` number, as PostgreSQL sends it and libpq reads it.
pub fn encode_negotiate_protocol_version(minor: u16, unsupported: &[&str], out: &mut Vec<u8>) {
    let at = begin(b'v', out);
    out.extend_from_slice(&(3u32 << 16 | u32::from(minor)).to_be_bytes());
    let count = i32::try_from(unsupported.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for name in unsupported {
        put_cstr(name.as_bytes(), out);
    }
    finish(at, out);
}

/// Parses a NegotiateProtocolVersion body into the server's newest 3.x minor version and the
/// protocol options it did not recognise.
pub fn parse_negotiate_protocol_version(body: &[u8]) -> Result<(u16, Vec<&str>), ProtocolError> {
    const WHAT: &str = "negotiate protocol version";
    let mut r = Reader::new(body, WHAT);
    let version = r.u32()?;
    if version >> 16 != 3 {
        return Err(ProtocolError::InvalidField {
            what: WHAT,
            reason: "server protocol version is not 3.x",
        });
    }
    let minor = version as u16;
    let count = usize::try_from(r.i32()?).map_err(|_| ProtocolError::InvalidField {
        what: WHAT,
        reason: "negative option count",
    })?;
    // Each name takes at least its NUL, so a count beyond the remaining bytes is a lie; checking
    // first keeps the allocation bounded by the message size.
    if count > r.remaining() {
        return Err(ProtocolError::Truncated { what: WHAT });
    }
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        names.push(r.cstr()?);
    }
    r.finish()?;
    Ok((minor, names))
}

/// Appends the one-byte answer to SSLRequest or GSSENCRequest: `S` to go on with TLS, `N` to
/// refuse and continue in plaintext.
pub fn encode_ssl_response(accept: bool, out: &mut Vec<u8>) {
    out.push(if accept { b'S' } else { b'N' });
}

/// An Authentication ('R') request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    /// Code 0.
    Ok,
    /// Code 2.
    KerberosV5,
    /// Code 3.
    CleartextPassword,
    /// Code 5.
    Md5Password { salt: [u8; 4] },
    /// Code 7.
    Gss,
    /// Code 8.
    GssContinue(&'a [u8]),
    /// Code 9.
    Sspi,
    /// Code 10: the SASL mechanisms the server offers, in its order of preference.
    Sasl(Vec<&'a str>),
    /// Code 11: server-first-message.
    SaslContinue(&'a [u8]),
    /// Code 12: server-final-message.
    SaslFinal(&'a [u8]),
}

/// Parses an Authentication ('R') body.
pub fn parse_auth_request(body: &[u8]) -> Result<AuthRequest<'_>, ProtocolError> {
    const WHAT: &str = "authentication request";
    let mut r = Reader::new(body, WHAT);
    let request = match r.i32()? {
        0 => AuthRequest::Ok,
        2 => AuthRequest::KerberosV5,
        3 => AuthRequest::CleartextPassword,
        5 => {
            let salt = r.bytes(4)?;
            AuthRequest::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        7 => AuthRequest::Gss,
        8 => AuthRequest::GssContinue(r.rest()),
        9 => AuthRequest::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl(mechanisms)
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        _ => {
            return Err(ProtocolError::InvalidField {
                what: WHAT,
                reason: "unknown authentication request code",
            });
        }
    };
    r.finish()?;
    Ok(request)
}

/// Appends a simple Query ('Q').
pub fn encode_query(sql: &str, out: &mut Vec<u8>) {
    let at = begin(b'Q', out);
    put_cstr(sql.as_bytes(), out);
    finish(at, out);
}

/// Appends CopyFail ('f'): the client's COPY FROM STDIN fails with `reason`.
pub fn encode_copy_fail(reason: &str, out: &mut Vec<u8>) {
    let at = begin(b'f', out);
    put_cstr(reason.as_bytes(), out);
    finish(at, out);
}

/// Appends Sync ('S').
pub fn encode_sync(out: &mut Vec<u8>) {
    let at = begin(b'S', out);
    finish(at, out);
}

/// Appends Flush ('H').
pub fn encode_flush(out: &mut Vec<u8>) {
    let at = begin(b'H', out);
    finish(at, out);
}

/// Appends Terminate ('X').
pub fn encode_terminate(out: &mut Vec<u8>) {
    let at = begin(b'X', out);
    finish(at, out);
}

/// Appends Parse ('P') of statement `name` (empty: the unnamed statement) with no parameter types
/// given, so the server infers them.
pub fn encode_parse(name: &str, sql: &str, out: &mut Vec<u8>) {
    let at = begin(b'P', out);
    put_cstr(name.as_bytes(), out);
    put_cstr(sql.as_bytes(), out);
    out.extend_from_slice(&0i16.to_be_bytes());
    finish(at, out);
}

/// Appends PasswordMessage ('p') carrying a cleartext or md5-hashed password.
pub fn encode_password(password: &[u8], out: &mut Vec<u8>) {
    let at = begin(b'p', out);
    put_cstr(password, out);
    finish(at, out);
}

/// Appends SASLInitialResponse ('p'): the chosen mechanism and the client-first-message.
pub fn encode_sasl_initial_response(mechanism: &str, data: &[u8], out: &mut Vec<u8>) {
    let at = begin(b'p', out);
    put_cstr(mechanism.as_bytes(), out);
    let len = i32::try_from(data.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    finish(at, out);
}

/// Appends SASLResponse ('p'): the client-final-message.
pub fn encode_sasl_response(data: &[u8], out: &mut Vec<u8>) {
    let at = begin(b'p', out);
    out.extend_from_slice(data);
    finish(at, out);
}

/// One column of a RowDescription ('T').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDesc<'a> {
    /// Column name, in the client encoding (not necessarily UTF-8).
    pub name: &'a [u8],
    /// Table OID if the column is a plain table column, else 0.
    pub table_oid: u32,
    /// Attribute number in that table, else 0.
    pub attnum: i16,
    pub type_oid: u32,
    /// Negative for variable-width types.
    pub type_len: i16,
    pub type_mod: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Bytes of a column description after its name.
const FIELD_FIXED_LEN: usize = 4 + 2 + 4 + 2 + 4 + 2;

/// Parses a RowDescription body.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<FieldDesc<'_>>, ProtocolError> {
    const WHAT: &str = "row description";
    let mut r = Reader::new(body, WHAT);
    let count = usize::try_from(r.i16()?).map_err(|_| ProtocolError::InvalidField {
        what: WHAT,
        reason: "negative column count",
    })?;
    // At least a NUL plus the fixed part per column: refuse a count the body cannot hold before
    // allocating for it.
    if count.saturating_mul(1 + FIELD_FIXED_LEN) > r.remaining() {
        return Err(ProtocolError::Truncated { what: WHAT });
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        fields.push(FieldDesc {
            name: r.cstr_bytes()?,
            table_oid: r.u32()?,
            attnum: r.i16()?,
            type_oid: r.u32()?,
            type_len: r.i16()?,
            type_mod: r.i32()?,
            format: r.i16()?,
        });
    }
    r.finish()?;
    Ok(fields)
}

/// Parses a DataRow ('D') body into its values (`None` for NULL). Checks every length against the
/// body before reading or allocating, and rejects trailing bytes.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, ProtocolError> {
    const WHAT: &str = "data row";
    let mut r = Reader::new(body, WHAT);
    let count = usize::try_from(r.i16()?).map_err(|_| ProtocolError::InvalidField {
        what: WHAT,
        reason: "negative column count",
    })?;
    if count.saturating_mul(4) > r.remaining() {
        return Err(ProtocolError::Truncated { what: WHAT });
    }
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.i32()?;
        values.push(match usize::try_from(len) {
            Ok(len) => Some(r.bytes(len)?),
            Err(_) if len == -1 => None,
            Err(_) => {
                return Err(ProtocolError::InvalidField {
                    what: WHAT,
                    reason: "negative value length other than -1",
                });
            }
        });
    }
    r.finish()?;
    Ok(values)
}

/// Appends a DataRow ('D') of text or binary values, `None` as NULL: the inverse of
/// [`parse_data_row`]. Used by tests and benches that play the server.
pub fn encode_data_row(values: &[Option<&[u8]>], out: &mut Vec<u8>) {
    let at = begin(b'D', out);
    let count = i16::try_from(values.len()).unwrap_or(i16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for value in values.iter().take(count as usize) {
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    finish(at, out);
}

/// Appends a RowDescription ('T'). Used by tests and by the driver when it answers a client
/// itself.
pub fn encode_row_description(fields: &[FieldDesc<'_>], out: &mut Vec<u8>) {
    let at = begin(b'T', out);
    let count = i16::try_from(fields.len()).unwrap_or(i16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for f in fields.iter().take(count as usize) {
        put_cstr(f.name, out);
        out.extend_from_slice(&f.table_oid.to_be_bytes());
        out.extend_from_slice(&f.attnum.to_be_bytes());
        out.extend_from_slice(&f.type_oid.to_be_bytes());
        out.extend_from_slice(&f.type_len.to_be_bytes());
        out.extend_from_slice(&f.type_mod.to_be_bytes());
        out.extend_from_slice(&f.format.to_be_bytes());
    }
    finish(at, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits one built message into tag and body, checking the length field on the way.
    fn split(msg: &[u8]) -> (u8, &[u8]) {
        let len = i32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(
            len + 1,
            msg.len(),
            "length field covers the rest of the message"
        );
        (msg[0], &msg[5..])
    }

    #[test]
    fn the_password_request_and_its_answer() {
        let mut out = Vec::new();
        encode_auth_cleartext_password(&mut out);
        assert_eq!(out, [b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        let mut msg = Vec::new();
        encode_password(b"eyJ.token.sig", &mut msg);
        assert_eq!(parse_password(&msg[5..]).unwrap(), b"eyJ.token.sig");
        assert!(parse_password(b"no-nul").is_err());
        assert!(parse_password(b"a\0trailing").is_err());
    }

    #[test]
    fn data_row_values_and_nulls_with_every_length_checked() {
        let mut body = 3i16.to_be_bytes().to_vec();
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ab");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            parse_data_row(&body).unwrap(),
            [Some(&b"ab"[..]), None, Some(&b""[..])]
        );
        // Cut anywhere, a trailing byte, a count or length past the body, a length below -1.
        for cut in 0..body.len() {
            assert!(parse_data_row(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse_data_row(&[body.as_slice(), &[0]].concat()).is_err());
        assert!(parse_data_row(&i16::MAX.to_be_bytes()).is_err());
        assert!(
            parse_data_row(&[&1i16.to_be_bytes()[..], &(-2i32).to_be_bytes()].concat()).is_err()
        );
        assert!(parse_data_row(&[&1i16.to_be_bytes()[..], &9i32.to_be_bytes()].concat()).is_err());
        let mut msg = Vec::new();
        encode_data_row(&[Some(b"ab"), None, Some(b"")], &mut msg);
        assert_eq!(msg[0], b'D');
        assert_eq!(&msg[1..5], &(4 + body.len() as u32).to_be_bytes());
        assert_eq!(&msg[5..], body);
    }

    #[test]
    fn error_round_trip() {
        let mut out = Vec::new();
        encode_error(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
            Some("detail"),
            Some("hint"),
            &mut out,
        );
        let (tag, body) = split(&out);
        assert_eq!(tag, b'E');
        let f = parse_error_fields(body).unwrap();
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.severity_nonlocalized, Some("FATAL"));
        assert_eq!(f.code, "28P01");
        assert_eq!(f.message, "password authentication failed for user \"app\"");
        assert_eq!(f.detail, Some("detail"));
        assert_eq!(f.hint, Some("hint"));
        assert!(f.is_fatal());

        out.clear();
        encode_error("ERROR", "42501", "blocked", None, None, &mut out);
        let f = parse_error_fields(split(&out).1).unwrap();
        assert_eq!((f.detail, f.hint), (None, None));
        assert!(!f.is_fatal());
    }

    #[test]
    fn notice_round_trip() {
        let mut out = Vec::new();
        encode_notice("01000", "held for approval", Some("ticket 7"), &mut out);
        let (tag, body) = split(&out);
        assert_eq!(tag, b'N');
        let f = parse_error_fields(body).unwrap();
        assert_eq!(
            (f.severity, f.code, f.message, f.detail),
            ("NOTICE", "01000", "held for approval", Some("ticket 7"))
        );
    }

    #[test]
    fn error_fields_from_a_real_server_layout() {
        // As PostgreSQL 15 sends it: localized S, V, C, M, then position, file, line, routine.
        let body = b"SERREUR\0VERROR\0C42P01\0Mla relation \xc2\xab t \xc2\xbb n'existe pas\0P15\0Fparse_relation.c\0L1392\0RparserOpenTable\0\0";
        let f = parse_error_fields(body).unwrap();
        assert_eq!(f.severity, "ERREUR");
        assert_eq!(f.severity_nonlocalized, Some("ERROR"));
        assert_eq!(f.code, "42P01");
        assert_eq!(f.message, "la relation « t » n'existe pas");
        assert_eq!(f.position, Some("15"));
    }

    #[test]
    fn error_fields_non_utf8_text_keeps_the_valid_prefix() {
        let f = parse_error_fields(b"SFATAL\0C28000\0Mr\xf4le inconnu\0\0").unwrap();
        assert_eq!(f.message, "r");
    }

    #[test]
    fn malformed_error_fields() {
        for (body, expected) in [
            (
                &b""[..],
                ProtocolError::Truncated {
                    what: "error response",
                },
            ),
            (
                b"SERROR",
                ProtocolError::MissingNul {
                    what: "error response",
                },
            ),
            (
                b"SERROR\0C42501\0Mx\0",
                ProtocolError::Truncated {
                    what: "error response",
                },
            ),
            (
                b"SERROR\0C42501\0Mx\0\0z",
                ProtocolError::TrailingBytes {
                    what: "error response",
                    extra: 1,
                },
            ),
            (
                b"SERROR\0Mx\0\0",
                ProtocolError::MissingField {
                    what: "error response",
                    field: "C (SQLSTATE)",
                },
            ),
            (
                b"C42501\0Mx\0\0",
                ProtocolError::MissingField {
                    what: "error response",
                    field: "S (severity)",
                },
            ),
            (
                b"SERROR\0C42501\0\0",
                ProtocolError::MissingField {
                    what: "error response",
                    field: "M (message)",
                },
            ),
            (
                b"SERROR\0C425\0Mx\0\0",
                ProtocolError::InvalidField {
                    what: "error response",
                    reason: "SQLSTATE is not five characters of 0-9A-Z",
                },
            ),
        ] {
            assert_eq!(parse_error_fields(body), Err(expected), "{body:?}");
        }
        // Unknown field types are skipped.
        assert!(parse_error_fields(b"SERROR\0C42501\0Mx\0Zfuture\0\0").is_ok());
    }

    #[test]
    fn ready_for_query_round_trip() {
        for status in [b'I', b'T', b'E'] {
            let mut out = Vec::new();
            encode_ready_for_query(status, &mut out);
            assert_eq!(out, [b'Z', 0, 0, 0, 5, status]);
            assert_eq!(parse_ready_for_query(split(&out).1), Ok(status));
        }
        assert!(parse_ready_for_query(b"X").is_err());
        assert!(parse_ready_for_query(b"").is_err());
        assert!(parse_ready_for_query(b"II").is_err());
    }

    #[test]
    fn backend_key_data_round_trip() {
        for key_len in [4, 32, 256] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            encode_backend_key_data(99, &key, &mut out);
            let (tag, body) = split(&out);
            assert_eq!(tag, b'K');
            assert_eq!(parse_backend_key_data(body), Ok((99, &key[..])));
        }
        assert!(matches!(
            parse_backend_key_data(&[0, 0, 0, 1, 1, 2, 3]),
            Err(ProtocolError::LengthOutOfRange { .. })
        ));
        assert!(matches!(
            parse_backend_key_data(&[0, 0, 1]),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(parse_backend_key_data(&[0; 4 + 257]).is_err());
    }

    #[test]
    fn auth_ok_and_ssl_response() {
        let mut out = Vec::new();
        encode_auth_ok(&mut out);
        assert_eq!(out, [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
        assert_eq!(parse_auth_request(split(&out).1), Ok(AuthRequest::Ok));
        out.clear();
        encode_ssl_response(true, &mut out);
        encode_ssl_response(false, &mut out);
        assert_eq!(out, b"SN");
    }

    #[test]
    fn parameter_status_round_trip() {
        let mut out = Vec::new();
        encode_parameter_status("server_version", "15.8", &mut out);
        let (tag, body) = split(&out);
        assert_eq!(tag, b'S');
        assert_eq!(parse_parameter_status(body), Ok(("server_version", "15.8")));
        assert!(parse_parameter_status(b"a\0").is_err());
        assert!(parse_parameter_status(b"a\0b\0c").is_err());
    }

    #[test]
    fn negotiate_protocol_version_round_trip() {
        let mut out = Vec::new();
        encode_negotiate_protocol_version(2, &["_pq_.a", "_pq_.b"], &mut out);
        let (tag, body) = split(&out);
        assert_eq!(tag, b'v');
        assert_eq!(
            parse_negotiate_protocol_version(body),
            Ok((2, vec!["_pq_.a", "_pq_.b"]))
        );
        out.clear();
        encode_negotiate_protocol_version(0, &[], &mut out);
        assert_eq!(
            parse_negotiate_protocol_version(split(&out).1),
            Ok((0, vec![]))
        );
        // A count far beyond the body is refused before allocating.
        let lying = [0, 3, 0, 2, 0x7f, 0xff, 0xff, 0xff, b'x', 0];
        assert!(parse_negotiate_protocol_version(&lying).is_err());
        let negative = [0, 3, 0, 2, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_negotiate_protocol_version(&negative).is_err());
        // The version is a full protocol number, as PostgreSQL 15 sends it (0x00030000 = 3.0).
        assert_eq!(
            parse_negotiate_protocol_version(&[0, 3, 0, 0, 0, 0, 0, 0]),
            Ok((0, vec![]))
        );
        assert!(parse_negotiate_protocol_version(&[0, 0, 0, 2, 0, 0, 0, 0]).is_err());
        assert_eq!(&out[5..9], &[0, 3, 0, 0]);
    }

    #[test]
    fn auth_requests() {
        let cases: &[(&[u8], AuthRequest<'_>)] = &[
            (&[0, 0, 0, 3], AuthRequest::CleartextPassword),
            (
                &[0, 0, 0, 5, 1, 2, 3, 4],
                AuthRequest::Md5Password { salt: [1, 2, 3, 4] },
            ),
            (&[0, 0, 0, 2], AuthRequest::KerberosV5),
            (&[0, 0, 0, 7], AuthRequest::Gss),
            (&[0, 0, 0, 9], AuthRequest::Sspi),
            (
                b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
                AuthRequest::Sasl(vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            ),
            (b"\0\0\0\x0br=abc", AuthRequest::SaslContinue(b"r=abc")),
            (b"\0\0\0\x0cv=xyz", AuthRequest::SaslFinal(b"v=xyz")),
        ];
        for (body, expected) in cases {
            assert_eq!(&parse_auth_request(body).unwrap(), expected);
        }
        for bad in [
            &b"\0\0\0"[..],
            b"\0\0\0\x05\x01\x02",
            b"\0\0\0\x00x",
            b"\0\0\0\x0aSCRAM-SHA-256\0",
            b"\0\0\0\x63",
        ] {
            assert!(parse_auth_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frontend_builders() {
        let mut out = Vec::new();
        encode_query("SELECT 1", &mut out);
        assert_eq!(split(&out), (b'Q', &b"SELECT 1\0"[..]));
        out.clear();
        encode_sync(&mut out);
        assert_eq!(out, [b'S', 0, 0, 0, 4]);
        out.clear();
        encode_flush(&mut out);
        assert_eq!(out, [b'H', 0, 0, 0, 4]);
        out.clear();
        encode_terminate(&mut out);
        assert_eq!(out, [b'X', 0, 0, 0, 4]);
        out.clear();
        encode_parse("s1", "SELECT $1", &mut out);
        assert_eq!(split(&out), (b'P', &b"s1\0SELECT $1\0\0\0"[..]));
        out.clear();
        encode_password(b"md5abc", &mut out);
        assert_eq!(split(&out), (b'p', &b"md5abc\0"[..]));
        out.clear();
        encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x", &mut out);
        assert_eq!(
            split(&out),
            (b'p', &b"SCRAM-SHA-256\0\0\0\0\x09n,,n=,r=x"[..])
        );
        out.clear();
        encode_sasl_response(b"c=biws", &mut out);
        assert_eq!(split(&out), (b'p', &b"c=biws"[..]));
    }

    #[test]
    fn row_description_round_trip() {
        let fields = [
            FieldDesc {
                name: b"id",
                table_oid: 16384,
                attnum: 1,
                type_oid: 23,
                type_len: 4,
                type_mod: -1,
                format: 0,
            },
            FieldDesc {
                name: b"email",
                table_oid: 16384,
                attnum: 2,
                type_oid: 25,
                type_len: -1,
                type_mod: -1,
                format: 1,
            },
        ];
        let mut out = Vec::new();
        encode_row_description(&fields, &mut out);
        let (tag, body) = split(&out);
        assert_eq!(tag, b'T');
        assert_eq!(parse_row_description(body).unwrap(), fields);

        out.clear();
        encode_row_description(&[], &mut out);
        assert_eq!(parse_row_description(split(&out).1).unwrap(), vec![]);
    }

    #[test]
    fn malformed_row_descriptions() {
        let mut out = Vec::new();
        encode_row_description(
            &[FieldDesc {
                name: b"a",
                table_oid: 0,
                attnum: 0,
                type_oid: 23,
                type_len: 4,
                type_mod: -1,
                format: 0,
            }],
            &mut out,
        );
        let body = split(&out).1.to_vec();
        for cut in 0..body.len() {
            assert!(parse_row_description(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = body.clone();
        extra.push(0);
        assert!(matches!(
            parse_row_description(&extra),
            Err(ProtocolError::TrailingBytes { .. })
        ));
        // A huge declared count with a tiny body is refused up front.
        assert_eq!(
            parse_row_description(&[0x7f, 0xff, b'a', 0]),
            Err(ProtocolError::Truncated {
                what: "row description"
            })
        );
        assert!(matches!(
            parse_row_description(&[0xff, 0xff]),
            Err(ProtocolError::InvalidField { .. })
        ));
    }
}
