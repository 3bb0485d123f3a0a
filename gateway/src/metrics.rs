//! Counters per target and the registry of live sessions, shared by the data path (writers) and
//! the admin API (reader). Plain atomics: the data path never takes a lock to count.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::Serialize;

use crate::identify::Peer;

/// Counters for one target, ready for a metrics endpoint.
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub sessions_total: AtomicU64,
    pub sessions_active: AtomicU64,
    pub queries: AtomicU64,
    pub blocked: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    pub pool: PoolCounters,
    /// Upstream connections open now, against `max_upstream_connections`.
    pub upstream: crate::forward::slots::UpstreamSlots,
}

/// What a target's warm upstream connections (`[target.pool]`) did, over all I/O workers.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Idle connections kept now.
    pub idle: AtomicU64,
    /// Sessions that took a warm connection.
    pub reused: AtomicU64,
    /// Sessions of a pooled target that found none (or none passed its check) and dialled.
    pub dialed: AtomicU64,
    /// Connections dialled ahead of any session, for `min_idle`.
    pub dialed_ahead: AtomicU64,
    closed: [AtomicU64; PoolClose::ALL.len()],
}

/// Why a connection left the pool, or never went back to it, other than being taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolClose {
    /// Past `idle_timeout` or `max_lifetime`.
    Expired,
    /// Beyond `max_idle_per_key`.
    Surplus,
    /// The server closed it or spoke while it sat idle (a restart, a terminated backend).
    Gone,
    /// It failed the check before reuse: `SELECT 1` after `health_check_after`, or setting the
    /// new client's parameters.
    CheckFailed,
    /// Its reset after a session (`ROLLBACK`, `DISCARD ALL`, the role's `SET ROLE`) failed.
    ResetFailed,
    /// Its session did not end at rest (mid-statement, mid-COPY, killed, a pending cancel, an
    /// error), so it was closed without a reset.
    NotAtRest,
    /// A reload turned pooling off for its target, moved the target's upstream or removed it.
    Disabled,
    /// Closed to make room for a session waiting at the target's `max_upstream_connections`.
    Shed,
}

impl PoolClose {
    pub const ALL: [PoolClose; 8] = [
        PoolClose::Expired,
        PoolClose::Surplus,
        PoolClose::Gone,
        PoolClose::CheckFailed,
        PoolClose::ResetFailed,
        PoolClose::NotAtRest,
        PoolClose::Disabled,
        PoolClose::Shed,
    ];

    /// The name in `portcullis status` and the `reason` label of `portcullis_pool_closed_total`.
    pub fn name(self) -> &'static str {
        match self {
            PoolClose::Expired => "expired",
            PoolClose::Surplus => "surplus",
            PoolClose::Gone => "gone",
            PoolClose::CheckFailed => "check_failed",
            PoolClose::ResetFailed => "reset_failed",
            PoolClose::NotAtRest => "not_at_rest",
            PoolClose::Disabled => "disabled",
            PoolClose::Shed => "shed",
        }
    }
}

impl PoolCounters {
    pub fn closed(&self, why: PoolClose, n: u64) {
        self.closed[why as usize].fetch_add(n, Relaxed);
    }

    fn snapshot(&self) -> PoolSnapshot {
        PoolSnapshot {
            idle: self.idle.load(Relaxed),
            reused: self.reused.load(Relaxed),
            dialed: self.dialed.load(Relaxed),
            dialed_ahead: self.dialed_ahead.load(Relaxed),
            closed: PoolClose::ALL
                .iter()
                .map(|&why| {
                    (
                        why.name().to_owned(),
                        self.closed[why as usize].load(Relaxed),
                    )
                })
                .collect(),
        }
    }
}

