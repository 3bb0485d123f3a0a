//! The approval store: approve, deny, timeout, a session going away, restart denies what was
//! pending, fingerprint grants and their expiry, listing and printing.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

use portcullis::policy::approval::Status;
use portcullis::policy::{Approvals, Decision, NewApproval, Scope, print_approvals};

/// Runs a future to completion on this thread: the store's futures need no runtime.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Polls `cond` until it holds (bounded), for effects of the background reaper.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not happen within 10s");
}

fn req(sql: &str, fingerprint: u64) -> NewApproval {
    NewApproval {
        agent: Some("claude".into()),
        subject: Some("alice".into()),
        actors: vec!["claude-agent".into()],
        pid: Some(4242),
        target: "prod".into(),
        database: "app".into(),
        sql: sql.into(),
        rule: "writes".into(),
        fingerprint,
    }
}

const LONG: Duration = Duration::from_secs(3600);

fn open(dir: &Path) -> Arc<Approvals> {
    Approvals::open(dir).expect("open the approval store")
}

#[test]
fn approve_resolves_the_waiting_session() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a
        .request(req("DELETE FROM t WHERE id = 1", 7), LONG)
        .unwrap();
    assert_eq!(pending.id(), id);
    let approver = {
        let a = a.clone();
        std::thread::spawn(move || a.approve(id, None, Scope::Statement, "alice"))
    };
    assert!(matches!(block_on(pending), Decision::Approved { .. }));
    approver.join().unwrap().unwrap();
    let rec = &a.list(10).unwrap()[0];
    assert_eq!((rec.id, rec.status), (id, Status::Approved));
    assert_eq!(rec.decided_by.as_deref(), Some("alice"));
    assert_eq!(rec.scope, Some(Scope::Statement));
    assert_eq!(rec.sql, "DELETE FROM t WHERE id = 1");
    assert_eq!(rec.pid, Some(4242));
    assert_eq!(rec.fingerprint, "0000000000000007");
    // Who asked, on whose behalf: kept with the request.
    assert_eq!(rec.subject.as_deref(), Some("alice"));
    assert_eq!(rec.actors, vec!["claude-agent".to_owned()]);
    // A statement approval is not a grant.
    assert!(!a.granted(7, Some("claude"), "prod"));
}

#[test]
fn deny_resolves_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    a.deny(id, Some("not during business hours"), "bob")
        .unwrap();
    assert_eq!(
        block_on(pending),
        Decision::Denied {
            reason: "denied by bob: not during business hours".into()
        }
    );
    let (id2, pending2) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    a.deny(id2, None, "bob").unwrap();
    assert_eq!(
        block_on(pending2),
        Decision::Denied {
            reason: "denied by bob".into()
        }
    );
    assert!(id2 > id);
}

#[test]
fn timeout_denies() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a
        .request(req("DELETE FROM t", 1), Duration::from_millis(50))
        .unwrap();
    // Another request with a long timeout must not delay the short one.
    let (_, _keep) = a.request(req("DELETE FROM u", 2), LONG).unwrap();
    assert_eq!(
        block_on(pending),
        Decision::Denied {
            reason: "timed out after 50ms".into()
        }
    );
    let recs = a.list(10).unwrap();
    let rec = recs.iter().find(|r| r.id == id).unwrap();
    assert_eq!(rec.status, Status::Denied);
    assert_eq!(rec.reason.as_deref(), Some("timed out after 50ms"));
    let err = a.approve(id, None, Scope::Statement, "alice").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("approval request {id} was already denied by portcullis (timed out after 50ms)")
    );
}

#[test]
fn a_session_that_goes_away_withdraws_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    drop(pending);
    let err = a
        .approve(id, None, Scope::Statement, "alice")
        .unwrap_err()
        .to_string();
    assert!(
        err == format!("approval request {id} is no longer waiting: its session closed")
            || err.contains("session closed before a decision"),
        "{err}"
    );
    eventually("the reaper recording the withdrawal", || {
        a.list(10).unwrap()[0].reason.as_deref() == Some("session closed before a decision")
    });
}

#[test]
fn restart_denies_pending_requests() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    drop(a);
    // The old process's waiter is told no.
    assert!(matches!(block_on(pending), Decision::Denied { .. }));
    let b = open(dir.path());
    let recs = b.list(10).unwrap();
    assert_eq!(recs[0].id, id);
    assert_eq!(recs[0].status, Status::Denied);
    assert_eq!(recs[0].reason.as_deref(), Some("gateway restarted"));
    // Never let through afterwards.
    let err = b
        .approve(id, None, Scope::Statement, "alice")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("approval request {id} was already denied by portcullis (gateway restarted)")
    );
    // Ids keep growing across restarts.
    let (id2, _p) = b.request(req("DELETE FROM t", 1), LONG).unwrap();
    assert!(id2 > id);
}

