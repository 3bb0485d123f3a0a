//! The I/O driver: the only code that touches sockets.
//!
//! One compio (io_uring) runtime per worker thread, each with its own SO_REUSEPORT listener per
//! address, so the kernel spreads connections and no lock sits on the accept path. Every session
//! is a task on one runtime; a slow session only waits on its own sockets.

pub mod cancel;
pub mod conn;
pub mod gate;
pub mod lineage;
pub mod mask_filter;
pub mod session;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::{Either, select};
use tracing::{error, info, warn};

use crate::config::{Config, ServeArgs};
use crate::identify::Identity;
use crate::mask::{MaskRules, Masker};
use crate::metrics::Registry;
use crate::policy::Policy;
use crate::policy::approval::Approvals;
use crate::route::{Routes, Target};

/// State every worker and the admin API share.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub cancel: Arc<cancel::CancelMap>,
    routes: RwLock<Arc<Routes>>,
    config: RwLock<Arc<Config>>,
    policy: RwLock<(Arc<Policy>, Masker)>,
    pub approvals: Arc<Approvals>,
    pub redirector: Option<Arc<crate::redirect::Redirector>>,
    pub started: Instant,
    pub draining: AtomicBool,
    /// Catalog snapshots for column lineage, shared by sessions.
    pub catalogs: crate::mask::lineage::CatalogCache,
}

impl Shared {
    pub fn route(&self, original_dst: SocketAddr) -> Option<Arc<Target>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .route(original_dst)
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn max_message(&self) -> usize {
        self.config().max_message_bytes
    }

