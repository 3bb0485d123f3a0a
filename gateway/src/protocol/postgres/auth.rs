//! The gateway authenticating upstream with its own credential: the client side of PostgreSQL
//! authentication, sans-IO. The driver writes the StartupMessage, then feeds every backend message
//! to [`UpstreamAuth::on_message`] and sends whatever it appends to `out`, until
//! [`AuthStep::Authenticated`]. SCRAM itself is `postgres-protocol`'s, not ours.
//!
//! Methods: trust, cleartext password, md5, SCRAM-SHA-256, and SCRAM-SHA-256-PLUS with
//! `tls-server-end-point` channel binding. Kerberos, GSSAPI and SSPI are refused.

use std::fmt;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    self, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::error::ProtocolError;
use super::messages::{
    AuthRequest, encode_password, encode_sasl_initial_response, encode_sasl_response,
    parse_auth_request, parse_error_fields, parse_negotiate_protocol_version,
};

/// What the upstream TLS session gives SCRAM to bind to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Plaintext upstream, or TLS whose certificate hash could not be computed.
    None,
    /// RFC 5929 `tls-server-end-point`: the hash of the server's certificate, as
    /// [`tls_server_end_point`] computes it.
    TlsServerEndPoint(Vec<u8>),
}

/// Whether the channel to the server keeps a cleartext or md5 password from anyone but the
/// server. The driver knows; the core refuses to send either unless told the channel is
/// [`PasswordChannel::Protected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordChannel {
    /// TLS whose certificate was verified (verify-ca, verify-full), a Unix socket, loopback, or
    /// an operator's explicit `danger_` override.
    Protected,
    /// Plaintext to another host, or TLS that encrypts without checking who answers: whoever
    /// answers may be an impostor asking for the password.
    Unverified,
}

/// What the driver does next after [`UpstreamAuth::on_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStep {
    /// Keep reading. `out` may hold one complete frontend message to send first.
    Continue,
    /// AuthenticationOk arrived: the server goes on with ParameterStatus, BackendKeyData and
    /// ReadyForQuery, which are the driver's to read.
    Authenticated,
    /// The server answered NegotiateProtocolVersion: the session runs at 3.`minor`. Keep reading.
    Negotiated { minor: u16 },
}

/// Why upstream authentication failed. No variant carries the password or anything derived
/// from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The server sent an ErrorResponse, e.g. `28P01` password authentication failed.
    #[error("upstream server refused the connection: {severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// The server asked for a method the gateway does not implement.
    #[error("upstream server requested unsupported authentication method {method}")]
    UnsupportedMethod { method: &'static str },
    /// SASL without any SCRAM-SHA-256 variant.
    #[error(
        "upstream server offers SASL mechanisms [{offered}], none of which the gateway supports"
    )]
    UnsupportedSaslMechanisms { offered: String },
    /// The server insists on SCRAM-SHA-256-PLUS but the upstream connection has no channel
    /// binding (plaintext, or a certificate whose hash algorithm is unknown).
    #[error(
        "upstream server offers only SCRAM-SHA-256-PLUS, which needs TLS channel binding, but the upstream connection has none"
    )]
    ChannelBindingUnavailable,
    /// The server asked for the password itself (cleartext) or its md5 over a channel that does
    /// not prove who the server is: an impostor would get the credential.
    #[error(
        "upstream server asked for {method} authentication over a channel that is neither verified TLS, a Unix socket nor loopback; the gateway does not send the password there (use sslmode=verify-full or verify-ca, or SCRAM on the server)"
    )]
    UnverifiedChannel { method: &'static str },
    /// The server asked for a password and the target has no credential configured.
    #[error(
        "upstream server requested {method} authentication, but no upstream password is configured"
    )]
    NoPassword { method: &'static str },
    /// The SCRAM exchange broke: malformed server message, wrong nonce, or the server could not
    /// prove it knows the password.
    #[error("upstream SCRAM authentication failed: {reason}")]
    Scram { reason: String },
    /// The server broke the protocol.
    #[error("upstream server broke the protocol during authentication: {0}")]
    Protocol(#[from] ProtocolError),
}

impl AuthError {
    /// The SQLSTATE to give the client: the server's own for [`AuthError::Server`], the protocol
    /// error's for [`AuthError::Protocol`], else `08001` (the gateway, as a client, could not
    /// establish the upstream connection).
    pub fn sqlstate(&self) -> &str {
        match self {
            AuthError::Server { code, .. } => code,
            AuthError::Protocol(e) => e.sqlstate(),
            _ => "08001",
        }
    }
}

enum State {
    /// StartupMessage sent; waiting for the first authentication request.
    Start,
    /// Cleartext or md5 password sent; waiting for AuthenticationOk.
    PasswordSent,
    /// client-first-message sent; waiting for AuthenticationSASLContinue.
    ScramFirst(Box<ScramSha256>),
    /// client-final-message sent; waiting for AuthenticationSASLFinal.
    ScramFinal(Box<ScramSha256>),
    /// The server proved it knows the password; waiting for AuthenticationOk.
    ScramVerified,
    Authenticated,
    Failed,
}

impl State {
    fn waiting_for(&self) -> &'static str {
        match self {
            State::Start => "waiting for an authentication request",
            State::PasswordSent => "waiting for the password to be accepted",
            State::ScramFirst(_) => "waiting for the SCRAM server-first-message",
            State::ScramFinal(_) => "waiting for the SCRAM server-final-message",
            State::ScramVerified => "waiting for AuthenticationOk after SCRAM",
            State::Authenticated => "already authenticated",
            State::Failed => "authentication already failed",
        }
    }
}

