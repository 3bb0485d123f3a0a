//! The PostgreSQL driver: what the pipeline cannot do without knowing the protocol. The client's
//! startup (probes, cancel requests, the StartupMessage), the upstream leg and the client's
//! startup answer, the catalog the masking stage reads, how a refusal or an ending is written on
//! the wire (a FATAL ErrorResponse), and the two pumps around the PostgreSQL session core:
//! client bytes through the gate (decide) to the server, server bytes through the filter (mask)
//! to the client. Input is written on straight from the read buffer; only what the core rewrote
//! comes from its scratch.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;
use compio::BufResult;
use compio::buf::IoBuf;
use futures_util::future::{Either, select};
use tracing::{info, warn};

use super::gate::{Held, PolicyGate};
use super::mask_filter::MaskFilter;
use super::record::{RecordGate, ResponseTap};
use crate::daemon::Shared;
use crate::forward::cancel::{CancelKey, CancelTarget};
use crate::forward::conn::{Stream, TlsStream};
use crate::forward::local_tls::{ALPN_POSTGRESQL, LocalTls};
use crate::forward::{pool, upstream};
use crate::idp::token::MAX_TOKEN_BYTES;
use crate::idp::{IdentityError, Token};
use crate::metrics::{SessionInfo, SessionState};
use crate::policy::approval::Decision;
use crate::protocol::postgres::session::{
    Blocked, Core, Disposition, Output, Progress, Seg, Session, SessionError, Side,
};
use crate::protocol::postgres::startup::{self, Initial, MAX_STARTUP_PACKET_LEN};
use crate::protocol::postgres::{hello, messages};
use crate::route::Target;

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
    let mut out = Vec::with_capacity(64 + message.len());
    messages::encode_error("FATAL", code, message, None, None, &mut out);
    crate::service::metrics::error_sent(code);
    let _ = client.write_all(out).await;
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
                refuse(&client, e.sqlstate(), &e.to_string()).await;
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
    let pooled = pool::take(&key, &target.config.pool, &startup.params, max_message).await;
    let (conn, relay) = match pooled {
        Some(conn) => {
            let relay = conn.state.relay();
            (conn, relay)
        }
        None => {
            let params: Vec<(&str, &str)> = startup
                .params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let connecting = std::time::Instant::now();
            let connected = upstream::connect(target, login, &params, startup.minor, max_message);
            let dialled = connected.await.and_then(|up| {
                let relay = up.relay.clone();
                pool::Conn::new(up, &startup.params).map(|c| (c, relay))
            });
            match dialled {
                Ok(up) => {
                    crate::service::metrics::connected(&target.config.name, connecting.elapsed());
                    up
                }
                Err(e) => {
                    target.counters.errors.fetch_add(1, Relaxed);
                    let retryable = e.is_retryable();
                    warn!(session = info.id, target = %target.config.name, retryable, "upstream: {e}");
                    refuse(client, e.sqlstate(), &e.to_string()).await;
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

/// Tells the client why the session ended, when it ended on the gateway's or the server's side.
pub async fn report_end(
    client: &Stream,
    end: &Result<End, PumpError>,
    target: &Target,
    info: &SessionInfo,
) {
    match end {
        Ok(End::ClientClosed) | Ok(End::Terminated) => {}
        Ok(End::Idle(after)) => {
            let message = format!(
                "terminating connection due to idle-session timeout ({})",
                humantime::format_duration(*after)
            );
            refuse(client, "57P05", &message).await;
        }
        Ok(End::Killed { by }) => {
            let message = format!(
                "terminating connection due to administrator command: session killed by {by} \
                 with `portcullis sessions kill`"
            );
            refuse(client, "57P01", &message).await;
        }
        Ok(End::ServerClosed { fatal_seen }) => {
            if !fatal_seen {
                refuse(
                    client,
                    "08006",
                    "the upstream server closed the connection unexpectedly",
                )
                .await;
            }
        }
        Err(PumpError::Protocol(e)) => {
            target.counters.errors.fetch_add(1, Relaxed);
            warn!(session = info.id, "{e}");
            refuse(client, e.sqlstate(), &e.client_message()).await;
            if e.side == Side::Client {
                drain_client(client).await;
            }
        }
        Err(PumpError::Io(e)) => {
            target.counters.errors.fetch_add(1, Relaxed);
            tracing::debug!(session = info.id, "I/O: {e}");
        }
        Err(PumpError::Identity(e)) => {
            warn!(session = info.id, check = e.check(), "session ended: {e}");
            let message = format!("the session's token expired and was not renewed: {e}");
            refuse(client, crate::idp::SQLSTATE_REFUSED, &message).await;
        }
    }
}

/// After refusing a client in the middle of what it is sending, reads and drops the rest for a
/// moment: closing with unread data resets the connection, and the client would lose the error.
async fn drain_client(client: &Stream) {
    use compio::io::AsyncWrite;
    let mut w = client.tcp();
    let _ = w.shutdown().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = Vec::new();
    let mut drained = 0usize;
    while drained < 256 << 20 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match compio::time::timeout(left, client.read(buf)).await {
            Ok(BufResult(Ok(n), b)) if n > 0 => {
                drained += n;
                buf = b;
                buf.clear();
            }
            _ => return,
        }
    }
}

/// Runs both pumps until one side ends the session.
#[expect(
    clippy::too_many_arguments,
    reason = "the session's parts, each handed to the pump that owns it"
)]
pub async fn pump(
    client: Rc<Stream>,
    server: Rc<Stream>,
    core: Rc<RefCell<Session>>,
    pending: Vec<u8>,
    info: Arc<SessionInfo>,
    gate: RecordGate,
    results: (MaskFilter, ResponseTap),
    reloads: (Arc<Shared>, u64),
) -> Result<End, PumpError> {
    let idle_timeout = reloads.0.config().idle_timeout;
    let killer = info.clone();
    let pumps = select(
        Box::pin(client_to_server(
            client.clone(),
            server.clone(),
            core.clone(),
            pending,
            info.clone(),
            gate,
            idle_timeout,
        )),
        Box::pin(server_to_client(
            server, client, core, info, results, reloads,
        )),
    );
    // `portcullis sessions kill` ends the session wherever it is, even held for approval.
    match select(pumps, Box::pin(killer.kill.pulled())).await {
        Either::Left((Either::Left((r, _)) | Either::Right((r, _)), _)) => r,
        Either::Right((by, _)) => Ok(End::Killed { by }),
    }
}

pub enum End {
    ClientClosed,
    Terminated,
    /// The client sent nothing for the idle timeout, with no reply pending.
    Idle(std::time::Duration),
    ServerClosed {
        fatal_seen: bool,
    },
    /// An operator ended it with `portcullis sessions kill`; `by` names them.
    Killed {
        by: String,
    },
}

/// How a session ended, as its recording says.
pub fn end_reason(end: &Result<End, PumpError>) -> String {
    match end {
        Ok(End::ClientClosed) => "client closed the connection".into(),
        Ok(End::Terminated) => "client terminated".into(),
        Ok(End::Idle(after)) => format!(
            "idle-session timeout ({})",
            humantime::format_duration(*after)
        ),
        Ok(End::ServerClosed { .. }) => "server closed the connection".into(),
        Ok(End::Killed { by }) => format!("killed by {by}"),
        Err(PumpError::Protocol(e)) => format!("protocol error: {e}"),
        Err(PumpError::Io(e)) => format!("I/O error: {e}"),
        Err(PumpError::Identity(e)) => format!("identity: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error(transparent)]
    Protocol(#[from] SessionError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The session's token expired and no fresh identity could be had: the session ends.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Writes one call's output: input ranges straight from the read buffer, the rest from scratch.
/// Returns the buffers for reuse.
async fn write_output(
    to: &Stream,
    mut buf: Vec<u8>,
    out: &mut Output,
) -> (std::io::Result<()>, Vec<u8>) {
    // Rows rewritten between untouched ones cut the output into many small pieces, each a write
    // of its own; past a couple, one gathered write is far cheaper than the copies it costs.
    if out.segments().len() > 2 {
        let total = out.segments().iter().map(|s| match s {
            Seg::Input(r) | Seg::Scratch(r) => r.len(),
        });
        let mut gathered = Vec::with_capacity(total.sum());
        for seg in out.segments() {
            match seg {
                Seg::Input(r) => gathered.extend_from_slice(&buf[r.clone()]),
                Seg::Scratch(r) => gathered.extend_from_slice(&out.scratch()[r.clone()]),
            }
        }
        out.clear();
        return (to.write_all(gathered).await.0, buf);
    }
    for i in 0..out.segments().len() {
        match out.segments()[i].clone() {
            Seg::Input(r) => {
                let BufResult(res, slice) = to.write_all(buf.slice(r)).await;
                buf = compio::buf::IntoInner::into_inner(slice);
                if let Err(e) = res {
                    return (Err(e), buf);
                }
            }
            Seg::Scratch(r) => {
                let scratch = std::mem::take(out.scratch_mut());
                let BufResult(res, slice) = to.write_all(scratch.slice(r)).await;
                *out.scratch_mut() = compio::buf::IntoInner::into_inner(slice);
                if let Err(e) = res {
                    return (Err(e), buf);
                }
            }
        }
    }
    out.clear();
    (Ok(()), buf)
}

async fn client_to_server(
    client: Rc<Stream>,
    server: Rc<Stream>,
    core: Rc<RefCell<Session>>,
    mut buf: Vec<u8>,
    info: Arc<SessionInfo>,
    mut gate: RecordGate,
    idle_timeout: Option<std::time::Duration>,
) -> Result<End, PumpError> {
    let mut out = Output::default();
    loop {
        if !buf.is_empty() {
            let started = std::time::Instant::now();
            let progress = core.borrow_mut().on_client(&buf, &mut gate, &mut out)?;
            let (r, b) = write_output(&server, buf, &mut out).await;
            buf = b;
            r?;
            crate::service::metrics::statement_overhead(started.elapsed());
            {
                let c = core.borrow();
                info.messages_in.store(c.from_client.messages, Relaxed);
                info.bytes_in.store(c.from_client.bytes, Relaxed);
            }
            match progress {
                Progress::Continue { consumed } => {
                    buf.drain(..consumed);
                }
                Progress::Terminate { .. } => return Ok(End::Terminated),
                Progress::Hold { consumed } => {
                    buf.drain(..consumed);
                    let outcome = settle(&client, &info, &mut gate).await?;
                    core.borrow_mut().resolve_hold(outcome);
                    // Process the held message again, now with its final answer.
                    continue;
                }
            }
        }
        let idle = {
            let c = core.borrow();
            c.pending_replies() == 0 && c.transaction_status() == b'I'
        };
        let BufResult(n, b) = match idle_timeout.filter(|_| idle && buf.is_empty()) {
            Some(after) => match compio::time::timeout(after, client.read(buf)).await {
                Ok(r) => r,
                Err(_) => return Ok(End::Idle(after)),
            },
            None => client.read(buf).await,
        };
        buf = b;
        if n? == 0 {
            return Ok(End::ClientClosed);
        }
    }
}

/// Waits for what a held statement needs before it runs: its request record on disk (strict
/// recording), then whatever policy holds it for; the outcome is recorded.
async fn settle(
    client: &Stream,
    info: &SessionInfo,
    gate: &mut RecordGate,
) -> Result<Disposition, PumpError> {
    if let Some(durable) = gate.take_durable() {
        if let Err(e) = unless_client_leaves(client, durable).await? {
            gate.policy.held = None;
            return Ok(super::record::refusal(&e));
        }
        if gate.policy.held.is_none() {
            return Ok(Disposition::Allow);
        }
    }
    let said = gate.said();
    let (outcome, approver) = hold(client, info, &mut gate.policy, &said).await?;
    Ok(gate.settled(outcome, approver))
}

/// Waits for what the gate is holding the statement for: its verdict from the classifier
/// thread, then, if it needs one, an operator's decision. The client hears that it is held for
/// approval, with the request id; earlier results keep flowing meanwhile. Returns the outcome,
/// and who approved it.
async fn hold(
    client: &Stream,
    info: &SessionInfo,
    gate: &mut PolicyGate,
    said: &super::record::Said,
) -> Result<(Disposition, Option<String>), PumpError> {
    let previous = info.state();
    info.set_state(SessionState::Holding);
    let mut approver = None;
    let outcome = loop {
        match gate.held.take() {
            None => {
                break Disposition::Block(Blocked {
                    rule: "internal".into(),
                    reason: "held without a reason to wait".into(),
                    sqlstate: None,
                });
            }
            Some(Held::Classifying { verdict, request }) => {
                let d = match unless_client_leaves(client, verdict).await? {
                    Ok(v) => gate.act(&request.as_request(), v),
                    Err(_) => Disposition::Block(Blocked {
                        rule: "classifier".into(),
                        reason: "the classifier thread stopped before a verdict".into(),
                        sqlstate: None,
                    }),
                };
                if d != Disposition::Hold {
                    break d;
                }
            }
            Some(Held::Catalog {
                read,
                generations,
                request,
            }) => {
                let read = unless_client_leaves(client, read).await?;
                gate.catalog_read(read, generations);
                let d = crate::protocol::core::Gate::check(gate, &request.as_request());
                if d != Disposition::Hold {
                    break d;
                }
            }
            Some(Held::Renewing { identity, request }) => {
                let fresh = unless_client_leaves(client, identity).await??;
                gate.renewed(fresh)?;
                let d = crate::protocol::core::Gate::check(gate, &request.as_request());
                if d != Disposition::Hold {
                    break d;
                }
            }
            Some(Held::Approval { id, rule, decision }) => {
                let mut notice = Vec::with_capacity(256);
                messages::encode_notice(
                    "01000",
                    &format!("statement held for approval: request {id} (rule \"{rule}\")"),
                    Some(&format!(
                        "an operator decides with `portcullis approve {id}` or `portcullis deny {id}`"
                    )),
                    &mut notice,
                );
                said.wrote(&notice);
                client.write_all(notice).await.0?;
                // Dropping `decision` when the client leaves withdraws the request.
                let decision = unless_client_leaves(client, decision).await?;
                info!(
                    session = info.id,
                    approval = id,
                    ?decision,
                    "approval decided"
                );
                if let Decision::Approved { by } = &decision {
                    approver = Some(by.clone());
                }
                break PolicyGate::outcome(&rule, decision);
            }
        }
    };
    info.set_state(previous);
    Ok((outcome, approver))
}

/// How often a held session looks whether its client is still there.
const HELD_CLIENT_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Awaits `f`, unless the client hangs up first: then the session ends, and with it the held
/// statement's upstream connection, instead of lingering until a decision or timeout.
async fn unless_client_leaves<F: std::future::Future>(
    client: &Stream,
    f: F,
) -> Result<F::Output, PumpError> {
    let mut f = std::pin::pin!(f);
    loop {
        match select(f.as_mut(), Box::pin(compio::time::sleep(HELD_CLIENT_CHECK))).await {
            Either::Left((v, _)) => return Ok(v),
            Either::Right(_) => {
                if client_gone(client) {
                    return Err(PumpError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the client disconnected while its statement was held",
                    )));
                }
            }
        }
    }
}

/// True when the client's socket is at end of stream or broken. Peeks without consuming and
/// without blocking, so pipelined bytes stay for the pump.
fn client_gone(client: &Stream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(client.tcp())
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

async fn server_to_client(
    server: Rc<Stream>,
    client: Rc<Stream>,
    core: Rc<RefCell<Session>>,
    info: Arc<SessionInfo>,
    (mut filter, mut tap): (MaskFilter, ResponseTap),
    (shared, mut generation): (Arc<Shared>, u64),
) -> Result<End, PumpError> {
    let mut buf = Vec::new();
    let mut out = Output::default();
    loop {
        let BufResult(n, b) = server.read(buf).await;
        buf = b;
        if n? == 0 {
            let fatal_seen = core.borrow().server_sent_fatal();
            return Ok(End::ServerClosed { fatal_seen });
        }
        // A reload reaches this session at its next result, not only new sessions.
        if let Some(masker) = shared.masker_if_reloaded(&mut generation) {
            filter.set_masker(masker);
        }
        let progress = core.borrow_mut().on_server(&buf, &mut filter, &mut out)?;
        // Record: exactly what goes to the client, after masking.
        tap.written(&buf, &out);
        let (r, b) = write_output(&client, buf, &mut out).await;
        buf = b;
        r?;
        {
            let c = core.borrow();
            info.messages_out.store(c.from_server.messages, Relaxed);
            info.bytes_out.store(c.from_server.bytes, Relaxed);
            info.set_state(match c.transaction_status() {
                b'T' => SessionState::InTransaction,
                b'E' => SessionState::FailedTransaction,
                _ => SessionState::Idle,
            });
        }
        if let Progress::Continue { consumed } = progress {
            buf.drain(..consumed);
        }
        tap.keep_pace().await;
    }
}
