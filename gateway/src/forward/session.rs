//! One client connection: startup with the client, the upstream leg, then two pumps around the
//! sans-IO session core. This and `conn` are the only places bytes meet sockets.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use compio::BufResult;
use compio::buf::IoBuf;
use compio::net::TcpStream;
use futures_util::future::{Either, select};
use tracing::{debug, info, warn};

use super::Shared;
use super::cancel::CancelTarget;
use super::conn::Stream;
use super::gate::PolicyGate;
use super::mask_filter::MaskFilter;
use super::upstream;
use crate::identify::Identity;
use crate::metrics::{NewSession, SessionInfo, SessionState};
use crate::protocol::postgres::messages;
use crate::protocol::postgres::session::{
    Blocked, Disposition, Output, Progress, Seg, Session, SessionError, Side,
};
use crate::protocol::postgres::startup::{self, Initial};

/// PostgreSQL caps startup packets at 10000 bytes; so does the gateway.
const MAX_STARTUP: usize = 10_000;

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

pub async fn handle(tcp: TcpStream, identity: Identity, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let client = Rc::new(Stream::tcp_stream(tcp));
    let peer = identity.client_addr;
    if let Err(e) = run(client.clone(), identity, &shared).await {
        debug!(client = %peer, "session ended: {e:#}");
    }
}

/// Sends a FATAL ErrorResponse to the client; the caller then closes.
async fn fatal(client: &Stream, code: &str, message: &str) {
    let mut out = Vec::with_capacity(64 + message.len());
    messages::encode_error("FATAL", code, message, None, None, &mut out);
    let _ = client.write_all(out).await;
}

