//! Accept: the listeners, and where each connection was going. A connection the eBPF redirect
//! steered here is looked up in its maps; one it has no record of is refused, never guessed.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures_channel::{mpsc as async_mpsc, oneshot};
use futures_util::StreamExt;
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

/// Spreads sessions over the workers by how many each serves. Every worker accepts on its own
/// SO_REUSEPORT listener, but the kernel picks that listener by a hash of the addresses, not by
/// load: of 8 connections, two workers get 6 and 2 or worse in 29% of tries, and the busy one
/// sets the pace. So a worker that accepts a connection while another serves fewer sessions
/// hands it over, as HAProxy gives each connection to its least-loaded thread.
pub struct Balancer {
    workers: Vec<Worker>,
}

struct Worker {
    live: AtomicUsize,
    handoffs: async_mpsc::UnboundedSender<Handoff>,
}

/// A connection one worker accepted for another to serve.
pub struct Handoff {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    arrival: Arrival,
    seat: Seat,
}

/// One session counted against a worker, until its task ends.
pub struct Seat {
    balancer: Arc<Balancer>,
    worker: usize,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.balancer.workers[self.worker]
            .live
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer for `n` workers, and the queue each worker takes its hand-offs from.
    pub fn new(n: usize) -> (Arc<Self>, Vec<async_mpsc::UnboundedReceiver<Handoff>>) {
        let (workers, queues) = (0..n)
            .map(|_| {
                let (tx, rx) = async_mpsc::unbounded();
                let worker = Worker {
                    live: AtomicUsize::new(0),
                    handoffs: tx,
                };
                (worker, rx)
            })
            .unzip();
        (Arc::new(Self { workers }), queues)
    }

    /// A seat for a connection worker `me` accepted: on `me` unless another worker serves fewer
    /// sessions. Two workers choosing at once may both pick the same one; the next accept evens it.
    fn seat(self: &Arc<Self>, me: usize) -> Seat {
        let load = |i: usize| self.workers[i].live.load(Ordering::Relaxed);
        let mine = load(me);
        let (least, fewest) = (0..self.workers.len())
            .map(|i| (i, load(i)))
            .min_by_key(|&(i, n)| (n, i != me))
            .unwrap_or((me, mine));
        let worker = if fewest < mine { least } else { me };
        self.workers[worker].live.fetch_add(1, Ordering::Relaxed);
        Seat {
            balancer: self.clone(),
            worker,
        }
    }

    /// A seat on worker `me`, whatever the others serve: for a connection that cannot move.
    fn seat_on(self: &Arc<Self>, me: usize) -> Seat {
        self.workers[me].live.fetch_add(1, Ordering::Relaxed);
        Seat {
            balancer: self.clone(),
            worker: me,
        }
    }

    /// Sends a connection to the worker its seat is on; gives it back if that worker has stopped.
    fn hand_off(&self, handoff: Handoff) -> Result<(), Handoff> {
        self.workers[handoff.seat.worker]
            .handoffs
            .unbounded_send(handoff)
            .map_err(|e| e.into_inner())
    }
}

thread_local! {
    static CURRENT_WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the worker this thread runs; 0 off the workers.
pub fn current_worker() -> usize {
    CURRENT_WORKER.get()
}

/// One worker thread's accept loops, one per listener, until `stop`. Each accepted connection
/// becomes a session task on this runtime, or on the worker the balancer seats it on.
pub async fn worker(
    me: usize,
    listeners: Vec<(SocketAddr, std::net::TcpListener, Arrival)>,
    shared: Arc<Shared>,
    balancer: Arc<Balancer>,
    mut handoffs: async_mpsc::UnboundedReceiver<Handoff>,
    stop: futures_channel::oneshot::Receiver<()>,
) {
    CURRENT_WORKER.set(me);
    let stop = futures_util::future::FutureExt::shared(stop);
    compio::runtime::spawn(crate::service::watchdog::heartbeat()).detach();
    compio::runtime::spawn(crate::forward::pool::maintain(shared.clone())).detach();
    let handed_shared = shared.clone();
    compio::runtime::spawn(async move {
        while let Some(h) = handoffs.next().await {
            match compio::net::TcpStream::from_std(h.tcp) {
                Ok(tcp) => serve(tcp, h.peer, h.addr, &h.arrival, &handed_shared, h.seat),
                Err(e) => warn!(client = %h.peer, "dropping a handed-over connection: {e}"),
            }
        }
    })
    .detach();
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
        let balancer = balancer.clone();
        let stop = stop.clone();
        accepts.push(compio::runtime::spawn(accept_loop(
            me, listener, addr, arrival, shared, balancer, stop,
        )));
    }
    for a in accepts {
        let _ = a.await;
    }
    // Sessions keep running on this runtime until the process exits after the drain.
    futures_util::future::pending::<()>().await;
}

