//! Framing of tagged protocol messages (`tag: u8, len: i32 (includes itself), body`).
//!
//! Frames are borrowed views into the caller's read buffer: nothing is copied or allocated here.
//! "Incomplete" is a state, not an error: the caller keeps the bytes and reads more.

/// Tag byte plus the 4-byte length.
pub const HEADER_LEN: usize = 5;

/// One complete message, borrowed from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    /// The message body, after the tag and length.
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this message occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next<'a> {
    /// A complete message is at the start of the buffer.
    Frame(Frame<'a>),
    /// The header is there but the body is not complete yet: `wire_len` bytes are needed in all.
    Partial { tag: u8, wire_len: usize },
    /// Fewer than [`HEADER_LEN`] bytes.
    NeedHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message {tag:?} declares length {declared}, outside 4..={max}")]
    LengthOutOfRange {
        tag: char,
        declared: i64,
        max: usize,
    },
}

/// The tag and wire length of the message at the start of `buf`, before any cap: a caller that
/// streams a message through does not need it whole, so only it can say how large is too large.
pub fn header(buf: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let declared = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if declared < 4 {
        return Err(FrameError::LengthOutOfRange {
            tag: h[0] as char,
            declared: declared.into(),
            max: i32::MAX as usize,
        });
    }
    Ok(Some((h[0], 1 + declared as usize)))
}

/// Looks at the start of `buf`. `max_len` caps the declared length so a peer cannot make the
/// gateway buffer an arbitrarily large message.
pub fn next_frame(buf: &[u8], max_len: usize) -> Result<Next<'_>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(Next::NeedHeader);
    };
    let tag = header[0];
    let declared = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if declared < 4 || declared as usize > max_len {
        return Err(FrameError::LengthOutOfRange {
            tag: tag as char,
            declared: declared.into(),
            max: max_len,
        });
    }
    let wire_len = 1 + declared as usize;
    match buf.get(HEADER_LEN..wire_len) {
        Some(body) => Ok(Next::Frame(Frame { tag, body })),
        None => Ok(Next::Partial { tag, wire_len }),
    }
}

/// Appends a message with `tag`, reserving the length field and fixing it after `body` wrote.
pub fn write_message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_message(&mut v, tag, |o| o.extend_from_slice(body));
        v
    }

    #[test]
    fn complete_frame_borrows_body() {
        let mut buf = msg(b'Q', b"SELECT 1\0");
        buf.extend_from_slice(b"trailing");
        match next_frame(&buf, 1 << 20).unwrap() {
            Next::Frame(f) => {
                assert_eq!(f.tag, b'Q');
                assert_eq!(f.body, b"SELECT 1\0");
                assert_eq!(f.wire_len(), 14);
                assert_eq!(f.body.as_ptr(), buf[5..].as_ptr(), "a view, not a copy");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_split_point_is_incomplete_not_an_error() {
        let buf = msg(b'D', &[0, 1, 0, 0, 0, 3, b'a', b'b', b'c']);
        for cut in 0..buf.len() {
            let r = next_frame(&buf[..cut], 1 << 20).unwrap();
            if cut < HEADER_LEN {
                assert_eq!(r, Next::NeedHeader);
            } else {
                assert_eq!(
                    r,
                    Next::Partial {
                        tag: b'D',
                        wire_len: buf.len()
                    }
                );
            }
        }
    }

    #[test]
    fn lengths_are_capped_both_ways() {
        let mut buf = vec![b'Q'];
        buf.extend_from_slice(&3i32.to_be_bytes());
        assert!(next_frame(&buf, 1024).is_err());
        let mut buf = vec![b'Q'];
        buf.extend_from_slice(&(-1i32).to_be_bytes());
        assert!(next_frame(&buf, 1024).is_err());
        let mut buf = vec![b'Q'];
        buf.extend_from_slice(&1025i32.to_be_bytes());
        assert!(next_frame(&buf, 1024).is_err());
        let mut buf = vec![b'Q'];
        buf.extend_from_slice(&1024i32.to_be_bytes());
        assert!(matches!(
            next_frame(&buf, 1024).unwrap(),
            Next::Partial { .. }
        ));
    }
}