async fn run(client: Rc<Stream>, identity: Identity, shared: &Arc<Shared>) -> anyhow::Result<()> {
    // Startup: answer SSL/GSS probes, serve cancels, wait for the StartupMessage.
    let mut buf = Vec::with_capacity(8192);
    let (params, minor) = loop {
        let parsed = match startup::parse_initial(&buf, MAX_STARTUP) {
            Ok(p) => p,
            Err(e) => {
                fatal(&client, e.sqlstate(), &e.to_string()).await;
                anyhow::bail!("bad startup from {}: {e}", identity.client_addr);
            }
        };
        match parsed {
            None => {
                let BufResult(n, b) = client.read(buf).await;
                buf = b;
                if n? == 0 {
                    return Ok(());
                }
            }
            Some((Initial::SslRequest | Initial::GssEncRequest, used)) => {
                buf.drain(..used);
                // TLS on the loopback leg is refused; the client continues in plaintext.
                let mut out = Vec::with_capacity(1);
                messages::encode_ssl_response(false, &mut out);
                client.write_all(out).await.0?;
            }
            Some((Initial::DirectTls, _)) => {
                anyhow::bail!(
                    "{} tried direct TLS, which this listener does not terminate",
                    identity.client_addr
                );
            }
            Some((Initial::Cancel { pid, key }, _)) => {
                if let Some(to) = shared.cancel.lookup(pid, key) {
                    info!(client = %identity.client_addr, target = %to.target.config.name, "forwarding cancel request");
                    upstream::cancel(&to.target, to.backend_pid, &to.backend_key).await?;
                }
                return Ok(());
            }
            Some((Initial::Startup(msg), used)) => {
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
                    fatal(
                        &client,
                        "42501",
                        "replication connections are not allowed through the gateway",
                    )
                    .await;
                    anyhow::bail!("refused a replication connection");
                }
                let minor = msg.negotiated_minor();
                buf.drain(..used);
                break (params, minor);
            }
        }
    };

    let Some(target) = shared.route(identity.original_dst) else {
        fatal(
            &client,
            "08004",
            &format!("no target is configured for {}", identity.original_dst),
        )
        .await;
        anyhow::bail!("no route for {}", identity.original_dst);
    };
    let up = &target.config.upstream;
    let guard = shared.registry.open(NewSession {
        client_addr: identity.client_addr,
        original_dst: identity.original_dst,
        target: target.config.name.clone(),
        upstream_user: up.user.clone(),
        database: up.database.clone(),
        peer: identity.peer.clone(),
    });
    let info = guard.info.clone();
    target.counters.sessions_total.fetch_add(1, Relaxed);
    target.counters.sessions_active.fetch_add(1, Relaxed);
    let _active = scopeguard(|| {
        target.counters.sessions_active.fetch_sub(1, Relaxed);
    });

    let param_refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let upstream = match upstream::connect(&target, &param_refs, minor, shared.max_message()).await
    {
        Ok(u) => u,
        Err(e) => {
            target.counters.errors.fetch_add(1, Relaxed);
            warn!(session = info.id, target = %target.config.name, "upstream: {e}");
            fatal(&client, e.sqlstate(), &e.to_string()).await;
            return Err(e.into());
        }
    };
    let cancel_key = shared.cancel.issue(
        upstream.minor,
        CancelTarget {
            target: target.clone(),
            backend_pid: upstream.backend_pid,
            backend_key: upstream.backend_key.clone(),
        },
    );

    // The client's startup is answered by the gateway: its own key, the server's parameters.
    let mut hello = Vec::with_capacity(upstream.relay.len() + 64);
    messages::encode_auth_ok(&mut hello);
    let (negotiate, rest) = split_negotiate(&upstream.relay);
    let mut out = Vec::with_capacity(hello.len() + upstream.relay.len() + 48);
    out.extend_from_slice(negotiate);
    out.extend_from_slice(&hello);
    let (params_part, ready) = rest.split_at(rest.len() - 6);
    out.extend_from_slice(params_part);
    messages::encode_backend_key_data(cancel_key.pid, &cancel_key.key, &mut out);
    out.extend_from_slice(ready);
    client.write_all(out).await.0?;
    info.set_state(SessionState::Idle);
    info!(
        session = info.id,
        client = %identity.client_addr,
        original_dst = %identity.original_dst,
        target = %target.config.name,
        agent = identity.peer.agent.as_deref().unwrap_or("-"),
        tls = upstream.stream.is_tls(),
        "session started"
    );

    let server = Rc::new(upstream.stream);
    let core = Rc::new(RefCell::new(Session::new(shared.max_message())));
    let masker = shared.masker();
    // Lineage needs the catalog: read it (or take a fresh shared snapshot) on this session's own
    // upstream connection before the agent's first byte goes through.
    let lineage = super::lineage::session_lineage(
        shared,
        &server,
        &masker,
        &target.config.name,
        &up.database,
        &up.user,
        info.id,
    )
    .await;
    if lineage.is_some() {
        core.borrow_mut().keep_statements();
    }
    let filter = MaskFilter::new(masker, lineage.clone());
    let gate = PolicyGate {
        lineage,
        shared: shared.clone(),
        session: info.id,
        agent: identity.peer.agent.clone(),
        pid: identity.peer.pid,
        target: target.config.name.clone(),
        database: up.database.clone(),
        held: None,
    };
    let ends = select(
        Box::pin(client_to_server(
            client.clone(),
            server.clone(),
            core.clone(),
            buf,
            info.clone(),
            gate,
        )),
        Box::pin(server_to_client(
            server.clone(),
            client.clone(),
            core.clone(),
            info.clone(),
            filter,
        )),
    )
    .await;
    let end = match ends {
        Either::Left((r, _)) | Either::Right((r, _)) => r,
    };
    info.set_state(SessionState::Closing);
    // Copied out: the core must not stay borrowed across the awaits below.
    let (queries, blocked, bytes_in, bytes_out) = {
        let c = core.borrow();
        (
            c.queries,
            c.blocked,
            c.from_client.bytes,
            c.from_server.bytes,
        )
    };
    target.counters.queries.fetch_add(queries, Relaxed);
    target.counters.blocked.fetch_add(blocked, Relaxed);
    target.counters.bytes_in.fetch_add(bytes_in, Relaxed);
    target.counters.bytes_out.fetch_add(bytes_out, Relaxed);
    match &end {
        Ok(End::ClientClosed) | Ok(End::Terminated) => {}
        Ok(End::ServerClosed { fatal_seen }) => {
            if !fatal_seen {
                fatal(
                    &client,
                    "08006",
                    "the upstream server closed the connection unexpectedly",
                )
                .await;
            }
        }
        Err(PumpError::Protocol(e)) => {
            target.counters.errors.fetch_add(1, Relaxed);
            let message = match e.side {
                Side::Client => format!("protocol violation: {}", e.reason),
                Side::Server => {
                    "the upstream server broke the protocol; the session is closed".to_owned()
                }
                Side::Gateway => format!("result refused by masking: {}", e.reason),
            };
            warn!(session = info.id, "{e}");
            let code = if e.side == Side::Gateway {
                "42501"
            } else {
                "08P01"
            };
            fatal(&client, code, &message).await;
            if e.side == Side::Client {
                drain_client(&client).await;
            }
        }
        Err(PumpError::Io(e)) => {
            target.counters.errors.fetch_add(1, Relaxed);
            debug!(session = info.id, "I/O: {e}");
        }
    }
    info!(
        session = info.id,
        queries, blocked, bytes_in, bytes_out, "session ended"
    );
    drop(guard);
    Ok(())
}

