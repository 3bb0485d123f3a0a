//! Memory per session, idle and after a burst, and the latency of active sessions beside many
//! idle ones.
//!
//! The gateway (shipped defaults: default policy with masking, recording on) forwards to
//! PgBouncer in transaction pooling, which shares a few PostgreSQL backends among all sessions:
//! PostgreSQL alone cannot hold 10,000 backends on a small machine.
//!
//! 1. `--active` clients run `SELECT 1` in a closed loop for `--seconds`: the baseline p50/p99.
//! 2. `--sessions` sessions connect and run `SELECT 1` once, then sit idle: gateway RSS per
//!    session ("idle").
//! 3. Each idle session reads one result of `--burst-kib` KiB, then sits idle again: RSS per
//!    session after a burst (what a session keeps once its traffic stops).
//! 4. The active clients run again beside the idle sessions: p50/p99 and their ratio to step 1.
//!
//! RSS is the gateway's VmRSS; per session is the growth over its RSS before step 2, divided by
//! the sessions. Run as root (PgBouncer runs as `postgres`; open-file limits are raised):
//! `cargo run --release -p portcullis-bench --bin idle_sessions -- [--sessions N] [--active N]
//! [--seconds N] [--burst-kib N]`. `PORTCULLIS_BIN` picks the gateway binary (default: the
//! `portcullis` next to this one).

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use testkit::wire::{PROTOCOL_3_0, RawConn, query, startup_message};
use testkit::{Gateway, GatewayOptions, Postgres, free_port, single_target_toml};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() -> Result<()> {
    let wanted = arg("--sessions", 10_000) as usize;
    let active = arg("--active", 4) as usize;
    let seconds = arg("--seconds", 10);
    let burst_kib = arg("--burst-kib", 256);
    if !testkit::is_root() {
        bail!("run as root: PgBouncer runs as `postgres`, and open-file limits are raised");
    }
    // The gateway, which inherits the limit, holds two sockets per session.
    let limit = testkit::raise_nofile(2 * wanted as u64 + 4096) as usize;
    let sessions = wanted.min(limit.saturating_sub(1024) / 2);
    if sessions < wanted {
        eprintln!(
            "NOTE: RLIMIT_NOFILE allows {limit} open files per process (and cannot be raised \
             here), so {sessions} sessions instead of {wanted}"
        );
    }
    let pg = Postgres::start()?;
    let bouncer = PgBouncer::start(&pg, sessions + active + 64)?;
    let dir = tempfile::tempdir()?;
    let password_file = pg.write_password_file(dir.path())?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let upstream = format!(
        "postgres://{}@127.0.0.1:{}/{}",
        pg.user, bouncer.port, pg.database
    );
    let gw = Gateway::start(
        GatewayOptions::with_config(
            listen,
            format!(
                "startup_timeout = \"300s\"\n{}",
                single_target_toml(listen, &upstream, &password_file)
            ),
        )
        .arg("--policy")
        .arg("default")
        .env("RUST_LOG", "warn"),
    )?;
    let binary = testkit::portcullis_bin();
    eprintln!("gateway: {}", binary.display());

    let quiet = latency(listen, active, seconds)?;
    let rss_before = rss(&gw)?;
    let started = Instant::now();
    let mut idle = open_sessions(listen, sessions)?;
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = rss(&gw)?;
    burst(&mut idle, burst_kib)?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_burst = rss(&gw)?;
    let beside = latency(listen, active, seconds)?;

    let per = |rss: u64| (rss.saturating_sub(rss_before) as f64) * 1024.0 / sessions as f64;
    println!("binary                      {}", binary.display());
    println!("open-file limit             {limit}");
    println!(
        "sessions                    {sessions} (opened in {:.1} s)",
        opened_in.as_secs_f64()
    );
    println!("gateway RSS before          {rss_before} KiB");
    println!(
        "idle                        {rss_idle} KiB = {:.1} KiB per session",
        per(rss_idle) / 1024.0
    );
    println!(
        "idle after a {burst_kib} KiB result  {rss_burst} KiB = {:.1} KiB per session",
        per(rss_burst) / 1024.0
    );
    println!(
        "{active} active, alone          {} queries, p50 {:.0} us, p99 {:.0} us",
        quiet.len(),
        quiet.value_at_quantile(0.5) as f64 / 1000.0,
        quiet.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!(
        "{active} active, beside {sessions}  {} queries, p50 {:.0} us, p99 {:.0} us (p99 x{:.2})",
        beside.len(),
        beside.value_at_quantile(0.5) as f64 / 1000.0,
        beside.value_at_quantile(0.99) as f64 / 1000.0,
        beside.value_at_quantile(0.99) as f64 / quiet.value_at_quantile(0.99).max(1) as f64
    );
    drop(idle);
    Ok(())
}

fn rss(gw: &Gateway) -> Result<u64> {
    testkit::rss_kib(gw.pid()).context("the gateway's VmRSS")
}

/// A session through the gateway, past startup.
fn session(listen: SocketAddr) -> Result<RawConn> {
    let mut c = RawConn::connect("127.0.0.1", listen.port())?;
    c.send(&startup_message(
        PROTOCOL_3_0,
        &[("user", "agent"), ("database", "app")],
    ))?;
    expect_ready(&mut c, "startup")?;
    Ok(c)
}

fn expect_ready(c: &mut RawConn, what: &str) -> Result<()> {
    let heard = c.read_until_ready()?;
    if let Some(e) = heard.iter().find(|m| m.is_error()) {
        bail!("{what}: {}", e.describe());
    }
    Ok(())
}

/// Opens `n` sessions on four threads; each runs `SELECT 1` once.
fn open_sessions(listen: SocketAddr, n: usize) -> Result<Vec<RawConn>> {
    const THREADS: usize = 4;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || -> Result<Vec<RawConn>> {
                let mine = n / THREADS + usize::from(t < n % THREADS);
                let mut conns = Vec::with_capacity(mine);
                for i in 0..mine {
                    let mut c = session(listen).with_context(|| format!("session {i}"))?;
                    c.send(&query("SELECT 1"))?;
                    expect_ready(&mut c, "SELECT 1")?;
                    conns.push(c);
                }
                Ok(conns)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.join().expect("opener thread")?);
    }
    Ok(all)
}

