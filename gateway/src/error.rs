//! The vocabulary every layer's error speaks, so that the pipeline can turn any of them into the
//! client's wire error in one place ([`crate::pipeline::pump::refuse_error`]): which side failed,
//! whether trying again may help, and what the client is told (a SQLSTATE and a message).
//!
//! Each layer keeps its own error type, which says what went wrong in its own terms
//! (`ProtocolError`, `SessionError`, `UpstreamError`, `IdentityError`, `RecordError`,
//! `MaskError`); each implements [`WireError`]. As in pingora's `ErrorSource` and rustls's
//! `Error`, the side and the wire mapping are answers of the error itself, not of the call site.

/// Who failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: bytes that break the protocol, a bad or missing credential.
    Client,
    /// The upstream server, or a service the gateway depends on (the IdP).
    Upstream,
    /// The gateway itself: its setup, its recorder, or a result it refuses to pass uninspected.
    Gateway,
}

/// An error as the client's wire sees it.
pub trait WireError: std::error::Error {
    /// Which side failed.
    fn side(&self) -> Side;

    /// Whether the same attempt may succeed later unchanged (the upstream was unreachable, a
    /// queue was full), rather than failing again for the same reason.
    fn retryable(&self) -> bool;

    /// The SQLSTATE of the error the client gets (PostgreSQL ErrorResponse; a MySQL ERR packet
    /// carries one too).
    fn sqlstate(&self) -> &str;

    /// What the client is told. Never a secret, a token, or bytes the upstream sent that the
    /// client may not see. Defaults to the error's `Display`, which each layer keeps safe.
    fn client_message(&self) -> String {
        self.to_string()
    }
}

/// Masking fails closed: a row or COPY it cannot evaluate ends the session with 42501 (through
/// the session core's refusal); its setup errors stop a load, never a client.
impl WireError for crate::mask::MaskError {
    fn side(&self) -> Side {
        use crate::mask::MaskError::*;
        match self {
            // A DataRow or CopyData that does not match its description came from the server.
            MalformedRow(_) | MalformedCopy(_) => Side::Upstream,
            Config(_) | HashKey(_) | CopyRefused(_) => Side::Gateway,
        }
    }

    fn retryable(&self) -> bool {
        false
    }

    fn sqlstate(&self) -> &str {
        use crate::mask::MaskError::*;
        match self {
            Config(_) | HashKey(_) => "F0000",
            _ => crate::protocol::postgres::session::SQLSTATE_BLOCKED,
        }
    }
}

#[cfg(test)]
mod tests {
    //! One test per layer: the side, whether a retry helps, and what reaches the client's wire.

    use super::*;

    fn wire(e: &dyn WireError) -> (Side, bool, String, String) {
        (
            e.side(),
            e.retryable(),
            e.sqlstate().to_owned(),
            e.client_message(),
        )
    }

    #[test]
    fn protocol_errors_are_the_clients() {
        use crate::protocol::postgres::ProtocolError;
        let truncated = ProtocolError::Truncated {
            what: "StartupMessage",
        };
        assert_eq!(
            wire(&truncated),
            (
                Side::Client,
                false,
                "08P01".into(),
                "StartupMessage: message is truncated".into()
            )
        );
        let version = ProtocolError::UnsupportedProtocolVersion { major: 2, minor: 0 };
        assert_eq!(version.side(), Side::Client);
        assert_eq!(WireError::sqlstate(&version), "0A000");
    }

    #[test]
    fn session_errors_never_describe_the_servers_bytes() {
        use crate::protocol::postgres::session::SessionError;
        let client = SessionError {
            side: Side::Client,
            reason: "message type 'x'".into(),
        };
        assert_eq!(
            wire(&client),
            (
                Side::Client,
                false,
                "08P01".into(),
                "protocol violation: message type 'x'".into()
            )
        );
        let server = SessionError {
            side: Side::Upstream,
            reason: "secret-looking server bytes".into(),
        };
        let (side, retry, code, message) = wire(&server);
        assert_eq!(
            (side, retry, code.as_str()),
            (Side::Upstream, false, "08P01")
        );
        assert_eq!(
            message,
            "the upstream server broke the protocol; the session is closed"
        );
        assert!(!message.contains("secret"));
        let refused = SessionError {
            side: Side::Gateway,
            reason: "masking: malformed DataRow".into(),
        };
        assert_eq!(
            wire(&refused),
            (
                Side::Gateway,
                false,
                "42501".into(),
                "masking: malformed DataRow".into()
            )
        );
    }

