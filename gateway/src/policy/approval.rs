//! Just-in-time approval of single statements: the store under the state dir, the futures that
//! held sessions wait on, and the timeout reaper.
//!
//! Every request is a row in `STATE_DIR/approvals.db` (SQLite). A held session waits on a
//! [`PendingDecision`]; an operator's `approve`/`deny`, the timeout, or the session going away
//! resolves it. Fail closed throughout: a request still pending when the gateway starts is denied
//! ("gateway restarted"), a decision that cannot be recorded is not delivered as an approval, and a
//! waiter whose store is gone resolves as denied.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak, mpsc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_channel::oneshot;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The outcome a held statement waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `by`: the operator who approved, for the recording.
    Approved { by: String },
    /// Denied by an operator, timed out, or abandoned; `reason` goes into the ErrorResponse.
    Denied { reason: String },
}

/// What an approval covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This one held statement.
    Statement,
    /// This statement, and for the `--for` duration every statement with the same fingerprint
    /// from the same agent to the same target.
    Fingerprint,
}

/// A request to hold a statement for approval.
#[derive(Clone, Debug)]
pub struct NewApproval {
    pub agent: Option<String>,
    /// Who the session's verified token names, and the actor chain acting for them (outermost
    /// first): on whose behalf, and through whom, the statement asks.
    pub subject: Option<String>,
    pub actors: Vec<String>,
    pub pid: Option<u32>,
    pub target: String,
    pub database: String,
    pub sql: String,
    pub rule: String,
    pub fingerprint: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            _ => Status::Denied,
        }
    }
}

/// One request as stored, for `portcullis approvals`. Times are RFC 3339 (UTC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: u64,
    pub status: Status,
    pub created_at: String,
    pub agent: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub actors: Vec<String>,
    pub pid: Option<u32>,
    pub target: String,
    pub database: String,
    pub sql: String,
    pub rule: String,
    /// 16 hex digits.
    pub fingerprint: String,
    pub decided_at: Option<String>,
    /// The operator: the admin socket peer's user name and uid, e.g. `alice (uid 1000)`.
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    pub scope: Option<Scope>,
    /// Until when a fingerprint grant lets matching statements through.
    pub grant_until: Option<String>,
}

/// The approval store, shared (`Arc`) by worker threads and the admin API.
///
/// SQLite lives on its own thread, which owns the connection and every waiter: an I/O worker
/// that holds a statement only sends a message and gets its [`PendingDecision`] at once, and
/// never waits on a lock held across a disk write. The admin API's calls are answered by the same
/// thread, in order, so an `approve` always sees the request it names.
pub struct Approvals {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Live fingerprint grants, read on the I/O thread for every statement that needs approval.
    grants: Mutex<Vec<Grant>>,
    next_id: AtomicU64,
    /// Requests recorded but not yet decided, across all sessions.
    pending: AtomicUsize,
}

/// Work for the store thread.
enum Job {
    Insert {
        id: u64,
        created_ms: i64,
        req: NewApproval,
        waiter: Waiter,
    },
    /// The session stopped waiting.
    Abandon(u64),
    Approve {
        id: u64,
        grant_for: Option<Duration>,
        scope: Scope,
        by: String,
        reply: mpsc::Sender<anyhow::Result<()>>,
    },
    Deny {
        id: u64,
        reason: String,
        by: String,
        reply: mpsc::Sender<anyhow::Result<()>>,
    },
    List {
        recent: usize,
        reply: mpsc::Sender<anyhow::Result<Vec<ApprovalRecord>>>,
    },
}

struct Waiter {
    tx: oneshot::Sender<Decision>,
    deadline: Instant,
    timeout: Duration,
}

struct Grant {
    fingerprint: u64,
    agent: Option<String>,
    target: String,
    until_ms: i64,
}

/// How many requests may wait for a decision at once, across all sessions; past it a statement
/// that needs approval is refused. Each session holds at most one.
pub const MAX_PENDING: usize = 10_000;

