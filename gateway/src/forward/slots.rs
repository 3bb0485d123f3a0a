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
    changed: Event,
}

impl UpstreamSlots {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Counts a session as waiting for a place (or a released connection) until the guard
    /// drops, however its wait ends.
    pub fn wait(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, AcqRel);
        Waiting(self)
    }

    /// Resolves when a place is freed or a connection is released to a pool.
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// A connection went back to a pool: every waiter looks at its own worker's.
    pub fn released(&self) {
        if self.waiting() > 0 {
            self.changed.notify(usize::MAX);
        }
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
        slots.changed.notify(1);
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
}

/// No place came free in time.
#[derive(Debug, Clone, Copy)]
pub struct AtCap {
    pub max: usize,
    pub waited: std::time::Duration,
}

/// A session counted in [`UpstreamSlots::waiting`] until it stops waiting.
pub struct Waiting<'a>(&'a UpstreamSlots);

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