#[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub idle: u64,
    pub reused: u64,
    pub dialed: u64,
    pub dialed_ahead: u64,
    /// By reason ([`PoolClose::name`]), every reason listed.
    pub closed: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TargetSnapshot {
    pub target: String,
    pub sessions_total: u64,
    pub sessions_active: u64,
    pub queries: u64,
    pub blocked: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    /// Whether the target pools upstream connections now; `pool` counts since the gateway
    /// started.
    #[serde(default)]
    pub pool_enabled: bool,
    #[serde(default)]
    pub pool: PoolSnapshot,
    /// Upstream connections open now (busy and idle), the target's `max_upstream_connections`,
    /// the sessions waiting at it, and how long the longest of them has waited.
    #[serde(default)]
    pub upstream_open: u64,
    #[serde(default)]
    pub upstream_max: Option<u64>,
    #[serde(default)]
    pub upstream_waiting: u64,
    #[serde(default)]
    pub upstream_longest_wait_ms: u64,
}

/// What a session is doing, for `portcullis sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum SessionState {
    Startup = 0,
    Idle = 1,
    InTransaction = 2,
    FailedTransaction = 3,
    Holding = 4,
    Closing = 5,
}

impl SessionState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Startup,
            1 => Self::Idle,
            2 => Self::InTransaction,
            3 => Self::FailedTransaction,
            4 => Self::Holding,
            _ => Self::Closing,
        }
    }
}

/// One live session. Counters are updated by its I/O task; the rest is fixed at accept.
#[derive(Debug)]
pub struct SessionInfo {
    pub id: u64,
    pub client_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub target: String,
    pub upstream_user: String,
    pub database: String,
    pub started_at: SystemTime,
    pub peer: Peer,
    /// The I/O worker serving it.
    pub worker: usize,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    state: AtomicU8,
    /// The upstream server's process for this session (PostgreSQL's `pg_backend_pid()`), 0
    /// until connected; and whether that connection came warm from the pool.
    backend_pid: AtomicU32,
    upstream_reused: AtomicBool,
    /// Who the IdP says the session is (targets with `[target.identity]`); replaced on renewal.
    identity: Mutex<Option<Arc<crate::idp::VerifiedIdentity>>>,
    /// `portcullis sessions kill`.
    pub kill: crate::admin::KillSwitch,
}

impl SessionInfo {
    /// The upstream connection is open: its server process, and whether it was reused.
    pub fn set_upstream(&self, backend_pid: u32, reused: bool) {
        self.upstream_reused.store(reused, Relaxed);
        self.backend_pid.store(backend_pid, Relaxed);
    }

    pub fn set_identity(&self, id: Arc<crate::idp::VerifiedIdentity>) {
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }
    pub fn identity(&self) -> Option<Arc<crate::idp::VerifiedIdentity>> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub fn set_state(&self, s: SessionState) {
        self.state.store(s as u8, Relaxed);
    }
    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.state.load(Relaxed))
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SessionSnapshot {
    pub id: u64,
    pub client_addr: String,
    pub original_dst: String,
    pub target: String,
    pub upstream_user: String,
    pub database: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub state: SessionState,
    /// The I/O worker (`portcullis-io-N`) serving it.
    #[serde(default)]
    pub worker: usize,
    /// The verified token's subject, groups, actor chain and expiry (RFC 3339, UTC); never the
    /// token.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub actors: Vec<String>,
    #[serde(default)]
    pub token_expires_at: Option<String>,
    #[serde(default)]
    pub token_jti: Option<String>,
    /// The upstream server's process serving the session (PostgreSQL: its `pg_backend_pid()`,
    /// the `pid` of `pg_stat_activity`); none before the upstream connection is open.
    #[serde(default)]
    pub backend_pid: Option<u32>,
    /// The upstream connection came warm from the pool.
    #[serde(default)]
    pub upstream_reused: bool,
}

/// New-session details the accept path knows.
pub struct NewSession {
    pub client_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub target: String,
    pub upstream_user: String,
    pub database: String,
    pub peer: Peer,
    pub worker: usize,
}

/// Live sessions and per-target counters. One per process, shared by `Arc`.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    targets: RwLock<HashMap<String, Arc<TargetCounters>>>,
}