/// The error of a request made while [`MAX_PENDING`] requests wait: a limit, not a failure of
/// the store.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_PENDING} approval requests are already waiting")]
pub struct TooManyPending;

/// How long decided requests are kept when the configuration does not say.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the store thread prunes decided requests older than the retention.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS approvals (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  INTEGER NOT NULL,
    agent       TEXT,
    pid         INTEGER,
    target      TEXT NOT NULL,
    database    TEXT NOT NULL,
    sql         TEXT NOT NULL,
    rule        TEXT NOT NULL,
    fingerprint INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    decided_at  INTEGER,
    decided_by  TEXT,
    reason      TEXT,
    scope       TEXT,
    grant_until INTEGER
);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status);
-- Added with identity: `subject` and `actors` (a JSON array), see `add_identity_columns`.
CREATE INDEX IF NOT EXISTS approvals_grants ON approvals (fingerprint) WHERE grant_until IS NOT NULL;
";

const SYSTEM: &str = "portcullis";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a plain in-memory update: a panic cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Approvals {
    /// [`Approvals::open_with_retention`] with [`DEFAULT_RETENTION`].
    pub fn open(state_dir: &Path) -> anyhow::Result<Arc<Approvals>> {
        Self::open_with_retention(state_dir, DEFAULT_RETENTION)
    }

    /// Opens (or creates) `STATE_DIR/approvals.db`. Requests left pending by a previous run are
    /// denied ("gateway restarted"); fingerprint grants still live are kept. Decided requests
    /// older than `retention` (and grants expired that long ago) are deleted now and hourly.
    pub fn open_with_retention(
        state_dir: &Path,
        retention: Duration,
    ) -> anyhow::Result<Arc<Approvals>> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = state_dir.join("approvals.db");
        let db = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        restrict_permissions(&path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        add_identity_columns(&db)
            .with_context(|| format!("adding identity columns in {}", path.display()))?;
        let now = now_ms();
        db.execute(
            "UPDATE approvals SET status = 'denied', decided_at = ?1, decided_by = ?2,
                 reason = 'gateway restarted' WHERE status = 'pending'",
            params![now, SYSTEM],
        )?;
        prune(&db, retention).with_context(|| format!("pruning {}", path.display()))?;
        let grants = {
            let mut stmt = db.prepare(
                "SELECT fingerprint, agent, target, grant_until FROM approvals
                 WHERE status = 'approved' AND grant_until > ?1",
            )?;
            stmt.query_map(params![now], |r| {
                Ok(Grant {
                    fingerprint: r.get::<_, i64>(0)? as u64,
                    agent: r.get(1)?,
                    target: r.get(2)?,
                    until_ms: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        // Ids are handed out here, so a request needs no round trip; they keep growing across
        // restarts and pruning (AUTOINCREMENT's own counter included).
        let last: i64 = db.query_row(
            "SELECT max(coalesce((SELECT max(id) FROM approvals), 0),
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'approvals'), 0))",
            [],
            |r| r.get(0),
        )?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            jobs: Mutex::new(tx),
            grants: Mutex::new(grants),
            next_id: AtomicU64::new(last as u64 + 1),
            pending: AtomicUsize::new(0),
        });
        let store = Store {
            db,
            waiters: HashMap::new(),
            inner: Arc::downgrade(&inner),
            retention,
        };
        let thread = std::thread::Builder::new()
            .name("portcullis-approvals".into())
            .spawn(move || store.run(rx))
            .context("starting the approval store thread")?;
        Ok(Arc::new(Approvals {
            inner,
            thread: Some(thread),
        }))
    }

    /// Records a pending request, without waiting for the disk. The returned future resolves
    /// when an operator decides, when `timeout` passes (denied, "timed out after 5m"), as denied
    /// if the request cannot be recorded (a full disk, say) or the store shuts down. It is
    /// runtime-agnostic and needs no timer from the caller. Dropping it before it resolves denies
    /// the request ("session closed before a decision"). Fails at once when [`MAX_PENDING`]
    /// requests are already waiting.
    pub fn request(
        &self,
        req: NewApproval,
        timeout: Duration,
    ) -> anyhow::Result<(u64, PendingDecision)> {
        let inner = &self.inner;
        if inner.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
            inner.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(TooManyPending.into());
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let job = Job::Insert {
            id,
            created_ms: now_ms(),
            req,
            waiter: Waiter {
                tx,
                deadline: Instant::now() + timeout,
                timeout,
            },
        };
        if !inner.send(job) {
            inner.pending.fetch_sub(1, Ordering::Relaxed);
            bail!("the approval store has stopped");
        }
        Ok((
            id,
            PendingDecision {
                id,
                rx,
                inner: Arc::downgrade(inner),
                done: false,
            },
        ))
    }

    /// True when a live fingerprint grant covers this statement for this agent and target.
    pub fn granted(&self, fingerprint: u64, agent: Option<&str>, target: &str) -> bool {
        let mut grants = lock(&self.inner.grants);
        let now = now_ms();
        grants.retain(|g| g.until_ms > now);
        grants.iter().any(|g| {
            g.fingerprint == fingerprint && g.agent.as_deref() == agent && g.target == target
        })
    }

    /// Approves a pending request. `Scope::Fingerprint` needs `for_` (how long the grant lasts);
    /// `Scope::Statement` takes none. Waits for the store thread: for the admin API, never for an
    /// I/O worker.
    pub fn approve(
        &self,
        id: u64,
        for_: Option<Duration>,
        scope: Scope,
        by: &str,
    ) -> anyhow::Result<()> {
        let grant_for = match (scope, for_) {
            (Scope::Statement, Some(_)) => {
                bail!(
                    "--for applies to --scope fingerprint only (a statement approval is used once)"
                )
            }
            (Scope::Fingerprint, None) => {
                bail!("--scope fingerprint needs --for DURATION (how long the grant lasts)")
            }
            (Scope::Fingerprint, Some(d)) if d.is_zero() => bail!("--for must be longer than zero"),
            (_, d) => d,
        };
        self.call(|reply| Job::Approve {
            id,
            grant_for,
            scope,
            by: by.to_owned(),
            reply,
        })
    }

    /// Denies a pending request.
    pub fn deny(&self, id: u64, reason: Option<&str>, by: &str) -> anyhow::Result<()> {
        let reason = match reason {
            Some(r) if !r.trim().is_empty() => format!("denied by {by}: {}", r.trim()),
            _ => format!("denied by {by}"),
        };
        self.call(|reply| Job::Deny {
            id,
            reason,
            by: by.to_owned(),
            reply,
        })
    }

    /// Every pending request (oldest first), then the `recent` most recently created decided ones.
    pub fn list(&self, recent: usize) -> anyhow::Result<Vec<ApprovalRecord>> {
        self.call(|reply| Job::List { recent, reply })
    }

    /// Sends a job that answers, and waits for the answer.
    fn call<T>(
        &self,
        job: impl FnOnce(mpsc::Sender<anyhow::Result<T>>) -> Job,
    ) -> anyhow::Result<T> {
        let (reply, answer) = mpsc::channel();
        if !self.inner.send(job(reply)) {
            bail!("the approval store has stopped");
        }
        answer
            .recv()
            .map_err(|_| anyhow::anyhow!("the approval store has stopped"))?
    }
}

