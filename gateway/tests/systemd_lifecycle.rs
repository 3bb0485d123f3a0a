//! The packaged service with interception on, under a real systemd booted in namespaces
//! (testkit::systemd, with its own bpffs): a real agent started by `portcullis run` dials
//! PostgreSQL's own address and lands in the gateway the unit runs; journald answers
//! `AGENT=<name>`; while the unit is down the pinned programs refuse the agent, never let it
//! through. Then the Debian lifecycle with the real package: install, upgrade to a higher
//! version (restarted, pins and state kept, the edited conffile kept), remove (state, config
//! and pins kept), purge (all of it gone).
//!
//! One sandbox per test. The two tests run one after the other: the package's default config,
//! which the unit starts with at install, binds fixed loopback ports of the shared network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use testkit::systemd::{Systemd, repack_upgrade, required_or_skip, test_package};
use testkit::{Postgres, free_port, psql};

const UNIT: &str = "portcullis.service";
const CONFIG: &str = "/etc/portcullis/portcullis.toml";
const PINS: &str = "/sys/fs/bpf/portcullis";
const AGENT_ROOT: &str = "/sys/fs/cgroup/portcullis-agents";

static ONE_SANDBOX_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The service's config: an explicit listener, and interception of the target's address onto a
/// redirect listener on a free port (the default one could be taken on a shared host).
fn config(listener: SocketAddr, redirect_port: u16, pg: &Postgres, marker: &str) -> String {
    let v6 = if testkit::ipv6_loopback_available() {
        format!(
            "listen_v6 = \"{}\"\n",
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), redirect_port)
        )
    } else {
        String::new()
    };
    format!(
        r#"# {marker}
[gateway]
admin_socket = "/run/portcullis/admin.sock"
admin_group = "portcullis"
state_dir = "/var/lib/portcullis"
policy = "default"
drain_timeout = "5s"
workers = 2

[[listener]]
listen = "{listener}"
target = "app"

[[target]]
name = "app"
upstream = "{url}?sslmode=disable"
password_file = "/etc/portcullis/app.password"

[target.local_tls]
mode = "local-ca"

[redirect]
enabled = true
listen = "{redirect}"
{v6}"#,
        url = pg.url(),
        redirect = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), redirect_port),
    )
}

/// Installs the package and configures it for `pg` with interception on; returns once the
/// restarted unit is active (READY=1 comes only after the programs are attached).
fn install_and_configure(sd: &Systemd, pg: &Postgres, marker: &str) -> Result<()> {
    sd.install_deb(&test_package()?)?;
    sd.write_secret(
        "/etc/portcullis/app.password",
        format!("{}\n", pg.password).as_bytes(),
        "portcullis",
    )?;
    let listener = SocketAddr::from(([127, 0, 0, 1], free_port()));
    sd.write(CONFIG, config(listener, free_port(), pg, marker).as_bytes())?;
    sd.ok(&["systemctl", "restart", UNIT])?;
    ensure!(sd.property(UNIT, "ActiveState")? == "active");
    Ok(())
}

/// The DSN an agent has: PostgreSQL's own address, with a password that is wrong on purpose
/// (the gateway holds the real credential, so only a redirected connection logs in).
fn agent_dsn(pg: &Postgres) -> String {
    format!(
        "host=127.0.0.1 port={} user=agent dbname=app sslmode=disable",
        pg.port
    )
}

/// `portcullis run --agent AGENT -- psql ... -c SQL`, inside the sandbox, as root: placing a
/// process in an agent cgroup means writing the cgroup.procs of a common ancestor, which only
/// root may do (cgroup delegation rules), so agents are started by root or by a unit.
fn agent_psql(sd: &Systemd, pg: &Postgres, agent: &str, sql: &str) -> std::process::Command {
    let psql = pg.bindir().join("psql");
    let dsn = agent_dsn(pg);
    let mut c = sd.command(&[
        "portcullis",
        "run",
        "--agent",
        agent,
        "--",
        psql.to_str().unwrap_or_default(),
        "-X",
        "-At",
        "-v",
        "VERBOSITY=verbose",
        "-d",
        &dsn,
        "-c",
        sql,
    ]);
    c.env("PGPASSWORD", "not-the-real-one")
        .env("PGCONNECT_TIMEOUT", "10");
    c
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What became of one agent connection attempt.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Through the gateway: logged in with the target's credential.
    Gateway,
    /// Refused at connect (the pinned programs, with no gateway listening).
    Refused,
}

