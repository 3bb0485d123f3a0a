//! The IdP's signing keys: cached, refreshed when a token names an unknown `kid` (at most once
//! per `min_refresh`, one fetch at a time), and kept when a refresh fails.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;

use super::IdentityError;

pub struct KeyStore {
    state: Mutex<State>,
    fetched: Condvar,
    min_refresh: Duration,
    max_age: Duration,
}

#[derive(Default)]
struct State {
    /// The last set that loaded.
    keys: Option<Arc<Vec<Jwk>>>,
    loaded_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    in_flight: bool,
    /// Bumped after every fetch, so waiters know one finished.
    generation: u64,
}

/// Why the caller wants keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Any current set (refreshed when older than `max_age`).
    Current,
    /// The set does not hold the token's `kid`: refresh unless one ran within `min_refresh`.
    UnknownKid,
}

impl KeyStore {
    pub fn new(min_refresh: Duration, max_age: Duration) -> KeyStore {
        KeyStore {
            state: Mutex::new(State::default()),
            fetched: Condvar::new(),
            min_refresh,
            max_age,
        }
    }

    /// The key set, fetching it with `fetch` when needed. Concurrent callers share one fetch;
    /// a failed fetch leaves the last good set in place.
    pub fn keys(
        &self,
        need: Need,
        now: Instant,
        fetch: impl FnOnce() -> Result<Vec<Jwk>, IdentityError>,
    ) -> Result<Arc<Vec<Jwk>>, IdentityError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.in_flight {
            let seen = st.generation;
            while st.in_flight && st.generation == seen {
                st = self.fetched.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            return current(&st);
        }
        let stale = st
            .loaded_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.max_age);
        let wanted = need == Need::UnknownKid || stale;
        let allowed = st
            .last_attempt
            .is_none_or(|t| now.saturating_duration_since(t) >= self.min_refresh);
        if !(wanted && allowed) {
            return current(&st);
        }
        st.in_flight = true;
        st.last_attempt = Some(now);
        drop(st);
        let result = fetch();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(keys) => {
                st.keys = Some(Arc::new(keys));
                st.loaded_at = Some(now);
                st.last_error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set");
                st.last_error = Some(e.to_string());
            }
        }
        st.in_flight = false;
        st.generation += 1;
        self.fetched.notify_all();
        current(&st)
    }
}

fn current(st: &State) -> Result<Arc<Vec<Jwk>>, IdentityError> {
    st.keys.clone().ok_or_else(|| {
        IdentityError::NoJwks(
            st.last_error
                .clone()
                .unwrap_or_else(|| "no fetch has been allowed yet".into()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn set(kid: &str) -> Vec<Jwk> {
        super::super::validate::parse_jwks(
            format!(r#"{{"keys":[{{"kty":"RSA","kid":"{kid}","n":"AQAB","e":"AQAB"}}]}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn kid(keys: &[Jwk]) -> &str {
        keys[0].common.key_id.as_deref().unwrap()
    }

    #[test]
    fn unknown_kid_refreshes_at_most_once_per_interval_and_keeps_the_last_good_set() {
        let store = KeyStore::new(Duration::from_secs(10), Duration::from_secs(3600));
        let t0 = Instant::now();
        let fail = || -> Result<Vec<Jwk>, IdentityError> {
            Err(IdentityError::IdpUnreachable {
                what: "JWKS",
                reason: "connection refused".into(),
            })
        };
        let e = store.keys(Need::Current, t0, fail).unwrap_err();
        assert_eq!(e.check(), "no_jwks");
        assert!(e.to_string().contains("connection refused"), "{e}");
        // Within the interval nothing is fetched, even after a failure.
        let e = store
            .keys(Need::UnknownKid, t0 + Duration::from_secs(1), || {
                panic!("rate limit ignored")
            })
            .unwrap_err();
        assert_eq!(e.check(), "no_jwks");
        let k = store
            .keys(Need::Current, t0 + Duration::from_secs(10), || Ok(set("a")))
            .unwrap();
        assert_eq!(kid(&k), "a");
        // A current set is not refetched for `Current`.
        let k = store
            .keys(Need::Current, t0 + Duration::from_secs(30), || {
                panic!("refetched")
            })
            .unwrap();
        assert_eq!(kid(&k), "a");
        // A failed refresh keeps the old set.
        let k = store
            .keys(Need::UnknownKid, t0 + Duration::from_secs(40), fail)
            .unwrap();
        assert_eq!(kid(&k), "a");
        let k = store
            .keys(Need::UnknownKid, t0 + Duration::from_secs(45), || {
                Ok(set("b"))
            })
            .unwrap();
        assert_eq!(kid(&k), "a", "refresh within 10 s of the last attempt");
        let k = store
            .keys(Need::UnknownKid, t0 + Duration::from_secs(50), || {
                Ok(set("b"))
            })
            .unwrap();
        assert_eq!(kid(&k), "b");
        // max_age forces a refresh of a set nobody complained about.
        let k = store
            .keys(Need::Current, t0 + Duration::from_secs(3650), || {
                Ok(set("c"))
            })
            .unwrap();
        assert_eq!(kid(&k), "c");
    }

    #[test]
    fn concurrent_callers_share_one_fetch() {
        // A long min_refresh: a thread that arrives after the fetch gets the loaded set without
        // fetching, and one that arrives during it gets keys only by waiting for that fetch, so
        // exactly one fetch happens however the threads are scheduled.
        let store = Arc::new(KeyStore::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ));
        let fetches = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, fetches, barrier) = (store.clone(), fetches.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store
                        .keys(Need::UnknownKid, Instant::now(), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(200));
                            Ok(set("a"))
                        })
                        .map(|k| kid(&k).to_owned())
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), "a");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }
}
