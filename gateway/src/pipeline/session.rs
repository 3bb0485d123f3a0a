//! The two pumps around a protocol's sans-IO session core: client bytes through the gate
//! (decide) to the server, server bytes through the filter (mask) to the client. Input is written
//! on straight from the read buffer; only what the core rewrote comes from its scratch.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use compio::BufResult;
use compio::buf::IoBuf;
use futures_util::future::{Either, select};
use tracing::info;

use super::gate::PolicyGate;
use super::mask_filter::MaskFilter;
use crate::forward::conn::{self, Stream};
use crate::metrics::{SessionInfo, SessionState};
use crate::protocol::postgres::messages;
use crate::protocol::postgres::session::{
    Blocked, Core, Disposition, Output, Progress, Seg, Session, SessionError,
};

/// Runs both pumps until one side ends the session.
pub async fn pump(
    client: Rc<Stream>,
    server: Rc<Stream>,
    core: Rc<RefCell<Session>>,
    pending: Vec<u8>,
    info: Arc<SessionInfo>,
    gate: PolicyGate,
    filter: MaskFilter,
) -> Result<End, PumpError> {
    let ends = select(
        Box::pin(client_to_server(
            client.clone(),
            server.clone(),
            core.clone(),
            pending,
            info.clone(),
            gate,
        )),
        Box::pin(server_to_client(server, client, core, info, filter)),
    )
    .await;
    match ends {
        Either::Left((r, _)) | Either::Right((r, _)) => r,
    }
}

pub enum End {
    ClientClosed,
    Terminated,
    ServerClosed { fatal_seen: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
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
            let progress = core.borrow_mut().on_client(&buf, &mut gate, &mut out)?;
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
    let mut buf = Vec::with_capacity(conn::READ_CHUNK);
    let mut out = Output::default();
    loop {
        let BufResult(n, b) = server.read(buf).await;
        buf = b;
        if n? == 0 {
            let fatal_seen = core.borrow().server_sent_fatal();
            return Ok(End::ServerClosed { fatal_seen });
        }
        let progress = core.borrow_mut().on_server(&buf, &mut filter, &mut out)?;
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
