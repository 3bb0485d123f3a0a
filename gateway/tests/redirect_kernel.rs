//! Interception against the real kernel, without the PostgreSQL proxy: each test starts a
//! `Redirector` on its own pin path and agent cgroup root, runs a plain `TcpListener` as a
//! stand-in gateway on the redirect listener, and runs a Python socket client inside the
//! agent cgroup through `portcullis run` (the real CLI). Root only; skipped loudly otherwise.

use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;

use portcullis::redirect::{Origin, ProtectedTarget, RedirectConfig, Redirector};
use serde_json::Value;

const PORTCULLIS: &str = env!("CARGO_BIN_EXE_portcullis");

/// The agent: a small socket client. Prints one JSON line; `tcp` waits for the stand-in
/// gateway's byte before closing, so the lookup always happens while the socket is open.
const CLIENT: &str = r#"
import errno, json, os, socket, sys, time
def fam(host): return socket.AF_INET6 if ':' in host else socket.AF_INET
def err(e): return errno.errorcode.get(e.errno, str(e.errno))
def out(d): d['pid'] = os.getpid(); print(json.dumps(d), flush=True)
cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if cmd == 'tcp':
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect((host, port))
    except OSError as e:
        out({'error': err(e)}); sys.exit(0)
    out({'peer': list(s.getpeername()[:2]), 'local': list(s.getsockname()[:2])})
    s.recv(1)
elif cmd == 'udp':
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    res = {}
    try:
        s.sendto(b'x', (host, port)); res['sendto'] = 'ok'
    except OSError as e:
        res['sendto'] = err(e)
    try:
        s.connect((host, port)); res['connect'] = 'ok'
    except OSError as e:
        res['connect'] = err(e)
    out(res)
elif cmd == 'fastopen':
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    try:
        s.sendto(b'x', socket.MSG_FASTOPEN, (host, port))
    except OSError as e:
        out({'error': err(e)}); sys.exit(0)
    out({'sent': True})
    # Hold the socket until the lookup; the unread SYN data may make the close a reset.
    s.settimeout(20)
    try:
        s.recv(1)
    except OSError:
        pass
elif cmd == 'many':
    n, failed = int(sys.argv[4]), 0
    for i in range(n):
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        s.settimeout(20)
        try:
            s.connect((host, port))
            if i % 2 == 0:
                s.recv(1)
        except OSError:
            failed += 1
        s.close()
    out({'failed': failed})
elif cmd == 'time':
    n, ns = int(sys.argv[4]), []
    for i in range(n):
        s = socket.socket(fam(host), socket.SOCK_STREAM)
        t = time.perf_counter_ns(); s.connect((host, port)); ns.append(time.perf_counter_ns() - t)
        s.close()
    out({'ns': ns})
"#;

/// One isolated interception setup: its own agent root, pin path and listener ports.
struct Env {
    root: PathBuf,
    pin: PathBuf,
    listen: SocketAddr,
    listen_v6: SocketAddr,
    extra_cgroups: Vec<PathBuf>,
}

