//! Portcullis as a systemd service, under a real systemd booted in namespaces (testkit::systemd):
//! the .deb installs, enables and starts the hardened unit; `systemctl start` waits for READY=1;
//! reload applies a good config and refuses a broken one visibly while the old one serves; the
//! watchdog restarts a wedged io_uring worker; stop drains; journald takes fields; /metrics
//! answers; `systemd-analyze security` scores the unit.
//!
//! One sandbox, one test: the steps share its boot (several seconds) and run in order.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::systemd::{Systemd, required_or_skip, test_package};
use testkit::{Postgres, free_port, psql};

const UNIT: &str = "portcullis.service";
/// The most `systemd-analyze security` may score the unit; docs/operations.md explains the rest.
const MAX_EXPOSURE: f64 = 2.5;

struct Ports {
    gateway: SocketAddr,
    metrics: SocketAddr,
}

fn config(ports: &Ports, pg: &Postgres, drain: &str) -> String {
    format!(
        r#"[gateway]
admin_socket = "/run/portcullis/admin.sock"
state_dir = "/var/lib/portcullis"
policy = "default"
drain_timeout = "{drain}"
workers = 2

[metrics]
listen = "{metrics}"

[[listener]]
listen = "{gateway}"
target = "app"

[[target]]
name = "app"
upstream = "{url}?sslmode=disable"
password_file = "/etc/portcullis/app.password"
"#,
        metrics = ports.metrics,
        gateway = ports.gateway,
        url = pg.url(),
    )
}

fn conninfo(ports: &Ports) -> String {
    format!(
        "host={} port={} user=app dbname=app sslmode=disable",
        ports.gateway.ip(),
        ports.gateway.port()
    )
}

fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    ensure!(body.starts_with("HTTP/1.1 200"), "scrape answered: {body}");
    Ok(body)
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn journal(sd: &Systemd, filter: &[&str]) -> Result<String> {
    let mut argv = vec!["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"];
    argv.extend_from_slice(filter);
    sd.ok(&argv)
}