/// The client side of one upstream authentication exchange.
pub struct UpstreamAuth {
    user: String,
    /// The gateway's copy, wiped when the exchange is dropped.
    password: Option<zeroize::Zeroizing<Vec<u8>>>,
    channel_binding: ChannelBinding,
    channel: PasswordChannel,
    state: State,
    method: Option<&'static str>,
}

impl fmt::Debug for UpstreamAuth {
    // Hand-written so the password can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("channel", &self.channel)
            .field("state", &self.state.waiting_for())
            .field("method", &self.method)
            .finish()
    }
}

impl UpstreamAuth {
    /// `user` must be the `user` of the StartupMessage sent upstream (md5 hashes it in). The
    /// channel counts as [`PasswordChannel::Unverified`] until [`UpstreamAuth::on_channel`] says
    /// otherwise.
    pub fn new(user: &str, password: Option<&[u8]>, channel_binding: ChannelBinding) -> Self {
        Self {
            user: user.to_owned(),
            password: password.map(|p| zeroize::Zeroizing::new(p.to_vec())),
            channel_binding,
            channel: PasswordChannel::Unverified,
            state: State::Start,
            method: None,
        }
    }

    /// What the channel to the server protects; see [`PasswordChannel`].
    pub fn on_channel(mut self, channel: PasswordChannel) -> Self {
        self.channel = channel;
        self
    }