impl Env {
    fn new(tag: &str) -> Env {
        let mount = portcullis::redirect::find_cgroup2_mount().expect("cgroup2 mount");
        let unique = format!("portcullis-test-{tag}-{}", std::process::id());
        let (v4, v6) = free_dual_stack_port();
        Env {
            root: mount.join(&unique),
            pin: PathBuf::from("/sys/fs/bpf").join(&unique),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), v4),
            listen_v6: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), v6),
            extra_cgroups: Vec::new(),
        }
    }

    fn config(&self) -> RedirectConfig {
        RedirectConfig {
            enabled: true,
            listen: self.listen,
            listen_v6: Some(self.listen_v6),
            pin_path: self.pin.clone(),
            agent_cgroup_root: Some(self.root.clone()),
        }
    }

    fn start(&self, targets: &[ProtectedTarget]) -> Arc<Redirector> {
        Arc::new(Redirector::start(&self.config(), targets).expect("start interception"))
    }

    fn location_args(&self) -> Vec<String> {
        vec![
            "--pin-path".into(),
            self.pin.display().to_string(),
            "--agent-root".into(),
            self.root.display().to_string(),
        ]
    }

    /// `portcullis run --agent AGENT -- python3 -c CLIENT ARGS...`
    fn run_agent(&self, agent: &str, args: &[&str]) -> Output {
        Command::new(PORTCULLIS)
            .arg("run")
            .args(["--agent", agent])
            .args(self.location_args())
            .args(["--", "python3", "-c", CLIENT])
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run portcullis run")
    }

    fn run_agent_json(&self, agent: &str, args: &[&str]) -> Value {
        let out = self.run_agent(agent, args);
        assert!(out.status.success(), "agent exited with {}", out.status);
        json_line(&out.stdout)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
        for cg in self.extra_cgroups.iter().chain([&self.root]) {
            remove_cgroup_tree(cg);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    // Kills whatever a failed test left running there, so the directory can go.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A port free on both 127.0.0.1 and ::1 (v4) and another one for ::1.
fn free_dual_stack_port() -> (u16, u16) {
    let v4 = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let v6 = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (v4, v6)
}

/// Python runs outside any agent cgroup: the control group.
fn run_outside(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .args(["-c", CLIENT])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run python3");
    assert!(out.status.success(), "client exited with {}", out.status);
    json_line(&out.stdout)
}

fn json_line(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output from client: {text:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad client output {line:?}: {e}"))
}

fn peer_of(v: &Value) -> SocketAddr {
    let host = v["peer"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no peer in {v}"));
    let port = v["peer"][1].as_u64().unwrap() as u16;
    SocketAddr::new(host.parse().unwrap(), port)
}

fn pid_of(v: &Value) -> u32 {
    v["pid"].as_u64().unwrap() as u32
}

/// The stand-in gateway: accepts `n` connections, looks each one up (which consumes the
/// record), answers one byte so the client may close, and returns the lookups.
fn stand_in(
    listener: TcpListener,
    redirector: Arc<Redirector>,
    n: usize,
) -> JoinHandle<Vec<(SocketAddr, Result<Origin, String>)>> {
    std::thread::spawn(move || {
        let mut seen = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let (mut conn, peer) = listener.accept().expect("accept");
            let origin = redirector.lookup(peer).map_err(|e| e.to_string());
            let _ = conn.write_all(b"k");
            if n <= 1024 {
                seen.push((peer, origin));
            }
        }
        seen
    })
}

/// A server the agent must not reach directly; nonblocking so "nobody came" can be checked.
fn protected_server(addr: &str) -> TcpListener {
    let l = TcpListener::bind(addr).expect("bind protected server");
    l.set_nonblocking(true).unwrap();
    l
}

fn assert_untouched(server: &TcpListener) {
    match server.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("protected server was reached directly from {peer}"),
        Err(e) => panic!("accept on protected server: {e}"),
    }
}

#[test]
fn agent_ipv4_connect_is_redirected_with_its_origin() {
    if testkit::skip_unless_root("agent_ipv4_connect_is_redirected_with_its_origin") {
        return;
    }
    let env = Env::new("v4");
    let server = protected_server("127.0.0.2:0");
    let target = server.local_addr().unwrap();
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    let listener = TcpListener::bind(env.listen).unwrap();
    let r = redirector.clone();
    // Like the real gateway: look up and read the executable while the agent waits.
    let gateway = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let origin = r.lookup(peer).map_err(|e| e.to_string());
        let exe = origin.as_ref().ok().and_then(Origin::executable);
        conn.write_all(b"k").unwrap();
        (vec![(peer, origin)], exe)
    });

    let client = env.run_agent_json("alpha", &["tcp", "127.0.0.2", &target.port().to_string()]);
    let (seen, exe) = gateway.join().unwrap();
    let exe = exe.expect("executable of a live agent");
    assert!(
        exe.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("python3"),
        "{}",
        exe.display()
    );

    assert_eq!(
        peer_of(&client),
        target,
        "getpeername must show the original peer"
    );
    let (peer, origin) = &seen[0];
    let origin = origin.as_ref().expect("lookup of a redirected connection");
    assert_eq!(origin.original_dst, target);
    assert_eq!(origin.pid, pid_of(&client));
    assert_eq!(origin.uid, 0);
    assert_eq!(origin.comm, "python3");
    assert_eq!(origin.agent.as_deref(), Some("alpha"));
    assert_eq!(
        origin.cgroup_path.as_deref(),
        Some(env.root.join("alpha").as_path())
    );
    let local = &client["local"];
    assert_eq!(
        peer.port() as u64,
        local[1].as_u64().unwrap(),
        "peer is the agent socket"
    );
    assert_untouched(&server);
    // Consumed: a second lookup refuses.
    assert!(redirector.lookup(*peer).is_err());
}

