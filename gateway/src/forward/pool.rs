//! Warm upstream connections (`[target.pool]`). The gateway holds the credential, so an agent's
//! connect can take an authenticated connection another session left, instead of paying for TCP,
//! TLS, SCRAM and a backend fork.
//!
//! Each I/O worker keeps its own idle connections (compio sockets belong to the thread that made
//! them), keyed by [`Key`]: target, upstream address and database, login, role, protocol version
//! and the names of the client parameters the connection was opened with. A session never gets a
//! connection authenticated as anyone else.
//!
//! A connection comes back only from a session that ended at rest (no reply owed, nothing half
//! sent), after `ROLLBACK` if a transaction was open, `DISCARD ALL` (temporary tables, prepared
//! statements, cursors, settings, `LISTEN`, advisory locks, `SET ROLE`/`SESSION AUTHORIZATION`),
//! and the target's mapped `SET ROLE` again. Any other answer closes it. Before reuse the socket
//! must be quiet (a restarted server has closed it or sent its FATAL); after
//! `health_check_after` idle it must answer `SELECT 1`; the new client's parameters are set where
//! they differ from those the connection was opened with (what `RESET ALL` returns to). A
//! connection that fails any of this is closed and the next one tried, then a fresh one dialled:
//! the client never hears of it.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::conn::Stream;
use super::slots::{AtCap, Slot};
use super::upstream::{self, Login, UpstreamError};
use crate::config::{PoolConfig, Upstream};
use crate::metrics::{PoolClose, TargetCounters};
use crate::protocol::postgres::frame::{self, Next};
use crate::protocol::postgres::housekeeping::{self, Answer, Housekeeping};
use crate::protocol::postgres::messages;
use crate::route::{Routes, Target};

/// How long the gateway's own housekeeping on a connection may take before it is closed.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(5);

/// How often each worker closes expired idle connections and tops up `min_idle`.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which connections may serve a session: the same server, database, login and role, the same
/// protocol version, and the same client parameter names (their values are set on reuse).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    target: String,
    upstream: Upstream,
    user: String,
    set_role: Option<String>,
    minor: u16,
    /// Lowercase, sorted.
    params: Vec<String>,
}

impl Key {
    pub fn new(target: &Target, login: Login<'_>, minor: u16, params: &[(String, String)]) -> Key {
        let mut names: Vec<String> = params.iter().map(|(k, _)| k.to_lowercase()).collect();
        names.sort();
        names.dedup();
        Key {
            target: target.config.name.clone(),
            upstream: target.config.upstream.clone(),
            user: login.user.to_owned(),
            set_role: login.set_role.map(str::to_owned),
            minor,
            params: names,
        }
    }

    /// A short stand-in for the key in its target's queue at the cap. Two keys that collide
    /// only cost the queue's first waiter one released connection it then cannot take.
    pub fn id(&self) -> u64 {
        use std::hash::BuildHasher as _;
        foldhash::fast::FixedState::default().hash_one(self)
    }
}

/// An authenticated upstream connection, with what another client must be told about it.
pub struct Conn {
    pub stream: Stream,
    pub state: ConnState,
}

/// Everything about a pooled connection but its socket.
pub struct ConnState {
    pub backend_pid: u32,
    pub backend_key: Vec<u8>,
    /// The protocol minor version the server agreed to.
    pub minor: u16,
    /// The server's NegotiateProtocolVersion at startup, if it sent one.
    negotiate: Vec<u8>,
    /// The reported settings (ParameterStatus) as the server last reported them.
    reported: Vec<(String, String)>,
    /// The client parameters it was opened with, names lowercase: what `RESET ALL` returns to.
    opened_with: Vec<(String, String)>,
    born: Instant,
    idle_since: Instant,
    /// Whether a session used it before this one.
    pub reused: bool,
    /// Its place under the target's `max_upstream_connections`, freed when it closes.
    _slot: Slot,
}

