//! The systemd watchdog, fed only while every io_uring worker is alive.
//!
//! Each worker runs [`heartbeat`] on its own runtime: a task that stamps the time at each tick
//! (from the ticker thread, not a timer on the worker's runtime). A worker stuck in a blocking
//! call or a busy loop stops stamping; the watchdog thread then stops sending `WATCHDOG=1`, and
//! systemd restarts the service (`WatchdogSec=`, `Restart=on-failure`). The pinned eBPF programs
//! keep agents fenced in meanwhile.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::error;

use super::Service;

/// Test hook: when this variable names a file and that file appears, the first worker deletes it
/// and blocks its thread for good, as a wedged worker would. Never set it in production.
pub const DANGER_TEST_WEDGE_ENV: &str = "PORTCULLIS_DANGER_TEST_WEDGE";

/// How often `STATUS=` is refreshed when there is no watchdog to pace it.
const STATUS_EVERY: Duration = Duration::from_secs(5);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
/// One stamp (milliseconds since [`EPOCH`]) per worker, in the order they started beating.
static BEATS: Mutex<Vec<Arc<AtomicU64>>> = Mutex::new(Vec::new());

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// How often workers stamp and the watchdog checks: a quarter of systemd's timeout, so a ping
/// goes out well within it.
fn period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|t| (t / 4).max(Duration::from_millis(50)))
}

/// Runs on each worker's runtime for as long as the worker lives.
pub async fn heartbeat() {
    let Some(period) = period() else { return };
    let beat = Arc::new(AtomicU64::new(now_ms()));
    let slot = {
        let mut beats = BEATS.lock().unwrap_or_else(|e| e.into_inner());
        beats.push(beat.clone());
        beats.len() - 1
    };
    let wedge = std::env::var_os(DANGER_TEST_WEDGE_ENV).filter(|_| slot == 0);
    let mut ticks = crate::daemon::ticks::every(period);
    loop {
        beat.store(now_ms(), Relaxed);
        if let Some(path) = &wedge
            && std::fs::remove_file(path).is_ok()
        {
            error!("{DANGER_TEST_WEDGE_ENV}: wedging worker {slot} on purpose");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        ticks.tick().await;
    }
}

/// The worker whose last stamp is older than `stale`, or that never stamped at all.
fn stuck_worker(workers: usize, stale: Duration) -> Option<(usize, Duration)> {
    let beats = BEATS.lock().unwrap_or_else(|e| e.into_inner());
    let now = now_ms();
    (0..workers).find_map(|i| match beats.get(i) {
        Some(b) => {
            let age = Duration::from_millis(now.saturating_sub(b.load(Relaxed)));
            (age > stale).then_some((i, age))
        }
        None => Some((i, Duration::MAX)),
    })
}

/// Pings systemd while all `workers` beat, and refreshes `STATUS=`.
pub fn start(workers: usize, service: Arc<Service>) {
    let period = period();
    let spawned = std::thread::Builder::new()
        .name("portcullis-watchdog".into())
        .spawn(move || {
            let mut reported = false;
            loop {
                std::thread::sleep(period.unwrap_or(STATUS_EVERY));
                let status = service.status();
                let Some(period) = period else {
                    super::notify(&[NotifyState::Status(&status)]);
                    continue;
                };
                // Two missed stamps: stuck, not merely late. Workers get a grace period to start.
                match stuck_worker(workers, period * 2) {
                    None => {
                        reported = false;
                        super::notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                    }
                    Some((i, age)) if !reported => {
                        reported = true;
                        error!(
                            worker = i,
                            "io_uring worker {i} has not run for {age:?}; withholding the watchdog ping so systemd restarts the gateway"
                        );
                    }
                    Some(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        error!("cannot start the watchdog thread: {e}");
    }
}