fn classify(out: &Output) -> Result<Outcome> {
    let (stdout, stderr) = text(out);
    if out.status.success() && stdout.trim() == "app" {
        return Ok(Outcome::Gateway);
    }
    if !out.status.success() && stderr.contains("Connection refused") {
        return Ok(Outcome::Refused);
    }
    bail!(
        "neither through the gateway nor refused ({}): {stdout}{stderr}",
        out.status
    )
}

/// `portcullis ARGS` as `pcl-operator`: a member of the admin socket's group, not root.
fn as_operator(sd: &Systemd, args: &[&str]) -> Result<Output> {
    let mut argv = vec!["runuser", "-u", "pcl-operator", "--", "portcullis"];
    argv.extend_from_slice(args);
    sd.run(&argv)
}

/// One `SELECT current_user` from agent `claude`: what became of it (any other answer fails).
fn connect_as_agent(sd: &Systemd, pg: &Postgres) -> Result<Outcome> {
    let out = agent_psql(sd, pg, "claude", "SELECT current_user").output()?;
    classify(&out)
}

fn journal(sd: &Systemd, filter: &[&str]) -> Result<String> {
    let mut argv = vec!["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"];
    argv.extend_from_slice(filter);
    sd.ok(&argv)
}

/// Kills a process started on the host side of nsenter, with everything it started.
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn agents_are_redirected_to_the_unit_and_refused_while_it_is_down() -> Result<()> {
    if !required_or_skip("agents_are_redirected_to_the_unit_and_refused_while_it_is_down")? {
        return Ok(());
    }
    let _one = ONE_SANDBOX_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let pg = Postgres::start()?;
    pg.app_superuser_sql("CREATE TABLE customers (id int, email text); INSERT INTO customers VALUES (1, 'alice@example.com'); ALTER TABLE customers OWNER TO app")?;
    let sd = Systemd::boot()?;
    install_and_configure(&sd, &pg, "redirect test")?;
    // An operator: a member of the admin socket's group, not root.
    sd.ok(&[
        "useradd",
        "--no-create-home",
        "-N",
        "-G",
        "portcullis",
        "pcl-operator",
    ])?;

    // A real agent dials PostgreSQL's own address and lands in the gateway: its wrong password
    // does not matter, the gateway logs in with the target's credential.
    let got = connect_as_agent(&sd, &pg)?;
    ensure!(got == Outcome::Gateway, "agent not redirected: {got:?}");
    // The default policy answers a DROP with 42501 naming the rule.
    let out = agent_psql(&sd, &pg, "claude", "DROP TABLE customers").output()?;
    let (_, err) = text(&out);
    ensure!(
        !out.status.success() && err.contains("42501") && err.contains("no-ddl"),
        "DROP from the agent was not blocked: {err}"
    );
    // Masking holds on the redirected path too.
    let out = agent_psql(&sd, &pg, "claude", "SELECT email FROM customers").output()?;
    let (masked, err) = text(&out);
    ensure!(out.status.success(), "SELECT as the agent: {err}");
    ensure!(
        !masked.contains("alice") && masked.contains('@'),
        "not masked: {masked}"
    );

    // While a session is open, the operator sees it with its agent over the admin socket.
    let held = agent_psql(&sd, &pg, "claude", "SELECT 'held' FROM pg_sleep(3)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut session = None;
    sd.wait_for(
        "the held session in `portcullis sessions`",
        Duration::from_secs(15),
        || {
            let out = as_operator(&sd, &["sessions", "--json"])?;
            ensure!(
                out.status.success(),
                "portcullis sessions as operator: {:?}",
                text(&out)
            );
            let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
            session = list.into_iter().find(|s| s["agent"] == "claude");
            Ok(session.is_some())
        },
    )?;
    let session = session.context("no session")?;
    ensure!(
        session["original_dst"] == format!("127.0.0.1:{}", pg.port),
        "{session}"
    );
    let id = session["id"].as_u64().context("session id")?.to_string();
    let out = held.wait_with_output()?;
    ensure!(out.status.success(), "held session: {:?}", text(&out));

    // journald by agent: that session's lines, the blocked DROP, and nothing of other agents.
    let sessions_of_claude = journal(&sd, &["AGENT=claude", &format!("SESSION={id}")])?;
    ensure!(
        sessions_of_claude.contains("session started"),
        "journalctl AGENT=claude SESSION={id}: {sessions_of_claude}"
    );
    let blocked = journal(&sd, &["AGENT=claude", "RULE=no-ddl"])?;
    ensure!(
        blocked.contains("statement blocked"),
        "journalctl AGENT=claude RULE=no-ddl: {blocked}"
    );
    let started = journal(&sd, &["AGENT=claude", "MESSAGE=session started"])?;
    ensure!(
        started.lines().count() == 4,
        "four sessions of claude: {started}"
    );
    ensure!(
        journal(&sd, &["AGENT=someone-else"])?.trim().is_empty(),
        "AGENT= does not filter"
    );

    // The admin group drives the gateway, not interception: its members can neither start an
    // agent (the command would run unintercepted) nor unpin the programs.
    let out = as_operator(&sd, &["run", "--agent", "mine", "--", "true"])?;
    ensure!(
        !out.status.success() && text(&out).1.contains("cannot create"),
        "portcullis run as a non-root operator: {:?}",
        text(&out)
    );
    let out = as_operator(&sd, &["uninstall"])?;
    ensure!(
        !out.status.success(),
        "a non-root operator unpinned the programs: {:?}",
        text(&out)
    );
    let got = connect_as_agent(&sd, &pg)?;
    ensure!(
        got == Outcome::Gateway,
        "after the operator's attempts: {got:?}"
    );

    // A crash: until systemd has restarted the gateway, agents are refused, never let through
    // to PostgreSQL directly (which would answer "password authentication failed").
    let pid_before = sd.property(UNIT, "MainPID")?;
    sd.ok(&["systemctl", "kill", "--signal=SIGKILL", UNIT])?;
    // Down once systemd has reaped it (the restart follows RestartSec=1s later).
    sd.wait_for(
        "the killed gateway to be reaped",
        Duration::from_secs(10),
        || Ok(sd.property(UNIT, "ActiveState")? != "active"),
    )?;
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcome = connect_as_agent(&sd, &pg)?;
        let back = outcome == Outcome::Gateway;
        outcomes.push(outcome);
        if back || Instant::now() > deadline {
            break;
        }
    }
    eprintln!("agent connects while the unit restarted: {outcomes:?}");
    ensure!(
        outcomes.first() == Some(&Outcome::Refused),
        "the first connect after the crash was not refused: {outcomes:?}"
    );
    ensure!(
        outcomes.last() == Some(&Outcome::Gateway),
        "not redirected after the restart: {outcomes:?}"
    );
    ensure!(sd.property(UNIT, "MainPID")? != pid_before);

    // Stopped: refused at once, every time.
    sd.ok(&["systemctl", "stop", UNIT])?;
    for _ in 0..3 {
        let started = Instant::now();
        let got = connect_as_agent(&sd, &pg)?;
        ensure!(got == Outcome::Refused, "with the unit stopped: {got:?}");
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "refused, not hung"
        );
    }
    let (_, _, ok) = psql(
        pg.bindir(),
        &format!(
            "host=127.0.0.1 port={} user={} dbname={} sslmode=disable password={}",
            pg.port, pg.user, pg.database, pg.password
        ),
        "SELECT 1",
    )?;
    ensure!(ok, "PostgreSQL itself is up: only agents are fenced off");
    Ok(())
}