async fn accept_loop<S>(
    me: usize,
    listener: compio::net::TcpListener,
    addr: SocketAddr,
    arrival: Arrival,
    shared: Arc<Shared>,
    balancer: Arc<Balancer>,
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
                let mut seat = balancer.seat(me);
                if seat.worker != me {
                    // A duplicate of the descriptor crosses threads; this runtime closes its own.
                    match tcp.as_fd().try_clone_to_owned() {
                        Ok(fd) => {
                            let handoff = Handoff {
                                tcp: fd.into(),
                                peer,
                                addr,
                                arrival: arrival.clone(),
                                seat,
                            };
                            if balancer.hand_off(handoff).is_ok() {
                                continue;
                            }
                            // That worker has stopped (the daemon is exiting): serve it here.
                        }
                        Err(e) => {
                            warn!(client = %peer, "cannot hand a connection to another worker, serving it here: {e}");
                        }
                    }
                    seat = balancer.seat_on(me);
                }
                serve(tcp, peer, addr, &arrival, &shared, seat);
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("accept on {addr}: {e}");
                compio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Starts a connection's session task on this runtime, once it is known where it was going.
fn serve(
    tcp: compio::net::TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    arrival: &Arrival,
    shared: &Arc<Shared>,
    seat: Seat,
) {
    let shared = shared.clone();
    match arrival {
        Arrival::Explicit => {
            let identity = Identity::explicit(peer, addr);
            compio::runtime::spawn(async move {
                let _seat = seat;
                crate::pipeline::handle(tcp, identity, shared).await;
            })
            .detach();
        }
        Arrival::Redirected(r) => {
            let (reply, answer) = oneshot::channel();
            match lookups().try_send((r.clone(), peer, reply)) {
                Ok(()) => {
                    compio::runtime::spawn(async move {
                        let _seat = seat;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(b: &Balancer) -> Vec<usize> {
        b.workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_accepted_on_one_worker_spread_over_all() {
        let (b, _queues) = Balancer::new(3);
        let seats: Vec<Seat> = (0..9).map(|_| b.seat(0)).collect();
        assert_eq!(loads(&b), [3, 3, 3]);
        // When all are even, the accepting worker keeps the connection: no needless hand-off.
        assert_eq!(seats[0].worker, 0);
        let kept = b.seat(1);
        assert_eq!(kept.worker, 1);
        assert_eq!(loads(&b), [3, 4, 3]);
    }

    #[test]
    fn ended_sessions_free_their_worker_for_the_next_ones() {
        let (b, _queues) = Balancer::new(2);
        let mut seats: Vec<Seat> = (0..6).map(|_| b.seat(1)).collect();
        assert_eq!(loads(&b), [3, 3]);
        seats.retain(|s| s.worker == 1);
        assert_eq!(loads(&b), [0, 3]);
        let next: Vec<usize> = (0..4).map(|_| b.seat(1).worker).collect();
        // Each seat drops at once, so worker 0 stays the emptiest.
        assert_eq!(next, [0, 0, 0, 0]);
        let _held: Vec<Seat> = (0..4).map(|_| b.seat(1)).collect();
        assert_eq!(loads(&b), [3, 4]);
    }

    #[test]
    fn a_handoff_to_a_stopped_worker_comes_back() {
        let (b, mut queues) = Balancer::new(2);
        drop(queues.pop());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let peer = tcp.local_addr().unwrap();
        let handoff = Handoff {
            tcp,
            peer,
            addr: listener.local_addr().unwrap(),
            arrival: Arrival::Explicit,
            seat: b.seat_on(1),
        };
        let back = b.hand_off(handoff).expect_err("worker 1 has stopped");
        assert_eq!(back.peer, peer);
    }
}