    /// The method the server chose, once it asked: `trust`, `password`, `md5`, `SCRAM-SHA-256`
    /// or `SCRAM-SHA-256-PLUS`. For logs and session listings.
    pub fn method(&self) -> Option<&'static str> {
        self.method
    }

    /// Feeds one complete backend message (type byte and body). See [`AuthStep`]. After an
    /// error, or after `Authenticated`, every further message is refused.
    pub fn on_message(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<AuthStep, AuthError> {
        let result = self.step(tag, body, out);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<AuthStep, AuthError> {
        if matches!(self.state, State::Authenticated | State::Failed) {
            return Err(self.unexpected(tag));
        }
        match tag {
            b'R' => self.on_auth_request(parse_auth_request(body)?, out),
            b'E' => {
                let f = parse_error_fields(body)?;
                Err(AuthError::Server {
                    severity: f.severity_nonlocalized.unwrap_or(f.severity).to_owned(),
                    code: f.code.to_owned(),
                    message: f.message.to_owned(),
                    detail: f.detail.map(str::to_owned),
                    hint: f.hint.map(str::to_owned),
                })
            }
            // A notice before authentication completes carries nothing the exchange needs.
            b'N' => Ok(AuthStep::Continue),
            b'v' if matches!(self.state, State::Start) => {
                let (minor, _unsupported) = parse_negotiate_protocol_version(body)?;
                Ok(AuthStep::Negotiated { minor })
            }
            _ => Err(self.unexpected(tag)),
        }
    }

    fn unexpected(&self, tag: u8) -> AuthError {
        AuthError::Protocol(ProtocolError::UnexpectedMessage {
            tag,
            state: self.state.waiting_for(),
        })
    }

    /// The password, for a method that sends it (or its md5) as is: only on a protected channel.
    fn plain_password(&self, method: &'static str) -> Result<&[u8], AuthError> {
        if self.channel != PasswordChannel::Protected {
            return Err(AuthError::UnverifiedChannel { method });
        }
        self.password(method)
    }

    fn password(&self, method: &'static str) -> Result<&[u8], AuthError> {
        self.password
            .as_deref()
            .map(Vec::as_slice)
            .ok_or(AuthError::NoPassword { method })
    }

    fn on_auth_request(
        &mut self,
        request: AuthRequest<'_>,
        out: &mut Vec<u8>,
    ) -> Result<AuthStep, AuthError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        match (state, request) {
            (State::Start, AuthRequest::Ok) => {
                self.method = Some("trust");
                self.state = State::Authenticated;
                Ok(AuthStep::Authenticated)
            }
            (State::PasswordSent | State::ScramVerified, AuthRequest::Ok) => {
                self.state = State::Authenticated;
                Ok(AuthStep::Authenticated)
            }
            (State::Start, AuthRequest::CleartextPassword) => {
                self.method = Some("password");
                encode_password(self.plain_password("password")?, out);
                self.state = State::PasswordSent;
                Ok(AuthStep::Continue)
            }
            (State::Start, AuthRequest::Md5Password { salt }) => {
                self.method = Some("md5");
                let hash = md5_hash(self.user.as_bytes(), self.plain_password("md5")?, salt);
                encode_password(hash.as_bytes(), out);
                self.state = State::PasswordSent;
                Ok(AuthStep::Continue)
            }
            (State::Start, AuthRequest::Sasl(mechanisms)) => {
                let (mechanism, binding) = self.choose_mechanism(&mechanisms)?;
                self.method = Some(mechanism);
                let scram = ScramSha256::new(self.password(mechanism)?, binding);
                encode_sasl_initial_response(mechanism, scram.message(), out);
                self.state = State::ScramFirst(Box::new(scram));
                Ok(AuthStep::Continue)
            }
            (State::ScramFirst(mut scram), AuthRequest::SaslContinue(data)) => {
                scram.update(data).map_err(scram_error)?;
                encode_sasl_response(scram.message(), out);
                self.state = State::ScramFinal(scram);
                Ok(AuthStep::Continue)
            }
            (State::ScramFinal(mut scram), AuthRequest::SaslFinal(data)) => {
                scram.finish(data).map_err(scram_error)?;
                self.state = State::ScramVerified;
                Ok(AuthStep::Continue)
            }
            (_, AuthRequest::KerberosV5) => Err(AuthError::UnsupportedMethod {
                method: "Kerberos V5",
            }),
            (_, AuthRequest::Gss | AuthRequest::GssContinue(_)) => {
                Err(AuthError::UnsupportedMethod { method: "GSSAPI" })
            }
            (_, AuthRequest::Sspi) => Err(AuthError::UnsupportedMethod { method: "SSPI" }),
            // Anything else out of order, notably AuthenticationOk in the middle of SCRAM, which
            // would skip the server's proof that it knows the password.
            (state, _) => Err(AuthError::Protocol(ProtocolError::UnexpectedMessage {
                tag: b'R',
                state: state.waiting_for(),
            })),
        }
    }

    /// SCRAM-SHA-256-PLUS when offered and we can bind; else SCRAM-SHA-256, telling the server
    /// whether we could have bound (`y`) or cannot (`n`) so it can detect a downgrade.
    fn choose_mechanism(
        &self,
        offered: &[&str],
    ) -> Result<(&'static str, sasl::ChannelBinding), AuthError> {
        let has = |m: &str| offered.contains(&m);
        match &self.channel_binding {
            ChannelBinding::TlsServerEndPoint(hash) if has(SCRAM_SHA_256_PLUS) => Ok((
                SCRAM_SHA_256_PLUS,
                sasl::ChannelBinding::tls_server_end_point(hash.clone()),
            )),
            ChannelBinding::TlsServerEndPoint(_) if has(SCRAM_SHA_256) => {
                Ok((SCRAM_SHA_256, sasl::ChannelBinding::unrequested()))
            }
            ChannelBinding::None if has(SCRAM_SHA_256) => {
                Ok((SCRAM_SHA_256, sasl::ChannelBinding::unsupported()))
            }
            ChannelBinding::None if has(SCRAM_SHA_256_PLUS) => {
                Err(AuthError::ChannelBindingUnavailable)
            }
            _ => Err(AuthError::UnsupportedSaslMechanisms {
                offered: offered.join(", "),
            }),
        }
    }
}

