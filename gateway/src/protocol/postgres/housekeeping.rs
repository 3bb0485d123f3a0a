//! The server's answers to the gateway's own housekeeping on a pooled upstream connection: the
//! reset after a session (`ROLLBACK`, `DISCARD ALL`, `SET ROLE`), and the client's parameters or
//! a health check before the next. Sans-IO, checked as strictly as a client's traffic: anything a
//! simple query would not bring is an error, and the caller reuses the connection only when
//! [`Answer::clean`] says every statement completed as expected and the session is idle.

use super::error::ProtocolError;
use super::messages;

/// Collects the answers to `queries` simple Query messages sent back to back.
#[derive(Debug)]
pub struct Housekeeping {
    /// ReadyForQuery messages still to come, one per Query.
    left: usize,
    answer: Answer,
}

/// What the server said, once every ReadyForQuery came.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// CommandComplete tags, in order.
    pub tags: Vec<String>,
    /// ParameterStatus reports: the session's reported settings that changed.
    pub params: Vec<(String, String)>,
    /// The first ErrorResponse: SQLSTATE and message.
    pub error: Option<(String, String)>,
    /// The last ReadyForQuery's transaction status.
    pub status: u8,
}

impl Answer {
    /// True when no statement failed, the tags are exactly `tags`, and the session is idle.
    pub fn clean(&self, tags: &[&str]) -> bool {
        self.error.is_none()
            && self.status == b'I'
            && self
                .tags
                .iter()
                .map(String::as_str)
                .eq(tags.iter().copied())
    }
}

impl Housekeeping {
    pub fn new(queries: usize) -> Housekeeping {
        Housekeeping {
            left: queries,
            answer: Answer::default(),
        }
    }

    /// One whole message: `tag` and its body. `Some` once the last ReadyForQuery came.
    pub fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<Option<Answer>, ProtocolError> {
        match tag {
            b'C' => {
                let text = body
                    .strip_suffix(&[0])
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .ok_or(ProtocolError::InvalidField {
                        what: "command complete",
                        reason: "the tag is not NUL-terminated UTF-8",
                    })?;
                self.answer.tags.push(text.to_owned());
            }
            b'S' => {
                let (name, value) = messages::parse_parameter_status(body)?;
                self.answer.params.push((name.to_owned(), value.to_owned()));
            }
            b'E' => {
                let e = messages::parse_error_fields(body)?;
                if self.answer.error.is_none() {
                    self.answer.error = Some((e.code.to_owned(), e.message.to_owned()));
                }
            }
            b'Z' => {
                self.answer.status = messages::parse_ready_for_query(body)?;
                self.left = self.left.saturating_sub(1);
                if self.left == 0 {
                    return Ok(Some(std::mem::take(&mut self.answer)));
                }
            }
            // Rows of `SELECT 1`/`set_config`, an empty query, notices and notifications that
            // were on their way before UNLISTEN.
            b'T' | b'D' | b'I' | b'N' | b'A' => {}
            tag => {
                return Err(ProtocolError::UnexpectedMessage {
                    tag,
                    state: "the gateway's housekeeping on a pooled connection",
                });
            }
        }
        Ok(None)
    }
}

/// Appends `value` as a SQL string literal that reads the same whatever
/// `standard_conforming_strings` is: an `E''` literal with backslashes doubled when it holds one,
/// as PostgreSQL's own `quote_literal` does.
pub fn quote_literal(value: &str, out: &mut String) {
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(h: &mut Housekeeping, status: u8) -> Option<Answer> {
        h.on_message(b'Z', &[status]).unwrap()
    }

    #[test]
    fn two_queries_answered_cleanly() {
        let mut h = Housekeeping::new(2);
        h.on_message(b'C', b"DISCARD ALL\0").unwrap();
        assert_eq!(ready(&mut h, b'I'), None);
        h.on_message(b'S', b"is_superuser\0off\0").unwrap();
        h.on_message(b'C', b"SET\0").unwrap();
        let a = ready(&mut h, b'I').unwrap();
        assert!(a.clean(&["DISCARD ALL", "SET"]));
        assert!(!a.clean(&["DISCARD ALL"]));
        assert_eq!(
            a.params,
            vec![("is_superuser".to_owned(), "off".to_owned())]
        );
    }

    #[test]
    fn an_error_or_a_transaction_left_open_is_not_clean() {
        let mut h = Housekeeping::new(1);
        h.on_message(b'E', b"SERROR\0C25001\0Mno\0\0").unwrap();
        let a = ready(&mut h, b'I').unwrap();
        assert_eq!(a.error, Some(("25001".into(), "no".into())));
        assert!(!a.clean(&[]));
        let mut h = Housekeeping::new(1);
        h.on_message(b'C', b"DISCARD ALL\0").unwrap();
        assert!(!ready(&mut h, b'T').unwrap().clean(&["DISCARD ALL"]));
    }

    #[test]
    fn strangers_are_errors() {
        let mut h = Housekeeping::new(1);
        assert!(h.on_message(b'G', &[0, 0, 0]).is_err());
        assert!(h.on_message(b'C', b"no nul").is_err());
        assert!(h.on_message(b'Z', b"X").is_err());
        assert!(h.on_message(b'K', &[0; 8]).is_err());
    }

    #[test]
    fn literals_quote_quotes_and_backslashes() {
        let mut s = String::new();
        quote_literal("it's", &mut s);
        assert_eq!(s, "'it''s'");
        s.clear();
        quote_literal("a\\'b", &mut s);
        assert_eq!(s, "E'a\\\\''b'");
    }
}