impl Conn {
    /// Takes a freshly authenticated connection, dialled in `slot`; `relay` is its startup
    /// answer.
    pub fn new(
        up: upstream::Upstream,
        params: &[(String, String)],
        slot: Slot,
    ) -> Result<Conn, UpstreamError> {
        let bad = |e: crate::protocol::postgres::ProtocolError| {
            UpstreamError::Protocol(format!("startup answer: {e}"))
        };
        let mut negotiate = Vec::new();
        let mut reported = Vec::new();
        let mut at = 0;
        while let Next::Frame(f) = frame::next_frame(&up.relay[at..], up.relay.len())
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
        {
            match f.tag {
                b'v' => negotiate.extend_from_slice(&up.relay[at..at + f.wire_len()]),
                b'S' => {
                    let (k, v) = messages::parse_parameter_status(f.body).map_err(bad)?;
                    merge(&mut reported, k, v);
                }
                _ => {}
            }
            at += f.wire_len();
        }
        let now = Instant::now();
        Ok(Conn {
            stream: up.stream,
            state: ConnState {
                backend_pid: up.backend_pid,
                backend_key: up.backend_key,
                minor: up.minor,
                negotiate,
                reported,
                opened_with: params
                    .iter()
                    .map(|(k, v)| (k.to_lowercase(), v.clone()))
                    .collect(),
                born: now,
                idle_since: now,
                reused: false,
                _slot: slot,
            },
        })
    }
}

impl ConnState {
    /// The startup answer a client of a reused connection gets, in the form the upstream's own
    /// takes ([`crate::protocol::postgres::hello::encode_client_hello`] adds the key).
    pub fn relay(&self) -> Vec<u8> {
        let mut out = self.negotiate.clone();
        for (k, v) in &self.reported {
            messages::encode_parameter_status(k, v, &mut out);
        }
        messages::encode_ready_for_query(b'I', &mut out);
        out
    }

    fn absorb(&mut self, answer: &Answer) {
        for (k, v) in &answer.params {
            merge(&mut self.reported, k, v);
        }
    }
}

fn merge(reported: &mut Vec<(String, String)>, name: &str, value: &str) {
    match reported.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => value.clone_into(v),
        None => reported.push((name.to_owned(), value.to_owned())),
    }
}

#[derive(Default)]
struct Pool {
    idle: HashMap<Key, Idle>,
}

struct Idle {
    /// Most recently used last: taken from the end, expired from the front.
    conns: Vec<Conn>,
    /// The client parameters of the last connection released, for dialling ahead.
    params: Vec<(String, String)>,
    /// A connection is being dialled ahead for `min_idle`.
    dialling: bool,
    /// The target's counters, kept here so that connections closed after a reload removed the
    /// target are still counted.
    counters: Arc<TargetCounters>,
}

impl Idle {
    fn new(counters: Arc<TargetCounters>) -> Idle {
        Idle {
            conns: Vec::new(),
            params: Vec::new(),
            dialling: false,
            counters,
        }
    }

    fn pop(&mut self) -> Option<Conn> {
        let conn = self.conns.pop()?;
        self.counters.pool.idle.fetch_sub(1, Relaxed);
        Some(conn)
    }

