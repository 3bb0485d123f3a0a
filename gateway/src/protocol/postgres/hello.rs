//! The gateway's answer to a client's startup, built from what the upstream sent once it had
//! authenticated the gateway. The upstream's messages are checked as strictly as a client's: a
//! server that sends something else, or no ReadyForQuery, is an error, never a panic.

use super::error::ProtocolError;
use super::frame::{self, Frame, Next};
use super::messages;

/// The upstream's startup after AuthenticationOk: ParameterStatus and notices are kept for the
/// client, BackendKeyData for cancels; an ErrorResponse refuses the session; ReadyForQuery ends it.
#[derive(Debug, Default)]
pub struct UpstreamHello {
    relay: Vec<u8>,
    backend: Option<(u32, Vec<u8>)>,
}

/// Where the upstream's startup stands after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum HelloStep {
    More,
    /// ReadyForQuery: the session is open.
    Ready,
    /// The server refused the session (e.g. the database does not exist).
    Refused {
        code: String,
        message: String,
        detail: Option<String>,
    },
}

impl UpstreamHello {
    /// A NegotiateProtocolVersion the server sent while authenticating: the client hears it first.
    pub fn negotiated(&mut self, msg: &[u8]) {
        self.relay.extend_from_slice(msg);
    }

    /// One whole message `msg` (framed as `f`) after AuthenticationOk.
    pub fn on_message(&mut self, f: &Frame<'_>, msg: &[u8]) -> Result<HelloStep, ProtocolError> {
        match f.tag {
            b'K' => {
                let (pid, key) = messages::parse_backend_key_data(f.body)?;
                self.backend = Some((pid, key.to_vec()));
            }
            b'S' | b'N' => self.relay.extend_from_slice(msg),
            b'E' => {
                let e = messages::parse_error_fields(f.body)?;
                return Ok(HelloStep::Refused {
                    code: e.code.to_owned(),
                    message: e.message.to_owned(),
                    detail: e.detail.map(str::to_owned),
                });
            }
            b'Z' => {
                self.relay.extend_from_slice(msg);
                return Ok(HelloStep::Ready);
            }
            tag => {
                return Err(ProtocolError::UnexpectedMessage {
                    tag,
                    state: "upstream startup",
                });
            }
        }
        Ok(HelloStep::More)
    }

    /// What the client's startup answer is built from (see [`encode_client_hello`]), and the
    /// server's cancel key (zero and empty when it sent none).
    pub fn finish(self) -> (Vec<u8>, u32, Vec<u8>) {
        let (pid, key) = self.backend.unwrap_or_default();
        (self.relay, pid, key)
    }
}

