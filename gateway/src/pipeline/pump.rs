//! The two pumps around a protocol's sans-IO core, for every protocol: client bytes through the
//! gate (decide) to the server, server bytes through the filter (mask) and the tap (record) to
//! the client. Input is written on straight from the read buffer; only what the core rewrote
//! comes from its scratch. The pumps are generic over the protocol's [`Driver`], so each protocol
//! gets its own monomorphised copy: nothing on the per-message path goes through a `dyn Core`.
//!
//! What only the protocol knows (its startup, the upstream connect, cancel, how an error or a
//! notice is framed) stays in its driver, `postgres.rs` for PostgreSQL.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use compio::BufResult;
use compio::buf::IoBuf;
use futures_util::future::{Either, select};
use tracing::{info, warn};

use super::gate::{Held, PolicyGate};
use super::record::{RecordGate, ResponseTap};
use crate::daemon::Shared;
use crate::error::{Side, WireError};
use crate::forward::conn::Stream;
use crate::idp::NotRenewed;
use crate::mask::Masker;
use crate::metrics::{SessionInfo, SessionState};
use crate::policy::approval::Decision;
use crate::protocol::core::{Blocked, Core, Disposition, Output, Progress, Seg, Transaction};
use crate::route::Target;

/// What the pumps need from a protocol beyond its core: how the gateway's own messages are framed
/// on its wire, and how its result filter is reached. Everything else protocol-specific (the
/// client's startup, the upstream connect and auth, cancel) happens before the pumps start, in
/// the driver's module.
pub trait Driver {
    /// The protocol's session core after startup.
    type Core: Core<Error: WireError>;
    /// The masking stage as the server→client pump owns it.
    type Filter;

    /// The hook the core runs results through.
    fn filter(filter: &mut Self::Filter) -> &mut <Self::Core as Core>::Filter;

    /// A reload's masking rules: the result in flight keeps its plan, the next one uses these.
    fn reload(filter: &mut Self::Filter, masker: Masker);

    /// Appends the error that ends the session, with its SQLSTATE (PostgreSQL: a FATAL
    /// ErrorResponse).
    fn encode_fatal(code: &str, message: &str, out: &mut Vec<u8>);

    /// Appends a notice the client reads without its request failing (PostgreSQL: a
    /// NoticeResponse).
    fn encode_notice(code: &str, message: &str, detail: Option<&str>, out: &mut Vec<u8>);
}

/// Refuses the client with the protocol's fatal error; the caller then closes.
pub async fn refuse<D: Driver>(client: &Stream, code: &str, message: &str) {
    let mut out = Vec::with_capacity(64 + message.len());
    D::encode_fatal(code, message, &mut out);
    crate::service::metrics::error_sent(code);
    let _ = client.write_all(out).await;
}

/// Refuses the client for `e`, whichever layer it comes from: the one place an error becomes
/// what the client reads (its SQLSTATE, and a message that carries no secret and none of the
/// upstream's own bytes).
pub async fn refuse_error<D: Driver>(client: &Stream, e: &(dyn WireError + '_)) {
    refuse::<D>(client, e.sqlstate(), &e.client_message()).await;
}

/// Runs both pumps until one side ends the session.
#[expect(
    clippy::too_many_arguments,
    reason = "the session's parts, each handed to the pump that owns it"
)]
pub async fn pump<D: Driver>(
    client: Rc<Stream>,
    server: Rc<Stream>,
    core: Rc<RefCell<D::Core>>,
    pending: Vec<u8>,
    info: Arc<SessionInfo>,
    gate: RecordGate,
    results: (D::Filter, ResponseTap),
    reloads: (Arc<Shared>, u64),
) -> Result<End, PumpError<<D::Core as Core>::Error>> {
    let idle_timeout = reloads.0.config().idle_timeout;
    let killer = info.clone();
    let pumps = select(
        Box::pin(client_to_server::<D>(
            client.clone(),
            server.clone(),
            core.clone(),
            pending,
            info.clone(),
            gate,
            idle_timeout,
        )),
        Box::pin(server_to_client::<D>(
            server, client, core, info, results, reloads,
        )),
    );
    // `portcullis sessions kill` ends the session wherever it is, even held for approval.
    match select(pumps, Box::pin(killer.kill.pulled())).await {
        Either::Left((Either::Left((r, _)) | Either::Right((r, _)), _)) => r,
        Either::Right((by, _)) => Ok(End::Killed { by }),
    }
}