/// Identity of pinned state: the inode of every pinned map (a re-created pin has a new one).
fn pinned_maps(sd: &Systemd) -> Result<String> {
    sd.ok(&[
        "sh",
        "-c",
        &format!("cd {PINS}/maps && stat -c '%n %i' * | sort"),
    ])
}

/// Checksums of the gateway's state: the local CA, the recording key, approvals, recordings.
fn state_sums(sd: &Systemd) -> Result<String> {
    sd.ok(&[
        "sh",
        "-c",
        "cd /var/lib/portcullis && find . -type f \\( -path './local-ca/*' -o -path './keys/*' \\) \
         -exec sha256sum {} + | sort",
    ])
}

fn package_status(sd: &Systemd) -> Result<String> {
    Ok(sd
        .ok(&[
            "dpkg-query",
            "-W",
            "-f",
            "${Status} ${Version}",
            "portcullis",
        ])?
        .trim()
        .to_owned())
}

#[test]
fn upgrade_keeps_pins_state_and_config_remove_keeps_them_purge_removes_them() -> Result<()> {
    if !required_or_skip(
        "upgrade_keeps_pins_state_and_config_remove_keeps_them_purge_removes_them",
    )? {
        return Ok(());
    }
    let _one = ONE_SANDBOX_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let pg = Postgres::start()?;
    let scratch = tempfile::tempdir()?;
    let (upgrade, new_version) = repack_upgrade(&test_package()?, "upgrade1", scratch.path())?;
    let sd = Systemd::boot()?;
    install_and_configure(&sd, &pg, "edited on this host")?;

    // State: pins, an agent registered in the pinned registry (a long-running agent), a session
    // recorded, the local CA and the recording key.
    let keeper = sd
        .command(&[
            "portcullis",
            "run",
            "--agent",
            "keeper",
            "--",
            "sleep",
            "600",
        ])
        .spawn()?;
    sd.wait_for(
        "agent keeper to be registered",
        Duration::from_secs(10),
        || {
            Ok(sd
                .ok(&["portcullis", "agents", "--json"])?
                .contains("keeper"))
        },
    )?;
    let got = connect_as_agent(&sd, &pg)?;
    ensure!(got == Outcome::Gateway, "before the upgrade: {got:?}");
    let maps = pinned_maps(&sd)?;
    ensure!(maps.contains("PC_AGENTS"), "pinned maps: {maps}");
    let links = sd.ok(&["ls", &format!("{PINS}/links")])?;
    ensure!(!links.trim().is_empty(), "no links pinned");
    let sums = state_sums(&sd)?;
    ensure!(
        sums.contains("./local-ca/") && sums.contains("./keys/"),
        "state dir: {sums}"
    );
    let recordings = sd.ok(&["find", "/var/lib/portcullis/recordings", "-type", "f"])?;
    ensure!(!recordings.trim().is_empty(), "nothing recorded");
    ensure!(sd.path("/var/lib/portcullis/approvals.db").exists());
    let pid_before = sd.property(UNIT, "MainPID")?;
    let old_status = package_status(&sd)?;

    // Upgrade: the new version is configured and the unit restarted, with nothing lost.
    let log = sd.install_deb(&upgrade)?;
    eprintln!("dpkg -i (upgrade):\n{log}");
    ensure!(
        package_status(&sd)? == format!("install ok installed {new_version}"),
        "after the upgrade from {old_status}: {}\n{log}",
        package_status(&sd)?
    );
    ensure!(sd.property(UNIT, "ActiveState")? == "active");
    ensure!(sd.property(UNIT, "UnitFileState")? == "enabled");
    let pid_after = sd.property(UNIT, "MainPID")?;
    ensure!(
        pid_after != pid_before && pid_after != "0",
        "not restarted: MainPID {pid_before} -> {pid_after}"
    );
    ensure!(
        pinned_maps(&sd)? == maps,
        "pinned maps re-created by the upgrade"
    );
    ensure!(state_sums(&sd)? == sums, "state changed by the upgrade");
    let recorded_after = sd.ok(&["find", "/var/lib/portcullis/recordings", "-type", "f"])?;
    ensure!(
        recordings.lines().all(|f| recorded_after.contains(f)),
        "recordings lost: {recordings} -> {recorded_after}"
    );
    ensure!(
        sd.ok(&["cat", CONFIG])?.contains("# edited on this host"),
        "the edited conffile was replaced"
    );
    let strays = sd.ok(&["find", "/etc/portcullis", "-name", "*.dpkg-*"])?;
    ensure!(strays.trim().is_empty(), "conffile prompts left: {strays}");
    ensure!(
        sd.ok(&["portcullis", "agents", "--json"])?
            .contains("keeper"),
        "the agent registry did not survive"
    );
    let got = connect_as_agent(&sd, &pg)?;
    ensure!(got == Outcome::Gateway, "after the upgrade: {got:?}");

    // An operator searches the recordings as root: the agent's statement is found, and the
    // full text the search built stays the service user's, as the rest of the directory is.
    let found = sd.ok(&[
        "portcullis",
        "recordings",
        "--dir",
        "/var/lib/portcullis/recordings",
        "list",
        "--grep",
        "current_user",
    ])?;
    ensure!(
        found.lines().count() >= 2,
        "the agent's statement not found: {found}"
    );
    let texts = sd.ok(&[
        "stat",
        "-c",
        "%U:%G %a",
        "/var/lib/portcullis/recordings/texts.sqlite",
    ])?;
    ensure!(
        texts.trim() == "portcullis:portcullis 640",
        "texts.sqlite: {texts}"
    );

    // Remove: the unit stops; state, config and pins stay, so agents stay fenced in. With the
    // binary gone, the agent is a plain shell moved into the keeper cgroup.
    eprintln!(
        "dpkg --remove:\n{}",
        sd.ok(&["dpkg", "--remove", "portcullis"])?
    );
    ensure!(package_status(&sd)?.starts_with("deinstall ok config-files"));
    ensure!(sd.property(UNIT, "ActiveState")? != "active");
    ensure!(!sd.path("/usr/bin/portcullis").exists());
    ensure!(state_sums(&sd)? == sums, "remove touched the state");
    ensure!(sd.ok(&["cat", CONFIG])?.contains("# edited on this host"));
    ensure!(pinned_maps(&sd)? == maps, "remove touched the pins");
    let psql_bin = pg.bindir().join("psql");
    let in_keeper = format!(
        "echo $$ > {AGENT_ROOT}/keeper/cgroup.procs && exec {} -X -At -d '{}' -c 'SELECT current_user'",
        psql_bin.display(),
        agent_dsn(&pg)
    );
    let run_in_keeper = || {
        sd.command(&["sh", "-c", &in_keeper])
            .env("PGPASSWORD", "not-the-real-one")
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
    };
    let out = run_in_keeper()?;
    ensure!(
        classify(&out)? == Outcome::Refused,
        "after remove: {:?}",
        text(&out)
    );

    // Purge: state, config and pins go; interception with them, so the same agent now reaches
    // PostgreSQL itself (and fails its login with the wrong password).
    let purge = sd.run(&["dpkg", "--purge", "portcullis"])?;
    let (said, warned) = text(&purge);
    eprintln!("dpkg --purge:\n{said}{warned}");
    ensure!(purge.status.success(), "purge failed: {said}{warned}");
    let gone = sd.run(&["dpkg-query", "-W", "portcullis"])?;
    ensure!(!gone.status.success(), "still known to dpkg after purge");
    for path in ["/var/lib/portcullis", CONFIG, PINS] {
        ensure!(!sd.path(path).exists(), "{path} survived the purge");
    }
    let out = run_in_keeper()?;
    let (_, err) = text(&out);
    ensure!(
        err.contains("password authentication failed"),
        "after purge the agent should reach PostgreSQL directly: {err}"
    );
    stop(keeper);
    Ok(())
}