/// After refusing a client in the middle of what it is sending, reads and drops the rest for a
/// moment: closing with unread data resets the connection, and the client would lose the error.
async fn drain_client(client: &Stream) {
    use compio::io::AsyncWrite;
    let mut w = client.tcp();
    let _ = w.shutdown().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = Vec::with_capacity(super::conn::READ_CHUNK);
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

/// Splits a leading NegotiateProtocolVersion message off the relayed startup messages: it must
/// reach the client before AuthenticationOk.
fn split_negotiate(relay: &[u8]) -> (&[u8], &[u8]) {
    if relay.first() == Some(&b'v') && relay.len() >= 5 {
        let len = 1 + u32::from_be_bytes([relay[1], relay[2], relay[3], relay[4]]) as usize;
        if len <= relay.len() {
            return relay.split_at(len);
        }
    }
    (&[], relay)
}

enum End {
    ClientClosed,
    Terminated,
    ServerClosed { fatal_seen: bool },
}

#[derive(Debug, thiserror::Error)]
enum PumpError {
    #[error(transparent)]
    Protocol(#[from] SessionError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
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
    mut gate: PolicyGate,
) -> Result<End, PumpError> {
    let mut out = Output::default();
    loop {
        if !buf.is_empty() {
            let progress = core.borrow_mut().on_frontend(&buf, &mut gate, &mut out)?;
            let (r, b) = write_output(&server, buf, &mut out).await;
            buf = b;
            r?;
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
                    let outcome = hold(&client, &info, &mut gate).await?;
                    core.borrow_mut().resolve_hold(outcome);
                    // Process the held message again, now with its final answer.
                    continue;
                }
            }
        }
        let BufResult(n, b) = client.read(buf).await;
        buf = b;
        if n? == 0 {
            return Ok(End::ClientClosed);
        }
    }
}

/// Waits for an operator's decision on the statement the gate is holding. The client hears
/// that it is held, with the request id; earlier results keep flowing meanwhile.
async fn hold(
    client: &Stream,
    info: &SessionInfo,
    gate: &mut PolicyGate,
) -> Result<Disposition, PumpError> {
    let Some(held) = gate.held.take() else {
        return Ok(Disposition::Block(Blocked {
            rule: "internal".into(),
            reason: "held without an approval request".into(),
        }));
    };
    let mut notice = Vec::with_capacity(256);
    messages::encode_notice(
        "01000",
        &format!(
            "statement held for approval: request {} (rule \"{}\")",
            held.id, held.rule
        ),
        Some(&format!(
            "an operator decides with `portcullis approve {0}` or `portcullis deny {0}`",
            held.id
        )),
        &mut notice,
    );
    client.write_all(notice).await.0?;
    let previous = info.state();
    info.set_state(SessionState::Holding);
    let decision = held.decision.await;
    info.set_state(previous);
    info!(
        session = info.id,
        approval = held.id,
        ?decision,
        "approval decided"
    );
    Ok(PolicyGate::outcome(&held.rule, decision))
}

async fn server_to_client(
    server: Rc<Stream>,
    client: Rc<Stream>,
    core: Rc<RefCell<Session>>,
    info: Arc<SessionInfo>,
    mut filter: MaskFilter,
) -> Result<End, PumpError> {
    let mut buf = Vec::with_capacity(super::conn::READ_CHUNK);
    let mut out = Output::default();
    loop {
        let BufResult(n, b) = server.read(buf).await;
        buf = b;
        if n? == 0 {
            let fatal_seen = core.borrow().server_sent_fatal();
            return Ok(End::ServerClosed { fatal_seen });
        }
        let progress = core.borrow_mut().on_backend(&buf, &mut filter, &mut out)?;
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
    }
}

/// Runs `f` on drop.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