    #[test]
    fn upstream_errors_say_when_a_retry_helps() {
        use crate::forward::upstream::UpstreamError;
        use crate::protocol::postgres::auth::AuthError;
        let down = UpstreamError::Connect {
            addr: "db:5432".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let (side, retry, code, _) = wire(&down);
        assert_eq!(
            (side, retry, code.as_str()),
            (Side::Upstream, true, "08001")
        );
        let slow = UpstreamError::Timeout {
            addr: "db:5432".into(),
            timeout: std::time::Duration::from_secs(5),
        };
        assert!(slow.retryable());
        let refused = UpstreamError::Server {
            code: "3D000".into(),
            message: "database \"x\" does not exist".into(),
            detail: None,
        };
        assert_eq!(
            wire(&refused),
            (
                Side::Upstream,
                false,
                "3D000".into(),
                "upstream refused the session: database \"x\" does not exist".into()
            )
        );
        // No credential configured, or a channel the gateway will not send it over: the
        // gateway's setup, and no retry fixes it.
        let no_password = UpstreamError::Auth(AuthError::NoPassword { method: "md5" });
        let (side, retry, code, _) = wire(&no_password);
        assert_eq!(
            (side, retry, code.as_str()),
            (Side::Gateway, false, "08001")
        );
        let wrong_password = UpstreamError::Auth(AuthError::Server {
            severity: "FATAL".into(),
            code: "28P01".into(),
            message: "password authentication failed".into(),
            detail: None,
            hint: None,
        });
        let (side, retry, code, _) = wire(&wrong_password);
        assert_eq!(
            (side, retry, code.as_str()),
            (Side::Upstream, false, "28P01")
        );
    }

    #[test]
    fn identity_errors_split_the_token_from_the_idp() {
        use crate::idp::{IdentityError, NotRenewed, SQLSTATE_BAD_TOKEN, SQLSTATE_REFUSED};
        let bad = IdentityError::BadSignature;
        assert_eq!(
            wire(&bad),
            (
                Side::Client,
                false,
                SQLSTATE_BAD_TOKEN.into(),
                "identity: token signature is invalid".into()
            )
        );
        let down = IdentityError::IdpUnreachable {
            what: "token endpoint",
            reason: "connection refused".into(),
        };
        let (side, retry, code, _) = wire(&down);
        assert_eq!(
            (side, retry, code.as_str()),
            (Side::Upstream, true, SQLSTATE_REFUSED)
        );
        let setup = IdentityError::NoRoleMapping {
            subject: "alice".into(),
            groups: vec![],
        };
        assert_eq!((setup.side(), setup.retryable()), (Side::Gateway, false));
        // In the middle of a session an expired token is a refusal (28000), with the message
        // the session's end has always carried.
        let expired = NotRenewed(IdentityError::Expired);
        assert_eq!(
            wire(&expired),
            (
                Side::Client,
                false,
                SQLSTATE_REFUSED.into(),
                "the session's token expired and was not renewed: identity: token expired".into()
            )
        );
    }

    #[test]
    fn record_errors_are_the_gateways() {
        use crate::record::RecordError;
        assert_eq!(
            wire(&RecordError::Overloaded),
            (
                Side::Gateway,
                true,
                "53100".into(),
                "recording failed: the recorder's queue is over its bound".into()
            )
        );
        let full = RecordError::DiskFull("no space left on device".into());
        assert_eq!(
            (full.side(), full.retryable(), WireError::sqlstate(&full)),
            (Side::Gateway, false, "53100")
        );
        let stopped = RecordError::Stopped;
        assert_eq!(
            (stopped.side(), WireError::sqlstate(&stopped)),
            (Side::Gateway, "58030")
        );
    }

    #[test]
    fn mask_errors_fail_closed() {
        use crate::mask::MaskError;
        let row = MaskError::MalformedRow("field count");
        assert_eq!(
            wire(&row),
            (
                Side::Upstream,
                false,
                "42501".into(),
                "malformed DataRow: field count".into()
            )
        );
        let copy = MaskError::CopyRefused("type rules need column types");
        assert_eq!((copy.side(), copy.sqlstate()), (Side::Gateway, "42501"));
        let config = MaskError::Config("mask.columns[2].type".into());
        assert_eq!((config.side(), config.sqlstate()), (Side::Gateway, "F0000"));
    }
}