    /// The policy in force now. A session takes it per request, so a reload applies to the next
    /// statement; a statement already held keeps the verdict it got.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The masking rules of the policy in force: a session takes them when it starts.
    pub fn masker(&self) -> Masker {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// `portcullis serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = Config::from_args(&args)?;
    crate::admin::logging::init(cfg.log_format);
    let registry = Arc::new(Registry::default());
    let routes =
        Routes::build(&cfg, &registry).with_context(|| format!("loading {}", cfg.origin))?;
    if cfg.listeners.is_empty() && !cfg.redirect.enabled {
        anyhow::bail!(
            "{}: no [[listener]] is configured and [redirect] is off, so there is nothing to serve",
            cfg.origin
        );
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state dir {}", cfg.state_dir.display()))?;
    let policy = load_policy(&cfg.policy)?;
    let approvals = Approvals::open(&cfg.state_dir)?;

    // Bind everything before starting anything, so a busy port is one clear error.
    let mut per_worker: Vec<Vec<(SocketAddr, std::net::TcpListener, Arrival)>> =
        (0..cfg.workers).map(|_| Vec::new()).collect();
    for l in &cfg.listeners {
        for worker in per_worker.iter_mut() {
            worker.push((l.listen, bind_reuseport(l.listen)?, Arrival::Explicit));
        }
    }
    // Interception: the programs steer agents' connects to these listeners, and the maps say
    // where each was going. Pinned, so a crash or restart of the gateway keeps agents fenced in.
    let redirector = if cfg.redirect.enabled {
        let r = Arc::new(
            crate::redirect::Redirector::start(&cfg.redirect, &routes.protected())
                .context("starting the eBPF redirect")?,
        );
        for addr in std::iter::once(cfg.redirect.listen).chain(cfg.redirect.listen_v6) {
            for worker in per_worker.iter_mut() {
                worker.push((addr, bind_reuseport(addr)?, Arrival::Redirected(r.clone())));
            }
        }
        Some(r)
    } else {
        None
    };

    let shared = Arc::new(Shared {
        registry,
        cancel: Arc::default(),
        routes: RwLock::new(Arc::new(routes)),
        config: RwLock::new(Arc::new(cfg.clone())),
        policy: RwLock::new(policy),
        approvals,
        redirector,
        started: Instant::now(),
        catalogs: Default::default(),
        draining: AtomicBool::new(false),
    });
    let admin = crate::admin::server::start(&cfg, shared.clone())?;

    let mut stops = Vec::new();
    let mut workers = Vec::new();
    for (i, listeners) in per_worker.into_iter().enumerate() {
        let (stop_tx, stop_rx) = futures_channel::oneshot::channel::<()>();
        stops.push(stop_tx);
        let shared = shared.clone();
        workers.push(
            std::thread::Builder::new()
                .name(format!("portcullis-io-{i}"))
                .spawn(move || {
                    let rt = match compio::runtime::Runtime::new() {
                        Ok(rt) => rt,
                        Err(e) => {
                            error!("worker {i}: cannot start an io_uring runtime: {e}");
                            std::process::exit(1);
                        }
                    };
                    rt.block_on(worker(listeners, shared, stop_rx));
                })?,
        );
    }
    let addrs: Vec<String> = cfg.listeners.iter().map(|l| l.listen.to_string()).collect();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %cfg.origin,
        workers = cfg.workers,
        listeners = %addrs.join(","),
        policy = %shared.policy().source(),
        admin = %cfg.admin_socket.display(),
        "portcullis serving"
    );

    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    for sig in signals.forever() {
        if sig == libc::SIGHUP {
            reload(&args, &shared);
            continue;
        }
        break;
    }
    // Drain: stop accepting, let sessions finish up to the deadline, then close the rest.
    shared.draining.store(true, Ordering::Relaxed);
    for s in stops {
        let _ = s.send(());
    }
    let deadline = Instant::now() + shared.config().drain_timeout;
    info!(sessions = shared.registry.live(), deadline = ?shared.config().drain_timeout, "draining");
    while shared.registry.live() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = shared.registry.live();
    if left > 0 {
        warn!(
            sessions = left,
            "drain deadline passed; closing the remaining sessions"
        );
    }
    drop(admin);
    info!("portcullis stopped");
    Ok(())
}

/// SIGHUP: re-read the configuration and credentials; live sessions keep what they started with.
fn reload(args: &ServeArgs, shared: &Shared) {
    let result = Config::from_args(args).and_then(|cfg| {
        let routes = Routes::build(&cfg, &shared.registry)
            .with_context(|| format!("loading {}", cfg.origin))?;
        let policy = load_policy(&cfg.policy)?;
        let old = shared.config();
        if old.listeners != cfg.listeners {
            warn!("listener changes take effect at the next restart");
        }
        if let Some(r) = &shared.redirector {
            r.update_targets(&routes.protected())
                .context("updating the eBPF protected targets")?;
        }
        *shared.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        *shared.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        *shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
        Ok(())
    });
    match result {
        Ok(()) => info!("configuration reloaded"),
        Err(e) => error!("reload failed, keeping the running configuration: {e:#}"),
    }
}

/// Loads a policy and compiles its `[mask]` table; any error names the policy and the key.
pub(crate) fn load_policy(name_or_path: &str) -> anyhow::Result<(Arc<Policy>, Masker)> {
    use serde::Deserialize;
    let policy = crate::policy::load(name_or_path).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let rules = MaskRules::deserialize(toml::Value::Table(policy.mask_table().clone()))
        .map_err(|e| anyhow::anyhow!("policy {}: [mask]: {e}", policy.source()))?;
    let masker = Masker::new(&rules)
        .map_err(|e| anyhow::anyhow!("policy {}: [mask]: {e}", policy.source()))?;
    Ok((Arc::new(policy), masker))
}

fn bind_reuseport(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
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
enum Arrival {
    /// Dialled directly: the original destination is the listener's own address.
    Explicit,
    /// Steered here by the eBPF programs, which recorded where the agent was going.
    Redirected(Arc<crate::redirect::Redirector>),
}

async fn worker(
    listeners: Vec<(SocketAddr, std::net::TcpListener, Arrival)>,
    shared: Arc<Shared>,
    stop: futures_channel::oneshot::Receiver<()>,
) {
    let stop = futures_util::future::FutureExt::shared(stop);
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
                let identity = match &arrival {
                    Arrival::Explicit => Identity::explicit(peer, addr),
                    Arrival::Redirected(r) => match r.lookup(peer) {
                        Ok(origin) => Identity::redirected(peer, origin),
                        Err(e) => {
                            // No record of where it was going: refuse rather than guess.
                            warn!(client = %peer, "refusing a redirected connection: {e}");
                            drop(tcp);
                            continue;
                        }
                    },
                };
                compio::runtime::spawn(session::handle(tcp, identity, shared.clone())).detach();
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("accept on {addr}: {e}");
                compio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
