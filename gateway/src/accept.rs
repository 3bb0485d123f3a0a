//! Accept: the listeners, and where each connection was going. A connection the eBPF redirect
//! steered here is looked up in its maps; one it has no record of is refused, never guessed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::{Either, select};
use tracing::{error, warn};

use crate::daemon::Shared;
use crate::identify::Identity;

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
                        let r = r.clone();
                        compio::runtime::spawn(async move {
                            // Map lookups under a lock and /proc reads: on the blocking pool, so
                            // a connect storm never stalls this worker's accept loop or sessions.
                            match compio::runtime::spawn_blocking(move || r.lookup(peer)).await {
                                Ok(Ok(origin)) => {
                                    let identity = Identity::redirected(peer, origin);
                                    crate::pipeline::handle(tcp, identity, shared).await;
                                }
                                // No record of where it was going: refuse rather than guess.
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