#[test]
fn ipv6_and_v4_mapped_connects_are_redirected() {
    if testkit::skip_unless_root("ipv6_and_v4_mapped_connects_are_redirected") {
        return;
    }
    let env = Env::new("v6");
    let server6 = protected_server("[::1]:0");
    let target6 = server6.local_addr().unwrap();
    let server4 = protected_server("127.0.0.2:0");
    let target4 = server4.local_addr().unwrap();
    let redirector = env.start(&[
        ProtectedTarget::host(target6),
        ProtectedTarget::host(target4),
    ]);

    let gateway6 = stand_in(
        TcpListener::bind(env.listen_v6).unwrap(),
        redirector.clone(),
        1,
    );
    let client = env.run_agent_json("v6", &["tcp", "::1", &target6.port().to_string()]);
    let (peer, origin) = gateway6.join().unwrap().remove(0);
    assert_eq!(peer_of(&client), target6);
    let origin = origin.expect("lookup of an IPv6 redirected connection");
    assert_eq!(origin.original_dst, target6);
    assert_eq!(origin.pid, pid_of(&client));
    assert!(peer.is_ipv6());

    // An AF_INET6 socket to ::ffff:127.0.0.2 is IPv4 on the wire: it lands on the v4 listener.
    let gateway4 = stand_in(
        TcpListener::bind(env.listen).unwrap(),
        redirector.clone(),
        1,
    );
    let mapped = format!("::ffff:{}", target4.ip());
    let client = env.run_agent_json("mapped", &["tcp", &mapped, &target4.port().to_string()]);
    let (_, origin) = gateway4.join().unwrap().remove(0);
    let origin = origin.expect("lookup of a v4-mapped redirected connection");
    assert_eq!(origin.original_dst, target4, "reported in its IPv4 form");
    assert_eq!(origin.agent.as_deref(), Some("mapped"));
    assert_eq!(
        peer_of(&client),
        SocketAddr::new(mapped.parse().unwrap(), target4.port())
    );
    assert_untouched(&server6);
    assert_untouched(&server4);
}

#[test]
fn processes_outside_agent_cgroups_are_untouched() {
    if testkit::skip_unless_root("processes_outside_agent_cgroups_are_untouched") {
        return;
    }
    let env = Env::new("outside");
    let server = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = server.local_addr().unwrap();
    let _redirector = env.start(&[ProtectedTarget::host(target)]);
    let accepted = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        conn.write_all(b"k").unwrap();
    });
    let client = run_outside(&["tcp", "127.0.0.2", &target.port().to_string()]);
    accepted.join().unwrap();
    assert_eq!(peer_of(&client), target);
}

