//! The per-worker classification cache, keyed by a text's shape where its class holds for every
//! text of that shape.

use foldhash::HashMapExt as _;

use super::shape::shape_key;
use super::*;

/// Bounded cache of classifications, owned by one worker thread (no locks). A statement is cached
/// by its shape (see `shape_key` in `shape.rs`) when its class holds for every text of that shape, so
/// `... WHERE id = 1` and `... WHERE id = 2` are classified once; otherwise by its exact text.
/// Eviction is CLOCK (second chance): a hit sets a bit, the hand clears bits until it finds an
/// entry not used since its last pass.
pub struct ClassifyCache {
    /// Exact texts and shape keys; a shape key starts with NUL, an exact text never does.
    index: foldhash::HashMap<Arc<str>, usize>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
    /// Reused for each request's shape key.
    shape: String,
    hits: u64,
    misses: u64,
}

struct Slot {
    key: Arc<str>,
    value: Arc<Classification>,
    referenced: bool,
}

/// Texts longer than this are classified every time instead of filling the cache.
pub const MAX_CACHED_TEXT: usize = 16 * 1024;

impl Default for ClassifyCache {
    fn default() -> Self {
        ClassifyCache::new(4096)
    }
}

impl ClassifyCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ClassifyCache {
            index: foldhash::HashMap::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            hand: 0,
            capacity,
            shape: String::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The classification of `sql`, from the cache or freshly computed.
    pub fn classify(&mut self, sql: &str) -> Arc<Classification> {
        // A leading NUL (never in a protocol text) could make an exact key look like a shape key.
        if sql.len() > MAX_CACHED_TEXT || sql.starts_with('\0') {
            self.misses += 1;
            return Arc::new(classify(sql));
        }
        let mut shape = std::mem::take(&mut self.shape);
        let shaped = shape_key(sql, &mut shape);
        let cached = if shaped {
            self.get(&shape).or_else(|| self.get(sql))
        } else {
            self.get(sql)
        };
        let value = cached.unwrap_or_else(|| {
            self.misses += 1;
            let value = Arc::new(classify(sql));
            let key = if shaped && value.holds_for_shape() {
                &shape
            } else {
                sql
            };
            self.insert(key, value.clone());
            value
        });
        self.shape = shape;
        value
    }

    fn get(&mut self, key: &str) -> Option<Arc<Classification>> {
        let &i = self.index.get(key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        self.hits += 1;
        Some(slot.value.clone())
    }

    fn insert(&mut self, key: &str, value: Arc<Classification>) {
        let key: Arc<str> = Arc::from(key);
        if self.slots.len() < self.capacity {
            self.index.insert(key.clone(), self.slots.len());
            self.slots.push(Slot {
                key,
                value,
                referenced: false,
            });
            return;
        }
        loop {
            let slot = &mut self.slots[self.hand];
            if slot.referenced {
                slot.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            self.index.remove(&slot.key);
            self.index.insert(key.clone(), self.hand);
            *slot = Slot {
                key,
                value,
                referenced: false,
            };
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// (hits, misses) since creation, for metrics.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}