impl Registry {
    pub fn target(&self, name: &str) -> Arc<TargetCounters> {
        if let Some(c) = self
            .targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return c.clone();
        }
        let mut w = self.targets.write().unwrap_or_else(|e| e.into_inner());
        w.entry(name.to_owned()).or_default().clone()
    }

    /// Registers a session; it leaves the registry when the guard drops.
    pub fn open(self: &Arc<Self>, s: NewSession) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        let info = Arc::new(SessionInfo {
            id,
            client_addr: s.client_addr,
            original_dst: s.original_dst,
            target: s.target,
            upstream_user: s.upstream_user,
            database: s.database,
            started_at: SystemTime::now(),
            peer: s.peer,
            worker: s.worker,
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            state: AtomicU8::new(SessionState::Startup as u8),
            backend_pid: AtomicU32::new(0),
            upstream_reused: AtomicBool::new(false),
            identity: Mutex::new(None),
            kill: Default::default(),
        });
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, info.clone());
        SessionGuard {
            registry: self.clone(),
            info,
        }
    }

    pub fn live(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The live sessions themselves, for `portcullis sessions kill`.
    pub fn live_sessions(&self) -> Vec<Arc<SessionInfo>> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }

    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        let map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map
            .values()
            .map(|s| (s, s.identity()))
            .map(|(s, who)| SessionSnapshot {
                id: s.id,
                client_addr: s.client_addr.to_string(),
                original_dst: s.original_dst.to_string(),
                target: s.target.clone(),
                upstream_user: s.upstream_user.clone(),
                database: s.database.clone(),
                started_at: humantime::format_rfc3339_seconds(s.started_at).to_string(),
                agent: s.peer.agent.clone(),
                pid: s.peer.pid,
                uid: s.peer.uid,
                exe: s.peer.exe.clone(),
                cgroup: s.peer.cgroup.clone(),
                messages_in: s.messages_in.load(Relaxed),
                messages_out: s.messages_out.load(Relaxed),
                bytes_in: s.bytes_in.load(Relaxed),
                bytes_out: s.bytes_out.load(Relaxed),
                state: s.state(),
                worker: s.worker,
                subject: who.as_ref().map(|w| w.subject.clone()),
                groups: who.as_ref().map(|w| w.groups.clone()).unwrap_or_default(),
                actors: who.as_ref().map(|w| w.actors.clone()).unwrap_or_default(),
                token_expires_at: who
                    .as_ref()
                    .map(|w| humantime::format_rfc3339_seconds(w.expires_at).to_string()),
                token_jti: who.as_ref().and_then(|w| w.jti.clone()),
                backend_pid: Some(s.backend_pid.load(Relaxed)).filter(|&p| p != 0),
                upstream_reused: s.upstream_reused.load(Relaxed),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Each target's counters, with what `routes` (the configuration now) says of it: whether
    /// it pools, and its cap on upstream connections.
    pub fn target_snapshots(&self, routes: &crate::route::Routes) -> Vec<TargetSnapshot> {
        let map = self.targets.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map
            .iter()
            .map(|(name, c)| {
                let config = routes.target(name);
                TargetSnapshot {
                    target: name.clone(),
                    sessions_total: c.sessions_total.load(Relaxed),
                    sessions_active: c.sessions_active.load(Relaxed),
                    queries: c.queries.load(Relaxed),
                    blocked: c.blocked.load(Relaxed),
                    bytes_in: c.bytes_in.load(Relaxed),
                    bytes_out: c.bytes_out.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    pool_enabled: config.is_some_and(|t| t.config.pool.enabled),
                    pool: c.pool.snapshot(),
                    upstream_open: c.upstream.open() as u64,
                    upstream_max: config
                        .and_then(|t| t.config.max_upstream_connections)
                        .map(|m| m as u64),
                    upstream_waiting: c.upstream.waiting() as u64,
                    upstream_longest_wait_ms: c.upstream.longest_wait().as_millis() as u64,
                }
            })
            .collect();
        v.sort_by(|a, b| a.target.cmp(&b.target));
        v
    }
}

/// Keeps a session listed while it lives.
pub struct SessionGuard {
    registry: Arc<Registry>,
    pub info: Arc<SessionInfo>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.info.id);
    }
}
