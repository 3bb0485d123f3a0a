//! Load: 200 concurrent sessions, and pgbench in -S and TPC-B modes with -M simple, extended and
//! prepared, with zero failed transactions and consistent results.

use std::sync::Arc;
use std::time::Duration;

use testkit::Harness;
use tokio::sync::Barrier;

const SESSIONS: usize = 200;

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions() {
    let mut h = harness();
    let h_ref = &h;
    h.must(
        h.direct().psql(
            h.bindir(),
            "CREATE TABLE hits (session int, n int, PRIMARY KEY (session, n))",
        ),
        "create table",
    );
    let ep = h.endpoint();
    // Everyone connects, then all wait until all are connected, so the 200 sessions are open at
    // the same time; then each runs its queries and waits again before closing.
    let connected = Arc::new(Barrier::new(SESSIONS + 1));
    let done = Arc::new(Barrier::new(SESSIONS + 1));
    let mut tasks = Vec::new();
    for s in 0..SESSIONS as i32 {
        let ep = ep.clone();
        let (connected, done) = (connected.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let c = ep.connect().await;
            connected.wait().await;
            let result = async {
                // Borrowed, not moved: the session stays open until `done`, so the backend count
                // below sees all of them.
                let c = c.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
                for n in 0..5i32 {
                    c.execute("INSERT INTO hits VALUES ($1, $2)", &[&s, &n])
                        .await?;
                }
                let mine: i64 = c
                    .query_one("SELECT count(*) FROM hits WHERE session = $1", &[&s])
                    .await?
                    .get(0);
                anyhow::ensure!(mine == 5, "session {s} sees {mine} of its 5 rows");
                let msgs = c.simple_query("SELECT 'simple'").await?;
                anyhow::ensure!(msgs.len() == 3, "simple query answer");
                anyhow::Ok(pid)
            }
            .await;
            done.wait().await;
            drop(c);
            result
        }));
    }
    let wait = |b: Arc<Barrier>, what: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(120), b.wait())
            .await
            .unwrap_or_else(|_| panic!("{what}: sessions stuck\n{}", h_ref.context()));
    };
    wait(connected, "connect").await;
    // All 200 are connected and stay open until `done`: PostgreSQL sees 200 backends for role app.
    let backends = h.must(
        h.pg.superuser_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"),
        "count backends",
    );
    wait(done, "queries").await;
    let mut pids = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("session task") {
            Ok(pid) => {
                pids.insert(pid);
            }
            Err(e) => failures.push(format!("session {i}: {e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {SESSIONS} sessions failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        h.context()
    );
    assert_eq!(pids.len(), SESSIONS, "one backend per session");
    let backends: usize = backends.trim().parse().unwrap();
    assert!(
        backends >= SESSIONS,
        "only {backends} backends while {SESSIONS} sessions were open\n{}",
        h.context()
    );
    let total = h.must(
        h.direct().psql(h.bindir(), "SELECT count(*) FROM hits"),
        "count rows",
    );
    assert_eq!(total.stdout.trim(), (SESSIONS * 5).to_string());
    if let Some(gw) = &h.gateway {
        eprintln!(
            "gateway RSS after {SESSIONS} sessions: {:?} KiB",
            testkit::rss_kib(gw.pid())
        );
    }
    h.assert_gateway_alive();
}

/// pgbench output values we check.
struct PgbenchRun {
    processed: String,
    failed: Option<u64>,
    tps: f64,
}

fn run_pgbench(h: &Harness, args: &[&str]) -> PgbenchRun {
    let mut cmd = h.client_cmd("pgbench");
    cmd.args(args);
    let out = h.must(cmd.output(), "run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        h.context()
    );
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let processed = field("number of transactions actually processed:")
        .unwrap_or_else(|| panic!("pgbench output without a processed count:\n{stdout}"));
    let failed = field("number of failed transactions:").map(|v| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("failed count")
    });
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l[6..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if stderr.contains("error") || stderr.contains("ERROR") {
        panic!(
            "pgbench {args:?} reported errors:\n{stderr}\n{}",
            h.context()
        );
    }
    PgbenchRun {
        processed,
        failed,
        tps,
    }
}

#[test]
fn pgbench_select_only_and_tpcb_in_every_protocol_mode() {
    let h = harness();
    // Initialise directly, as the app role (pgbench -i is DDL and COPY, not what is measured).
    let mut init = h.pg.client("pgbench");
    h.direct().apply_env(&mut init);
    init.args(["-i", "-s", "1", "-q"]);
    let out = h.must(init.output(), "pgbench -i");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    const CLIENTS: &str = "4";
    const TX: u64 = 200;
    let expected = format!("{}/{}", 4 * TX, 4 * TX);
    let mut tpcb_transactions = 0u64;
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let tx = TX.to_string();
            let mut args = vec!["-n", "-M", mode, "-c", CLIENTS, "-j", "2", "-t", &tx];
            if select_only {
                args.push("-S");
            }
            let run = run_pgbench(&h, &args);
            let label = format!(
                "pgbench -M {mode} {}",
                if select_only { "-S" } else { "TPC-B" }
            );
            eprintln!(
                "{label}: {} transactions, tps {:.0}",
                run.processed, run.tps
            );
            assert_eq!(
                run.processed,
                expected,
                "{label}: processed\n{}",
                h.context()
            );
            assert_eq!(
                run.failed.unwrap_or(0),
                0,
                "{label}: failed transactions\n{}",
                h.context()
            );
            if !select_only {
                tpcb_transactions += 4 * TX;
            }
        }
    }

    // The TPC-B runs left a consistent database: every transaction is in the history, and the
    // balances add up to the deltas, exactly as they would direct.
    let check = h.must(
        h.direct().psql(
            h.bindir(),
            "SELECT (SELECT count(*) FROM pgbench_history), \
             (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history), \
             (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT sum(delta) FROM pgbench_history), \
             (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT sum(delta) FROM pgbench_history)",
        ),
        "consistency",
    );
    assert_eq!(
        check.stdout.trim(),
        format!("{tpcb_transactions}|t|t|t"),
        "{}",
        h.context()
    );

    // The same query through the endpoint and direct gives the same answer.
    let sql = "SELECT bid, bbalance FROM pgbench_branches ORDER BY bid";
    let via = h.must(h.endpoint().psql(h.bindir(), sql), "psql");
    let direct = h.must(h.direct().psql(h.bindir(), sql), "psql direct");
    assert!(via.success, "{}", via.stderr);
    assert_eq!(via.stdout, direct.stdout);
}