#[test]
fn without_a_listener_agent_connects_fail_at_once_and_resume_after_restart() {
    if testkit::skip_unless_root("without_a_listener_agent_connects_fail_at_once") {
        return;
    }
    let env = Env::new("closed");
    let server = protected_server("127.0.0.2:0");
    let target = server.local_addr().unwrap();
    let port = target.port().to_string();
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    // The gateway "crashes": its process state is gone, the pinned programs stay.
    drop(redirector);

    let client = env.run_agent_json("down", &["tcp", "127.0.0.2", &port]);
    assert_eq!(
        client["error"], "ECONNREFUSED",
        "fail closed, at once: {client}"
    );
    assert_untouched(&server);

    // Restart: adopts the pinned programs and maps; new connections are intercepted again.
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    let gateway = stand_in(
        TcpListener::bind(env.listen).unwrap(),
        redirector.clone(),
        1,
    );
    let client = env.run_agent_json("down", &["tcp", "127.0.0.2", &port]);
    let (_, origin) = gateway.join().unwrap().remove(0);
    assert_eq!(origin.expect("lookup after restart").original_dst, target);
    assert_eq!(peer_of(&client), target);
    assert_untouched(&server);
}

#[test]
fn escape_attempts_from_an_agent_are_refused() {
    if testkit::skip_unless_root("escape_attempts_from_an_agent_are_refused") {
        return;
    }
    let env = Env::new("escape");
    // The server listens on every local address; only 127.0.0.2:PORT is named as the target.
    let server = protected_server("0.0.0.0:0");
    let port = server.local_addr().unwrap().port();
    let server6 = protected_server(&format!("[::1]:{port}"));
    let target = SocketAddr::new("127.0.0.2".parse().unwrap(), port);
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    let p = port.to_string();

    let mut others = vec![
        "127.0.0.3".to_owned(),
        "127.0.0.1".into(),
        "0.0.0.0".into(),
        "::1".into(),
    ];
    others.extend(host_addresses().iter().map(IpAddr::to_string));
    for host in &others {
        let client = env.run_agent_json("escape", &["tcp", host, &p]);
        assert_eq!(
            client["error"], "EPERM",
            "{host}:{port} must be refused: {client}"
        );
    }
    let udp = env.run_agent_json("escape", &["udp", "127.0.0.2", &p]);
    assert_eq!(udp["sendto"], "EPERM", "{udp}");
    assert_eq!(udp["connect"], "EPERM", "{udp}");
    let udp = env.run_agent_json("escape", &["udp", "127.0.0.3", &p]);
    assert_eq!(udp["sendto"], "EPERM", "{udp}");

    // TCP Fast Open carries data in the SYN: it goes through the same connect hook.
    let gateway = stand_in(
        TcpListener::bind(env.listen).unwrap(),
        redirector.clone(),
        1,
    );
    let client = env.run_agent_json("escape", &["fastopen", "127.0.0.2", &p]);
    assert_eq!(client["sent"], true, "{client}");
    let (_, origin) = gateway.join().unwrap().remove(0);
    assert_eq!(origin.expect("fastopen is redirected").original_dst, target);

    assert_untouched(&server);
    assert_untouched(&server6);
}

#[test]
fn a_cidr_target_redirects_every_address_in_it() {
    if testkit::skip_unless_root("a_cidr_target_redirects_every_address_in_it") {
        return;
    }
    let env = Env::new("cidr");
    let server = protected_server("0.0.0.0:0");
    let port = server.local_addr().unwrap().port();
    let target = ProtectedTarget {
        net: "127.0.0.0".parse().unwrap(),
        prefix_len: 8,
        port,
    };
    let redirector = env.start(&[target]);
    for host in ["127.0.0.9", "127.1.2.3"] {
        let gateway = stand_in(
            TcpListener::bind(env.listen).unwrap(),
            redirector.clone(),
            1,
        );
        let client = env.run_agent_json("cidr", &["tcp", host, &port.to_string()]);
        let (_, origin) = gateway.join().unwrap().remove(0);
        let want = SocketAddr::new(host.parse().unwrap(), port);
        assert_eq!(origin.expect("lookup").original_dst, want);
        assert_eq!(peer_of(&client), want);
    }
    // Another port on the same addresses is not protected.
    let other = TcpListener::bind("127.0.0.9:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut conn, _) = other.accept().unwrap();
        conn.write_all(b"k").unwrap();
    });
    let client = env.run_agent_json("cidr", &["tcp", "127.0.0.9", &other_port.to_string()]);
    accepted.join().unwrap();
    assert_eq!(peer_of(&client).port(), other_port);
    assert_untouched(&server);

    // Reload without the target: the agent now reaches the server directly.
    redirector.update_targets(&[]).unwrap();
    let server_port = port.to_string();
    let client = env.run_agent_json("cidr", &["udp", "127.0.0.9", &server_port]);
    assert_eq!(client["sendto"], "ok", "{client}");
}