impl Inner {
    /// False when the store thread has stopped.
    fn send(&self, job: Job) -> bool {
        lock(&self.jobs).send(job).is_ok()
    }
}

impl Drop for Approvals {
    fn drop(&mut self) {
        // The store thread ends when the last sender goes: it finishes what was queued, then
        // every waiter left hears "shutting down".
        let (dead, _) = mpsc::channel();
        *lock(&self.inner.jobs) = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The store thread's state: the only owner of the database connection and of the waiters.
struct Store {
    db: Connection,
    waiters: HashMap<u64, Waiter>,
    inner: Weak<Inner>,
    retention: Duration,
}

struct PendingRow {
    fingerprint: u64,
    agent: Option<String>,
    target: String,
}

impl Store {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut next_prune = Instant::now() + PRUNE_EVERY;
        loop {
            let next = self
                .waiters
                .values()
                .map(|w| w.deadline)
                .min()
                .map_or(next_prune, |d| d.min(next_prune));
            match jobs.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(job) => self.handle(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.expire();
            if Instant::now() >= next_prune {
                if let Err(e) = prune(&self.db, self.retention) {
                    tracing::warn!("approval store: pruning: {e:#}");
                }
                next_prune = Instant::now() + PRUNE_EVERY;
            }
        }
        // Dropping the senders tells each waiter "shutting down".
        for _ in std::mem::take(&mut self.waiters) {
            self.settled();
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Insert {
                id,
                created_ms,
                req,
                waiter,
            } => {
                let result = self.db.execute(
                    "INSERT INTO approvals (id, created_at, agent, pid, target, database, sql, rule,
                         fingerprint, status, subject, actors)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11)",
                    params![
                        id as i64,
                        created_ms,
                        req.agent,
                        req.pid,
                        req.target,
                        req.database,
                        req.sql,
                        req.rule,
                        req.fingerprint as i64,
                        req.subject,
                        serde_json::to_string(&req.actors).unwrap_or_else(|_| "[]".into()),
                    ],
                );
                match result {
                    Ok(_) => {
                        self.waiters.insert(id, waiter);
                    }
                    Err(e) => {
                        // Not recorded, so no operator can see it: refuse, never wave through.
                        tracing::warn!(id, "approval store: recording request: {e}");
                        self.settled();
                        let _ = waiter.tx.send(Decision::Denied {
                            reason: format!(
                                "needs approval, but the approval store could not record the request ({e})"
                            ),
                        });
                    }
                }
            }
            Job::Abandon(id) => {
                if self.waiters.contains_key(&id)
                    && let Err(e) = self.close(id, "session closed before a decision", SYSTEM)
                {
                    tracing::warn!(id, "approval store: {e:#}");
                }
            }
            Job::Approve {
                id,
                grant_for,
                scope,
                by,
                reply,
            } => {
                let _ = reply.send(self.approve(id, grant_for, scope, &by));
            }
            Job::Deny {
                id,
                reason,
                by,
                reply,
            } => {
                let _ = reply.send(
                    self.check_pending(id)
                        .and_then(|_| self.close(id, &reason, &by)),
                );
            }
            Job::List { recent, reply } => {
                let _ = reply.send(self.list(recent));
            }
        }
    }

