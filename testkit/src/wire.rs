//! A raw PostgreSQL wire client over a blocking TcpStream, for what real drivers never send:
//! malformed bytes, odd startup packets, protocol 3.2, hand-made CancelRequests.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};

use crate::Endpoint;

/// Protocol 3.0 (196608) and 3.2 (196610).
pub const PROTOCOL_3_0: u32 = 3 << 16;
pub const PROTOCOL_3_2: u32 = (3 << 16) | 2;
pub const SSL_REQUEST_CODE: u32 = 80877103;
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
pub const CANCEL_REQUEST_CODE: u32 = 80877102;

/// How long a raw read waits before the test calls it a hang.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// One backend message: its type byte and its body (without the length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// Fields of an ErrorResponse or NoticeResponse, keyed by field type ('S', 'C', 'M', …).
    pub fn fields(&self) -> HashMap<u8, String> {
        let mut out = HashMap::new();
        let mut rest = self.body.as_slice();
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            out.insert(code, String::from_utf8_lossy(&tail[..end]).into_owned());
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        out
    }

    pub fn is_error(&self) -> bool {
        self.tag == b'E'
    }

    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.is_error()
            .then(|| self.fields().remove(&b'C'))
            .flatten()
    }

    /// "SEVERITY SQLSTATE: message" for an ErrorResponse, else the tag and length.
    pub fn describe(&self) -> String {
        if self.tag == b'E' || self.tag == b'N' {
            let f = self.fields();
            let get = |c: u8| f.get(&c).cloned().unwrap_or_default();
            format!("{} {}: {}", get(b'S'), get(b'C'), get(b'M'))
        } else {
            format!("'{}' ({} bytes)", self.tag as char, self.body.len())
        }
    }
}

/// A StartupMessage for `version` with these parameters.
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    untagged(&body)
}

/// A length-prefixed packet without a type byte (startup-phase requests).
pub fn untagged(body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A frontend message: type byte, length, body.
pub fn frontend(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// SSLRequest or GSSENCRequest: an 8-byte packet carrying just the code.
pub fn request_code(code: u32) -> Vec<u8> {
    untagged(&code.to_be_bytes())
}

/// A CancelRequest for this backend key (4 bytes in protocol 3.0, up to 256 in 3.2).
pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
    let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(key);
    untagged(&body)
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frontend(b'Q', &body)
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Parse: a named (or unnamed, "") statement with no declared parameter types.
pub fn parse(statement: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, statement);
    cstr(&mut body, sql);
    body.extend_from_slice(&0u16.to_be_bytes());
    frontend(b'P', &body)
}

/// Bind: text-format parameters (`None` is NULL), text-format results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.extend_from_slice(&0u16.to_be_bytes());
    body.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    frontend(b'B', &body)
}

/// Describe (`kind` b'S' statement or b'P' portal).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frontend(b'D', &body)
}

/// Execute a portal, returning at most `max_rows` rows (0: all).
pub fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    frontend(b'E', &body)
}

/// Close (`kind` b'S' statement or b'P' portal).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frontend(b'C', &body)
}

