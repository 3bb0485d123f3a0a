//! No credential on an unverified channel. A fake PostgreSQL on a non-loopback address (the far
//! end of a veth pair, in a network namespace the test makes) answers 'N' to SSLRequest and asks
//! for the password in cleartext, or as md5: what anyone on the path under `sslmode=prefer` can do.
//! The gateway must refuse with a clear error, and the password must never cross the wire. The
//! `danger_` override shows the same impostor does get it when the rule is lifted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use testkit::wire::{Message, RawConn, startup_message};
use testkit::{Gateway, GatewayOptions, free_port, random_password, write_secret};

/// True (after a loud line) when the test cannot run here; under CI=true it must.
fn skip(test: &str) -> bool {
    if testkit::is_root() {
        return false;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (network namespaces) and CI requires it"
    );
    eprintln!("SKIPPED {test}: needs root to make a network namespace");
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair: `host` here, `far` over there.
struct Netns {
    name: String,
    host_if: String,
    far: Ipv4Addr,
}

impl Netns {
    fn create(tag: u8) -> Netns {
        let id = std::process::id() % 10_000;
        let name = format!("pc-imp-{id}-{tag}");
        let host_if = format!("pci{id}h{tag}");
        let far_if = format!("pci{id}f{tag}");
        // A /30 per test, from the process id, so parallel runs do not collide.
        let (a, b) = ((id % 250) as u8 + 1, tag * 4);
        let host = Ipv4Addr::new(10, a, b, 1);
        let far = Ipv4Addr::new(10, a, b, 2);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            far,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &far_if,
        ]);
        ip(&["link", "set", &far_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{far}/30"), "dev", &far_if]);
        inside(&["link", "set", &far_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// A listener bound inside the namespace: a thread enters it just to bind.
    fn listen(&self, port: u16) -> TcpListener {
        let path = format!("/run/netns/{}", self.name);
        let addr = SocketAddr::from((self.far, port));
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            TcpListener::bind(addr).expect("bind inside the namespace")
        })
        .join()
        .expect("bind thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// What the impostor asks for once it has the StartupMessage.
#[derive(Clone, Copy)]
enum Ask {
    Cleartext,
    Md5,
}

/// Serves one connection as a PostgreSQL that refuses TLS and wants the password; returns every
/// byte the gateway sent it.
fn impostor(listener: TcpListener, ask: Ask) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = Vec::new();
        let read_packet = |s: &mut std::net::TcpStream, seen: &mut Vec<u8>| -> bool {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                return false;
            }
            let n = u32::from_be_bytes(len) as usize;
            let mut body = vec![0; n.saturating_sub(4)];
            if s.read_exact(&mut body).is_err() {
                return false;
            }
            seen.extend_from_slice(&len);
            seen.extend_from_slice(&body);
            true
        };
        // SSLRequest (8 bytes): no TLS here.
        if !read_packet(&mut s, &mut seen) {
            return seen;
        }
        if seen.ends_with(&80877103u32.to_be_bytes()) {
            s.write_all(b"N").unwrap();
            if !read_packet(&mut s, &mut seen) {
                return seen;
            }
        }
        let request: &[u8] = match ask {
            Ask::Cleartext => &[b'R', 0, 0, 0, 8, 0, 0, 0, 3],
            Ask::Md5 => &[b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4],
        };
        s.write_all(request).unwrap();
        // Whatever comes now, until the gateway hangs up.
        let mut rest = [0u8; 4096];
        while let Ok(n) = s.read(&mut rest) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&rest[..n]);
        }
        seen
    })
}