    /// One fewer request waiting.
    fn settled(&self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn approve(
        &mut self,
        id: u64,
        grant_for: Option<Duration>,
        scope: Scope,
        by: &str,
    ) -> anyhow::Result<()> {
        let row = self.check_pending(id)?;
        let now = now_ms();
        let until = grant_for.map(|d| now.saturating_add(d.as_millis() as i64));
        self.db
            .execute(
                "UPDATE approvals SET status = 'approved', decided_at = ?2, decided_by = ?3,
                     scope = ?4, grant_until = ?5 WHERE id = ?1 AND status = 'pending'",
                params![
                    id as i64,
                    now,
                    by,
                    match scope {
                        Scope::Statement => "statement",
                        Scope::Fingerprint => "fingerprint",
                    },
                    until
                ],
            )
            .context("recording the approval")?;
        if let (Some(until_ms), Some(inner)) = (until, self.inner.upgrade()) {
            lock(&inner.grants).push(Grant {
                fingerprint: row.fingerprint,
                agent: row.agent,
                target: row.target,
                until_ms,
            });
        }
        if let Some(w) = self.waiters.remove(&id) {
            self.settled();
            let _ = w.tx.send(Decision::Approved { by: by.to_owned() });
        }
        Ok(())
    }

    fn list(&self, recent: usize) -> anyhow::Result<Vec<ApprovalRecord>> {
        let mut out = self.query_records(
            "SELECT * FROM approvals WHERE status = 'pending' ORDER BY id",
            params![],
        )?;
        out.extend(self.query_records(
            "SELECT * FROM approvals WHERE status != 'pending' ORDER BY id DESC LIMIT ?1",
            params![recent as i64],
        )?);
        Ok(out)
    }

    /// Denies requests past their deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<(u64, Duration)> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(id, w)| (*id, w.timeout))
            .collect();
        for (id, timeout) in expired {
            let reason = format!("timed out after {}", humantime::format_duration(timeout));
            if let Err(e) = self.close(id, &reason, SYSTEM) {
                tracing::warn!(id, "approval store: {e:#}");
            }
        }
    }

