//! The answer to one of the gateway's own simple queries (the catalog read), sans-IO. The
//! upstream's messages are checked as strictly as a client's: rows of any width, an error, or a
//! message a simple query never brings end it cleanly, never with a panic.

use super::error::ProtocolError;
use super::messages;

/// Rows as text, NULL as `None`.
pub type Rows = Vec<Vec<Option<String>>>;

/// Where a side query stands after one message.
#[derive(Debug, PartialEq, Eq)]
pub enum SideStep {
    More,
    /// ReadyForQuery: the rows are complete.
    Done(Rows),
    /// The server refused the query.
    Failed {
        code: String,
        message: String,
    },
}

/// Collects a simple query's result from the upstream's messages, one at a time.
#[derive(Debug, Default)]
pub struct SideQuery {
    rows: Rows,
    failed: Option<(String, String)>,
}

impl SideQuery {
    /// One whole message: `tag` and its body.
    pub fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<SideStep, ProtocolError> {
        match tag {
            b'D' => {
                let values = messages::parse_data_row(body)?;
                let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
                self.rows
                    .push(values.into_iter().map(|v| v.map(text)).collect());
            }
            b'E' => {
                let e = messages::parse_error_fields(body)?;
                self.failed = Some((e.code.to_owned(), e.message.to_owned()));
            }
            b'Z' => {
                messages::parse_ready_for_query(body)?;
                return Ok(match self.failed.take() {
                    Some((code, message)) => SideStep::Failed { code, message },
                    None => SideStep::Done(std::mem::take(&mut self.rows)),
                });
            }
            // What a simple query's answer may also hold, and asynchronous messages.
            b'T' | b'C' | b'I' | b'N' | b'S' | b'A' => {}
            tag => {
                return Err(ProtocolError::UnexpectedMessage {
                    tag,
                    state: "a side query",
                });
            }
        }
        Ok(SideStep::More)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    #[test]
    fn rows_then_ready() {
        let mut q = SideQuery::default();
        assert_eq!(q.on_message(b'T', b"ignored").unwrap(), SideStep::More);
        let row = data_row(&[Some("public"), None]);
        assert_eq!(q.on_message(b'D', &row).unwrap(), SideStep::More);
        assert_eq!(q.on_message(b'C', b"SELECT 1\0").unwrap(), SideStep::More);
        assert_eq!(
            q.on_message(b'Z', b"I").unwrap(),
            SideStep::Done(vec![vec![Some("public".into()), None]])
        );
    }

    #[test]
    fn an_error_waits_for_ready_for_query() {
        let mut q = SideQuery::default();
        let e = b"SERROR\0C42P01\0Mno such table\0\0";
        assert_eq!(q.on_message(b'E', e).unwrap(), SideStep::More);
        assert_eq!(
            q.on_message(b'Z', b"I").unwrap(),
            SideStep::Failed {
                code: "42P01".into(),
                message: "no such table".into()
            }
        );
    }

    #[test]
    fn malformed_or_unexpected_messages_are_errors() {
        let mut q = SideQuery::default();
        assert!(q.on_message(b'D', &[0, 2, 0, 0, 0, 9, b'x']).is_err());
        assert!(q.on_message(b'Z', b"").is_err());
        assert!(q.on_message(b'G', &[0, 0, 0]).is_err());
    }
}
