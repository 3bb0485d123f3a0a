//! The composition root: startup, config and policy load, shared state, reload on SIGHUP and
//! drain on SIGTERM. It builds the stages and hands each accepted connection to `accept`; the
//! admin API reads [`Shared`], and nothing on the data path reaches back in here.
//!
//! One compio (io_uring) runtime per worker thread, each with its own SO_REUSEPORT listener per
//! address, so no lock sits on the accept path; a worker that accepts while another serves fewer
//! sessions hands the connection over (`accept::Balancer`).

pub mod logging;
pub mod ticks;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{error, info, warn};

use crate::accept::{Arrival, bind_reuseport};
use crate::config::{Config, ServeArgs};
use crate::mask::{MaskRules, Masker};
use crate::metrics::Registry;
use crate::policy::Policy;
use crate::policy::approval::Approvals;
use crate::route::{Routes, Target};

/// State every worker and the admin API share.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub cancel: Arc<crate::forward::cancel::CancelMap>,
    routes: RwLock<Arc<Routes>>,
    config: RwLock<Arc<Config>>,
    policy: RwLock<(Arc<Policy>, Masker)>,
    /// Bumped by every reload that swaps the policy, so live sessions notice at no cost.
    policy_generation: AtomicU64,
    pub approvals: Arc<Approvals>,
    pub redirector: Option<Arc<crate::redirect::Redirector>>,
    pub started: Instant,
    pub draining: AtomicBool,
    /// Catalog snapshots for column lineage, shared by sessions.
    pub catalogs: crate::mask::lineage::CatalogCache,
    /// The recorder sessions record through (`[recording]`); a handle that records nothing when
    /// recording is turned off with `danger_disable`.
    pub recorder: crate::record::RecorderHandle,
    /// Agents' token files set with `--token-file` while the gateway runs.
    pub token_files: crate::identify::RuntimeTokenFiles,
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

    /// The masking rules of the policy in force: a session takes them when it starts, and again
    /// when [`Shared::masker_if_reloaded`] says a reload changed them.
    pub fn masker(&self) -> Masker {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The policy generation now, for [`Shared::masker_if_reloaded`].
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::Acquire)
    }

    /// The masker in force, if a reload swapped the policy since generation `*seen` (which is
    /// then brought up to date). One atomic load when nothing changed.
    pub fn masker_if_reloaded(&self, seen: &mut u64) -> Option<Masker> {
        let now = self.policy_generation();
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(self.masker())
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Every session holds two descriptors, and the usual soft limit (1024) would cap the gateway
/// near 500 sessions: the soft limit goes up to the hard one. Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
            warn!("cannot raise the open-file limit above {soft}: {e}");
            soft
        }
    }
}

