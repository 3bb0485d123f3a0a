//! Identity at connect: the agent's OIDC token, exchanged (RFC 8693) for a short-lived token
//! bound to the target, or validated as presented; and who that makes the session.
//!
//! - [`config`]: `[[agent]]`, `[target.identity]` and `[[target.role]]` as written.
//! - [`token`]: tokens as held (zeroized, hash-only Debug) and where they come from.
//! - [`validate`]: strict, pure JWT validation against a key set and `now`.
//! - [`keys`]: the JWKS cache (refresh on unknown `kid`, rate-limited, single-flight).
//! - [`http`]: discovery, JWKS and the exchange, blocking, on the service's threads only.
//! - `service`: [`IdentityService`], one per target: threads, identity cache, futures.
//! - [`roles`]: which upstream login or role an identity gets.
//! - [`local_ca`]: the local CA that mints certificates for the local TLS leg.

pub mod config;
mod error;
pub mod http;
pub mod keys;
pub mod local_ca;
pub mod roles;
mod service;
pub mod token;
pub mod validate;

use std::time::SystemTime;

pub use error::{IdentityError, NotRenewed, SQLSTATE_BAD_TOKEN, SQLSTATE_REFUSED};
pub use roles::{UpstreamRole, map_role, set_role_sql};
pub use service::{IdentityService, Stats};
pub use token::{ConnectTokens, Token, TokenSource, connect_tokens, read_token_file};

/// RFC 8693 token type of an OAuth access token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Who a verified token says the session is. Holds no token: only what logs may show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedIdentity {
    pub subject: String,
    /// From the configured groups claim.
    pub groups: Vec<String>,
    /// The `act` chain: the current actor first (the agent acting for `subject`).
    pub actors: Vec<String>,
    pub jti: Option<String>,
    /// `client_id` (or `azp`) of the token, when present.
    pub client_id: Option<String>,
    pub issuer: String,
    pub audience: String,
    /// First 8 bytes of the token's SHA-256, hex: what logs show instead of the token.
    pub token_hash: String,
    pub issued_at: Option<SystemTime>,
    /// Bounds the session: after it, the next statement needs a fresh identity.
    pub expires_at: SystemTime,
}