fn scram_error(e: std::io::Error) -> AuthError {
    // postgres-protocol's SCRAM errors describe the server's message, never the password.
    AuthError::Scram {
        reason: e.to_string(),
    }
}

/// The RFC 5929 `tls-server-end-point` channel binding data for a server certificate (DER): its
/// hash with the hash function of its signature algorithm, SHA-256 when that is MD5 or SHA-1,
/// exactly as PostgreSQL computes it. `None` when the certificate cannot be read or its
/// signature algorithm names no hash (Ed25519, Ed448, RSASSA-PSS): PostgreSQL cannot bind to
/// those either, so the driver passes [`ChannelBinding::None`].
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (cert, _) = der_element(cert_der, SEQUENCE)?;
    let (_tbs, rest) = der_element(cert, SEQUENCE)?;
    let (algorithm, _) = der_element(rest, SEQUENCE)?;
    let (oid, _) = der_element(algorithm, OBJECT_IDENTIFIER)?;
    Some(match signature_hash(oid)? {
        SignatureHash::Sha256 => Sha256::digest(cert_der).to_vec(),
        SignatureHash::Sha224 => Sha224::digest(cert_der).to_vec(),
        SignatureHash::Sha384 => Sha384::digest(cert_der).to_vec(),
        SignatureHash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

const SEQUENCE: u8 = 0x30;
const OBJECT_IDENTIFIER: u8 = 0x06;

/// One DER element of type `tag` at the start of `buf`: its contents and what follows it.
fn der_element(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = buf.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length bytes. DER never needs more than 4 here.
        let n = usize::from(first & 0x7f);
        if !(1..=4).contains(&n) {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    rest.split_at_checked(len)
}

enum SignatureHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The hash for channel binding, by signature algorithm OID (DER contents).
fn signature_hash(oid: &[u8]) -> Option<SignatureHash> {
    // 1.2.840.113549.1.1.x: PKCS #1 RSA signatures.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    // 1.2.840.10045.4: ECDSA signatures (4.1 is SHA-1, 4.3.x the SHA-2 family).
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    // 2.16.840.1.101.3.4.3.x: DSA with SHA-2.
    const DSA_SHA2: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03];
    use SignatureHash::*;
    if let Some(rest) = oid.strip_prefix(RSA) {
        return match rest {
            // md5WithRSA, sha1WithRSA: RFC 5929 says SHA-256.
            [0x04] | [0x05] | [0x0b] => Some(Sha256),
            [0x0c] => Some(Sha384),
            [0x0d] => Some(Sha512),
            [0x0e] => Some(Sha224),
            _ => None,
        };
    }
    if let Some(rest) = oid.strip_prefix(ECDSA) {
        return match rest {
            [0x01] | [0x03, 0x02] => Some(Sha256),
            [0x03, 0x01] => Some(Sha224),
            [0x03, 0x03] => Some(Sha384),
            [0x03, 0x04] => Some(Sha512),
            _ => None,
        };
    }
    if let Some(rest) = oid.strip_prefix(DSA_SHA2) {
        return match rest {
            [0x01] => Some(Sha224),
            [0x02] => Some(Sha256),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::postgres::messages::encode_error;

    fn auth_request(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        body
    }

    /// The body of the one message a step wrote.
    fn sent(out: &[u8]) -> (u8, &[u8]) {
        let len = i32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
        assert_eq!(out.len(), len + 1);
        (out[0], &out[5..])
    }

    #[test]
    fn trust_is_authenticated_at_once() {
        let mut a = UpstreamAuth::new("app", None, ChannelBinding::None);
        let mut out = Vec::new();
        assert_eq!(
            a.on_message(b'R', &auth_request(0, &[]), &mut out),
            Ok(AuthStep::Authenticated)
        );
        assert!(out.is_empty());
        assert_eq!(a.method(), Some("trust"));
        // Nothing more is accepted.
        assert!(matches!(
            a.on_message(b'R', &auth_request(0, &[]), &mut out),
            Err(AuthError::Protocol(_))
        ));
    }

    #[test]
    fn cleartext_and_md5_send_the_password_message() {
        let mut a = UpstreamAuth::new("md5_user", Some(b"password"), ChannelBinding::None)
            .on_channel(PasswordChannel::Protected);
        let mut out = Vec::new();
        a.on_message(b'R', &auth_request(5, &[0x2a, 0x3d, 0x8f, 0xe0]), &mut out)
            .unwrap();
        // The known answer from postgres-protocol's own md5 test.
        assert_eq!(
            sent(&out),
            (b'p', &b"md562af4dd09bbb41884907a838a3233294\0"[..])
        );
        out.clear();
        assert_eq!(
            a.on_message(b'R', &auth_request(0, &[]), &mut out),
            Ok(AuthStep::Authenticated)
        );

        let mut a = UpstreamAuth::new("u", Some(b"s3cret"), ChannelBinding::None)
            .on_channel(PasswordChannel::Protected);
        out.clear();
        a.on_message(b'R', &auth_request(3, &[]), &mut out).unwrap();
        assert_eq!(sent(&out), (b'p', &b"s3cret\0"[..]));
        assert_eq!(a.method(), Some("password"));
    }

    #[test]
    fn cleartext_and_md5_are_refused_on_an_unverified_channel() {
        for (code, extra, method) in [(3, &[][..], "password"), (5, &[1, 2, 3, 4][..], "md5")] {
            let mut a = UpstreamAuth::new("u", Some(b"hunter2"), ChannelBinding::None);
            let mut out = Vec::new();
            let err = a
                .on_message(b'R', &auth_request(code, extra), &mut out)
                .unwrap_err();
            assert_eq!(err, AuthError::UnverifiedChannel { method });
            assert!(
                out.is_empty(),
                "nothing is sent to a server we cannot verify"
            );
            assert!(!format!("{err} {a:?}").contains("hunter2"));
        }
        // SCRAM never reveals the password and proves the server knows it: allowed.
        let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None);
        let mut out = Vec::new();
        a.on_message(b'R', &auth_request(10, b"SCRAM-SHA-256\0\0"), &mut out)
            .unwrap();
        assert_eq!(out[0], b'p');
    }

    #[test]
    fn password_methods_without_a_password_fail_clearly() {
        for (code, extra, method) in [
            (3, &[][..], "password"),
            (5, &[1, 2, 3, 4][..], "md5"),
            (10, &b"SCRAM-SHA-256\0\0"[..], "SCRAM-SHA-256"),
        ] {
            let mut a = UpstreamAuth::new("u", None, ChannelBinding::None)
                .on_channel(PasswordChannel::Protected);
            let err = a
                .on_message(b'R', &auth_request(code, extra), &mut Vec::new())
                .unwrap_err();
            assert_eq!(err, AuthError::NoPassword { method });
            assert_eq!(err.sqlstate(), "08001");
        }
    }

    #[test]
    fn scram_mechanism_choice() {
        let mut out = Vec::new();
        let mut first = |cb: ChannelBinding, offered: &[u8]| {
            let mut a = UpstreamAuth::new("u", Some(b"pw"), cb);
            out.clear();
            a.on_message(b'R', &auth_request(10, offered), &mut out)
                .map(|_| {
                    let (_, body) = sent(&out);
                    let nul = body.iter().position(|&b| b == 0).unwrap();
                    let data = &body[nul + 5..];
                    (
                        String::from_utf8(body[..nul].to_vec()).unwrap(),
                        String::from_utf8(data[..data.len().min(24)].to_vec()).unwrap(),
                    )
                })
        };
        let both = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let plain = b"SCRAM-SHA-256\0\0";
        let plus = b"SCRAM-SHA-256-PLUS\0\0";
        let bound = || ChannelBinding::TlsServerEndPoint(vec![7; 32]);

        let (m, gs2) = first(bound(), both).unwrap();
        assert_eq!(m, "SCRAM-SHA-256-PLUS");
        assert!(gs2.starts_with("p=tls-server-end-point,,"));
        let (m, gs2) = first(bound(), plain).unwrap();
        assert_eq!(m, "SCRAM-SHA-256");
        assert!(gs2.starts_with("y,,"), "{gs2}");
        let (m, gs2) = first(ChannelBinding::None, both).unwrap();
        assert_eq!(m, "SCRAM-SHA-256");
        assert!(gs2.starts_with("n,,"), "{gs2}");
        assert_eq!(
            first(ChannelBinding::None, plus),
            Err(AuthError::ChannelBindingUnavailable)
        );
        assert_eq!(
            first(bound(), b"SCRAM-SHA-1\0OAUTHBEARER\0\0"),
            Err(AuthError::UnsupportedSaslMechanisms {
                offered: "SCRAM-SHA-1, OAUTHBEARER".into()
            })
        );
    }

    #[test]
    fn scram_cannot_be_cut_short_by_an_early_ok() {
        let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None);
        let mut out = Vec::new();
        a.on_message(b'R', &auth_request(10, b"SCRAM-SHA-256\0\0"), &mut out)
            .unwrap();
        let err = a
            .on_message(b'R', &auth_request(0, &[]), &mut out)
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::Protocol(ProtocolError::UnexpectedMessage { tag: b'R', .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn scram_rejects_a_foreign_nonce() {
        let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None);
        let mut out = Vec::new();
        a.on_message(b'R', &auth_request(10, b"SCRAM-SHA-256\0\0"), &mut out)
            .unwrap();
        let err = a
            .on_message(
                b'R',
                &auth_request(11, b"r=notournonce,s=QSXCR+Q6sek8bf92,i=4096"),
                &mut out,
            )
            .unwrap_err();
        assert!(matches!(err, AuthError::Scram { .. }), "{err:?}");
    }

    #[test]
    fn server_error_carries_sqlstate_and_never_the_password() {
        let mut a = UpstreamAuth::new("app", Some(b"hunter2-secret"), ChannelBinding::None)
            .on_channel(PasswordChannel::Protected);
        let mut out = Vec::new();
        a.on_message(b'R', &auth_request(3, &[]), &mut out).unwrap();
        let mut e = Vec::new();
        encode_error(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
            None,
            None,
            &mut e,
        );
        let err = a.on_message(b'E', &e[5..], &mut out).unwrap_err();
        assert_eq!(err.sqlstate(), "28P01");
        let shown = format!("{err} {err:?} {a:?}");
        assert!(shown.contains("password authentication failed"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn unsupported_methods_are_named() {
        for (code, method) in [(2, "Kerberos V5"), (7, "GSSAPI"), (9, "SSPI")] {
            let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None);
            let err = a
                .on_message(b'R', &auth_request(code, &[]), &mut Vec::new())
                .unwrap_err();
            assert_eq!(err, AuthError::UnsupportedMethod { method });
            assert!(err.to_string().contains(method));
        }
    }

    #[test]
    fn negotiate_protocol_version_only_before_auth() {
        let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None)
            .on_channel(PasswordChannel::Protected);
        let mut out = Vec::new();
        let mut v = Vec::new();
        crate::protocol::postgres::messages::encode_negotiate_protocol_version(
            0,
            &["_pq_.x"],
            &mut v,
        );
        assert_eq!(
            a.on_message(b'v', &v[5..], &mut out),
            Ok(AuthStep::Negotiated { minor: 0 })
        );
        assert_eq!(
            a.on_message(b'N', b"SNOTICE\0C00000\0Mhi\0\0", &mut out),
            Ok(AuthStep::Continue)
        );
        a.on_message(b'R', &auth_request(3, &[]), &mut out).unwrap();
        assert!(a.on_message(b'v', &v[5..], &mut out).is_err());
    }

    #[test]
    fn unexpected_messages_are_protocol_errors() {
        let mut a = UpstreamAuth::new("u", Some(b"pw"), ChannelBinding::None);
        let err = a.on_message(b'Z', b"I", &mut Vec::new()).unwrap_err();
        assert_eq!(err.sqlstate(), "08P01");
        // After an error the exchange is over.
        assert!(
            a.on_message(b'R', &auth_request(0, &[]), &mut Vec::new())
                .is_err()
        );
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        for (alg, expected_len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let der = cert.der().to_vec();
            let hash = tls_server_end_point(&der).unwrap();
            assert_eq!(hash.len(), expected_len);
            let expected = match expected_len {
                32 => Sha256::digest(&der).to_vec(),
                _ => Sha384::digest(&der).to_vec(),
            };
            assert_eq!(hash, expected);
            // Every truncation is refused without panicking.
            for cut in 0..der.len().min(600) {
                let _ = tls_server_end_point(&der[..cut]);
            }
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(tls_server_end_point(cert.der()), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x30, 0x01, 9, 8], 0x30),
            Some((&[9][..], &[8][..]))
        );
        assert_eq!(
            der_element(&[0x30, 0x81, 0x01, 9], 0x30),
            Some((&[9][..], &[][..]))
        );
        assert_eq!(der_element(&[0x30, 0x85, 0, 0, 0, 0, 1], 0x30), None);
        assert_eq!(der_element(&[0x30, 0x80], 0x30), None);
        assert_eq!(
            der_element(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff], 0x30),
            None
        );
        assert_eq!(der_element(&[0x31, 0x00], 0x30), None);
    }
}
