//! Cancel keys. Clients get the gateway's own BackendKeyData; a CancelRequest, which arrives on a
//! new connection, is mapped back to the real backend here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::RngCore;

use crate::route::Target;

/// Where a cancel for one client-visible key goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub target: Arc<Target>,
    pub backend_pid: u32,
    pub backend_key: Vec<u8>,
    /// Cancels for this session being forwarded now: a pooled connection is not handed to
    /// another session while one may still land.
    pub in_flight: Arc<AtomicUsize>,
}

/// A cancel being forwarded; counted in its session's `in_flight` until dropped.
pub struct Forwarding(CancelTarget);

impl std::ops::Deref for Forwarding {
    type Target = CancelTarget;
    fn deref(&self) -> &CancelTarget {
        &self.0
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
pub struct CancelMap {
    keys: Mutex<HashMap<(u32, Vec<u8>), CancelTarget>>,
}

impl CancelMap {
    /// Issues a fresh (pid, key) for a session. Protocol 3.2 clients get a 32-byte key; 3.0
    /// clients can only take 4 bytes.
    pub fn issue(self: &Arc<Self>, minor: u16, to: CancelTarget) -> CancelKey {
        let mut rng = rand::thread_rng();
        let len = if minor >= 2 { 32 } else { 4 };
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rng.next_u32() & 0x7fff_ffff;
            let mut key = vec![0; len];
            rng.fill_bytes(&mut key);
            if let std::collections::hash_map::Entry::Vacant(v) = keys.entry((pid, key.clone())) {
                let in_flight = to.in_flight.clone();
                v.insert(to);
                return CancelKey {
                    map: self.clone(),
                    pid,
                    key,
                    in_flight,
                };
            }
        }
    }

    /// The session a cancel is for, counted as in flight until the result is dropped. Counted
    /// under the lock, so once a session's key is gone no cancel can be counted for it anew.
    pub fn lookup(&self, pid: u32, key: &[u8]) -> Option<Forwarding> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let to = keys.get(&(pid, key.to_vec()))?.clone();
        to.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Forwarding(to))
    }
}

/// A session's key; it stops working when the session ends.
pub struct CancelKey {
    map: Arc<CancelMap>,
    pub pid: u32,
    pub key: Vec<u8>,
    in_flight: Arc<AtomicUsize>,
}

impl CancelKey {
    /// Ends the key; true when no cancel for it is still being forwarded, so none can land on
    /// the backend after this.
    pub fn retire(self) -> bool {
        let in_flight = self.in_flight.clone();
        drop(self);
        in_flight.load(Ordering::Acquire) == 0
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        self.map
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.pid, std::mem::take(&mut self.key)));
    }
}