    /// Takes out `conns` (already split off `self.conns`), counted as closed for `why`.
    fn closing(&self, conns: Vec<Conn>, why: PoolClose, out: &mut Vec<Conn>) {
        let n = conns.len() as u64;
        self.counters.pool.idle.fetch_sub(n, Relaxed);
        self.counters.pool.closed(why, n);
        out.extend(conns);
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// An idle connection for `key`, ready for a client that sent `params`; `None` when there is
/// none (or pooling is off).
async fn take(
    key: &Key,
    target: &Target,
    params: &[(String, String)],
    max_message: usize,
) -> Option<Conn> {
    let settings = &target.config.pool;
    if !settings.enabled {
        return None;
    }
    let counters = &target.counters.pool;
    loop {
        let Some(mut conn) = POOL.with_borrow_mut(|p| p.idle.get_mut(key)?.pop()) else {
            break None;
        };
        let now = Instant::now();
        let s = &mut conn.state;
        if now.duration_since(s.born) >= settings.max_lifetime
            || now.duration_since(s.idle_since) >= settings.idle_timeout
        {
            counters.closed(PoolClose::Expired, 1);
            close(conn).await;
            continue;
        }
        if !quiet(&conn.stream) {
            counters.closed(PoolClose::Gone, 1);
            debug!(
                backend = s.backend_pid,
                "pooled upstream connection closed or spoke while idle: discarded"
            );
            continue;
        }
        let mut sql = String::new();
        for (name, value) in params {
            let name = name.to_lowercase();
            if s.opened_with.iter().any(|(k, v)| *k == name && v == value) {
                continue;
            }
            sql.push_str(if sql.is_empty() { "SELECT " } else { ", " });
            sql.push_str("pg_catalog.set_config(");
            housekeeping::quote_literal(&name, &mut sql);
            sql.push_str(", ");
            housekeeping::quote_literal(value, &mut sql);
            sql.push_str(", false)");
        }
        if sql.is_empty() {
            if now.duration_since(s.idle_since) < settings.health_check_after {
                s.reused = true;
                break Some(conn);
            }
            sql.push_str("SELECT 1");
        }
        match run(&conn.stream, &[&sql], max_message).await {
            Ok(a) if a.clean(&["SELECT 1"]) => {
                conn.state.absorb(&a);
                conn.state.reused = true;
                break Some(conn);
            }
            // The server refused the client's parameters; the connection is as it was. A fresh
            // connection's startup gives the client the server's own error.
            Ok(a) if a.error.is_some() && a.status == b'I' && a.tags.is_empty() => {
                conn.state.absorb(&a);
                conn.state.idle_since = Instant::now();
                if let Some(extra) = put(key.clone(), conn, target) {
                    close(extra).await;
                }
                break None;
            }
            Ok(a) => debug!(
                backend = conn.state.backend_pid,
                ?a,
                "pooled upstream connection failed its check: closed"
            ),
            Err(e) => debug!(
                backend = conn.state.backend_pid,
                "pooled upstream connection failed its check: {e}"
            ),
        }
        counters.closed(PoolClose::CheckFailed, 1);
    }
}

/// How a session gets its upstream connection.
pub enum Acquired {
    /// A warm one from this worker's pool.
    Pooled(Box<Conn>),
    /// A place under the target's `max_upstream_connections` to dial one in.
    Dial(Slot),
}

/// A warm connection for `key` from this worker's pool, or a place to dial one. At the target's
/// `max_upstream_connections`, an idle connection of another key on this worker is closed to
/// make room; otherwise the session queues, up to `upstream_queue_timeout`, for a connection of
/// its key released on this worker, a place freed by a session's end, or another worker's sweep
/// closing an idle connection (within a second). A session that has waited longest goes first
/// once it has waited a second or half its queue timeout (see [`super::slots`]).
pub async fn acquire(
    key: &Key,
    target: &Target,
    params: &[(String, String)],
    max_message: usize,
) -> Result<Acquired, AtCap> {
    let slots = &target.counters.upstream;
    let max = target.config.max_upstream_connections;
    let wait = target.config.upstream_queue_timeout;
    if max.is_none() || slots.overdue(wait).is_none() {
        if let Some(got) = available(key, target, params, max_message).await {
            return Ok(got);
        }
        shed_oldest_idle(target).await;
    }
    let queued = slots.wait(key.id());
    let deadline = Instant::now() + wait;
    loop {
        let changed = slots.listen();
        if queued.may_take(wait) {
            if let Some(got) = available(key, target, params, max_message).await {
                return Ok(got);
            }
            if slots.overdue(wait).is_some() && shed_oldest_idle(target).await {
                continue;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || compio::time::timeout(left, changed).await.is_err() {
            return Err(AtCap {
                max: max.unwrap_or(0),
                waited: wait,
            });
        }
    }
}

/// A warm connection for `key` on this worker, or a free place under the target's cap.
async fn available(
    key: &Key,
    target: &Target,
    params: &[(String, String)],
    max_message: usize,
) -> Option<Acquired> {
    if let Some(conn) = take(key, target, params, max_message).await {
        return Some(Acquired::Pooled(Box::new(conn)));
    }
    Slot::try_take(&target.counters, target.config.max_upstream_connections).map(Acquired::Dial)
}

/// Closes this worker's longest-idle connection to `target`, of any key, to free its place;
/// false when there is none.
async fn shed_oldest_idle(target: &Target) -> bool {
    let idle = POOL.with_borrow_mut(|p| {
        let (_, idle) = p
            .idle
            .iter_mut()
            .filter(|(k, i)| k.target == target.config.name && !i.conns.is_empty())
            .min_by_key(|(_, i)| i.conns[0].state.idle_since)?;
        let oldest = vec![idle.conns.remove(0)];
        let mut closing = Vec::with_capacity(1);
        idle.closing(oldest, PoolClose::Shed, &mut closing);
        closing.pop()
    });
    match idle {
        Some(conn) => {
            close(conn).await;
            true
        }
        None => false,
    }
}

/// Resets a session's connection and keeps it for the next, or closes it. `tx_status` is the
/// last ReadyForQuery's; the caller checked the session ended at rest. `target` is the target
/// as configured now: after a reload that turned pooling off or moved the upstream, it closes;
/// `counters` are the session's target's.
pub async fn release(
    mut conn: Conn,
    key: Key,
    target: Option<&Target>,
    counters: &TargetCounters,
    tx_status: u8,
    max_message: usize,
) {
    let Some(target) =
        target.filter(|t| t.config.upstream == key.upstream && t.config.pool.enabled)
    else {
        counters.pool.closed(PoolClose::Disabled, 1);
        return close(conn).await;
    };
    let settings = &target.config.pool;
    if conn.state.born.elapsed() >= settings.max_lifetime {
        counters.pool.closed(PoolClose::Expired, 1);
        return close(conn).await;
    }
    let role_sql = key.set_role.as_deref().map(crate::idp::set_role_sql);
    let mut queries = Vec::with_capacity(3);
    let mut tags = Vec::with_capacity(3);
    if tx_status != b'I' {
        queries.push("ROLLBACK");
        tags.push("ROLLBACK");
    }
    queries.push("DISCARD ALL");
    tags.push("DISCARD ALL");
    if let Some(sql) = &role_sql {
        queries.push(sql.as_str());
        tags.push("SET");
    }
    match run(&conn.stream, &queries, max_message).await {
        Ok(a) if a.clean(&tags) => {
            if target.config.max_upstream_connections.is_some()
                && let Some(head) = counters
                    .upstream
                    .overdue(target.config.upstream_queue_timeout)
                && !head.can_use(key.id())
            {
                // The session that has waited longest cannot use it: its place goes to that one.
                counters.pool.closed(PoolClose::Shed, 1);
                return close(conn).await;
            }
            conn.state.absorb(&a);
            conn.state.idle_since = Instant::now();
            if let Some(extra) = put(key, conn, target) {
                close(extra).await;
            }
            // A session of this key waiting at the cap on this worker takes it now; the sweep
            // closes it for the others.
            counters.upstream.released();
        }
        Ok(a) => {
            counters.pool.closed(PoolClose::ResetFailed, 1);
            warn!(backend = conn.state.backend_pid, error = ?a.error, tags = ?a.tags, "upstream connection reset refused: closed, not reused");
        }
        Err(e) => {
            counters.pool.closed(PoolClose::ResetFailed, 1);
            debug!(
                backend = conn.state.backend_pid,
                "upstream connection reset failed: {e}"
            );
        }
    }
}

/// Keeps `conn` idle under `key`; gives it back, counted as surplus, when the key has
/// `max_idle_per_key` already.
fn put(key: Key, conn: Conn, target: &Target) -> Option<Conn> {
    let settings: &PoolConfig = &target.config.pool;
    POOL.with_borrow_mut(|p| {
        let idle = p
            .idle
            .entry(key)
            .or_insert_with(|| Idle::new(target.counters.clone()));
        if idle.conns.len() >= settings.max_idle_per_key {
            idle.counters.pool.closed(PoolClose::Surplus, 1);
            return Some(conn);
        }
        conn.state.opened_with.clone_into(&mut idle.params);
        idle.conns.push(conn);
        idle.counters.pool.idle.fetch_add(1, Relaxed);
        None
    })
}

/// Runs `queries` as simple Query messages sent in one write; the answer once each has its
/// ReadyForQuery, within [`HOUSEKEEPING_TIMEOUT`].
async fn run(
    stream: &Stream,
    queries: &[&str],
    max_message: usize,
) -> Result<Answer, UpstreamError> {
    let exchange = async {
        let mut out = Vec::new();
        for q in queries {
            messages::encode_query(q, &mut out);
        }
        stream
            .write_all(out)
            .await
            .0
            .map_err(|source| UpstreamError::Connect {
                addr: "upstream".into(),
                source,
            })?;
        let mut answer = Housekeeping::new(queries.len());
        let mut buf = Vec::with_capacity(1024);
        loop {
            let len = upstream::read_message(stream, &mut buf, max_message, "a reset").await?;
            let step = answer
                .on_message(buf[0], &buf[frame::HEADER_LEN..len])
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            buf.drain(..len);
            if let Some(a) = step {
                if !buf.is_empty() {
                    return Err(UpstreamError::Protocol(
                        "data after the last ReadyForQuery".into(),
                    ));
                }
                return Ok(a);
            }
        }
    };
    compio::time::timeout(HOUSEKEEPING_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Protocol("no answer in time".into())))
}

/// True when nothing waits to be read on the socket and it is not closed: an idle upstream
/// has nothing to say, so bytes or an end of stream mean it is gone (a restart's FATAL).
fn quiet(stream: &Stream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(stream.tcp())
        .recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Closes a connection the way a client does: Terminate, then the socket.
async fn close(conn: Conn) {
    let mut out = Vec::with_capacity(5);
    messages::encode_terminate(&mut out);
    let _ = compio::time::timeout(Duration::from_secs(1), conn.stream.write_all(out)).await;
}

/// Each worker's upkeep, for as long as it runs: closes connections past `idle_timeout` or
/// `max_lifetime`, past `max_idle_per_key` after a reload lowered it, of targets that turned
/// pooling off or moved; and dials ahead to keep `min_idle` for keys this worker has served.
pub async fn maintain(shared: Arc<crate::daemon::Shared>) {
    let mut ticks = crate::daemon::ticks::every(SWEEP_EVERY);
    loop {
        ticks.tick().await;
        let routes = shared.routes();
        let (closing, wanted) = POOL.with_borrow_mut(|p| sweep(p, &routes, Instant::now()));
        for conn in closing {
            close(conn).await;
        }
        for (key, target, params) in wanted {
            compio::runtime::spawn(dial_ahead(key, target, params, shared.max_message())).detach();
        }
    }
}

type Wanted = (Key, Arc<Target>, Vec<(String, String)>);

fn sweep(pool: &mut Pool, routes: &Routes, now: Instant) -> (Vec<Conn>, Vec<Wanted>) {
    let mut closing = Vec::new();
    let mut wanted = Vec::new();
    let mut gone = HashSet::new();
    let mut shed = HashMap::new();
    for (key, idle) in &mut pool.idle {
        let target = routes
            .targets()
            .iter()
            .find(|t| t.config.name == key.target && t.config.upstream == key.upstream)
            .filter(|t| t.config.pool.enabled);
        let Some(target) = target else {
            let all = std::mem::take(&mut idle.conns);
            idle.closing(all, PoolClose::Disabled, &mut closing);
            gone.insert(key.clone());
            continue;
        };
        let s = &target.config.pool;
        let (keep, expired): (Vec<Conn>, Vec<Conn>) =
            std::mem::take(&mut idle.conns).into_iter().partition(|c| {
                now.duration_since(c.state.born) < s.max_lifetime
                    && now.duration_since(c.state.idle_since) < s.idle_timeout
            });
        idle.closing(expired, PoolClose::Expired, &mut closing);
        idle.conns = keep;
        let over = idle.conns.len().saturating_sub(s.max_idle_per_key);
        let surplus = idle.conns.drain(..over).collect();
        idle.closing(surplus, PoolClose::Surplus, &mut closing);
        // Sessions wait at the target's cap: its oldest idle connections make room.
        let waiting = target.counters.upstream.waiting();
        if waiting > 0 {
            let left = shed.entry(key.target.clone()).or_insert(waiting);
            let n = (*left).min(idle.conns.len());
            let oldest = idle.conns.drain(..n).collect();
            idle.closing(oldest, PoolClose::Shed, &mut closing);
            *left -= n;
        }
        if idle.conns.len() < s.min_idle && !idle.dialling && waiting == 0 {
            idle.dialling = true;
            wanted.push((key.clone(), target.clone(), idle.params.clone()));
        } else if idle.conns.is_empty() && s.min_idle == 0 {
            gone.insert(key.clone());
        }
    }
    pool.idle.retain(|k, i| !gone.contains(k) || i.dialling);
    (closing, wanted)
}

/// Dials one connection for `key` ahead of any session (`min_idle`).
async fn dial_ahead(
    key: Key,
    target: Arc<Target>,
    params: Vec<(String, String)>,
    max_message: usize,
) {
    let mut login = Login::of(&target);
    if key.user != login.user {
        login.user = &key.user;
        login.password = target
            .identity
            .as_ref()
            .and_then(|i| i.role_passwords.get(&key.user))
            .map(|s| s.expose());
    }
    login.set_role = key.set_role.as_deref();
    let borrowed: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let done = || {
        POOL.with_borrow_mut(|p| {
            if let Some(idle) = p.idle.get_mut(&key) {
                idle.dialling = false;
            }
        })
    };
    // Never past the cap, and never taking a place a session waits for.
    let slot = (target.counters.upstream.waiting() == 0)
        .then(|| Slot::try_take(&target.counters, target.config.max_upstream_connections))
        .flatten();
    let Some(slot) = slot else {
        return done();
    };
    let dialled = upstream::connect(&target, login, &borrowed, key.minor, max_message).await;
    let conn = dialled.and_then(|up| Conn::new(up, &params, slot));
    done();
    match conn {
        Ok(conn) => {
            target.counters.pool.dialed_ahead.fetch_add(1, Relaxed);
            if let Some(extra) = put(key, conn, &target) {
                close(extra).await;
            }
        }
        Err(e) => warn!(target = %target.config.name, "dialling ahead for the pool: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_connection_tells_the_client_what_the_server_last_reported() {
        let mut reported = Vec::new();
        merge(&mut reported, "DateStyle", "ISO, MDY");
        merge(&mut reported, "application_name", "first");
        merge(&mut reported, "application_name", "second");
        let s = ConnState {
            backend_pid: 7,
            backend_key: vec![1; 4],
            minor: 0,
            negotiate: Vec::new(),
            reported,
            opened_with: Vec::new(),
            born: Instant::now(),
            idle_since: Instant::now(),
            reused: true,
            _slot: Slot::try_take(&Default::default(), None).unwrap(),
        };
        let mut want = Vec::new();
        messages::encode_parameter_status("DateStyle", "ISO, MDY", &mut want);
        messages::encode_parameter_status("application_name", "second", &mut want);
        messages::encode_ready_for_query(b'I', &mut want);
        assert_eq!(s.relay(), want);
        let mut hello = Vec::new();
        crate::protocol::postgres::hello::encode_client_hello(&s.relay(), 1, &[2; 4], &mut hello)
            .unwrap();
    }
}
