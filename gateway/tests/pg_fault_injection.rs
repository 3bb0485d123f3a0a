//! Fault injection on a live gateway running the shipped `default` policy: the upstream cut in
//! the middle of a COPY and of a pipeline, a client that trickles its statement a byte at a time,
//! and ten thousand connections at once. Each fault ends only the session it hits, with an error
//! the client can read or a closed connection, never a hang; every other session carries on.
//!
//! The upstream is reached through [`Relay`], a TCP relay the test can cut per connection, so a
//! fault hits one backend exactly as a dead server or a broken path would.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use testkit::wire::{PROTOCOL_3_0, RawConn, query, startup_message};
use testkit::{Gateway, GatewayOptions, Postgres, free_port, single_target_toml};
use tokio_postgres::{Client, NoTls};

/// One relayed connection: both sockets, so the test can cut it, and the bytes it carried.
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    bytes: Arc<AtomicU64>,
}

/// A TCP relay in front of PostgreSQL that counts and can cut each connection.
struct Relay {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<Link>>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let registry = links.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let bytes = Arc::new(AtomicU64::new(0));
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let bytes = bytes.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
                registry.lock().unwrap().push(Link {
                    client,
                    upstream: server,
                    bytes,
                });
            }
        });
        Relay { addr, links }
    }

    fn count(&self) -> usize {
        self.links.lock().unwrap().len()
    }

    fn bytes(&self, link: usize) -> u64 {
        self.links.lock().unwrap()[link]
            .bytes
            .load(Ordering::Relaxed)
    }

    /// The upstream dies under one session: both halves of its connection are shut at once.
    fn cut(&self, link: usize) {
        let links = self.links.lock().unwrap();
        let _ = links[link].upstream.shutdown(Shutdown::Both);
        let _ = links[link].client.shutdown(Shutdown::Both);
    }
}

struct Setup {
    pg: Postgres,
    relay: Relay,
    gw: Gateway,
    _dir: tempfile::TempDir,
}

fn setup(gateway_keys: &str) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.app_superuser_sql(
        "CREATE TABLE sink (id int, pad text); ALTER TABLE sink OWNER TO app;
         CREATE TABLE facts (id int PRIMARY KEY, word text); ALTER TABLE facts OWNER TO app;
         INSERT INTO facts SELECT g, 'w' || g FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let relay = Relay::start(pg.addr());
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let url = pg.url().replace(
        &pg.addr().port().to_string(),
        &relay.addr.port().to_string(),
    );
    let gw = start_gateway(&url, &pw, gateway_keys);
    Setup {
        pg,
        relay,
        gw,
        _dir: dir,
    }
}

fn start_gateway(url: &str, pw: &Path, gateway_keys: &str) -> Gateway {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = String::new();
    if !gateway_keys.is_empty() {
        // testkit writes its own [gateway] table first; these keys extend it.
        config.push_str(gateway_keys);
        config.push('\n');
    }
    config.push_str(&single_target_toml(listen, url, pw));
    Gateway::start(
        GatewayOptions::with_config(listen, config)
            .arg("--policy")
            .arg("default"),
    )
    .expect("start gateway")
}

async fn connect(gw: &Gateway) -> Client {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    tokio::spawn(conn);
    client
}

/// A session opened now, and the relay link that carries it.
async fn session(s: &Setup) -> (Client, usize) {
    let before = s.relay.count();
    let client = connect(&s.gw).await;
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(s.relay.count(), before + 1, "one upstream link per session");
    (client, before)
}

/// The survivor still answers, and a session opened after the fault works too.
async fn others_carry_on(s: &Setup, survivor: &Client) {
    let n: i64 = survivor
        .query_one("SELECT count(*) FROM facts", &[])
        .await
        .expect("a session the fault did not hit still answers")
        .get(0);
    assert_eq!(n, 100);
    let fresh = connect(&s.gw).await;
    let w: String = fresh
        .query_one("SELECT word FROM facts WHERE id = $1", &[&7i32])
        .await
        .expect("a new session after the fault")
        .get(0);
    assert_eq!(w, "w7");
}

/// Waits (bounded: a hang is the failure) for a future the fault must end.
async fn ends<T>(what: &str, gw: &Gateway, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), f).await {
        Ok(v) => v,
        Err(_) => panic!(
            "{what}: still waiting 30 s after the fault\n{}",
            gw.log_tail(30)
        ),
    }
}