pub fn sync() -> Vec<u8> {
    frontend(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    frontend(b'H', b"")
}

pub fn terminate() -> Vec<u8> {
    frontend(b'X', b"")
}

/// A raw connection.
pub struct RawConn {
    stream: TcpStream,
    /// BackendKeyData after a successful [`RawConn::startup`]: (pid, secret key).
    pub backend_key: Option<(u32, Vec<u8>)>,
    /// ParameterStatus values after startup.
    pub parameters: HashMap<String, String>,
    /// The NegotiateProtocolVersion message, if the server sent one.
    pub negotiated: Option<Message>,
}

impl RawConn {
    pub fn connect(host: &str, port: u16) -> Result<RawConn> {
        let addr = format!("{host}:{port}");
        let sock: std::net::SocketAddr = addr.parse().context("endpoint address")?;
        let stream = TcpStream::connect_timeout(&sock, READ_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            backend_key: None,
            parameters: HashMap::new(),
            negotiated: None,
        })
    }

    pub fn to(endpoint: &Endpoint) -> Result<RawConn> {
        Self::connect(&endpoint.host, endpoint.port)
    }

    /// The client side address, as the gateway sees it (`client_addr` in `portcullis sessions`).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.stream
            .local_addr()
            .expect("local address of a connected socket")
    }

    /// Writes bytes; a peer that already closed is not an error here (the read that follows
    /// tells the test what happened).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        match self.stream.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One byte (the answer to SSLRequest/GSSENCRequest); `None` on end of stream.
    pub fn read_byte(&mut self) -> Result<Option<u8>> {
        let mut b = [0u8; 1];
        match self.read_exact_or_eof(&mut b)? {
            true => Ok(Some(b[0])),
            false => Ok(None),
        }
    }

    /// The next backend message, or `None` when the server closed the connection (a reset
    /// counts as closed). A read timeout is an error: the test's "no hang" guarantee.
    pub fn read_message(&mut self) -> Result<Option<Message>> {
        let mut head = [0u8; 5];
        if !self.read_exact_or_eof(&mut head)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=64 << 20).contains(&len) {
            bail!(
                "backend sent message '{}' with implausible length {len}",
                head[0] as char
            );
        }
        let mut body = vec![0u8; len - 4];
        if !self.read_exact_or_eof(&mut body)? {
            bail!("connection closed in the middle of a backend message");
        }
        Ok(Some(Message { tag: head[0], body }))
    }

    /// Every message until the server closes the connection.
    pub fn read_until_closed(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while let Some(m) = self.read_message()? {
            out.push(m);
            if out.len() > 10_000 {
                bail!("server keeps talking after 10000 messages");
            }
        }
        Ok(out)
    }

    /// Reads until `ReadyForQuery`, returning everything before it; fails on end of stream.
    pub fn read_until_ready(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        loop {
            match self.read_message()? {
                Some(m) if m.tag == b'Z' => return Ok(out),
                Some(m) => out.push(m),
                None => bail!(
                    "connection closed before ReadyForQuery; got {:?}",
                    out.iter().map(Message::describe).collect::<Vec<_>>()
                ),
            }
        }
    }

    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    if filled == 0 {
                        return Ok(false);
                    }
                    bail!("connection closed after {filled} of {} bytes", buf.len());
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset && filled == 0 => {
                    return Ok(false);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no answer within {READ_TIMEOUT:?} (hang)")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Sends a StartupMessage for `endpoint` and completes authentication (trust, cleartext,
    /// md5 or SCRAM-SHA-256) up to the first ReadyForQuery.
    pub fn startup(&mut self, endpoint: &Endpoint, version: u32) -> Result<()> {
        self.send(&startup_message(
            version,
            &[
                ("user", &endpoint.user),
                ("database", &endpoint.dbname),
                ("application_name", "portcullis-raw-test"),
            ],
        ))?;
        let password = endpoint.password.clone().unwrap_or_default();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self
                .read_message()?
                .context("server closed the connection during startup")?;
            match m.tag {
                b'R' => {
                    let kind = u32::from_be_bytes(m.body[..4].try_into()?);
                    let data = &m.body[4..];
                    match kind {
                        0 => {}
                        3 => {
                            let mut body = password.as_bytes().to_vec();
                            body.push(0);
                            self.send(&frontend(b'p', &body))?;
                        }
                        5 => {
                            let salt: [u8; 4] = data[..4].try_into()?;
                            let hash =
                                md5_hash(endpoint.user.as_bytes(), password.as_bytes(), salt);
                            let mut body = hash.into_bytes();
                            body.push(0);
                            self.send(&frontend(b'p', &body))?;
                        }
                        10 => {
                            let mechanisms = String::from_utf8_lossy(data);
                            if !mechanisms.split('\0').any(|m| m == SCRAM_SHA_256) {
                                bail!("server offers no SCRAM-SHA-256: {mechanisms:?}");
                            }
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            let first = s.message().to_vec();
                            let mut body = SCRAM_SHA_256.as_bytes().to_vec();
                            body.push(0);
                            body.extend_from_slice(&(first.len() as u32).to_be_bytes());
                            body.extend_from_slice(&first);
                            self.send(&frontend(b'p', &body))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().context("SASLContinue before SASL")?;
                            s.update(data)?;
                            let msg = s.message().to_vec();
                            self.send(&frontend(b'p', &msg))?;
                        }
                        12 => {
                            scram
                                .take()
                                .context("SASLFinal before SASL")?
                                .finish(data)?;
                        }
                        other => bail!("unsupported authentication request {other}"),
                    }
                }
                b'v' => self.negotiated = Some(m),
                b'S' => {
                    let mut parts = m.body.split(|&b| b == 0);
                    let k = String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
                    let v = String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned();
                    self.parameters.insert(k, v);
                }
                b'K' => {
                    if m.body.len() < 8 {
                        bail!("short BackendKeyData");
                    }
                    let pid = u32::from_be_bytes(m.body[..4].try_into()?);
                    self.backend_key = Some((pid, m.body[4..].to_vec()));
                }
                b'N' => {}
                b'E' => bail!("startup failed: {}", m.describe()),
                b'Z' => return Ok(()),
                other => bail!("unexpected message '{}' during startup", other as char),
            }
        }
    }

    /// Reads exactly `n` messages (fails on a close or a hang).
    pub fn read_n(&mut self, n: usize) -> Result<Vec<Message>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.read_message()? {
                Some(m) => out.push(m),
                None => bail!("connection closed after {} of {n} messages", out.len()),
            }
        }
        Ok(out)
    }

    /// Runs one simple query, returning the messages before ReadyForQuery.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<Message>> {
        self.send(&query(sql))?;
        self.read_until_ready()
    }

    /// The text of column 0 of every DataRow in `messages`.
    pub fn first_column(messages: &[Message]) -> Vec<Option<String>> {
        messages
            .iter()
            .filter(|m| m.tag == b'D')
            .map(|m| {
                let len = i32::from_be_bytes(m.body[2..6].try_into().expect("DataRow column"));
                (len >= 0)
                    .then(|| String::from_utf8_lossy(&m.body[6..6 + len as usize]).into_owned())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_and_sqlstate() {
        let m = Message {
            tag: b'E',
            body: b"SFATAL\0VFATAL\0C08P01\0Minvalid frontend message type 122\0\0".to_vec(),
        };
        assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
        assert_eq!(m.fields().get(&b'S').map(String::as_str), Some("FATAL"));
        assert_eq!(
            m.describe(),
            "FATAL 08P01: invalid frontend message type 122"
        );
        let not_error = Message {
            tag: b'N',
            body: m.body.clone(),
        };
        assert_eq!(not_error.sqlstate(), None);
    }

    #[test]
    fn message_layouts() {
        let s = startup_message(PROTOCOL_3_0, &[("user", "agent")]);
        assert_eq!(&s[..4], &(s.len() as u32).to_be_bytes());
        assert_eq!(&s[4..8], &[0, 3, 0, 0]);
        assert_eq!(&s[8..], b"user\0agent\0\0");
        assert_eq!(request_code(SSL_REQUEST_CODE), [0, 0, 0, 8, 4, 210, 22, 47]);
        assert_eq!(query("SELECT 1"), b"Q\0\0\0\x0dSELECT 1\0");
        let c = cancel_request(7, &[1, 2, 3, 4]);
        assert_eq!(c.len(), 16);
        assert_eq!(&c[8..12], &7u32.to_be_bytes());
        let b = bind("", "s", &[Some("5"), None]);
        assert_eq!(b[0], b'B');
        assert!(b.windows(4).any(|w| w == (-1i32).to_be_bytes()));
    }
}