/// How a session ended without an error: the driver reports it to the client in its protocol
/// ([`report_end`]), the recording in words ([`end_reason`]).
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
pub fn end_reason<E: WireError>(end: &Result<End, PumpError<E>>) -> String {
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
        Err(PumpError::Identity(e)) => format!("identity: {}", e.0),
    }
}

/// Why the pumps stopped other than by an ending of the session's own.
#[derive(Debug, thiserror::Error)]
pub enum PumpError<E> {
    /// The core's error: a peer broke the protocol, or a result could not be passed.
    #[error(transparent)]
    Protocol(E),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The session's token expired and no fresh identity could be had: the session ends.
    #[error(transparent)]
    Identity(NotRenewed),
}

impl<E> From<crate::idp::IdentityError> for PumpError<E> {
    fn from(e: crate::idp::IdentityError) -> Self {
        PumpError::Identity(NotRenewed(e))
    }
}

/// Tells the client why the session ended, when it ended on the gateway's or the server's side.
pub async fn report_end<D: Driver>(
    client: &Stream,
    end: &Result<End, PumpError<<D::Core as Core>::Error>>,
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
            refuse::<D>(client, "57P05", &message).await;
        }
        Ok(End::Killed { by }) => {
            let message = format!(
                "terminating connection due to administrator command: session killed by {by} \
                 with `portcullis sessions kill`"
            );
            refuse::<D>(client, "57P01", &message).await;
        }
        Ok(End::ServerClosed { fatal_seen }) => {
            if !fatal_seen {
                refuse::<D>(
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
            refuse_error::<D>(client, e).await;
            if e.side() == Side::Client {
                drain_client(client).await;
            }
        }
        Err(PumpError::Io(e)) => {
            target.counters.errors.fetch_add(1, Relaxed);
            tracing::debug!(session = info.id, "I/O: {e}");
        }
        Err(PumpError::Identity(e)) => {
            warn!(
                session = info.id,
                check = e.0.check(),
                "session ended: {}",
                e.0
            );
            refuse_error::<D>(client, e).await;
        }
    }
}

