//! Periodic upkeep on the io_uring workers without a timer on their runtimes.
//!
//! While any timer is pending, a compio runtime reads the clock twice per turn of its loop,
//! splits its timer map, and bounds each io_uring wait with a kernel timer: an upkeep task
//! sleeping on the worker would add that to every query the worker serves. One thread keeps the
//! time instead, and an upkeep task waits for its tick as it would for any other event.

use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use futures_channel::mpsc;
use futures_util::StreamExt;
use tracing::error;

/// A task's ticks, one per period; a tick not yet taken is not doubled up.
pub struct Ticks(mpsc::Receiver<()>);

impl Ticks {
    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        if self.0.next().await.is_none() {
            // The ticker never drops a subscriber whose receiver lives.
            std::future::pending::<()>().await;
        }
    }
}

struct Subscriber {
    every: Duration,
    due: Instant,
    tx: mpsc::Sender<()>,
}

static SUBSCRIBERS: Mutex<Vec<Subscriber>> = Mutex::new(Vec::new());
/// Wakes the ticker when a subscriber joins, which may be due before the ticker's next wake.
static JOINED: Condvar = Condvar::new();
static TICKER: Once = Once::new();

/// Ticks every `period`, the first one `period` from now.
pub fn every(period: Duration) -> Ticks {
    let (tx, rx) = mpsc::channel(0);
    lock().push(Subscriber {
        every: period,
        due: Instant::now() + period,
        tx,
    });
    JOINED.notify_one();
    TICKER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("portcullis-ticks".into())
            .spawn(tick_forever);
        if let Err(e) = spawned {
            // Without ticks the pool is not swept and the watchdog goes unfed, so systemd
            // restarts the gateway: visible, not silent.
            error!("cannot start the upkeep ticker thread: {e}");
        }
    });
    Ticks(rx)
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Subscriber>> {
    SUBSCRIBERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn tick_forever() {
    let mut subscribers = lock();
    loop {
        let now = Instant::now();
        subscribers.retain_mut(|s| {
            if s.due > now {
                return true;
            }
            // A late tick is not followed by a burst of catch-up ticks.
            s.due = (s.due + s.every).max(now + s.every / 2);
            match s.tx.try_send(()) {
                Ok(()) => true,
                Err(e) => e.is_full(),
            }
        });
        let next = subscribers.iter().map(|s| s.due).min();
        let wait = next.map_or(Duration::from_secs(3600), |due| {
            due.saturating_duration_since(Instant::now())
        });
        subscribers = JOINED
            .wait_timeout(subscribers, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_come_once_per_period_and_never_early() {
        let started = Instant::now();
        let mut slow = every(Duration::from_millis(300));
        let mut fast = every(Duration::from_millis(20));
        compio::runtime::Runtime::new().unwrap().block_on(async {
            for n in 1..=3 {
                fast.tick().await;
                assert!(started.elapsed() >= Duration::from_millis(20) * n);
            }
            slow.tick().await;
            assert!(started.elapsed() >= Duration::from_millis(300));
        });
    }
}
