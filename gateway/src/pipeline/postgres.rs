//! The PostgreSQL driver: what the pipeline cannot do without knowing the protocol. The client's
//! startup (probes, cancel requests, the StartupMessage), the upstream leg and the client's
//! startup answer, and how the gateway's own errors and notices are framed ([`Postgres`], the
//! [`Driver`] the generic pumps in `pump.rs` run the PostgreSQL session core with).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;
use compio::BufResult;
use tracing::{info, warn};

use super::mask_filter::MaskFilter;
use super::pump::{self, Driver, drain_client, refuse_error};
use crate::daemon::Shared;
use crate::forward::cancel::{CancelKey, CancelTarget};
use crate::forward::conn::{Stream, TlsStream};
use crate::forward::local_tls::{ALPN_POSTGRESQL, LocalTls};
use crate::forward::{pool, upstream};
use crate::idp::token::MAX_TOKEN_BYTES;
use crate::idp::{IdentityError, Token};
use crate::mask::Masker;
use crate::metrics::SessionInfo;
use crate::protocol::postgres::session::{ResultFilter, Session};
use crate::protocol::postgres::startup::{self, Initial, MAX_STARTUP_PACKET_LEN};
use crate::protocol::postgres::{hello, messages};
use crate::route::Target;

/// The PostgreSQL session core, its masking filter, and its ErrorResponse and NoticeResponse.
pub enum Postgres {}

impl Driver for Postgres {
    type Core = Session;
    type Filter = MaskFilter;

    fn filter(filter: &mut MaskFilter) -> &mut (dyn ResultFilter + 'static) {
        filter
    }

    fn reload(filter: &mut MaskFilter, masker: Masker) {
        filter.set_masker(masker);
    }

    fn encode_fatal(code: &str, message: &str, out: &mut Vec<u8>) {
        messages::encode_error("FATAL", code, message, None, None, out);
    }

    fn encode_notice(code: &str, message: &str, detail: Option<&str>, out: &mut Vec<u8>) {
        messages::encode_notice(code, message, detail, out);
    }
}

/// Session parameters passed upstream. Others are not: `options` can carry `-c role=...`,
/// `replication` opens a replication session, and `client_encoding` would let the server read
/// SQL differently from the policy classifier (the gateway fixes it to UTF8).
const PASSED_PARAMS: &[&str] = &[
    "application_name",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
];

/// A client's startup, accepted: what goes upstream, and what the client sent after it.
pub struct Startup {
    params: Vec<(String, String)>,
    minor: u16,
    /// Bytes the client pipelined after its StartupMessage.
    pub pending: Vec<u8>,
}

/// Refuses the client with a FATAL ErrorResponse; the caller then closes.
pub async fn refuse(client: &Stream, code: &str, message: &str) {
    pump::refuse::<Postgres>(client, code, message).await;
}