/// After refusing a client in the middle of what it is sending, reads and drops the rest for a
/// moment: closing with unread data resets the connection, and the client would lose the error.
pub async fn drain_client(client: &Stream) {
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

/// Writes one call's output: input ranges straight from the read buffer, the rest from scratch.
/// Returns the buffers for reuse.
async fn write_output(
    to: &Stream,
    mut buf: Vec<u8>,
    out: &mut Output,
) -> (std::io::Result<()>, Vec<u8>) {
    // Rows rewritten between untouched ones cut the output into many small pieces, each a write
    // of its own. Rewritten to the same length (the `partial` style), they go back over the
    // rows they replace, and the output is one range of the read buffer; otherwise, past a
    // couple of pieces, one gathered write is far cheaper than the copies it costs.
    if out.segments().len() > 2 {
        if let Some(r) = out.patch_into(&mut buf) {
            out.clear();
            let BufResult(res, slice) = to.write_all(buf.slice(r)).await;
            return (res, compio::buf::IntoInner::into_inner(slice));
        }
        let mut gathered = Vec::new();
        out.gather(&buf, &mut gathered);
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

async fn client_to_server<D: Driver>(
    client: Rc<Stream>,
    server: Rc<Stream>,
    core: Rc<RefCell<D::Core>>,
    mut buf: Vec<u8>,
    info: Arc<SessionInfo>,
    mut gate: RecordGate,
    idle_timeout: Option<std::time::Duration>,
) -> Result<End, PumpError<<D::Core as Core>::Error>> {
    let mut out = Output::default();
    loop {
        if !buf.is_empty() {
            let started = std::time::Instant::now();
            let progress = core
                .borrow_mut()
                .on_client(&buf, &mut gate, &mut out)
                .map_err(PumpError::Protocol)?;
            let (r, b) = write_output(&server, buf, &mut out).await;
            buf = b;
            r?;
            crate::service::metrics::statement_overhead(started.elapsed());
            let from_client = core.borrow().client_traffic();
            info.messages_in.store(from_client.messages, Relaxed);
            info.bytes_in.store(from_client.bytes, Relaxed);
            match progress {
                Progress::Continue { consumed } => {
                    buf.drain(..consumed);
                }
                Progress::Terminate { .. } => return Ok(End::Terminated),
                Progress::Hold { consumed } => {
                    buf.drain(..consumed);
                    let outcome = settle::<D>(&client, &info, &mut gate).await?;
                    core.borrow_mut().resolve_hold(outcome);
                    // Process the held message again, now with its final answer.
                    continue;
                }
            }
        }
        let idle = core.borrow().idle();
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
async fn settle<D: Driver>(
    client: &Stream,
    info: &SessionInfo,
    gate: &mut RecordGate,
) -> Result<Disposition, PumpError<<D::Core as Core>::Error>> {
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
    let (outcome, approver) = hold::<D>(client, info, &mut gate.policy, &said).await?;
    Ok(gate.settled(outcome, approver))
}

/// Waits for what the gate is holding the statement for: its verdict from the classifier
/// thread, then, if it needs one, an operator's decision. The client hears that it is held for
/// approval, with the request id; earlier results keep flowing meanwhile. Returns the outcome,
/// and who approved it.
async fn hold<D: Driver>(
    client: &Stream,
    info: &SessionInfo,
    gate: &mut PolicyGate,
    said: &super::record::Said,
) -> Result<(Disposition, Option<String>), PumpError<<D::Core as Core>::Error>> {
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
                // Dropping `decision` withdraws the request.
                if let Err(refused) = said.held_for_approval(id, &rule) {
                    break refused;
                }
                let mut notice = Vec::with_capacity(256);
                D::encode_notice(
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
) -> std::io::Result<F::Output> {
    let mut f = std::pin::pin!(f);
    loop {
        match select(f.as_mut(), Box::pin(compio::time::sleep(HELD_CLIENT_CHECK))).await {
            Either::Left((v, _)) => return Ok(v),
            Either::Right(_) => {
                if client_gone(client) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the client disconnected while its statement was held",
                    ));
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

async fn server_to_client<D: Driver>(
    server: Rc<Stream>,
    client: Rc<Stream>,
    core: Rc<RefCell<D::Core>>,
    info: Arc<SessionInfo>,
    (mut filter, mut tap): (D::Filter, ResponseTap),
    (shared, mut generation): (Arc<Shared>, u64),
) -> Result<End, PumpError<<D::Core as Core>::Error>> {
    let mut buf = Vec::new();
    let mut out = Output::default();
    loop {
        let BufResult(n, b) = server.read(buf).await;
        buf = b;
        if n? == 0 {
            let fatal_seen = core.borrow().server_sent_fatal();
            return Ok(End::ServerClosed { fatal_seen });
        }
        // A drained leg's first read is small, to keep idle sessions light. When it came back
        // full and cut a message, the server owes the rest and most of it is likely waiting:
        // one more read now spares a pass through the core and a send of a sliver.
        if server.last_read_filled() && core.borrow().server_owes_more(&buf) {
            let BufResult(more, b) = server.read(buf).await;
            buf = b;
            more?;
        }
        // A reload reaches this session at its next result, not only new sessions.
        if let Some(masker) = shared.masker_if_reloaded(&mut generation) {
            D::reload(&mut filter, masker);
        }
        let progress = core
            .borrow_mut()
            .on_server(&buf, D::filter(&mut filter), &mut out)
            .map_err(PumpError::Protocol)?;
        // Record: exactly what goes to the client, after masking.
        tap.written(&buf, &out);
        let (r, b) = write_output(&client, buf, &mut out).await;
        buf = b;
        r?;
        {
            let c = core.borrow();
            let from_server = c.server_traffic();
            info.messages_out.store(from_server.messages, Relaxed);
            info.bytes_out.store(from_server.bytes, Relaxed);
            info.set_state(match c.transaction() {
                Transaction::Open => SessionState::InTransaction,
                Transaction::Failed => SessionState::FailedTransaction,
                Transaction::Idle => SessionState::Idle,
            });
        }
        if let Progress::Continue { consumed } = progress {
            buf.drain(..consumed);
        }
        tap.keep_pace().await;
    }
}
