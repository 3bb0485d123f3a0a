//! Operating the gateway: `portcullis status` and `sessions` (tables and --json), the CLI with
//! no gateway running, the upstream password never leaking, SIGTERM draining, SIGHUP reloading.
//! All of these are about the gateway process, so they skip in direct mode.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::wire::{self, RawConn};
use testkit::{
    Gateway, GatewayOptions, Harness, Postgres, output_within, portcullis_bin, single_target_toml,
    skip_in_direct, write_secret,
};

const SESSION_FIELDS: [&str; 11] = [
    "id",
    "client_addr",
    "original_dst",
    "target",
    "upstream_user",
    "started_at",
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "state",
];

/// Runs a CLI command against the gateway, returning stdout; fails on a non-zero exit.
fn cli_ok(h: &Harness, args: &[&str]) -> String {
    let out = h.must(h.gw().cli(args), "run the CLI");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "portcullis {args:?} failed ({}): {}{}\n{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr),
        h.context()
    );
    stdout
}

fn sessions_json(h: &Harness) -> Vec<Value> {
    let out = cli_ok(h, &["sessions", "--json"]);
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(a)) => a,
        other => panic!("sessions --json is not a JSON array: {other:?}\n{out}"),
    }
}

/// The session whose client address is `addr`.
fn session_of(h: &Harness, addr: std::net::SocketAddr) -> Option<Value> {
    sessions_json(h)
        .into_iter()
        .find(|s| s["client_addr"].as_str() == Some(addr.to_string().as_str()))
}

fn number(s: &Value, field: &str) -> u64 {
    s[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number in {s}"))
}

#[test]
fn sessions_and_status_report_live_sessions() {
    if skip_in_direct(
        "sessions_and_status_report_live_sessions",
        "it tests the gateway CLI",
    ) {
        return;
    }
    let h = Harness::start().expect("start");
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
    for _ in 0..3 {
        h.must(conn.simple_query("SELECT 1"), "query");
    }
    let mut other = h.must(RawConn::to(&ep), "connect another");
    h.must(other.startup(&ep, wire::PROTOCOL_3_0), "startup");

    let all = sessions_json(&h);
    assert!(all.len() >= 2, "two live sessions listed: {all:?}");
    let s = session_of(&h, conn.local_addr()).unwrap_or_else(|| {
        panic!(
            "no session with client_addr {}: {all:?}\n{}",
            conn.local_addr(),
            h.context()
        )
    });
    for f in SESSION_FIELDS {
        assert!(s.get(f).is_some(), "session lacks field {f}: {s}");
    }
    assert_eq!(
        s["original_dst"].as_str(),
        Some(h.gw().listen.to_string().as_str()),
        "original destination is the listen address: {s}"
    );
    assert_eq!(s["upstream_user"].as_str(), Some("app"), "{s}");
    assert!(
        !s["target"].as_str().unwrap_or_default().is_empty(),
        "target named: {s}"
    );
    assert!(
        !s["started_at"].to_string().trim_matches('"').is_empty(),
        "started_at: {s}"
    );
    let (m_in, b_in, m_out, b_out) = (
        number(&s, "messages_in"),
        number(&s, "bytes_in"),
        number(&s, "messages_out"),
        number(&s, "bytes_out"),
    );
    assert!(m_in >= 3 && b_in > 0, "client→upstream counters: {s}");
    assert!(m_out >= 3 && b_out > 0, "upstream→client counters: {s}");
    let other_s = session_of(&h, other.local_addr()).expect("the second session is listed");
    assert_ne!(other_s["id"], s["id"], "session ids differ");

    // Counters are live.
    for _ in 0..10 {
        h.must(conn.simple_query("SELECT 2"), "query");
    }
    let s2 = session_of(&h, conn.local_addr()).expect("still listed");
    assert!(
        number(&s2, "messages_in") >= m_in + 10,
        "messages_in grows: {s} then {s2}"
    );
    assert!(number(&s2, "bytes_out") > b_out, "bytes_out grows");

    // The table form lists the same session.
    let table = cli_ok(&h, &["sessions"]);
    assert!(
        table.contains(&conn.local_addr().to_string()),
        "sessions table shows the client address:\n{table}"
    );

    // status: version, listeners, session counts.
    let status = cli_ok(&h, &["status", "--json"]);
    let v: Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {status}"));
    assert!(v.is_object(), "status --json is an object: {status}");
    assert!(
        status.contains(env!("CARGO_PKG_VERSION")),
        "status shows the version: {status}"
    );
    assert!(
        status.contains(&h.gw().listen.to_string()),
        "status lists the listener: {status}"
    );
    let table = cli_ok(&h, &["status"]);
    assert!(
        table.contains(env!("CARGO_PKG_VERSION")),
        "status table shows the version:\n{table}"
    );

    // A closed session leaves the list.
    let gone = conn.local_addr();
    conn.send(&wire::frontend(b'X', b"")).unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while session_of(&h, gone).is_some() {
        assert!(
            Instant::now() < deadline,
            "a terminated session is still listed after 10 s\n{}",
            h.context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cli_against(socket: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(portcullis_bin());
    cmd.args(args).arg("--admin-socket").arg(socket);
    output_within(&mut cmd, Duration::from_secs(20))
        .expect("run the CLI")
        .unwrap_or_else(|| panic!("portcullis {args:?} hangs without a gateway"))
}

#[test]
fn cli_without_a_gateway_errors_clearly() {
    if skip_in_direct(
        "cli_without_a_gateway_errors_clearly",
        "it tests the gateway CLI",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap()); // the file stays, nobody listens
    for socket in [&missing, &stale] {
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["sessions"],
            &["sessions", "--json"],
        ] {
            let out = cli_against(socket, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "portcullis {args:?} succeeded with no gateway at {}",
                socket.display()
            );
            assert!(
                stderr.contains(&socket.display().to_string()),
                "the error names the socket {}: {stderr}",
                socket.display()
            );
            assert!(
                !stderr.contains("panicked"),
                "a panic is not a clear error: {stderr}"
            );
            assert!(
                out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains('{'),
                "no JSON on stdout when failing"
            );
        }
    }
}

/// Everything observable about the gateway, as text, to search for a secret in.
fn observable_output(gw: &Gateway) -> Vec<(String, String)> {
    let mut out = vec![("gateway log".to_string(), gw.log())];
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["sessions"],
        &["sessions", "--json"],
    ] {
        if let Ok(o) = gw.cli(args) {
            out.push((
                format!("portcullis {args:?}"),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ));
        }
    }
    if let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", gw.pid())) {
        out.push(("cmdline".into(), String::from_utf8_lossy(&cmdline).into()));
    }
    let mut stack = vec![gw.state_dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((
                    format!("state file {}", p.display()),
                    String::from_utf8_lossy(&bytes).into(),
                ));
            }
        }
    }
    out
}

