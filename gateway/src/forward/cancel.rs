//! Cancel keys. Clients get the gateway's own BackendKeyData; a CancelRequest, which arrives on a
//! new connection, is mapped back to the real backend here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngCore;

use crate::route::Target;

/// Where a cancel for one client-visible key goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub target: Arc<Target>,
    pub backend_pid: u32,
    pub backend_key: Vec<u8>,
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
                v.insert(to);
                return CancelKey {
                    map: self.clone(),
                    pid,
                    key,
                };
            }
        }
    }

    pub fn lookup(&self, pid: u32, key: &[u8]) -> Option<CancelTarget> {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, key.to_vec()))
            .cloned()
    }
}

/// A session's key; it stops working when the session ends.
pub struct CancelKey {
    map: Arc<CancelMap>,
    pub pid: u32,
    pub key: Vec<u8>,
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
