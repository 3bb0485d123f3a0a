//! `max_upstream_connections`: a target's upstream connections open at once, busy and idle, over
//! every I/O worker. A connection holds its [`Slot`] from before it is dialled until it closes,
//! in a session or idle in a pool, so the count is the connections PostgreSQL sees from the
//! gateway for that target (cancel requests aside).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};

use event_listener::Event;

use crate::metrics::TargetCounters;

/// One target's count, kept with its counters so that it outlives reloads: connections opened
/// before a reload keep their place.
#[derive(Debug, Default)]
pub struct UpstreamSlots {
    open: AtomicUsize,
    /// Sessions waiting for a place now; each worker's pool closes idle connections of the
    /// target while there are any.
    waiting: AtomicUsize,
    freed: Event,
}

impl UpstreamSlots {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// One place more, unless `max` are taken.
    fn try_take(&self, max: Option<usize>) -> bool {
        let mut open = self.open.load(Relaxed);
        loop {
            if max.is_some_and(|m| open >= m) {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(open, open + 1, AcqRel, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => open = now,
            }
        }
    }
}

/// An upstream connection's place under its target's cap; dropping it frees the place.
#[derive(Debug)]
pub struct Slot(Arc<TargetCounters>);

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.0.upstream;
        slots.open.fetch_sub(1, AcqRel);
        slots.freed.notify(1);
    }
}

impl Slot {
    /// A place at once, or `None` at `max`.
    pub fn try_take(counters: &Arc<TargetCounters>, max: Option<usize>) -> Option<Slot> {
        counters
            .upstream
            .try_take(max)
            .then(|| Slot(counters.clone()))
    }

    /// A place, waiting while `max` are taken, for as long as `wait` lasts. While it waits the
    /// target counts it in [`UpstreamSlots::waiting`], which the pools' sweeps read.
    pub async fn take(
        counters: &Arc<TargetCounters>,
        max: Option<usize>,
        wait: std::time::Duration,
    ) -> Result<Slot, AtCap> {
        if let Some(slot) = Slot::try_take(counters, max) {
            return Ok(slot);
        }
        let slots = &counters.upstream;
        let _waiting = Waiting::start(slots);
        let deadline = std::time::Instant::now() + wait;
        loop {
            let freed = slots.freed.listen();
            if let Some(slot) = Slot::try_take(counters, max) {
                return Ok(slot);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || compio::time::timeout(left, freed).await.is_err() {
                return Err(AtCap {
                    max: max.unwrap_or(0),
                    waited: wait,
                });
            }
        }
    }
}

/// No place came free in time.
#[derive(Debug, Clone, Copy)]
pub struct AtCap {
    pub max: usize,
    pub waited: std::time::Duration,
}

/// A session counted in [`UpstreamSlots::waiting`] until it stops waiting, however that ends
/// (its task dropped included).
struct Waiting<'a>(&'a UpstreamSlots);

impl<'a> Waiting<'a> {
    fn start(slots: &'a UpstreamSlots) -> Waiting<'a> {
        slots.waiting.fetch_add(1, AcqRel);
        Waiting(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_and_freed() {
        let counters = Arc::new(TargetCounters::default());
        let a = Slot::try_take(&counters, Some(2)).unwrap();
        let b = Slot::try_take(&counters, Some(2)).unwrap();
        assert!(Slot::try_take(&counters, Some(2)).is_none());
        assert_eq!(counters.upstream.open(), 2);
        drop(a);
        let c = Slot::try_take(&counters, Some(2)).unwrap();
        assert!(Slot::try_take(&counters, None).is_some(), "no cap");
        drop((b, c));
        assert_eq!(counters.upstream.open(), 0);
    }
}