/// Appends the client's startup answer to `out`: the upstream's NegotiateProtocolVersion (it must
/// come before AuthenticationOk), AuthenticationOk, the upstream's ParameterStatus and notices,
/// the gateway's own BackendKeyData (`pid`, `key`), and the upstream's ReadyForQuery.
///
/// `relay` is what the upstream sent after authentication, in order; it must be whole messages
/// of those types, with exactly one ReadyForQuery, last.
pub fn encode_client_hello(
    relay: &[u8],
    pid: u32,
    key: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    const STATE: &str = "relaying the upstream startup";
    let mut at = 0;
    let mut negotiate_len = 0;
    let mut ready_len = 0;
    while at < relay.len() {
        let f = match frame::next_frame(&relay[at..], relay.len()) {
            Ok(Next::Frame(f)) => f,
            Ok(Next::NeedHeader | Next::Partial { .. }) => {
                return Err(ProtocolError::Truncated { what: STATE });
            }
            Err(frame::FrameError::LengthOutOfRange { declared, max, .. }) => {
                return Err(ProtocolError::LengthOutOfRange {
                    what: STATE,
                    len: declared,
                    min: 4,
                    max,
                });
            }
        };
        let last = at + f.wire_len() == relay.len();
        match f.tag {
            b'v' if at == 0 => {
                messages::parse_negotiate_protocol_version(f.body)?;
                negotiate_len = f.wire_len();
            }
            b'S' => {
                messages::parse_parameter_status(f.body)?;
            }
            b'N' => {
                messages::parse_error_fields(f.body)?;
            }
            b'Z' if last => {
                messages::parse_ready_for_query(f.body)?;
                ready_len = f.wire_len();
            }
            tag => return Err(ProtocolError::UnexpectedMessage { tag, state: STATE }),
        }
        at += f.wire_len();
    }
    if ready_len == 0 {
        return Err(ProtocolError::MissingField {
            what: STATE,
            field: "ReadyForQuery",
        });
    }
    let (negotiate, rest) = relay.split_at(negotiate_len);
    let (params, ready) = rest.split_at(rest.len() - ready_len);
    out.reserve(relay.len() + 48);
    out.extend_from_slice(negotiate);
    messages::encode_auth_ok(out);
    out.extend_from_slice(params);
    messages::encode_backend_key_data(pid, key, out);
    out.extend_from_slice(ready);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: u8) -> Vec<u8> {
        let mut out = Vec::new();
        messages::encode_ready_for_query(status, &mut out);
        out
    }

    /// Feeds whole messages to an [`UpstreamHello`]; the result of the last.
    fn feed(hello: &mut UpstreamHello, msgs: &[u8]) -> Result<HelloStep, ProtocolError> {
        let mut rest = msgs;
        let mut step = HelloStep::More;
        while let Ok(Next::Frame(f)) = frame::next_frame(rest, rest.len()) {
            let (msg, next) = rest.split_at(f.wire_len());
            step = hello.on_message(&f, msg)?;
            rest = next;
        }
        Ok(step)
    }

    #[test]
    fn upstream_hello_keeps_parameters_and_key_until_ready() {
        let mut msgs = Vec::new();
        messages::encode_parameter_status("server_version", "17", &mut msgs);
        messages::encode_backend_key_data(42, &[9; 4], &mut msgs);
        let mut hello = UpstreamHello::default();
        assert_eq!(feed(&mut hello, &msgs).unwrap(), HelloStep::More);
        assert_eq!(feed(&mut hello, &ready(b'T')).unwrap(), HelloStep::Ready);
        let (relay, pid, key) = hello.finish();
        let mut want = Vec::new();
        messages::encode_parameter_status("server_version", "17", &mut want);
        want.extend_from_slice(&ready(b'T'));
        assert_eq!((relay, pid, key), (want, 42, vec![9; 4]));
    }

    #[test]
    fn upstream_hello_refusals_and_strangers() {
        let mut err = Vec::new();
        messages::encode_error("FATAL", "3D000", "no such database", None, None, &mut err);
        assert!(matches!(
            feed(&mut UpstreamHello::default(), &err),
            Ok(HelloStep::Refused { code, .. }) if code == "3D000"
        ));
        let mut query = Vec::new();
        messages::encode_query("SELECT 1", &mut query);
        assert!(feed(&mut UpstreamHello::default(), &query).is_err());
        // A BackendKeyData with a 2-byte key.
        let short_key = [b'K', 0, 0, 0, 10, 0, 0, 0, 1, 7, 7];
        assert!(feed(&mut UpstreamHello::default(), &short_key).is_err());
    }

    #[test]
    fn splices_the_gateway_key_before_ready_for_query() {
        let mut relay = Vec::new();
        messages::encode_negotiate_protocol_version(0, &["_pq_.x"], &mut relay);
        let negotiate_len = relay.len();
        messages::encode_parameter_status("server_version", "17", &mut relay);
        relay.extend_from_slice(&ready(b'I'));
        let mut out = Vec::new();
        encode_client_hello(&relay, 7, &[1, 2, 3, 4], &mut out).unwrap();

        let mut want = relay[..negotiate_len].to_vec();
        messages::encode_auth_ok(&mut want);
        messages::encode_parameter_status("server_version", "17", &mut want);
        messages::encode_backend_key_data(7, &[1, 2, 3, 4], &mut want);
        want.extend_from_slice(&ready(b'I'));
        assert_eq!(out, want);
    }

    #[test]
    fn a_short_or_missing_ready_for_query_is_an_error() {
        let mut params = Vec::new();
        messages::encode_parameter_status("a", "b", &mut params);
        // ReadyForQuery without its status byte: once a panic in the splice.
        let short = [b'Z', 0, 0, 0, 4];
        for relay in [
            short.to_vec(),
            [params.clone(), short.to_vec()].concat(),
            params.clone(),
            Vec::new(),
            [params.clone(), ready(b'I'), params.clone()].concat(),
            [ready(b'I'), ready(b'I')].concat(),
            ready(b'I')[..5].to_vec(),
            [params.clone(), ready(b'X')].concat(),
        ] {
            let mut out = Vec::new();
            assert!(
                encode_client_hello(&relay, 1, &[0; 4], &mut out).is_err(),
                "accepted {relay:?}"
            );
        }
    }

    #[test]
    fn negotiate_only_first_and_no_other_message_types() {
        let mut negotiate = Vec::new();
        messages::encode_negotiate_protocol_version(0, &[], &mut negotiate);
        let mut params = Vec::new();
        messages::encode_parameter_status("a", "b", &mut params);
        let mut key = Vec::new();
        messages::encode_backend_key_data(1, &[0; 4], &mut key);
        for relay in [
            [params.clone(), negotiate.clone(), ready(b'I')].concat(),
            [key, ready(b'I')].concat(),
        ] {
            assert!(encode_client_hello(&relay, 1, &[0; 4], &mut Vec::new()).is_err());
        }
    }
}
