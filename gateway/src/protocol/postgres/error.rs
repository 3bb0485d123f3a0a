//! The one error type of the PostgreSQL protocol core. Each variant says what was wrong with the
//! bytes, and [`ProtocolError::sqlstate`] gives the SQLSTATE the driver puts in the ErrorResponse it
//! sends before closing the connection.

/// Something in the bytes is not valid PostgreSQL protocol. Never carries message contents beyond
/// what is needed to name the problem, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A declared length is below the minimum or above the cap for that message.
    #[error("{what}: declared length {len} is outside the allowed range {min}..={max}")]
    LengthOutOfRange {
        what: &'static str,
        len: i64,
        min: usize,
        max: usize,
    },
    /// The message body ends before a field it must contain.
    #[error("{what}: message is truncated")]
    Truncated { what: &'static str },
    /// Bytes are left over after the last field of a fixed-layout message.
    #[error("{what}: {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    /// A string field has no terminating NUL inside the message.
    #[error("{what}: string is not NUL-terminated")]
    MissingNul { what: &'static str },
    /// A string field that must be text is not valid UTF-8.
    #[error("{what}: string is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    /// A field holds a value the protocol does not allow (negative count, bad SQLSTATE, ...).
    #[error("{what}: {reason}")]
    InvalidField {
        what: &'static str,
        reason: &'static str,
    },
    /// A required field is absent (e.g. an ErrorResponse without a SQLSTATE).
    #[error("{what}: required field {field} is missing")]
    MissingField {
        what: &'static str,
        field: &'static str,
    },
    /// The client asked for a protocol major version other than 3.
    #[error(
        "unsupported frontend protocol {major}.{minor}: the gateway supports protocol 3.0 to 3.2"
    )]
    UnsupportedProtocolVersion { major: u16, minor: u16 },
    /// An untagged initial message carries a request code the gateway does not know.
    #[error("unsupported request code {code} in the initial message")]
    UnsupportedRequestCode { code: u32 },
    /// A message of this type may not arrive in the current state.
    #[error("unexpected message type {:?} while {state}", char::from(*tag))]
    UnexpectedMessage { tag: u8, state: &'static str },
}

impl ProtocolError {
    /// The SQLSTATE for an ErrorResponse reporting this error: `0A000` feature_not_supported for
    /// versions and request codes the gateway does not implement, otherwise `08P01`
    /// protocol_violation.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ProtocolError::UnsupportedProtocolVersion { .. }
            | ProtocolError::UnsupportedRequestCode { .. } => "0A000",
            _ => "08P01",
        }
    }
}

/// The codec meets these in what a peer sent. The driver reports them for the client's bytes (its
/// startup); the upstream leg wraps its own in `UpstreamError`, whose side is the server's.
impl crate::error::WireError for ProtocolError {
    fn side(&self) -> crate::error::Side {
        crate::error::Side::Client
    }

    fn retryable(&self) -> bool {
        false
    }

    fn sqlstate(&self) -> &str {
        ProtocolError::sqlstate(self)
    }
}

/// A bounds-checked cursor over one message body. Every read checks the remaining length first
/// and names the message in its error.
#[derive(Clone, Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        match self.buf.split_at_checked(n) {
            Some((head, rest)) => {
                self.buf = rest;
                Ok(head)
            }
            None => Err(ProtocolError::Truncated { what: self.what }),
        }
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated byte string, without its NUL.
    pub(crate) fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let Some(nul) = memchr::memchr(0, self.buf) else {
            return Err(ProtocolError::MissingNul { what: self.what });
        };
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// A NUL-terminated string that must be UTF-8.
    pub(crate) fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let b = self.cstr_bytes()?;
        std::str::from_utf8(b).map_err(|_| ProtocolError::InvalidUtf8 { what: self.what })
    }

    /// Errors unless the whole body was consumed.
    pub(crate) fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// Starts a tagged message: writes the tag and a length placeholder, returns where the length is.
pub(crate) fn begin(tag: u8, out: &mut Vec<u8>) -> usize {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Fills in the length placeholder written by [`begin`] (the length counts itself, not the tag).
pub(crate) fn finish(at: usize, out: &mut [u8]) {
    let len = out.len() - at;
    // Messages the gateway builds are far below the 1 GiB PostgreSQL limit; saturate rather than
    // wrap if a caller ever passes something absurd, so the peer sees an oversized length.
    let len = i32::try_from(len).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` and a NUL. Bytes from an interior NUL on are dropped: the protocol cannot carry
/// them, and a truncated field keeps the message well-formed.
pub(crate) fn put_cstr(s: &[u8], out: &mut Vec<u8>) {
    let end = memchr::memchr(0, s).unwrap_or(s.len());
    out.extend_from_slice(&s[..end]);
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_checks_every_bound() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, b'a', 0, 9], "test");
        assert_eq!(r.i16().unwrap(), 1);
        assert_eq!(r.i32().unwrap(), 2);
        assert_eq!(r.cstr().unwrap(), "a");
        assert_eq!(
            r.finish(),
            Err(ProtocolError::TrailingBytes {
                what: "test",
                extra: 1
            })
        );
        assert_eq!(r.i16(), Err(ProtocolError::Truncated { what: "test" }));
        assert_eq!(r.u8().unwrap(), 9);
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.cstr(), Err(ProtocolError::MissingNul { what: "test" }));
        assert_eq!(r.u32(), Err(ProtocolError::Truncated { what: "test" }));
    }

    #[test]
    fn sqlstates() {
        assert_eq!(
            ProtocolError::UnsupportedProtocolVersion { major: 2, minor: 0 }.sqlstate(),
            "0A000"
        );
        assert_eq!(ProtocolError::Truncated { what: "x" }.sqlstate(), "08P01");
    }

    #[test]
    fn put_cstr_drops_interior_nul() {
        let mut out = Vec::new();
        put_cstr(b"ab\0cd", &mut out);
        assert_eq!(out, b"ab\0");
    }
}