#[test]
fn maps_return_to_baseline_after_10000_connections() {
    if testkit::skip_unless_root("maps_return_to_baseline_after_10000_connections") {
        return;
    }
    const N: usize = 10_000;
    let env = Env::new("leak");
    let server = protected_server("127.0.0.2:0");
    let target = server.local_addr().unwrap();
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    let baseline = redirector.map_counts().unwrap();

    // Every other connection waits for the lookup (the gateway consumes the record); the others
    // close at once, before or after the lookup (the release hook deletes the record).
    let gateway = stand_in(
        TcpListener::bind(env.listen).unwrap(),
        redirector.clone(),
        N,
    );
    let client = env.run_agent_json(
        "leak",
        &[
            "many",
            "127.0.0.2",
            &target.port().to_string(),
            &N.to_string(),
        ],
    );
    assert_eq!(client["failed"], 0, "{client}");
    gateway.join().unwrap();

    let after = redirector.map_counts().unwrap();
    assert_eq!(after, baseline, "connection records leaked");
}

#[test]
fn agents_attach_list_and_uninstall() {
    if testkit::skip_unless_root("agents_attach_list_and_uninstall") {
        return;
    }
    let mut env = Env::new("attach");
    let server = protected_server("127.0.0.2:0");
    let target = server.local_addr().unwrap();
    let port = target.port().to_string();
    let redirector = env.start(&[ProtectedTarget::host(target)]);

    // A cgroup outside the agent root, placed under interception by name.
    let outside = env.root.with_file_name(format!(
        "{}-extra",
        env.root.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir(&outside).unwrap();
    env.extra_cgroups.push(outside.clone());
    let out = Command::new(PORTCULLIS)
        .args(["agents", "attach"])
        .arg(&outside)
        .args(["--name", "beta"])
        .args(env.location_args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let gateway = stand_in(
        TcpListener::bind(env.listen).unwrap(),
        redirector.clone(),
        1,
    );
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" tcp 127.0.0.2 {port}",
        outside.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script, CLIENT])
        .output()
        .unwrap();
    assert!(out.status.success());
    let client = json_line(&out.stdout);
    let (_, origin) = gateway.join().unwrap().remove(0);
    let origin = origin.expect("lookup from an attached cgroup");
    assert_eq!(origin.agent.as_deref(), Some("beta"));
    assert_eq!(origin.pid, pid_of(&client));
    assert_eq!(peer_of(&client), target);

    // A long-running agent under the root, so the listing has a process to count.
    let sleeper = Command::new(PORTCULLIS)
        .args(["run", "--agent", "gamma"])
        .args(env.location_args())
        .args(["--", "sleep", "30"])
        .spawn()
        .unwrap();
    let gamma = env.root.join("gamma");
    let started = (0..3000).any(|_| {
        let ready =
            std::fs::read_to_string(gamma.join("cgroup.procs")).is_ok_and(|s| !s.is_empty());
        if !ready {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        ready
    });
    assert!(
        started,
        "portcullis run never placed its command in {}",
        gamma.display()
    );
    let out = Command::new(PORTCULLIS)
        .args(["agents", "--json"])
        .args(env.location_args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agents: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agents: Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |name: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("agent {name} not listed: {agents}"))
            .clone()
    };
    assert_eq!(find("beta")["attached"], true);
    assert_eq!(find("gamma")["processes"], 1);
    assert_eq!(find("gamma")["connections"], 0);
    std::fs::write(gamma.join("cgroup.kill"), "1").unwrap();
    let status = sleeper.wait_with_output().unwrap().status;
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "killed agent's status passes through"
    );

    let out = Command::new(PORTCULLIS)
        .arg("uninstall")
        .args(env.location_args())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!env.pin.exists(), "uninstall leaves nothing pinned");
    drop(redirector);
    // Nothing intercepts any more: the agent cgroup reaches the server directly.
    server.set_nonblocking(false).unwrap();
    let accepted = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        conn.write_all(b"k").unwrap();
    });
    let out = Command::new("sh")
        .args(["-c", &script, CLIENT])
        .output()
        .unwrap();
    accepted.join().unwrap();
    assert_eq!(peer_of(&json_line(&out.stdout)), target);
}