/// An error the client saw: a protocol-level one names the broken connection (08xxx), otherwise
/// the connection was closed under it. Either way it is not a result.
fn assert_connection_error(e: &tokio_postgres::Error, gw: &Gateway) {
    if let Some(db) = e.as_db_error() {
        assert!(
            db.code().code().starts_with("08") || db.code().code().starts_with("57"),
            "unexpected SQLSTATE {} ({}):\n{}",
            db.code().code(),
            db.message(),
            gw.log_tail(20)
        );
    } else {
        assert!(e.is_closed() || e.to_string().contains("closed"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_mid_copy_out_ends_that_session_only() {
    let s = setup("");
    let (victim, link) = session(&s).await;
    let (survivor, _) = session(&s).await;

    let stream = victim
        .copy_out("COPY (SELECT g, repeat('x', 200) FROM generate_series(1, 5000000) g) TO STDOUT")
        .await
        .expect("COPY OUT starts under the default policy");
    futures_util::pin_mut!(stream);
    let mut received = 0usize;
    while received < 1 << 20 {
        received += stream.next().await.expect("data").expect("copy data").len();
    }
    s.relay.cut(link);
    let outcome = ends("the cut COPY OUT", &s.gw, async {
        loop {
            match stream.next().await {
                Some(Ok(chunk)) => received += chunk.len(),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await;
    let e = outcome.expect_err("a COPY whose upstream died does not end as if complete");
    assert_connection_error(&e, &s.gw);
    assert!(received < 5_000_000 * 200, "the result cannot be whole");
    others_carry_on(&s, &survivor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_mid_copy_in_ends_that_session_only() {
    // COPY FROM is a write: under the default policy it waits for approval, so this test
    // approves it through the CLI as an operator would, then cuts the upstream mid-stream.
    let s = setup("");
    let (victim, link) = session(&s).await;
    let (survivor, _) = session(&s).await;

    let gw_admin = s.gw.admin_socket.clone();
    let copying = tokio::spawn(async move {
        let sink = victim.copy_in("COPY sink FROM STDIN").await?;
        futures_util::pin_mut!(sink);
        let chunk: &'static [u8] = Box::leak(
            format!("1\t{}\n", "y".repeat(1000))
                .repeat(64)
                .into_bytes()
                .into_boxed_slice(),
        );
        for _ in 0..1_000_000 {
            sink.send(chunk).await?;
        }
        sink.finish().await
    });
    let mut approved = false;
    for _ in 0..300 {
        let out = s.gw.cli(&["approvals", "--json"]).unwrap();
        let recs: Vec<portcullis::policy::ApprovalRecord> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(r) = recs.iter().find(|r| r.sql.contains("COPY sink")) {
            let out = s.gw.cli(&["approve", &r.id.to_string()]).unwrap();
            assert!(out.status.success(), "{gw_admin:?}: approve failed");
            approved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        approved,
        "the COPY was held for approval\n{}",
        s.gw.log_tail(20)
    );
    // Let some megabytes through, then kill the upstream under it.
    let start = s.relay.bytes(link);
    for _ in 0..600 {
        if s.relay.bytes(link) > start + (4 << 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.relay.bytes(link) > start + (4 << 20), "COPY data flows");
    s.relay.cut(link);
    let outcome = ends("the cut COPY IN", &s.gw, copying).await.unwrap();
    let e = outcome.expect_err("a COPY whose upstream died does not report success");
    assert_connection_error(&e, &s.gw);
    others_carry_on(&s, &survivor).await;
    // Nothing was committed by the half-done COPY: it never completed upstream.
    assert_eq!(
        s.pg.app_superuser_sql("SELECT count(*) FROM sink")
            .unwrap()
            .trim(),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_mid_pipeline_fails_every_pending_query() {
    let s = setup("");
    let (victim, link) = session(&s).await;
    let (survivor, _) = session(&s).await;
    let victim = Arc::new(victim);
    let statement = victim
        .prepare("SELECT pg_sleep(0.05), $1::int4")
        .await
        .unwrap();

    // 100 queries pipelined on one connection: tokio-postgres sends them without waiting.
    let mut pending = Vec::new();
    for i in 0..100i32 {
        let (c, st) = (victim.clone(), statement.clone());
        pending.push(tokio::spawn(async move {
            c.query_one(&st, &[&i]).await.map(|r| r.get::<_, i32>(1))
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.relay.cut(link);
    let mut answered = 0;
    let mut failed = 0;
    for (i, p) in pending.into_iter().enumerate() {
        match ends("a pipelined query", &s.gw, p).await.unwrap() {
            Ok(v) => {
                assert_eq!(v, i as i32, "an answer reached the wrong query");
                answered += 1;
            }
            Err(e) => {
                assert_connection_error(&e, &s.gw);
                failed += 1;
            }
        }
    }
    assert!(answered > 0, "some queries ran before the cut");
    assert!(
        failed > 0,
        "the queries after the cut fail instead of hanging"
    );
    others_carry_on(&s, &survivor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_trickled_one_byte_at_a_time_stalls_nobody() {
    let s = setup("");
    let mut slow = RawConn::connect("127.0.0.1", s.gw.listen.port()).unwrap();
    slow.send(&startup_message(
        PROTOCOL_3_0,
        &[("user", "agent"), ("database", "app")],
    ))
    .unwrap();
    slow.read_until_ready().expect("startup");
    let message = query("SELECT word FROM facts WHERE id = 42");
    // The last byte waits until the other session's work is done: a gateway that stalled behind
    // the half-sent statement would hang that work, whatever the machine's speed.
    let (others_done, last_byte_may_go) = std::sync::mpsc::channel::<()>();
    let (first_byte_sent, trickle_started) = std::sync::mpsc::channel::<()>();
    let trickle = std::thread::spawn(move || {
        let (last, head) = message.split_last().unwrap();
        for (i, b) in head.iter().enumerate() {
            slow.send(&[*b]).unwrap();
            if i == 0 {
                first_byte_sent.send(()).unwrap();
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        last_byte_may_go
            .recv_timeout(Duration::from_secs(60))
            .expect("the other session finished while the statement was half sent");
        slow.send(&[*last]).unwrap();
        slow.read_until_ready()
            .expect("the trickled statement is answered")
    });
    // While the statement dribbles in, other sessions run their queries as usual.
    tokio::task::spawn_blocking(move || trickle_started.recv().unwrap())
        .await
        .unwrap();
    let other = connect(&s.gw).await;
    for i in 1..=40i32 {
        let w: String = tokio::time::timeout(
            Duration::from_secs(20),
            other.query_one("SELECT word FROM facts WHERE id = $1", &[&i]),
        )
        .await
        .expect("a query beside a half-sent statement is answered")
        .unwrap()
        .get(0);
        assert_eq!(w, format!("w{i}"));
    }
    others_done.send(()).unwrap();
    let heard = tokio::task::spawn_blocking(move || trickle.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        RawConn::first_column(&heard),
        vec![Some("w42".to_string())],
        "{heard:?}"
    );
}

#[test]
fn ten_thousand_connections_at_once() {
    const WANTED: usize = 10_000;
    // The test's own client sockets count against its limit, and the gateway inherits it.
    let limit = testkit::raise_nofile(WANTED as u64 + 2048) as usize;
    let connections = WANTED.min(limit.saturating_sub(2048));
    if connections < WANTED {
        eprintln!(
            "NOTE ten_thousand_connections_at_once: RLIMIT_NOFILE allows {limit}, so {connections} \
             connections instead of {WANTED}"
        );
    }
    assert!(
        connections >= 1000,
        "RLIMIT_NOFILE {limit} is too low to test a connection storm"
    );
    // The gateway, started after the raise, inherits the limit.
    let s = setup("startup_timeout = \"120s\"");
    let rss_before = testkit::rss_kib(s.gw.pid()).unwrap_or(0);
    // Ten thousand clients each send half a startup packet and wait: the gateway holds them all.
    let mut held = Vec::with_capacity(connections);
    let half = &startup_message(PROTOCOL_3_0, &[("user", "agent"), ("database", "app")])[..6];
    for i in 0..connections {
        let mut c = TcpStream::connect(("127.0.0.1", s.gw.listen.port()))
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", s.gw.log_tail(10)));
        c.write_all(half).unwrap();
        held.push(c);
    }
    let rss_held = testkit::rss_kib(s.gw.pid()).unwrap_or(0);
    // With all of them open, a real session still connects and runs.
    let out = testkit::psql(
        s.pg.bindir(),
        &s.gw.conninfo("app"),
        "SELECT word FROM facts WHERE id = 3",
    )
    .unwrap();
    assert!(
        out.2,
        "psql while {connections} connections wait: {}",
        out.1
    );
    assert!(out.0.contains("w3"), "{}", out.0);
    eprintln!(
        "gateway RSS: {rss_before} KiB idle, {rss_held} KiB with {connections} connections in startup \
         ({} bytes each)",
        (rss_held.saturating_sub(rss_before)) * 1024 / connections as u64
    );
    // They leave all at once; the gateway keeps serving.
    drop(held);
    let out = testkit::psql(
        s.pg.bindir(),
        &s.gw.conninfo("app"),
        "SELECT word FROM facts WHERE id = 4",
    )
    .unwrap();
    assert!(out.2 && out.0.contains("w4"), "after the storm: {}", out.1);
}