/// Answers SSL/GSS probes and serves cancel requests until the StartupMessage arrives. Where the
/// target has local TLS, an SSLRequest is answered 'S' and the startup goes on over TLS, as does a
/// PostgreSQL 17 direct-TLS connection; the client stream returned is then the TLS one. `None`
/// when the connection ended without a startup (closed, or it was a cancel request).
pub async fn client_startup(
    mut client: Rc<Stream>,
    local_tls: Option<&LocalTls>,
    shared: &Shared,
    client_addr: std::net::SocketAddr,
    dialled: std::net::SocketAddr,
) -> anyhow::Result<(Rc<Stream>, Option<Startup>)> {
    // All of it within the startup timeout, so a silent or trickling client cannot hold a slot
    // forever.
    let startup_timeout = shared.config().startup_timeout;
    let startup_deadline = std::time::Instant::now() + startup_timeout;
    let left = || startup_deadline.saturating_duration_since(std::time::Instant::now());
    let mut buf = Vec::new();
    // Each probe is answered once, as PostgreSQL does; a repeat is a protocol violation.
    let (mut ssl_asked, mut gss_asked) = (false, false);
    loop {
        let parsed = match startup::parse_initial(&buf, MAX_STARTUP_PACKET_LEN) {
            Ok(p) => p,
            Err(e) => {
                refuse_error::<Postgres>(&client, &e).await;
                anyhow::bail!("bad startup from {client_addr}: {e}");
            }
        };
        match parsed {
            None => {
                let Ok(BufResult(n, b)) = compio::time::timeout(left(), client.read(buf)).await
                else {
                    let message = format!(
                        "the client did not complete startup within {}",
                        humantime::format_duration(startup_timeout)
                    );
                    refuse(&client, "08P01", &message).await;
                    anyhow::bail!("{client_addr}: {message}");
                };
                buf = b;
                if n? == 0 {
                    return Ok((client, None));
                }
            }
            Some((probe @ (Initial::SslRequest | Initial::GssEncRequest), used)) => {
                let ssl = matches!(probe, Initial::SslRequest);
                buf.drain(..used);
                let asked = if ssl { &mut ssl_asked } else { &mut gss_asked };
                if std::mem::replace(asked, true) || client.is_tls() {
                    let message = format!(
                        "{} sent again during startup",
                        if ssl { "SSLRequest" } else { "GSSENCRequest" }
                    );
                    refuse(&client, "08P01", &message).await;
                    anyhow::bail!("{client_addr}: {message}");
                }
                let tls = local_tls.filter(|_| ssl);
                // Bytes behind the SSLRequest were sent before any TLS: taking them as if they
                // came over it would let someone on the path inject them (CVE-2021-23214).
                if tls.is_some() && !buf.is_empty() {
                    let message = "received unencrypted data after SSL request";
                    refuse(&client, "08P01", message).await;
                    anyhow::bail!("{client_addr}: {message}");
                }
                let mut out = Vec::with_capacity(1);
                messages::encode_ssl_response(tls.is_some(), &mut out);
                client.write_all(out).await.0?;
                if let Some(tls) = tls {
                    client =
                        accept_tls(client, tls, Vec::new(), client_addr, dialled, left()).await?;
                }
            }
            Some((Initial::DirectTls, _)) => {
                let Some(tls) = local_tls.filter(|_| !(ssl_asked || gss_asked || client.is_tls()))
                else {
                    // Nothing to answer in: the client is speaking TLS records, or TLS is up.
                    warn!(client = %client_addr, "refused a direct TLS connection: this target has no local_tls, or it came after a probe");
                    anyhow::bail!("{client_addr}: unexpected direct TLS");
                };
                let hello = std::mem::take(&mut buf);
                client = accept_tls(client, tls, hello, client_addr, dialled, left()).await?;
                // PostgreSQL 17 requires ALPN on direct TLS, so that a TLS connection meant for
                // another protocol cannot be taken for a PostgreSQL one.
                if client.alpn_protocol().as_deref() != Some(ALPN_POSTGRESQL) {
                    let message = "direct TLS connections must negotiate ALPN \"postgresql\"";
                    refuse(&client, "08P01", message).await;
                    drain_client(&client).await;
                    warn!(client = %client_addr, "{message}");
                    anyhow::bail!("{client_addr}: {message}");
                }
            }
            Some((Initial::Cancel { pid, key }, _)) => {
                if let Some(to) = shared.cancel.lookup(pid, key) {
                    info!(client = %client_addr, target = %to.target.config.name, "forwarding cancel request");
                    upstream::cancel(&to.target, to.backend_pid, &to.backend_key).await?;
                }
                return Ok((client, None));
            }
            Some((Initial::Startup(msg), used)) => {
                if local_tls.is_some_and(|t| t.require_tls) && !client.is_tls() {
                    let message = "this target requires TLS between the client and the gateway: \
                                   connect with sslmode=require, verify-ca or verify-full";
                    refuse(&client, "28000", message).await;
                    anyhow::bail!("{client_addr}: refused a plaintext startup (require_tls)");
                }
                let params: Vec<(String, String)> = msg
                    .params
                    .iter()
                    .filter(|(k, _)| PASSED_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(k)))
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                if msg
                    .get("replication")
                    .is_some_and(|v| v != "false" && v != "0")
                {
                    refuse(
                        &client,
                        "42501",
                        "replication connections are not allowed through the gateway",
                    )
                    .await;
                    anyhow::bail!("refused a replication connection");
                }
                let minor = msg.negotiated_minor();
                buf.drain(..used);
                return Ok((
                    client,
                    Some(Startup {
                        params,
                        minor,
                        pending: buf,
                    }),
                ));
            }
        }
    }
}