#[test]
fn portcullis_runs_as_a_hardened_systemd_service() -> Result<()> {
    if !required_or_skip("portcullis_runs_as_a_hardened_systemd_service")? {
        return Ok(());
    }
    let deb = test_package()?;
    let pg = Postgres::start()?;
    pg.app_superuser_sql("CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, 'alice@example.com'); ALTER TABLE customers OWNER TO app")?;
    let sd = Systemd::boot()?;

    // Install: the Debian way enables and starts the unit, as the `portcullis` user.
    sd.install_deb(&deb)?;
    ensure!(
        sd.property(UNIT, "UnitFileState")? == "enabled",
        "not enabled on install"
    );
    sd.wait_for(
        "the packaged default to be active",
        Duration::from_secs(20),
        || Ok(sd.property(UNIT, "ActiveState")? == "active"),
    )?;
    ensure!(sd.property(UNIT, "User")? == "portcullis");
    let owner = sd.ok(&["stat", "-c", "%U:%G %a", "/run/portcullis/admin.sock"])?;
    ensure!(
        owner.trim() == "portcullis:portcullis 660",
        "admin socket: {owner}"
    );
    let conffiles = sd.ok(&["dpkg-query", "-W", "-f", "${Conffiles}", "portcullis"])?;
    ensure!(
        conffiles.contains("/etc/portcullis/portcullis.toml"),
        "conffiles: {conffiles}"
    );
    let doc = sd.ok(&[
        "sh",
        "-c",
        "ls /usr/share/man/man1/portcullis.1* /usr/share/bash-completion/completions/portcullis",
    ])?;
    ensure!(doc.lines().count() == 2, "man page and completion: {doc}");

    // Our own config and a short watchdog, plus the hook that can wedge a worker.
    let ports = Ports {
        gateway: SocketAddr::from(([127, 0, 0, 1], free_port())),
        metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    sd.write_secret(
        "/etc/portcullis/app.password",
        format!("{}\n", pg.password).as_bytes(),
        "portcullis",
    )?;
    sd.write(
        "/etc/portcullis/portcullis.toml",
        config(&ports, &pg, "20s").as_bytes(),
    )?;
    sd.write(
        "/etc/systemd/system/portcullis.service.d/test.conf",
        b"[Service]\nWatchdogSec=2s\nEnvironment=PORTCULLIS_DANGER_TEST_WEDGE=/run/portcullis/wedge\n",
    )?;
    sd.ok(&["systemctl", "daemon-reload"])?;

    // `systemctl restart` returns only once READY=1 came: the listener answers at once.
    sd.ok(&["systemctl", "restart", UNIT])?;
    ensure!(sd.property(UNIT, "ActiveState")? == "active");
    let status = sd.property(UNIT, "StatusText")?;
    ensure!(
        status.contains("serving") && status.contains("last reload"),
        "STATUS=: {status}"
    );
    let ci = conninfo(&ports);
    let (out, err, ok) = psql(pg.bindir(), &ci, "SELECT email FROM customers")?;
    ensure!(ok, "SELECT through the service failed: {err}");
    ensure!(
        !out.contains("alice") && out.contains('@'),
        "not masked: {out}"
    );
    let (_, err, ok) = psql(pg.bindir(), &ci, "DROP TABLE customers")?;
    ensure!(!ok && err.contains("no-ddl"), "DROP was not blocked: {err}");

    // journald has the fields, so operators can filter by them.
    let blocked = journal(&sd, &["RULE=no-ddl", "TARGET=app"])?;
    ensure!(
        blocked.contains("statement blocked"),
        "journalctl RULE=no-ddl: {blocked}"
    );
    let started = journal(&sd, &["TARGET=app", "AGENT=-"])?;
    ensure!(
        started.contains("session started"),
        "journalctl TARGET=app: {started}"
    );

    // /metrics: the blocked DROP and the session are counted, with bounded labels.
    let text = scrape(ports.metrics)?;
    let drop_blocked = metric(
        &text,
        r#"portcullis_verdicts_total{rule="no-ddl",verdict="block"}"#,
    );
    ensure!(drop_blocked == Some(1.0), "verdict metric: {text}");
    ensure!(
        metric(&text, r#"portcullis_sessions_total{target="app"}"#) >= Some(2.0),
        "{text}"
    );
    ensure!(text.contains("portcullis_connect_seconds_bucket"), "{text}");
    ensure!(
        !text.contains("customers") && !text.contains("DROP"),
        "SQL text in metrics: {text}"
    );

    // A good reload: `systemctl reload` waits for it and it shows in STATUS=.
    sd.write(
        "/etc/portcullis/portcullis.toml",
        config(&ports, &pg, "25s").as_bytes(),
    )?;
    sd.ok(&["systemctl", "reload", UNIT])?;
    ensure!(sd.property(UNIT, "StatusText")?.contains("last reload: ok"));

    // A broken one fails `systemctl reload` visibly; the old config keeps serving.
    sd.write(
        "/etc/portcullis/portcullis.toml",
        b"[gateway]\npolicy = \"default\"\nbogus_key = 1\n",
    )?;
    let out = sd.run(&["systemctl", "reload", UNIT])?;
    ensure!(!out.status.success(), "a broken config reloaded");
    ensure!(sd.property(UNIT, "ActiveState")? == "active");
    let why = journal(&sd, &["-n", "20"])?;
    ensure!(
        why.contains("bogus_key") && why.contains("portcullis.toml:3"),
        "reload error: {why}"
    );
    ensure!(sd.property(UNIT, "StatusText")?.contains("failed"));
    let (_, err, ok) = psql(pg.bindir(), &ci, "DROP TABLE customers")?;
    ensure!(
        !ok && err.contains("no-ddl"),
        "old config no longer serving: {err}"
    );
    sd.write(
        "/etc/portcullis/portcullis.toml",
        config(&ports, &pg, "25s").as_bytes(),
    )?;
    sd.ok(&["systemctl", "reload", UNIT])?;

    // The watchdog: a wedged worker stops the pings, and systemd restarts the service.
    let pid_before = sd.property(UNIT, "MainPID")?;
    let restarts: u32 = sd.property(UNIT, "NRestarts")?.parse()?;
    sd.ok(&["touch", "/run/portcullis/wedge"])?;
    sd.wait_for(
        "the watchdog to restart the service",
        Duration::from_secs(30),
        || {
            Ok(sd.property(UNIT, "NRestarts")?.parse::<u32>()? > restarts
                && sd.property(UNIT, "ActiveState")? == "active")
        },
    )?;
    ensure!(sd.property(UNIT, "MainPID")? != pid_before);
    let wd = journal(&sd, &["-n", "50"])?;
    ensure!(
        wd.contains("wedging worker") && wd.to_lowercase().contains("watchdog"),
        "{wd}"
    );
    let (_, err, ok) = psql(pg.bindir(), &ci, "SELECT 1")?;
    ensure!(ok, "not serving after the watchdog restart: {err}");

    // Stop drains: a statement in flight finishes before the service goes.
    let slow = std::process::Command::new(pg.bindir().join("psql"))
        .args([
            "-X",
            "-At",
            "-d",
            &ci,
            "-c",
            "SELECT 'drained' FROM pg_sleep(2)",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    pg.wait_active("pg_sleep(2)", Duration::from_secs(10))?;
    let stopping = Instant::now();
    sd.ok(&["systemctl", "stop", UNIT])?;
    let out = slow.wait_with_output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("drained"),
        "the session was cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stopping.elapsed() < Duration::from_secs(20),
        "stop waited out the drain timeout"
    );
    ensure!(journal(&sd, &["-n", "20"])?.contains("draining"));

    // The exposure score.
    let out = sd.run(&["systemd-analyze", "security", "--no-pager", UNIT])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for portcullis.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no exposure level in: {text}"))?;
    eprintln!("systemd-analyze security {UNIT}: {score}\n{text}");
    ensure!(
        score <= MAX_EXPOSURE,
        "exposure {score} above {MAX_EXPOSURE}:\n{text}"
    );
    Ok(())
}