    fn check_pending(&self, id: u64) -> anyhow::Result<PendingRow> {
        let row = self
            .db
            .query_row(
                "SELECT status, decided_by, reason, fingerprint, agent, target
                     FROM approvals WHERE id = ?1",
                params![id as i64],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        PendingRow {
                            fingerprint: r.get::<_, i64>(3)? as u64,
                            agent: r.get(4)?,
                            target: r.get(5)?,
                        },
                    ))
                },
            )
            .optional()?;
        let Some((status, by, reason, pending)) = row else {
            bail!("no approval request with id {id}");
        };
        if status != "pending" {
            let mut msg = format!("approval request {id} was already {status}");
            if let Some(by) = by {
                msg.push_str(&format!(" by {by}"));
            }
            if let Some(reason) = reason.filter(|_| status == "denied") {
                msg.push_str(&format!(" ({reason})"));
            }
            bail!(msg);
        }
        if !self.waiters.contains_key(&id) {
            bail!("approval request {id} is no longer waiting: its session closed");
        }
        Ok(pending)
    }

    /// Denies a pending request and wakes its waiter. The waiter hears the denial even if it
    /// cannot be recorded.
    fn close(&mut self, id: u64, reason: &str, by: &str) -> anyhow::Result<()> {
        let result = self.db.execute(
            "UPDATE approvals SET status = 'denied', decided_at = ?2, decided_by = ?3, reason = ?4
             WHERE id = ?1 AND status = 'pending'",
            params![id as i64, now_ms(), by, reason],
        );
        if let Some(w) = self.waiters.remove(&id) {
            self.settled();
            let _ = w.tx.send(Decision::Denied {
                reason: reason.to_owned(),
            });
        }
        result.context("recording the denial")?;
        Ok(())
    }

    fn query_records(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> anyhow::Result<Vec<ApprovalRecord>> {
        let mut stmt = self.db.prepare(sql)?;
        let rows = stmt.query_map(params, |r| {
            let ms = |name: &str| -> rusqlite::Result<Option<String>> {
                Ok(r.get::<_, Option<i64>>(name)?.map(rfc3339))
            };
            Ok(ApprovalRecord {
                id: r.get::<_, i64>("id")? as u64,
                status: Status::parse(&r.get::<_, String>("status")?),
                created_at: rfc3339(r.get("created_at")?),
                agent: r.get("agent")?,
                subject: r.get("subject")?,
                actors: r
                    .get::<_, Option<String>>("actors")?
                    .and_then(|a| serde_json::from_str(&a).ok())
                    .unwrap_or_default(),
                pid: r.get("pid")?,
                target: r.get("target")?,
                database: r.get("database")?,
                sql: r.get("sql")?,
                rule: r.get("rule")?,
                fingerprint: format!("{:016x}", r.get::<_, i64>("fingerprint")? as u64),
                decided_at: ms("decided_at")?,
                decided_by: r.get("decided_by")?,
                reason: r.get("reason")?,
                scope: r
                    .get::<_, Option<String>>("scope")?
                    .map(|s| match s.as_str() {
                        "fingerprint" => Scope::Fingerprint,
                        _ => Scope::Statement,
                    }),
                grant_until: ms("grant_until")?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Stores made before identity lack `subject` and `actors`: add them, keeping every row.
fn add_identity_columns(db: &Connection) -> rusqlite::Result<()> {
    let mut stmt = db.prepare("SELECT name FROM pragma_table_info('approvals')")?;
    let have = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for column in ["subject", "actors"] {
        if !have.iter().any(|c| c == column) {
            db.execute_batch(&format!("ALTER TABLE approvals ADD COLUMN {column} TEXT"))?;
        }
    }
    Ok(())
}

/// Deletes decided requests created more than `retention` ago, unless they carry a grant that
/// expired less than `retention` ago (or not at all). Pending rows are never pruned.
fn prune(db: &Connection, retention: Duration) -> rusqlite::Result<usize> {
    let cutoff = now_ms().saturating_sub(retention.as_millis().min(i64::MAX as u128) as i64);
    db.execute(
        "DELETE FROM approvals WHERE status != 'pending' AND created_at < ?1
             AND (grant_until IS NULL OR grant_until < ?1)",
        params![cutoff],
    )
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Held SQL can carry sensitive values: only the gateway's user reads the store.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting permissions of {}", path.display()))
}

/// Resolves to the operator's decision for one held statement.
pub struct PendingDecision {
    id: u64,
    rx: oneshot::Receiver<Decision>,
    inner: Weak<Inner>,
    done: bool,
}

impl PendingDecision {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Future for PendingDecision {
    type Output = Decision;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Decision> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.done = true;
                Poll::Ready(result.unwrap_or_else(|_| Decision::Denied {
                    reason: "the gateway is shutting down".into(),
                }))
            }
        }
    }
}

impl Drop for PendingDecision {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The store thread records the withdrawal: no database write on the caller's thread.
        if let Some(inner) = self.inner.upgrade() {
            inner.send(Job::Abandon(self.id));
        }
    }
}

/// Formats records for `portcullis approvals`: a table, or JSON with `json`.
pub fn print_approvals(records: &[ApprovalRecord], json: bool) -> String {
    if json {
        let mut s = serde_json::to_string_pretty(records).unwrap_or_else(|_| "[]".into());
        s.push('\n');
        return s;
    }
    if records.is_empty() {
        return "no approval requests\n".into();
    }
    let now = SystemTime::now();
    let header = [
        "ID", "STATUS", "AGE", "AGENT", "SUBJECT", "ACTORS", "PID", "TARGET", "RULE", "DECISION",
        "SQL",
    ];
    let rows: Vec<[String; 11]> = records
        .iter()
        .map(|r| {
            let age = humantime::parse_rfc3339(&r.created_at)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
                .unwrap_or_else(|| "-".into());
            let decision = match r.status {
                Status::Pending => String::new(),
                Status::Approved => {
                    let by = r.decided_by.as_deref().unwrap_or("?");
                    match &r.grant_until {
                        Some(until) => format!("by {by}, fingerprint until {until}"),
                        None => format!("by {by}"),
                    }
                }
                Status::Denied => r.reason.clone().unwrap_or_default(),
            };
            [
                r.id.to_string(),
                r.status.as_str().to_owned(),
                age,
                r.agent.clone().unwrap_or_else(|| "-".into()),
                r.subject.clone().unwrap_or_else(|| "-".into()),
                match r.actors.is_empty() {
                    true => "-".into(),
                    false => r.actors.join(","),
                },
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                format!("{}/{}", r.target, r.database),
                r.rule.clone(),
                decision,
                one_line(&r.sql, 60),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// SQL on one line, whitespace collapsed, cut at `max` characters.
fn one_line(sql: &str, max: usize) -> String {
    let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}