fn assert_no_secret(gw: &Gateway, secret: &str) {
    for (what, text) in observable_output(gw) {
        assert!(
            !text.contains(secret),
            "the upstream password appears in the {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_password_never_leaks() {
    if skip_in_direct(
        "upstream_password_never_leaks",
        "it inspects the gateway's output",
    ) {
        return;
    }
    // Most verbose logging: no level may carry the secret.
    let h = Harness::builder()
        .gateway_env("RUST_LOG", "trace")
        .start()
        .expect("start");
    let ep = h.endpoint();
    let c = h.must(ep.connect().await, "connect");
    h.must(
        c.batch_execute("CREATE TABLE s (v text); INSERT INTO s VALUES ('x')")
            .await,
        "work",
    );
    let _ = c.query("SELECT * FROM missing", &[]).await;
    let _ = c.query_one("SELECT $1::text", &[&"param"]).await;
    let mut raw = h.must(RawConn::to(&ep), "raw connect");
    raw.send(&wire::frontend(b'z', b"garbage")).unwrap();
    let _ = raw.read_until_closed();
    // A session is live while the CLI output is captured.
    let _live = h.must(ep.connect().await, "connect");
    assert_no_secret(h.gw(), &h.pg.password);
    drop(c);

    // With a wrong password the gateway fails authentication: that password stays hidden too.
    let wrong = "Wr0ng-upstream-secret-1234";
    let h = Harness::builder()
        .gateway_env("RUST_LOG", "trace")
        .upstream_password(wrong)
        .start()
        .expect("start");
    let _ = h.endpoint().try_connect().await;
    let _ = h.endpoint().psql(h.bindir(), "SELECT 1");
    assert_no_secret(h.gw(), wrong);
}

/// Sessions spread evenly over the I/O workers whichever worker's listener the kernel picked: by
/// its SO_REUSEPORT hash alone, 16 connections land 4/4/4/4 on four workers about one time in 70.
/// Every session, handed over to another worker or not, serves queries and can be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_evenly_over_the_workers() {
    if skip_in_direct(
        "sessions_spread_evenly_over_the_workers",
        "it counts the gateway's workers",
    ) {
        return;
    }
    // The shipped policy, masking included: a handed-over session runs the same stages.
    let h = Harness::builder()
        .gateway_arg("--workers")
        .gateway_arg("4")
        .gateway_arg("--policy")
        .gateway_arg("default")
        .start()
        .expect("start");
    let ep = h.endpoint();
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(h.must(ep.connect().await, "connect"));
    }
    let mut per_worker = [0; 4];
    for s in sessions_json(&h) {
        per_worker[number(&s, "worker") as usize] += 1;
    }
    assert_eq!(per_worker, [4; 4], "sessions per worker\n{}", h.context());

    let mut sleepers = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let token = c.cancel_token();
        let sleep = tokio::spawn(async move {
            let r = c
                .simple_query(&format!("SELECT pg_sleep(60) AS s{i}"))
                .await;
            (r, c)
        });
        sleepers.push((i, token, sleep));
    }
    for (i, token, _) in &sleepers {
        h.must(
            h.pg.wait_active(&format!("AS s{i}"), Duration::from_secs(20)),
            "the sleep reaches PostgreSQL",
        );
        h.must(token.cancel_query(tokio_postgres::NoTls).await, "cancel");
    }
    for (i, _, sleep) in sleepers {
        let Ok(joined) = tokio::time::timeout(Duration::from_secs(30), sleep).await else {
            panic!(
                "session {i}'s sleep still runs 30 s after its cancel\n{}",
                h.context()
            );
        };
        let (r, c) = joined.expect("sleeper task");
        let err = r.expect_err("the cancelled query fails");
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("57014"),
            "session {i}: query_canceled, got {err:?}\n{}",
            h.context()
        );
        let one: i32 = h
            .must(c.query_one("SELECT 1", &[]).await, "query after the cancel")
            .get(0);
        assert_eq!(one, 1);
        // Whichever worker serves it, the session's results are masked.
        let email: String = h
            .must(
                c.query_one("SELECT 'alice.smith@example.com'::text", &[])
                    .await,
                "an email through the session",
            )
            .get(0);
        assert!(
            !email.contains("alice.smith"),
            "session {i} returned {email:?} unmasked"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    if skip_in_direct("sigterm_drains_and_exits_zero", "it signals the gateway") {
        return;
    }
    let mut h = Harness::start().expect("start");
    let ep = h.endpoint();
    let c = h.must(ep.connect().await, "connect");
    let _idle = h.must(ep.connect().await, "connect an idle session");
    let in_flight = tokio::spawn(async move {
        c.query_one("SELECT pg_sleep(2), 'finished'::text", &[])
            .await
            .map(|r| r.get::<_, String>(1))
    });
    h.must(
        h.pg.wait_active("pg_sleep(2)", Duration::from_secs(20)),
        "the query is running",
    );

    let gw = h.gateway.as_mut().unwrap();
    let listen = gw.listen;
    // Waits beyond any sensible drain deadline; the assertion is the exit code.
    let status = gw
        .terminate_within(Duration::from_secs(120))
        .expect("signal the gateway");
    let log = gw.log_tail(40);
    let status = status.unwrap_or_else(|| panic!("the gateway ignores SIGTERM:\n{log}"));
    assert!(
        status.success(),
        "the gateway exits 0 on SIGTERM, got {status}:\n{log}"
    );
    assert!(!log.contains("panicked"), "a panic during shutdown:\n{log}");
    // The in-flight query was allowed to finish (drained, not cut).
    let r = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("in-flight query resolves")
        .unwrap();
    assert_eq!(
        r.as_deref().ok(),
        Some("finished"),
        "the query in flight at SIGTERM completes: {r:?}\n{log}"
    );
    assert!(
        std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(2)).is_err(),
        "the listener is closed after exit"
    );
}

