//! Why an identity was refused. Each variant names the check that failed; none carries a token,
//! a client secret or a key.

/// SQLSTATE for a refusal the client can fix with another credential (invalid_password).
pub const SQLSTATE_BAD_TOKEN: &str = "28P01";
/// SQLSTATE for every other refusal (invalid_authorization_specification).
pub const SQLSTATE_REFUSED: &str = "28000";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// No token was presented or the token source is empty or absent.
    #[error("identity: no token: {0}")]
    TokenMissing(String),
    #[error("identity: token file {path} is unreadable: {reason}")]
    TokenUnreadable { path: String, reason: String },
    #[error("identity: token is not a signed JWT: {0}")]
    Malformed(String),
    #[error("identity: token algorithm {0:?} refused (only RS*, PS*, ES*, EdDSA are accepted)")]
    AlgorithmRefused(String),
    #[error("identity: token header has critical extensions the gateway does not know: {0}")]
    UnknownCrit(String),
    #[error("identity: signing key {kid:?} is not in the IdP's JWKS")]
    UnknownKey { kid: String },
    #[error("identity: signing key {kid:?} does not fit algorithm {alg}")]
    KeyMismatch { kid: String, alg: String },
    #[error("identity: token signature is invalid")]
    BadSignature,
    #[error("identity: token expired")]
    Expired,
    #[error("identity: token is not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("identity: token issued in the future (iat)")]
    IssuedInFuture,
    #[error("identity: token issuer is not {expected:?}")]
    WrongIssuer { expected: String },
    #[error("identity: token audience does not contain {expected:?}")]
    WrongAudience { expected: String },
    #[error("identity: token has no {0:?} claim")]
    MissingClaim(String),
    /// The token endpoint answered an OAuth error (`error` code, then its description).
    #[error("identity: IdP refused the token exchange: {error}{}", description_suffix(.description))]
    ExchangeRefused { error: String, description: String },
    #[error("identity: IdP unreachable ({what}): {reason}")]
    IdpUnreachable { what: &'static str, reason: String },
    #[error("identity: IdP answered badly ({what}): {reason}")]
    IdpProtocol { what: &'static str, reason: String },
    #[error("identity: no JWKS has ever loaded from the IdP: {0}")]
    NoJwks(String),
    #[error("identity: gateway identity settings: {0}")]
    Config(String),
    #[error("identity: no upstream role is mapped for subject {subject:?} (groups {groups:?})")]
    NoRoleMapping {
        subject: String,
        groups: Vec<String>,
    },
    #[error("identity: the identity service has stopped")]
    Stopped,
    /// A renewal in the middle of a session named someone else or another upstream role.
    #[error("identity: {0}")]
    Changed(String),
}

impl IdentityError {
    /// The SQLSTATE a PostgreSQL client gets: 28P01 when the presented token itself is bad,
    /// 28000 when the gateway could not establish an identity for another reason.
    pub fn sqlstate(&self) -> &'static str {
        use IdentityError::*;
        match self {
            Malformed(_)
            | AlgorithmRefused(_)
            | UnknownCrit(_)
            | UnknownKey { .. }
            | KeyMismatch { .. }
            | BadSignature
            | Expired
            | NotYetValid
            | IssuedInFuture
            | WrongIssuer { .. }
            | WrongAudience { .. }
            | MissingClaim(_) => SQLSTATE_BAD_TOKEN,
            // invalid_grant: the IdP judged the presented token; anything else (invalid_client,
            // invalid_target, ...) is the gateway's setup.
            ExchangeRefused { error, .. } if error == "invalid_grant" => SQLSTATE_BAD_TOKEN,
            ExchangeRefused { .. }
            | TokenMissing(_)
            | TokenUnreadable { .. }
            | IdpUnreachable { .. }
            | IdpProtocol { .. }
            | NoJwks(_)
            | Config(_)
            | NoRoleMapping { .. }
            | Stopped
            | Changed(_) => SQLSTATE_REFUSED,
        }
    }

    /// A stable short name of the failed check, for counters and structured logs.
    pub fn check(&self) -> &'static str {
        use IdentityError::*;
        match self {
            TokenMissing(_) => "token_missing",
            TokenUnreadable { .. } => "token_unreadable",
            Malformed(_) => "malformed",
            AlgorithmRefused(_) => "algorithm",
            UnknownCrit(_) => "crit",
            UnknownKey { .. } => "unknown_kid",
            KeyMismatch { .. } => "key_mismatch",
            BadSignature => "signature",
            Expired => "expired",
            NotYetValid => "nbf",
            IssuedInFuture => "iat",
            WrongIssuer { .. } => "issuer",
            WrongAudience { .. } => "audience",
            MissingClaim(_) => "claim",
            ExchangeRefused { .. } => "exchange_refused",
            IdpUnreachable { .. } => "idp_unreachable",
            IdpProtocol { .. } => "idp_protocol",
            NoJwks(_) => "no_jwks",
            Config(_) => "config",
            NoRoleMapping { .. } => "no_role",
            Stopped => "stopped",
            Changed(_) => "identity_changed",
        }
    }
}

/// The token is the client's to fix; an IdP that cannot be reached or has never served its keys
/// is the upstream's, and may answer a moment later; the rest is the gateway's setup.
impl crate::error::WireError for IdentityError {
    fn side(&self) -> crate::error::Side {
        use crate::error::Side;
        use IdentityError::*;
        match self {
            IdpUnreachable { .. } | IdpProtocol { .. } | NoJwks(_) => Side::Upstream,
            Config(_) | NoRoleMapping { .. } | Stopped => Side::Gateway,
            ExchangeRefused { .. } if self.sqlstate() == SQLSTATE_REFUSED => Side::Gateway,
            _ => Side::Client,
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            IdentityError::IdpUnreachable { .. } | IdentityError::NoJwks(_)
        )
    }

    fn sqlstate(&self) -> &str {
        IdentityError::sqlstate(self)
    }
}

/// A session's identity that could not be renewed when its token expired: the session ends, with
/// 28000 whatever the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session's token expired and was not renewed: {0}")]
pub struct NotRenewed(pub IdentityError);

impl crate::error::WireError for NotRenewed {
    fn side(&self) -> crate::error::Side {
        self.0.side()
    }

    fn retryable(&self) -> bool {
        self.0.retryable()
    }

    fn sqlstate(&self) -> &str {
        SQLSTATE_REFUSED
    }
}

fn description_suffix(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(" ({description})")
    }
}