/// Each session reads one `kib` KiB result.
fn burst(conns: &mut [RawConn], kib: u64) -> Result<()> {
    let sql = format!("SELECT repeat('x', {})", kib * 1024);
    for chunk in conns.chunks_mut(256) {
        for c in chunk.iter_mut() {
            c.send(&query(&sql))?;
        }
        for c in chunk.iter_mut() {
            expect_ready(c, "burst")?;
        }
    }
    Ok(())
}

/// `clients` sessions run `SELECT 1` in a closed loop for `seconds`; round trips in ns.
fn latency(listen: SocketAddr, clients: usize, seconds: u64) -> Result<Histogram<u64>> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || -> Result<Histogram<u64>> {
                let mut h = Histogram::<u64>::new(3)?;
                let mut c = session(listen)?;
                while Instant::now() < until {
                    let t = Instant::now();
                    c.send(&query("SELECT 1"))?;
                    expect_ready(&mut c, "SELECT 1")?;
                    h.record(t.elapsed().as_nanos() as u64)?;
                }
                Ok(h)
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3)?;
    for h in handles {
        all.add(h.join().expect("latency thread")?)?;
    }
    Ok(all)
}

/// PgBouncer in transaction pooling on a free port, authenticating with the role's own SCRAM
/// secret; stopped on drop.
struct PgBouncer {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    fn start(pg: &Postgres, max_clients: usize) -> Result<PgBouncer> {
        let secret = pg
            .superuser_sql(&format!(
                "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
                pg.user
            ))?
            .trim()
            .to_string();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-bench-pgbouncer-")
            .tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let port = free_port();
        let userlist = dir.path().join("userlist.txt");
        fs::write(&userlist, format!("\"{}\" \"{secret}\"\n", pg.user))?;
        fs::set_permissions(&userlist, fs::Permissions::from_mode(0o600))?;
        let ini = dir.path().join("pgbouncer.ini");
        fs::write(
            &ini,
            format!(
                "[databases]\n{db} = host={host} port={pgport} dbname={db}\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {userlist}\n\
                 pool_mode = transaction\nmax_client_conn = {max_clients}\n\
                 default_pool_size = 20\nserver_tls_sslmode = disable\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 log_connections = 0\nlog_disconnections = 0\n",
                db = pg.database,
                host = pg.host,
                pgport = pg.port,
                userlist = userlist.display(),
            ),
        )?;
        let (uid, gid) = postgres_ids()?;
        for p in [dir.path(), &userlist, &ini] {
            chown(p, Some(uid), Some(gid))?;
        }
        let log = fs::File::create(dir.path().join("pgbouncer.log"))?;
        let child = Command::new("pgbouncer")
            .arg(&ini)
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("pgbouncer (apt-get install pgbouncer)")?;
        let b = PgBouncer { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("PgBouncer did not listen: {}", b.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(b)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .map(|f| Ok((f[2].parse()?, f[3].parse()?)))
        .unwrap_or_else(|| bail!("no `postgres` user to run PgBouncer as (it refuses root)"))
}