/// Runs the TLS server handshake on the client leg, within what is `left` of the startup timeout.
/// `hello`: handshake bytes already read (a direct-TLS ClientHello). A failure is logged with its
/// cause (never key material: rustls's errors carry none) and ends the connection.
async fn accept_tls(
    client: Rc<Stream>,
    tls: &LocalTls,
    hello: Vec<u8>,
    client_addr: std::net::SocketAddr,
    dialled: std::net::SocketAddr,
    left: std::time::Duration,
) -> anyhow::Result<Rc<Stream>> {
    let config = tls.server_config(dialled.ip())?;
    let Ok(Stream::Tcp(tcp, _)) = Rc::try_unwrap(client) else {
        anyhow::bail!("{client_addr}: TLS asked for on a leg that is not plain TCP");
    };
    let conn = rustls::ServerConnection::new(config)?;
    match compio::time::timeout(left, TlsStream::handshake_after(tcp, conn, hello)).await {
        Ok(Ok(stream)) => Ok(Rc::new(Stream::Tls(Box::new(stream)))),
        Ok(Err(e)) => {
            warn!(client = %client_addr, "local TLS handshake failed: {e}");
            anyhow::bail!("{client_addr}: local TLS handshake failed: {e}")
        }
        Err(_) => {
            warn!(client = %client_addr, "local TLS handshake not completed within the startup timeout");
            anyhow::bail!("{client_addr}: local TLS handshake timed out")
        }
    }
}

/// Takes a warm upstream connection for `login` from this worker's pool, or connects and
/// authenticates as the target's user, then answers the client's startup with the gateway's own
/// cancel key and the server's parameters. Returns the connection, its pool key, and the cancel
/// key, which serves cancel requests for as long as it is kept. The user is `login`'s: the
/// target's own, or the one mapped from the session's identity.
pub async fn open_upstream(
    client: &Stream,
    target: &Arc<Target>,
    login: upstream::Login<'_>,
    startup: &Startup,
    shared: &Shared,
    info: &SessionInfo,
) -> anyhow::Result<(pool::Conn, pool::Key, CancelKey)> {
    let key = pool::Key::new(target, login, startup.minor, &startup.params);
    let max_message = shared.max_message();
    let acquired = match pool::acquire(&key, target, &startup.params, max_message).await {
        Ok(acquired) => acquired,
        Err(full) => {
            target.counters.errors.fetch_add(1, Relaxed);
            let message = format!(
                "too many upstream connections: target \"{}\" has its \
                 max_upstream_connections ({}) open, and none came free within \
                 upstream_queue_timeout ({})",
                target.config.name,
                full.max,
                humantime::format_duration(full.waited)
            );
            warn!(session = info.id, target = %target.config.name, "{message}");
            super::pump::refuse::<Postgres>(client, "53300", &message).await;
            anyhow::bail!("{message}");
        }
    };
    let (conn, relay) = match acquired {
        pool::Acquired::Pooled(conn) => {
            target.counters.pool.reused.fetch_add(1, Relaxed);
            let conn = *conn;
            let relay = conn.state.relay();
            (conn, relay)
        }
        pool::Acquired::Dial(slot) => {
            if target.config.pool.enabled {
                target.counters.pool.dialed.fetch_add(1, Relaxed);
            }
            let params: Vec<(&str, &str)> = startup
                .params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let connecting = std::time::Instant::now();
            let connected = upstream::connect(target, login, &params, startup.minor, max_message);
            let dialled = connected.await.and_then(|up| {
                let relay = up.relay.clone();
                pool::Conn::new(up, &startup.params, slot).map(|c| (c, relay))
            });
            match dialled {
                Ok(up) => {
                    crate::service::metrics::connected(&target.config.name, connecting.elapsed());
                    up
                }
                Err(e) => {
                    target.counters.errors.fetch_add(1, Relaxed);
                    let retryable = crate::error::WireError::retryable(&e);
                    warn!(session = info.id, target = %target.config.name, retryable, "upstream: {e}");
                    refuse_error::<Postgres>(client, &e).await;
                    return Err(e.into());
                }
            }
        }
    };
    let cancel_key = shared.cancel.issue(
        conn.state.minor,
        CancelTarget {
            target: target.clone(),
            backend_pid: conn.state.backend_pid,
            backend_key: conn.state.backend_key.clone(),
            in_flight: Default::default(),
        },
    );
    let mut out = Vec::new();
    if let Err(e) = hello::encode_client_hello(&relay, cancel_key.pid, &cancel_key.key, &mut out) {
        target.counters.errors.fetch_add(1, Relaxed);
        warn!(session = info.id, target = %target.config.name, "upstream startup: {e}");
        refuse(
            client,
            "08P01",
            "the upstream server broke the protocol during startup",
        )
        .await;
        return Err(e).context("upstream startup");
    }
    client.write_all(out).await.0?;
    Ok((conn, key, cancel_key))
}

