//! `max_upstream_connections`: a target's upstream connections open at once, busy and idle, over
//! every I/O worker. A connection holds its [`Slot`] from before it is dialled until it closes,
//! in a session or idle in a pool, so the count is the connections PostgreSQL sees from the
//! gateway for that target (cancel requests aside).
//!
//! Sessions that find the target at its cap queue. While none has waited long, a connection
//! released to a pool goes to a waiting session of its key on its worker, and a freed place to
//! whichever waiter takes it first: handing a warm connection on is what keeps a burst fast.
//! Once the longest waiter has waited a second (or half its queue timeout), it goes first: no
//! other session takes a place or an idle connection, and connections released that it cannot
//! use are closed to make room for it. So one agent's burst of sessions cannot keep another
//! agent's session, of another pool key or on another worker, out until its
//! `upstream_queue_timeout`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use event_listener::Event;

use crate::metrics::TargetCounters;

/// How long the longest waiter waits before it goes first: a second, or half the queue timeout
/// when that is shorter.
fn first_after(queue_timeout: Duration) -> Duration {
    (queue_timeout / 2).min(Duration::from_secs(1))
}

/// One target's count, kept with its counters so that it outlives reloads: connections opened
/// before a reload keep their place.
#[derive(Debug, Default)]
pub struct UpstreamSlots {
    open: AtomicUsize,
    /// Sessions waiting for a place or a released connection, oldest first.
    queue: Mutex<VecDeque<Waiter>>,
    tickets: AtomicU64,
    changed: Event,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    since: Instant,
    /// What it can use: a connection of this pool key ([`crate::forward::pool::Key::id`]) on
    /// this worker.
    key: u64,
    worker: ThreadId,
}

/// The longest waiter, once it has waited long enough to go first.
#[derive(Debug, Clone, Copy)]
pub struct Overdue {
    ticket: u64,
    key: u64,
    worker: ThreadId,
}

impl Overdue {
    /// Whether a connection of pool key `key` released on this thread's worker can serve it.
    pub fn can_use(&self, key: u64) -> bool {
        self.key == key && self.worker == std::thread::current().id()
    }
}

impl UpstreamSlots {
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.queue().len()
    }

    /// How long the longest waiter has waited; zero when none waits.
    pub fn longest_wait(&self) -> Duration {
        self.queue()
            .front()
            .map_or(Duration::ZERO, |w| w.since.elapsed())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        // The queue is consistent after every push and removal; a panic elsewhere leaves it so.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a session of pool key `key` on this thread's worker until the guard drops,
    /// however its wait ends.
    pub fn wait(&self, key: u64) -> Waiting<'_> {
        let ticket = self.tickets.fetch_add(1, Relaxed);
        self.queue().push_back(Waiter {
            ticket,
            since: Instant::now(),
            key,
            worker: std::thread::current().id(),
        });
        Waiting {
            slots: self,
            ticket,
        }
    }

    /// The longest waiter, if it has waited long enough to go first under `queue_timeout`.
    pub fn overdue(&self, queue_timeout: Duration) -> Option<Overdue> {
        let queue = self.queue();
        let head = queue.front()?;
        (head.since.elapsed() >= first_after(queue_timeout)).then_some(Overdue {
            ticket: head.ticket,
            key: head.key,
            worker: head.worker,
        })
    }

    /// Resolves when a place is freed, a connection is released to a pool, or a waiter leaves.
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// Something a waiter may take came free, or the order changed: every waiter looks again.
    pub fn released(&self) {
        self.changed.notify(usize::MAX);
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
        slots.released();
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

/// A session in its target's queue until it stops waiting.
pub struct Waiting<'a> {
    slots: &'a UpstreamSlots,
    ticket: u64,
}

impl Waiting<'_> {
    /// Whether this session may take a place or an idle connection now: no other session has
    /// waited long enough to go first under `queue_timeout`.
    pub fn may_take(&self, queue_timeout: Duration) -> bool {
        self.slots
            .overdue(queue_timeout)
            .is_none_or(|head| head.ticket == self.ticket)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut queue = self.slots.queue();
        let was_head = queue.front().is_some_and(|w| w.ticket == self.ticket);
        queue.retain(|w| w.ticket != self.ticket);
        drop(queue);
        if was_head {
            self.slots.released();
        }
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

    #[test]
    fn the_longest_waiter_goes_first_once_overdue() {
        let slots = UpstreamSlots::default();
        let first = slots.wait(7);
        let second = slots.wait(8);
        let long = Duration::from_secs(3600);
        assert!(slots.overdue(long).is_none());
        assert!(
            first.may_take(long) && second.may_take(long),
            "none overdue yet"
        );
        let head = slots.overdue(Duration::ZERO).expect("the first is overdue");
        assert!(head.can_use(7) && !head.can_use(8));
        assert!(first.may_take(Duration::ZERO));
        assert!(
            !second.may_take(Duration::ZERO),
            "the second waits its turn"
        );
        drop(first);
        assert!(second.may_take(Duration::ZERO));
        assert_eq!(slots.waiting(), 1);
        drop(second);
        assert_eq!(slots.waiting(), 0);
    }

    #[test]
    fn first_after_is_a_second_or_half_the_queue_timeout() {
        assert_eq!(first_after(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(
            first_after(Duration::from_millis(600)),
            Duration::from_millis(300)
        );
    }
}