#[test]
fn a_crash_with_requests_pending_is_denied_on_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, _pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    // Requests are written by the store's thread; a round trip through it means this one is.
    a.list(0).unwrap();
    // A second store on the same state dir is what a restarted process sees while the old one's
    // rows are still pending.
    let b = open(dir.path());
    let rec = b
        .list(10)
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap();
    assert_eq!(rec.status, Status::Denied);
    assert_eq!(rec.reason.as_deref(), Some("gateway restarted"));
}

#[test]
fn fingerprint_grants_cover_the_same_statement_shape_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (id, pending) = a
        .request(req("DELETE FROM t WHERE id = 1", 99), LONG)
        .unwrap();
    a.approve(id, Some(LONG), Scope::Fingerprint, "alice")
        .unwrap();
    assert!(matches!(block_on(pending), Decision::Approved { .. }));
    assert!(a.granted(99, Some("claude"), "prod"));
    assert!(!a.granted(98, Some("claude"), "prod"));
    assert!(!a.granted(99, Some("other-agent"), "prod"));
    assert!(!a.granted(99, None, "prod"));
    assert!(!a.granted(99, Some("claude"), "staging"));
    let rec = &a.list(1).unwrap()[0];
    assert_eq!(rec.scope, Some(Scope::Fingerprint));
    assert!(rec.grant_until.is_some());
    // Grants survive a restart.
    drop(a);
    let b = open(dir.path());
    assert!(b.granted(99, Some("claude"), "prod"));

    // A short grant expires.
    let (id, pending) = b
        .request(req("UPDATE t SET a = 1 WHERE id = 2", 5), LONG)
        .unwrap();
    b.approve(
        id,
        Some(Duration::from_millis(1)),
        Scope::Fingerprint,
        "alice",
    )
    .unwrap();
    assert!(matches!(block_on(pending), Decision::Approved { .. }));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!b.granted(5, Some("claude"), "prod"));
}

#[test]
fn bad_decisions_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    assert_eq!(
        a.approve(12345, None, Scope::Statement, "alice")
            .unwrap_err()
            .to_string(),
        "no approval request with id 12345"
    );
    assert_eq!(
        a.deny(12345, None, "alice").unwrap_err().to_string(),
        "no approval request with id 12345"
    );
    let (id, _p) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    assert!(
        a.approve(id, Some(LONG), Scope::Statement, "alice")
            .unwrap_err()
            .to_string()
            .contains("--for applies to --scope fingerprint only")
    );
    assert!(
        a.approve(id, None, Scope::Fingerprint, "alice")
            .unwrap_err()
            .to_string()
            .contains("--scope fingerprint needs --for DURATION")
    );
    a.approve(id, None, Scope::Statement, "alice").unwrap();
    assert_eq!(
        a.approve(id, None, Scope::Statement, "bob")
            .unwrap_err()
            .to_string(),
        format!("approval request {id} was already approved by alice")
    );
    assert_eq!(
        a.deny(id, Some("late"), "bob").unwrap_err().to_string(),
        format!("approval request {id} was already approved by alice")
    );
}

#[test]
fn list_shows_pending_first_then_recent_and_prints() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let mut ids = Vec::new();
    let mut keep = Vec::new();
    for i in 0..5 {
        let (id, p) = a
            .request(req(&format!("DELETE FROM t\n   WHERE id = {i}"), i), LONG)
            .unwrap();
        ids.push(id);
        keep.push(p);
    }
    a.approve(ids[0], None, Scope::Statement, "alice").unwrap();
    a.deny(ids[1], Some("no"), "bob").unwrap();
    a.deny(ids[2], None, "bob").unwrap();
    let recs = a.list(2).unwrap();
    let order: Vec<(u64, Status)> = recs.iter().map(|r| (r.id, r.status)).collect();
    assert_eq!(
        order,
        [
            (ids[3], Status::Pending),
            (ids[4], Status::Pending),
            (ids[2], Status::Denied),
            (ids[1], Status::Denied),
        ]
    );

    let table = print_approvals(&recs, false);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID"), "{table}");
    assert!(
        lines[0].contains("STATUS") && lines[0].contains("SQL"),
        "{table}"
    );
    assert!(
        lines[1].contains("pending") && lines[1].contains("claude"),
        "{table}"
    );
    assert!(lines[1].contains("prod/app"), "{table}");
    assert!(lines[1].ends_with("DELETE FROM t WHERE id = 3"), "{table}");
    assert!(lines[4].contains("denied by bob: no"), "{table}");
    assert_eq!(print_approvals(&[], false), "no approval requests\n");

    let json = print_approvals(&recs, true);
    let back: Vec<portcullis::policy::ApprovalRecord> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, recs);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["status"], "pending");
    assert_eq!(v[0]["agent"], "claude");
}