/// Starts a gateway in front of `upstream` (a URL) with `extra` target keys, connects one
/// client, and returns what the client heard and the gateway itself.
fn attempt(upstream: &str, password: &str, extra: &str) -> (Vec<Message>, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_secret(dir.path(), "pw", password).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "[[listener]]\nlisten = \"{listen}\"\ntarget = \"remote\"\n\n[[target]]\nname = \"remote\"\n\
         upstream = \"{upstream}\"\npassword_file = \"{}\"\n{extra}",
        pw.display()
    );
    let gw = Gateway::start(GatewayOptions::with_config(listen, body)).expect("start gateway");
    let mut c = RawConn::connect("127.0.0.1", listen.port()).unwrap();
    c.send(&startup_message(
        testkit::wire::PROTOCOL_3_0,
        &[("user", "agent"), ("database", "app")],
    ))
    .unwrap();
    let heard = c.read_until_closed().unwrap();
    (heard, gw)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn prefer_to_a_remote_impostor_never_sends_the_password() {
    if skip("prefer_to_a_remote_impostor_never_sends_the_password") {
        return;
    }
    let ns = Netns::create(1);
    for ask in [Ask::Cleartext, Ask::Md5] {
        let port = free_port();
        let upstream = format!("postgres://app@{}:{port}/app?sslmode=prefer", ns.far);
        let server = impostor(ns.listen(port), ask);
        let password = random_password();
        let (heard, gw) = attempt(&upstream, &password, "");
        let seen = server.join().unwrap();
        assert!(
            contains(&seen, b"user\0app\0"),
            "the impostor got the startup (the path is real): {seen:?}"
        );
        assert!(
            !contains(&seen, password.as_bytes()) && !contains(&seen, b"md5"),
            "no password message crossed the wire: {:?}",
            String::from_utf8_lossy(&seen)
        );
        let err = heard
            .iter()
            .find(|m| m.is_error())
            .unwrap_or_else(|| panic!("an ErrorResponse; got {heard:?}"));
        assert_eq!(
            err.sqlstate().as_deref(),
            Some("08001"),
            "{}",
            err.describe()
        );
        assert!(
            err.describe().contains("verified TLS"),
            "the error says why: {}",
            err.describe()
        );
        assert!(!gw.log().contains(&password), "the log holds no password");
    }
}

#[test]
fn default_sslmode_for_a_remote_host_refuses_plaintext() {
    if skip("default_sslmode_for_a_remote_host_refuses_plaintext") {
        return;
    }
    let ns = Netns::create(2);
    let port = free_port();
    // As the embedded default reads once pointed at a remote host: no sslmode.
    let upstream = format!("postgres://app@{}:{port}/app", ns.far);
    let server = impostor(ns.listen(port), Ask::Cleartext);
    let password = random_password();
    // verify-full wants roots; give it a CA the impostor cannot hold a certificate of.
    let dir = tempfile::tempdir().unwrap();
    let ca = testkit::tls::TestCa::new("impostor-test-ca").unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    let upstream = format!("{upstream}?sslrootcert={}", ca_path.display());
    let (heard, _gw) = attempt(&upstream, &password, "");
    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        [0, 0, 0, 8, 4, 210, 22, 47],
        "only the SSLRequest crossed: the startup waits for TLS"
    );
    let err = heard.iter().find(|m| m.is_error()).expect("an error");
    assert!(
        err.describe().contains("does not support TLS"),
        "{}",
        err.describe()
    );
}

#[test]
fn danger_override_is_loud_and_is_what_lets_the_password_out() {
    if skip("danger_override_is_loud_and_is_what_lets_the_password_out") {
        return;
    }
    let ns = Netns::create(3);
    let port = free_port();
    let upstream = format!("postgres://app@{}:{port}/app?sslmode=prefer", ns.far);
    let server = impostor(ns.listen(port), Ask::Cleartext);
    let password = random_password();
    let (_heard, gw) = attempt(
        &upstream,
        &password,
        "danger_password_over_unverified_channel = true\n",
    );
    let seen = server.join().unwrap();
    assert!(
        contains(&seen, password.as_bytes()),
        "with the override the impostor gets it: the test above can fail"
    );
    assert!(
        gw.log_shows(
            "danger_password_over_unverified_channel",
            Duration::from_secs(5)
        ) && gw.log().contains("DANGER"),
        "the override is logged at start: {}",
        gw.log()
    );
}
