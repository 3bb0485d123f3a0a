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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures_channel::oneshot;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The outcome a held statement waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Approved,
    /// Denied by an operator, timed out, or abandoned; `reason` goes into the ErrorResponse.
    Denied {
        reason: String,
    },
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
    pub pid: Option<u32>,
    pub target: String,
    pub database: String,
    pub sql: String,
    pub rule: String,
    /// 16 hex digits.
    pub fingerprint: String,
    pub decided_at: Option<String>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    pub scope: Option<Scope>,
    /// Until when a fingerprint grant lets matching statements through.
    pub grant_until: Option<String>,
}

/// The approval store, shared (`Arc`) by worker threads and the admin API.
pub struct Approvals {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    db: Connection,
    waiters: HashMap<u64, Waiter>,
    grants: Vec<Grant>,
    /// Requests whose session stopped waiting, to be closed by the reaper.
    abandoned: Vec<u64>,
    shutdown: bool,
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

impl Approvals {
    /// Opens (or creates) `STATE_DIR/approvals.db`. Requests left pending by a previous run are
    /// denied ("gateway restarted"); fingerprint grants still live are kept.
    pub fn open(state_dir: &Path) -> anyhow::Result<Arc<Approvals>> {
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
        let now = now_ms();
        db.execute(
            "UPDATE approvals SET status = 'denied', decided_at = ?1, decided_by = ?2,
                 reason = 'gateway restarted' WHERE status = 'pending'",
            params![now, SYSTEM],
        )?;
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                db,
                waiters: HashMap::new(),
                grants,
                abandoned: Vec::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
        });
        let reaper = shared.clone();
        std::thread::Builder::new()
            .name("portcullis-approvals".into())
            .spawn(move || reap(&reaper))
            .context("starting the approval timeout thread")?;
        Ok(Arc::new(Approvals { shared }))
    }

    /// Records a pending request. The returned future resolves when an operator decides, when
    /// `timeout` passes (denied, "timed out after 5m"), or as denied if the store shuts down. It is
    /// runtime-agnostic and needs no timer from the caller. Dropping it before it resolves denies
    /// the request ("session closed before a decision").
    pub fn request(
        &self,
        req: NewApproval,
        timeout: Duration,
    ) -> anyhow::Result<(u64, PendingDecision)> {
        let mut st = self.shared.lock();
        st.db.execute(
            "INSERT INTO approvals (created_at, agent, pid, target, database, sql, rule, fingerprint, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
            params![
                now_ms(),
                req.agent,
                req.pid,
                req.target,
                req.database,
                req.sql,
                req.rule,
                req.fingerprint as i64
            ],
        )
        .context("recording the approval request")?;
        let id = st.db.last_insert_rowid() as u64;
        let (tx, rx) = oneshot::channel();
        st.waiters.insert(
            id,
            Waiter {
                tx,
                deadline: Instant::now() + timeout,
                timeout,
            },
        );
        drop(st);
        self.shared.wake.notify_all();
        Ok((
            id,
            PendingDecision {
                id,
                rx,
                shared: Arc::downgrade(&self.shared),
                done: false,
            },
        ))
    }

    /// True when a live fingerprint grant covers this statement for this agent and target.
    pub fn granted(&self, fingerprint: u64, agent: Option<&str>, target: &str) -> bool {
        let mut st = self.shared.lock();
        let now = now_ms();
        st.grants.retain(|g| g.until_ms > now);
        st.grants.iter().any(|g| {
            g.fingerprint == fingerprint && g.agent.as_deref() == agent && g.target == target
        })
    }

    /// Approves a pending request. `Scope::Fingerprint` needs `for_` (how long the grant lasts);
    /// `Scope::Statement` takes none.
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
        let mut st = self.shared.lock();
        let row = st.check_pending(id)?;
        let now = now_ms();
        let until = grant_for.map(|d| now.saturating_add(d.as_millis() as i64));
        st.db
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
        if let Some(until_ms) = until {
            st.grants.push(Grant {
                fingerprint: row.fingerprint,
                agent: row.agent,
                target: row.target,
                until_ms,
            });
        }
        if let Some(w) = st.waiters.remove(&id) {
            let _ = w.tx.send(Decision::Approved);
        }
        Ok(())
    }

    /// Denies a pending request.
    pub fn deny(&self, id: u64, reason: Option<&str>, by: &str) -> anyhow::Result<()> {
        let reason = match reason {
            Some(r) if !r.trim().is_empty() => format!("denied by {by}: {}", r.trim()),
            _ => format!("denied by {by}"),
        };
        let mut st = self.shared.lock();
        st.check_pending(id)?;
        st.close(id, &reason, by)
    }

    /// Every pending request (oldest first), then the `recent` most recently created decided ones.
    pub fn list(&self, recent: usize) -> anyhow::Result<Vec<ApprovalRecord>> {
        let st = self.shared.lock();
        let mut out = st.query_records(
            "SELECT * FROM approvals WHERE status = 'pending' ORDER BY id",
            params![],
        )?;
        out.extend(st.query_records(
            "SELECT * FROM approvals WHERE status != 'pending' ORDER BY id DESC LIMIT ?1",
            params![recent as i64],
        )?);
        Ok(out)
    }
}

impl Drop for Approvals {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (each change is one SQL statement).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct PendingRow {
    fingerprint: u64,
    agent: Option<String>,
    target: String,
}

impl State {
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
        if self.abandoned.contains(&id) {
            bail!("approval request {id} is no longer waiting: its session closed");
        }
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

/// The timeout thread: denies requests past their deadline and those whose session went away.
fn reap(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        for id in std::mem::take(&mut st.abandoned) {
            if let Err(e) = st.close(id, "session closed before a decision", SYSTEM) {
                tracing::warn!(id, "approval store: {e:#}");
            }
        }
        let now = Instant::now();
        let expired: Vec<(u64, Duration)> = st
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(id, w)| (*id, w.timeout))
            .collect();
        for (id, timeout) in expired {
            let reason = format!("timed out after {}", humantime::format_duration(timeout));
            if let Err(e) = st.close(id, &reason, SYSTEM) {
                tracing::warn!(id, "approval store: {e:#}");
            }
        }
        let next = st.waiters.values().map(|w| w.deadline).min();
        st = match next {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
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
    shared: Weak<Shared>,
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
        // Hand the bookkeeping to the reaper: no database write on the caller's thread.
        if let Some(shared) = self.shared.upgrade() {
            let mut st = shared.lock();
            if st.waiters.remove(&self.id).is_some() {
                st.abandoned.push(self.id);
            }
            drop(st);
            shared.wake.notify_all();
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
        "ID", "STATUS", "AGE", "AGENT", "PID", "TARGET", "RULE", "DECISION", "SQL",
    ];
    let rows: Vec<[String; 9]> = records
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
