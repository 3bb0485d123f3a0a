//! Running under a service manager: systemd readiness and reload notifications, the watchdog
//! fed by every io_uring worker, the Prometheus endpoint, and `portcullis doctor`.
//!
//! `serve()` calls in at three points: [`Service::start`] once everything is bound, loaded and
//! attached; [`Service::reload`] around each SIGHUP reload; [`Service::stopping`] when it drains.
//! Outside systemd (no `NOTIFY_SOCKET`) every notification is a no-op.

pub mod doctor;
pub mod metrics;
pub mod watchdog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sd_notify::NotifyState;
use serde::Deserialize;
use tracing::warn;

use crate::config::Config;
use crate::daemon::Shared;

/// `[metrics]`: the Prometheus endpoint. Off unless `listen` is set; reloads need a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving Prometheus text at `/metrics`, e.g. "127.0.0.1:9477". Default: none.
    pub listen: Option<SocketAddr>,
}

/// Where `portcullis reload` reads what the last SIGHUP did: one line, `<n> ok` or
/// `<n> failed: <error>`, under the runtime directory systemd gives the service.
pub fn reload_status_path(admin_socket: &std::path::Path) -> PathBuf {
    admin_socket.with_file_name("last-reload")
}

pub struct Service {
    shared: Arc<Shared>,
    reload_file: PathBuf,
    last_reload: Mutex<(u64, String)>,
    _metrics: Option<metrics::Endpoint>,
}

impl Service {
    /// Serves `/metrics`, starts the watchdog, and tells systemd the gateway is ready. Called only
    /// once listeners are bound, policy and credentials loaded, and eBPF programs attached.
    pub fn start(cfg: &Config, shared: &Arc<Shared>) -> anyhow::Result<Arc<Service>> {
        let endpoint = match cfg.metrics.listen {
            Some(addr) => Some(metrics::Endpoint::start(addr, shared.clone())?),
            None => None,
        };
        let service = Arc::new(Service {
            shared: shared.clone(),
            reload_file: reload_status_path(&cfg.admin_socket),
            last_reload: Mutex::new((0, "none yet".into())),
            _metrics: endpoint,
        });
        service.write_reload_status();
        notify(&[NotifyState::Ready, NotifyState::Status(&service.status())]);
        watchdog::start(cfg.workers, service.clone());
        Ok(service)
    }

    /// Runs one reload between `RELOADING=1` and `READY=1`, so `systemctl reload` waits for it,
    /// and records the outcome where `portcullis reload` (the unit's ExecReload) reads it.
    pub fn reload(&self, reload: impl FnOnce() -> anyhow::Result<()>) {
        notify(&[NotifyState::Reloading]);
        let result = reload();
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
            let at = humantime::format_rfc3339_seconds(SystemTime::now());
            last.0 += 1;
            last.1 = match &result {
                Ok(()) => format!("ok at {at}"),
                Err(e) => format!("failed at {at}: {}", one_line(&format!("{e:#}"))),
            };
        }
        metrics::reload(result.is_ok());
        self.write_reload_status();
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status())]);
    }

    /// The drain has begun: systemd shows it and stops waiting for watchdog pings.
    pub fn stopping(&self) {
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status(&format!(
                "draining {} sessions",
                self.shared.registry.live()
            )),
        ]);
    }

    /// The `STATUS=` line `systemctl status` shows.
    pub fn status(&self) -> String {
        let last = self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "serving {} sessions; last reload: {}",
            self.shared.registry.live(),
            last.1
        )
    }

    fn write_reload_status(&self) {
        let line = {
            let last = self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
            format!("{} {}\n", last.0, last.1)
        };
        if let Err(e) = std::fs::write(&self.reload_file, line) {
            warn!("cannot write {}: {e}", self.reload_file.display());
        }
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify systemd: {e}");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// `portcullis reload`: what the unit's `ExecReload=` runs. Sends SIGHUP to the gateway and waits
/// for the outcome, so a broken config fails `systemctl reload` with the gateway's own message
/// while the running configuration keeps serving.
pub fn reload_command(
    pid: i32,
    status_file: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let generation = |text: &str| {
        text.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
    };
    let before = std::fs::read_to_string(status_file)
        .ok()
        .and_then(|t| generation(&t))
        .unwrap_or(0);
    // SAFETY: kill with a pid and a signal number has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        anyhow::bail!(
            "cannot signal the gateway (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(status_file)
            && generation(&text).is_some_and(|g| g > before)
        {
            let outcome = text.trim().split_once(' ').map_or("", |(_, o)| o);
            if outcome.starts_with("ok") {
                println!("reloaded: {outcome}");
                return Ok(());
            }
            anyhow::bail!("reload {outcome}; the running configuration keeps serving");
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the gateway did not report a reload within {timeout:?} (watching {})",
                status_file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