#[test]
fn run_passes_the_exit_status_through() {
    if testkit::skip_unless_root("run_passes_the_exit_status_through") {
        return;
    }
    let env = Env::new("status");
    let _redirector = env.start(&[]);
    let status = Command::new(PORTCULLIS)
        .args(["run", "--agent", "st"])
        .args(env.location_args())
        .args(["--", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7));
    let status = Command::new(PORTCULLIS)
        .args(["run", "--agent", "st"])
        .args(env.location_args())
        .args(["--", "sh", "-c", "kill -TERM $$"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    assert!(
        !env.root.join("st").exists(),
        "an agent cgroup left empty is removed"
    );
}

/// Measures connect() latency, direct against redirected, for the record (no assertion on
/// time: shared machines are noisy; bench/ proves speed).
#[test]
fn connect_latency_direct_vs_redirected() {
    if testkit::skip_unless_root("connect_latency_direct_vs_redirected") {
        return;
    }
    const N: usize = 1_000;
    // Connects made before measuring: the client's start-up and cold caches are not connect().
    const WARMUP: usize = 200;
    let env = Env::new("latency");
    let server = TcpListener::bind("127.0.0.2:0").unwrap();
    let target = server.local_addr().unwrap();
    let redirector = env.start(&[ProtectedTarget::host(target)]);
    let port = target.port().to_string();
    let n = (WARMUP + N).to_string();

    let direct_server = std::thread::spawn(move || {
        for _ in 0..WARMUP + N {
            drop(server.accept().unwrap());
        }
    });
    let direct = run_outside(&["time", "127.0.0.2", &port, &n]);
    direct_server.join().unwrap();

    let listener = TcpListener::bind(env.listen).unwrap();
    let r = redirector.clone();
    let gateway = std::thread::spawn(move || {
        for _ in 0..WARMUP + N {
            let (conn, peer) = listener.accept().unwrap();
            let _ = r.lookup(peer);
            drop(conn);
        }
    });
    let redirected = env.run_agent_json("latency", &["time", "127.0.0.2", &port, &n]);
    gateway.join().unwrap();

    let summary = |v: &Value| {
        let mut ns: Vec<u64> = v["ns"]
            .as_array()
            .unwrap()
            .iter()
            .skip(WARMUP)
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(ns.len(), N);
        ns.sort_unstable();
        (ns[ns.len() / 2], ns[ns.len() * 99 / 100])
    };
    let (d50, d99) = summary(&direct);
    let (r50, r99) = summary(&redirected);
    eprintln!(
        "connect() over {N}: direct median {:.1} us p99 {:.1} us; redirected median {:.1} us p99 {:.1} us",
        d50 as f64 / 1e3,
        d99 as f64 / 1e3,
        r50 as f64 / 1e3,
        r99 as f64 / 1e3
    );
}

/// This host's non-loopback interface addresses, if it has any.
fn host_addresses() -> Vec<IpAddr> {
    let out = Command::new("hostname").arg("-I").output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| !a.is_loopback() && !matches!(a, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80))
        .collect()
}