/// Asks the client for its token as a cleartext password (AuthenticationCleartextPassword) and
/// reads its PasswordMessage within `limit`. The caller decides the leg may carry one. Bytes the
/// client sent after it stay in `pending`; the password's own bytes are wiped.
pub async fn ask_password(
    client: &Stream,
    pending: &mut Vec<u8>,
    limit: std::time::Duration,
) -> Result<Token, IdentityError> {
    use crate::protocol::postgres::frame::{Next, next_frame};
    let missing = |why: String| IdentityError::TokenMissing(why);
    let mut out = Vec::with_capacity(9);
    messages::encode_auth_cleartext_password(&mut out);
    if client.write_all(out).await.0.is_err() {
        return Err(missing("the client left before sending a token".into()));
    }
    let deadline = std::time::Instant::now() + limit;
    let mut buf = zeroize::Zeroizing::new(std::mem::take(pending));
    loop {
        let len = match next_frame(&buf, MAX_TOKEN_BYTES + 64) {
            Ok(Next::Frame(f)) if f.tag == b'p' => f.wire_len(),
            Ok(Next::Frame(f)) => {
                return Err(missing(format!(
                    "the client answered the password request with message {:?}",
                    f.tag as char
                )));
            }
            Err(e) => return Err(missing(format!("the client's password message: {e}"))),
            Ok(Next::NeedHeader | Next::Partial { .. }) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let read = compio::time::timeout(left, client.read(std::mem::take(&mut *buf)));
                let Ok(BufResult(n, b)) = read.await else {
                    return Err(missing(format!(
                        "the client sent no password within {}",
                        humantime::format_duration(limit)
                    )));
                };
                *buf = b;
                if !matches!(n, Ok(n) if n > 0) {
                    return Err(missing(
                        "the client closed the connection instead of sending a token as its \
                         password"
                            .into(),
                    ));
                }
                continue;
            }
        };
        let body = &buf[crate::protocol::postgres::frame::HEADER_LEN..len];
        let token = match messages::parse_password(body).map(std::str::from_utf8) {
            Ok(Ok(text)) => Ok(Token::new(text.to_owned())),
            Ok(Err(_)) => Err(IdentityError::Malformed("the password is not UTF-8".into())),
            Err(e) => Err(missing(format!("the client's password message: {e}"))),
        };
        *pending = buf[len..].to_vec();
        return token;
    }
}