/// A gateway started from a config file (so SIGHUP has something to reload).
fn config_gateway(pg: &Postgres, dir: &Path) -> Gateway {
    let pwfile = write_secret(dir, "main.password", &pg.password).unwrap();
    let listen = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    Gateway::start(GatewayOptions::with_config(
        listen,
        single_target_toml(listen, &pg.url(), &pwfile),
    ))
    .expect("start the gateway from a config file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_sessions_and_reloads_credentials() {
    if skip_in_direct(
        "sighup_keeps_sessions_and_reloads_credentials",
        "it signals the gateway",
    ) {
        return;
    }
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let mut gw = config_gateway(&pg, dir.path());
    let ep = testkit::Endpoint {
        host: gw.listen.ip().to_string(),
        port: gw.listen.port(),
        user: "agent".into(),
        password: None,
        dbname: "app".into(),
        params: vec![],
    };
    let ctx = |gw: &Gateway| format!("gateway log:\n{}", gw.log_tail(40));
    let before = ep
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e:#}\n{}", ctx(&gw)));
    before
        .batch_execute("BEGIN; CREATE TABLE r (v int); INSERT INTO r VALUES (1)")
        .await
        .unwrap();

    gw.signal(1);
    // Existing sessions, even one inside a transaction, carry on.
    let v: i64 = before
        .query_one("SELECT count(*) FROM r", &[])
        .await
        .unwrap_or_else(|e| panic!("session after SIGHUP: {e}\n{}", ctx(&gw)))
        .get(0);
    assert_eq!(v, 1);
    before.batch_execute("COMMIT").await.unwrap();
    assert!(
        gw.try_wait().unwrap().is_none(),
        "the gateway exited on SIGHUP:\n{}",
        ctx(&gw)
    );
    let after = ep
        .connect()
        .await
        .unwrap_or_else(|e| panic!("new session after SIGHUP: {e:#}\n{}", ctx(&gw)));
    after.query_one("SELECT 1", &[]).await.unwrap();

    // Rotate the upstream password: the file changes, then SIGHUP; new sessions use it.
    let rotated = testkit::random_password();
    pg.superuser_sql(&format!("ALTER ROLE app PASSWORD '{rotated}'"))
        .map_err(|e| testkit::redact(&e.to_string(), &rotated))
        .unwrap();
    write_secret(dir.path(), "main.password", &rotated).unwrap();
    gw.signal(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ep.try_connect().await {
            Ok(c) => {
                c.query_one("SELECT 1", &[]).await.unwrap();
                break;
            }
            Err(e) if Instant::now() > deadline => panic!(
                "new sessions still fail 30 s after the password was rotated and SIGHUP sent: {e}\n{}",
                ctx(&gw)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Sessions opened before the rotation are still up.
    before.query_one("SELECT 1", &[]).await.unwrap();
    after.query_one("SELECT 1", &[]).await.unwrap();
    assert!(
        !gw.log().contains(&rotated),
        "the rotated password reached the log"
    );
}

/// Two listeners in one config, each routed to its own target (one credential from a file, one
/// from the environment): the original destination picks the upstream.
#[test]
fn listeners_route_to_their_own_targets() {
    if skip_in_direct(
        "listeners_route_to_their_own_targets",
        "it tests the gateway's routing",
    ) {
        return;
    }
    let pg_a = Postgres::start().expect("start PostgreSQL a");
    let pg_b = Postgres::start().expect("start PostgreSQL b");
    let dir = tempfile::tempdir().unwrap();
    let pw_a = write_secret(dir.path(), "a.password", &pg_a.password).unwrap();
    let port = || testkit::free_port();
    let listen_a: std::net::SocketAddr = format!("127.0.0.1:{}", port()).parse().unwrap();
    let listen_b: std::net::SocketAddr = format!("127.0.0.1:{}", port()).parse().unwrap();
    let body = format!(
        "[[listener]]\nlisten = \"{listen_a}\"\ntarget = \"a\"\n\n\
         [[listener]]\nlisten = \"{listen_b}\"\ntarget = \"b\"\n\n\
         [[target]]\nname = \"a\"\nupstream = \"{}\"\npassword_file = \"{}\"\n\n\
         [[target]]\nname = \"b\"\nupstream = \"{}\"\npassword_env = \"PORTCULLIS_TEST_PASSWORD_B\"\n",
        pg_a.url(),
        pw_a.display(),
        pg_b.url()
    );
    let gw = Gateway::start(
        GatewayOptions::with_config(listen_a, body)
            .env("PORTCULLIS_TEST_PASSWORD_B", pg_b.password.clone()),
    )
    .expect("start the gateway with two listeners");
    let conninfo = |l: std::net::SocketAddr| {
        format!(
            "host={} port={} user=agent dbname=app sslmode=disable",
            l.ip(),
            l.port()
        )
    };
    let port_via = |l: std::net::SocketAddr| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (out, err, ok) = testkit::psql(
                pg_a.bindir(),
                &conninfo(l),
                "SELECT current_setting('port')",
            )
            .unwrap();
            if ok {
                return out.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "psql via {l}: {err}\n{}",
                gw.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(port_via(listen_a), pg_a.port.to_string(), "listener a → a");
    assert_eq!(port_via(listen_b), pg_b.port.to_string(), "listener b → b");

    // sessions shows each session's original destination and target.
    let ep = |l: std::net::SocketAddr| testkit::Endpoint {
        host: l.ip().to_string(),
        port: l.port(),
        user: "agent".into(),
        password: None,
        dbname: "app".into(),
        params: vec![],
    };
    let mut on_b = RawConn::to(&ep(listen_b)).unwrap();
    on_b.startup(&ep(listen_b), wire::PROTOCOL_3_0).unwrap();
    let out = gw.cli(&["sessions", "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("sessions --json");
    let s = all
        .iter()
        .find(|s| s["client_addr"].as_str() == Some(on_b.local_addr().to_string().as_str()))
        .unwrap_or_else(|| panic!("session on listener b not listed: {all:?}"));
    assert_eq!(
        s["original_dst"].as_str(),
        Some(listen_b.to_string().as_str())
    );
    let target = s["target"].as_str().unwrap_or_default();
    assert!(
        target == "b" || target.contains(&pg_b.port.to_string()),
        "target of the session on listener b: {s}"
    );
    let log = gw.log();
    assert!(!log.contains(&pg_a.password) && !log.contains(&pg_b.password));
}