#[test]
fn the_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nested/state");
    let _a = open(&state);
    let mode = std::fs::metadata(state.join("approvals.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "approvals.db mode {mode:o}");
}

#[test]
fn a_request_never_waits_for_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    // Another writer holds the database: a held statement's session must not wait for it.
    let other = rusqlite::Connection::open(dir.path().join("approvals.db")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (id, pending) = a
        .request(req("DELETE FROM t", 1), LONG)
        .expect("the request is queued, not written on the caller's thread");
    other.execute_batch("COMMIT").unwrap();
    drop(other);
    a.approve(id, None, Scope::Statement, "alice").unwrap();
    assert!(matches!(block_on(pending), Decision::Approved { .. }));
}

#[test]
fn decided_requests_past_the_retention_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let (old, p) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    a.deny(old, None, "bob").unwrap();
    block_on(p);
    let (granted, p) = a.request(req("DELETE FROM g", 2), LONG).unwrap();
    a.approve(granted, Some(LONG), Scope::Fingerprint, "alice")
        .unwrap();
    block_on(p);
    drop(a);
    std::thread::sleep(Duration::from_millis(5));
    let b = Approvals::open_with_retention(dir.path(), Duration::from_millis(1)).unwrap();
    let ids: Vec<u64> = b.list(10).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(ids, [granted], "the denial is gone; the live grant stays");
    assert!(b.granted(2, Some("claude"), "prod"));
    // Ids never go back, even after the newest rows were pruned.
    let (next, _p) = b.request(req("DELETE FROM t", 1), LONG).unwrap();
    assert!(next > granted);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_denies_what_needs_the_store_and_nothing_panics() {
    if !testkit::is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "needs root to mount a tmpfs, and CI requires it"
        );
        eprintln!("SKIPPED a_full_disk_denies_what_needs_the_store: needs root to mount a tmpfs");
        return;
    }
    let fs = Tmpfs::mount("2m");
    let a = open(fs.0.path());
    // Fill what is left.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(fs.0.path().join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
    }
    let big = format!("DELETE FROM t WHERE note = '{}'", "x".repeat(256 * 1024));
    let (id, pending) = a.request(req(&big, 1), LONG).unwrap();
    match block_on(pending) {
        Decision::Denied { reason } => assert!(
            reason.contains("could not record"),
            "a clear reason: {reason}"
        ),
        Decision::Approved { .. } => panic!("approved without a record"),
    }
    // Nobody can approve what was never recorded; the store still answers.
    assert!(a.approve(id, None, Scope::Statement, "alice").is_err());
    // Space again: the store works again.
    std::fs::remove_file(fs.0.path().join("filler")).unwrap();
    let (id, pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    a.approve(id, None, Scope::Statement, "alice").unwrap();
    assert!(matches!(block_on(pending), Decision::Approved { .. }));
}

/// A store written before identity (no `subject`/`actors` columns) opens with its rows intact,
/// and new requests record who asked.
#[test]
fn a_store_from_before_identity_gains_the_identity_columns() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = rusqlite::Connection::open(dir.path().join("approvals.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE approvals (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at INTEGER NOT NULL,
                 agent TEXT, pid INTEGER, target TEXT NOT NULL, database TEXT NOT NULL,
                 sql TEXT NOT NULL, rule TEXT NOT NULL, fingerprint INTEGER NOT NULL,
                 status TEXT NOT NULL, decided_at INTEGER, decided_by TEXT, reason TEXT,
                 scope TEXT, grant_until INTEGER);
             INSERT INTO approvals (created_at, agent, target, database, sql, rule, fingerprint,
                 status, decided_at, decided_by)
             VALUES (strftime('%s','now') * 1000, 'claude', 'prod', 'app', 'DELETE FROM old',
                 'writes', 3, 'approved', strftime('%s','now') * 1000, 'root');",
        )
        .unwrap();
    }
    let a = open(dir.path());
    let (id, pending) = a.request(req("DELETE FROM t", 1), LONG).unwrap();
    a.deny(id, None, "bob (uid 1001)").unwrap();
    block_on(pending);
    let list = a.list(10).unwrap();
    let old = list.iter().find(|r| r.sql == "DELETE FROM old").unwrap();
    assert_eq!((old.subject.as_deref(), old.actors.len()), (None, 0));
    let new = list.iter().find(|r| r.id == id).unwrap();
    assert_eq!(new.subject.as_deref(), Some("alice"));
    assert_eq!(new.decided_by.as_deref(), Some("bob (uid 1001)"));
    let table = print_approvals(&list, false);
    assert!(
        table.contains("SUBJECT") && table.contains("claude-agent"),
        "{table}"
    );
}
