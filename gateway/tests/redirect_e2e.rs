//! Interception end to end (root): agents in an agent cgroup keep the PostgreSQL DSN and land in
//! the real gateway, which shows them with their pid and agent; the same clients outside agent
//! cgroups are untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::{
    Gateway, GatewayOptions, Postgres, free_port, portcullis_bin, single_target_toml,
    skip_unless_root,
};

struct Env {
    pg: Postgres,
    gw: Gateway,
    root: PathBuf,
    pin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start(tag: &str) -> Env {
        let pg = Postgres::start().expect("start PostgreSQL");
        let dir = tempfile::tempdir().unwrap();
        let pw = pg.write_password_file(dir.path()).unwrap();
        let mount = portcullis::redirect::find_cgroup2_mount().expect("cgroup2 mount");
        let unique = format!("portcullis-e2e-{tag}-{}", std::process::id());
        let root = mount.join(&unique);
        let pin = PathBuf::from("/sys/fs/bpf").join(&unique);
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let redirect_port = free_port();
        let v6 = if testkit::ipv6_loopback_available() {
            format!(
                "listen_v6 = \"{}\"\n",
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), redirect_port)
            )
        } else {
            String::new()
        };
        let config = format!(
            "{}\n[redirect]\nenabled = true\nlisten = \"{}\"\n{v6}pin_path = \"{}\"\nagent_cgroup_root = \"{}\"\n",
            single_target_toml(listen, &pg.url(), &pw),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), redirect_port),
            pin.display(),
            root.display(),
        );
        let gw = Gateway::start(GatewayOptions::with_config(listen, config))
            .expect("start the gateway with [redirect]");
        Env {
            pg,
            gw,
            root,
            pin,
            _dir: dir,
        }
    }

    /// `portcullis run --agent AGENT -- PROGRAM ARGS...`
    fn agent(&self, agent: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(portcullis_bin());
        c.arg("run").args(["--agent", agent]);
        c.arg("--pin-path")
            .arg(&self.pin)
            .arg("--agent-root")
            .arg(&self.root);
        c.arg("--").arg(self.pg.bindir().join(program)).args(args);
        c.env("PGPASSWORD", "not-the-real-one")
            .env("PGCONNECT_TIMEOUT", "10");
        c
    }

    /// The DSN an agent has: the real server's address, not the gateway's.
    fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=agent dbname=app sslmode=disable",
            self.pg.port
        )
    }

    fn sessions(&self) -> Vec<serde_json::Value> {
        let out = self
            .gw
            .cli(&["sessions", "--json"])
            .expect("sessions --json");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("sessions --json is JSON")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new(portcullis_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin)
            .arg("--agent-root")
            .arg(&self.root)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin);
        let _ = std::fs::write(self.root.join("cgroup.kill"), "1");
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn ok(out: &Output, what: &str, env: &Env) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n--- gateway log ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        env.gw.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agents_keep_their_dsn_and_land_in_the_gateway() {
    if skip_unless_root("agents_keep_their_dsn_and_land_in_the_gateway") {
        return;
    }
    let env = Env::start("dsn");

    // psql in an agent cgroup dials PostgreSQL's own address; the gateway answers with its own
    // credential (the agent's password is wrong on purpose), so current_user is the target's.
    let out = env
        .agent(
            "claude",
            "psql",
            &[
                "-X",
                "-At",
                "-d",
                &env.dsn(),
                "-c",
                "SELECT current_user, inet_server_port()",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        ok(&out, "psql as an agent", &env).trim(),
        format!("app|{}", env.pg.port)
    );

    // The first psql's session leaves the list once the gateway has seen it close; wait for that,
    // so the session found below is the held one and not the first one on its way out.
    if let Err(left) = env
        .gw
        .wait_sessions_gone(|s| s["agent"] == "claude", Duration::from_secs(10))
    {
        panic!(
            "the first session is still listed: {left}\n{}",
            env.gw.log()
        );
    }

    // While an agent's session is open, the gateway lists it with its pid, agent and executable.
    let mut held = env
        .agent(
            "claude",
            "psql",
            &["-X", "-At", "-d", &env.dsn(), "-c", "SELECT pg_sleep(3)"],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        if let Some(s) = env.sessions().into_iter().find(|s| s["agent"] == "claude") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no session for agent claude:\n{}",
            env.gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        session["original_dst"],
        format!("127.0.0.1:{}", env.pg.port)
    );
    let pid = session["pid"]
        .as_u64()
        .expect("the session has the agent's pid") as u32;
    assert!(
        session["exe"].as_str().is_some_and(|e| e.ends_with("psql")),
        "{session}"
    );
    assert!(
        session["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains("claude")),
        "{session}"
    );
    // That pid is the psql process, a descendant of `portcullis run`.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "psql", "pid {pid} is not psql");
    assert!(held.wait().unwrap().success());

    // pgbench in the agent cgroup, extended protocol, through the gateway without errors.
    env.pg.app_superuser_sql("CREATE TABLE t AS SELECT g AS a FROM generate_series(1, 100) g; GRANT SELECT ON t TO app").unwrap();
    let script = env._dir.path().join("select.sql");
    std::fs::write(&script, "SELECT sum(a) FROM t;\n").unwrap();
    let out = env
        .agent(
            "bench",
            "pgbench",
            &[
                "-n",
                "-M",
                "extended",
                "-c",
                "4",
                "-t",
                "50",
                "-f",
                script.to_str().unwrap(),
                &env.dsn(),
            ],
        )
        .output()
        .unwrap();
    let text = ok(&out, "pgbench as an agent", &env);
    assert!(text.contains("number of failed transactions: 0"), "{text}");

    // Outside agent cgroups the same DSN reaches PostgreSQL directly: the fake password fails.
    let out = Command::new(env.pg.bindir().join("psql"))
        .args(["-X", "-At", "-d", &env.dsn(), "-c", "SELECT 1"])
        .env("PGPASSWORD", "not-the-real-one")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a process outside agent cgroups must not be redirected"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
}

#[test]
fn with_the_gateway_stopped_agents_are_refused_at_once() {
    if skip_unless_root("with_the_gateway_stopped_agents_are_refused_at_once") {
        return;
    }
    let mut env = Env::start("down");
    let status = env.gw.terminate().unwrap();
    assert!(status.success(), "gateway exit: {status}");
    let started = Instant::now();
    let out = env
        .agent(
            "claude",
            "psql",
            &["-X", "-At", "-d", &env.dsn(), "-c", "SELECT 1"],
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an agent must not get through with the gateway down"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused"),
        "expected connection refused, got: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused, not hung: {:?}",
        started.elapsed()
    );
}
