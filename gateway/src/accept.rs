//! Accept: the listeners, and where each connection was going. A connection the eBPF redirect
//! steered here is looked up in its maps; one it has no record of is refused, never guessed.

use std::net::SocketAddr;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures_channel::oneshot;
use futures_util::future::{Either, select};
use tracing::{error, warn};

use crate::daemon::Shared;
use crate::identify::Identity;
use crate::redirect::{LookupError, Origin, Redirector};

/// Threads that answer redirect lookups (a map lookup under the maps' lock, then /proc reads).
const LOOKUP_THREADS: usize = 2;

/// Lookups that may wait for those threads; past it a redirected connection is refused. compio's
/// blocking pool, used before, grows to 256 threads and then spins the submitting I/O worker
/// until one frees up: under a connect storm the lookups ran on, and stalled, the hot path.
pub const LOOKUP_QUEUE: usize = 4096;

type LookupJob = (
    Arc<Redirector>,
    SocketAddr,
    oneshot::Sender<Result<Origin, LookupError>>,
);

/// The queue to the lookup threads, started on first use.
fn lookups() -> &'static SyncSender<LookupJob> {
    static QUEUE: OnceLock<SyncSender<LookupJob>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<LookupJob>(LOOKUP_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..LOOKUP_THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("redirect-lookup-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok((redirector, peer, reply)) = job else {
                            return;
                        };
                        let _ = reply.send(redirector.lookup(peer));
                    }
                });
            // Without its threads the queue fills and connections are refused: fail closed.
            if let Err(e) = spawned {
                error!("cannot start a redirect lookup thread: {e}");
            }
        }
        tx
    })
}

/// A listening socket that every worker binds to the same address: the kernel spreads accepts.
pub fn bind_reuseport(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding listener {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// How connections reach a listener, and so how the gateway learns their original destination.
#[derive(Clone)]
pub enum Arrival {
    /// Dialled directly: the original destination is the listener's own address.
    Explicit,
    /// Steered here by the eBPF programs, which recorded where the agent was going.
    Redirected(Arc<crate::redirect::Redirector>),
}

/// One worker thread's accept loops, one per listener, until `stop`; each accepted connection is
/// identified and becomes a session task on this runtime.
pub async fn worker(
    listeners: Vec<(SocketAddr, std::net::TcpListener, Arrival)>,
    shared: Arc<Shared>,
    stop: futures_channel::oneshot::Receiver<()>,
) {
    let stop = futures_util::future::FutureExt::shared(stop);
    compio::runtime::spawn(crate::service::watchdog::heartbeat()).detach();
    compio::runtime::spawn(crate::forward::pool::maintain(shared.clone())).detach();
    let mut accepts = Vec::new();
    for (addr, std_listener, arrival) in listeners {
        let listener = match compio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                error!("listener {addr}: {e}");
                continue;
            }
        };
        let shared = shared.clone();
        let stop = stop.clone();
        accepts.push(compio::runtime::spawn(accept_loop(
            listener, addr, arrival, shared, stop,
        )));
    }
    for a in accepts {
        let _ = a.await;
    }
    // Sessions keep running on this runtime until the process exits after the drain.
    futures_util::future::pending::<()>().await;
}

async fn accept_loop<S>(
    listener: compio::net::TcpListener,
    addr: SocketAddr,
    arrival: Arrival,
    shared: Arc<Shared>,
    mut stop: S,
) where
    S: std::future::Future + Unpin,
{
    loop {
        let accepted = match select(Box::pin(listener.accept()), &mut stop).await {
            Either::Left((r, _)) => r,
            Either::Right(_) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let shared = shared.clone();
                match &arrival {
                    Arrival::Explicit => {
                        let identity = Identity::explicit(peer, addr);
                        compio::runtime::spawn(crate::pipeline::handle(tcp, identity, shared))
                            .detach();
                    }
                    Arrival::Redirected(r) => {
                        let (reply, answer) = oneshot::channel();
                        match lookups().try_send((r.clone(), peer, reply)) {
                            Ok(()) => {
                                compio::runtime::spawn(async move {
                                    match answer.await {
                                        Ok(Ok(origin)) => {
                                            let identity = Identity::redirected(peer, origin);
                                            crate::pipeline::handle(tcp, identity, shared).await;
                                        }
                                        // No record of where it was going: refuse, never guess.
                                        Ok(Err(e)) => {
                                            warn!(client = %peer, "refusing a redirected connection: {e}");
                                        }
                                        Err(_) => {
                                            warn!(client = %peer, "refusing a redirected connection: the lookup failed");
                                        }
                                    }
                                })
                                .detach();
                            }
                            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                                warn!(client = %peer, "refusing a redirected connection: {LOOKUP_QUEUE} redirect lookups are already waiting");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("accept on {addr}: {e}");
                compio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