/// `portcullis serve`. `admin` starts the admin API over the shared state; what it returns lives
/// until the daemon stops.
pub fn serve<A>(
    args: ServeArgs,
    admin: impl FnOnce(&Config, Arc<Shared>) -> anyhow::Result<A>,
) -> anyhow::Result<()> {
    let cfg = Config::from_args(&args)?;
    logging::init(cfg.log_format);
    let open_files = raise_open_file_limit();
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
    let approvals = Approvals::open_with_retention(&cfg.state_dir, cfg.approval_retention)?;
    // Recording starts before anything is served: no session runs unrecorded. Changes to
    // `[recording]` take effect at the next restart.
    let recorder = crate::record::Recorder::start(&cfg.recording, &cfg.state_dir)
        .with_context(|| format!("{}: [recording]", cfg.origin))?;

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
        policy_generation: AtomicU64::new(0),
        approvals,
        redirector,
        started: Instant::now(),
        catalogs: Default::default(),
        draining: AtomicBool::new(false),
        recorder: recorder.handle(),
        token_files: Default::default(),
    });
    // Signals are caught before the admin socket says the daemon is up, so a SIGTERM that
    // follows readiness at once still drains instead of killing the process.
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    let admin = admin(&cfg, shared.clone())?;

    let mut stops = Vec::new();
    let mut workers = Vec::new();
    let (balancer, handoffs) = crate::accept::Balancer::new(cfg.workers);
    for ((i, listeners), handoffs) in per_worker.into_iter().enumerate().zip(handoffs) {
        let (stop_tx, stop_rx) = futures_channel::oneshot::channel::<()>();
        stops.push(stop_tx);
        let shared = shared.clone();
        let balancer = balancer.clone();
        workers.push(
            std::thread::Builder::new()
                .name(format!("portcullis-io-{i}"))
                .spawn(move || {
                    let rt = match io_runtime() {
                        Ok(rt) => rt,
                        Err(e) => {
                            error!("worker {i}: cannot start an io_uring runtime: {e}");
                            std::process::exit(1);
                        }
                    };
                    rt.block_on(crate::accept::worker(
                        i, listeners, shared, balancer, handoffs, stop_rx,
                    ));
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
        open_files,
        "portcullis serving"
    );
    let service = crate::service::Service::start(&cfg, &shared)?;

    for sig in signals.forever() {
        if sig == libc::SIGHUP {
            service.reload(|| reload(&args, &shared));
            continue;
        }
        break;
    }
    // Drain: stop accepting, let sessions finish up to the deadline, then close the rest.
    service.stopping();
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
    // Commits what is queued and signs a last checkpoint.
    recorder.shutdown();
    info!("portcullis stopped");
    Ok(())
}

/// A worker's io_uring runtime. With COOP_TASKRUN the kernel runs the task work of a completion
/// (a socket became readable) when the worker next enters the kernel, instead of interrupting it
/// with an IPI wherever it runs; TASKRUN_FLAG tells the runtime when such work waits. Under
/// `pgbench -S -c 8` that took the gateway from about 37,800 to 40,000 TPS (`docs/benchmarks.md`).
/// Kernels before 5.19 refuse the flags: the runtime then starts without them.
pub fn io_runtime() -> std::io::Result<compio::runtime::Runtime> {
    compio::runtime::RuntimeBuilder::new()
        .with_proactor(io_ring())
        .build()
        .or_else(|e| {
            let plain = compio::runtime::Runtime::new()?;
            info!("io_uring without COOP_TASKRUN (this kernel refused it: {e})");
            Ok(plain)
        })
}

/// The ring settings of [`io_runtime`], for a tool that measures the workers' runtime with
/// settings of its own on top.
pub fn io_ring() -> compio::driver::ProactorBuilder {
    let mut ring = compio::driver::ProactorBuilder::new();
    ring.coop_taskrun(true).taskrun_flag(true);
    ring
}

/// SIGHUP: re-read the configuration, credentials and policy. Live sessions decide their next
/// statement by the new policy and mask their next result by its rules; their upstream
/// connection stays as it was opened.
fn reload(args: &ServeArgs, shared: &Shared) -> anyhow::Result<()> {
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
        shared.policy_generation.fetch_add(1, Ordering::AcqRel);
        *shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
        Ok(())
    });
    match &result {
        Ok(()) => info!("configuration reloaded"),
        Err(e) => error!("reload failed, keeping the running configuration: {e:#}"),
    }
    result
}

/// Loads a policy and compiles its `[mask]` table; any error names the policy and the key.
pub(crate) fn load_policy(name_or_path: &str) -> anyhow::Result<(Arc<Policy>, Masker)> {
    let policy = crate::policy::load(name_or_path).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let rules = MaskRules::from_policy(&policy)
        .map_err(|e| anyhow::anyhow!("policy {}: [mask]: {e}", policy.source()))?;
    let masker = Masker::new(&rules)
        .map_err(|e| anyhow::anyhow!("policy {}: [mask]: {e}", policy.source()))?;
    Ok((Arc::new(policy), masker))
}
