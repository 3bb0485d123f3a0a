//! TLS on the local leg: the gateway as a TLS server to the agent, with certificates minted from
//! its local CA. Real psql with sslmode=require, verify-ca and verify-full (sslrootcert = the
//! gateway's CA), a wrong host name that verify-full refuses, `require_tls`, PostgreSQL 17 direct
//! TLS driven by rustls's client (psql 15 cannot do direct TLS), and the attempts a client would
//! make to get the handshake wrong. The shipped default policy (masking on) throughout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use testkit::{Gateway, GatewayOptions, Postgres, free_port, single_target_toml};

const EMAIL: &str = "alice.smith@example.com";
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

struct Setup {
    pg: Postgres,
    gw: Gateway,
    /// A listener whose target sets `require_tls = true`.
    strict: SocketAddr,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

fn start() -> Setup {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let strict: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The first lines land in the harness's [gateway] table.
    let body = format!(
        "startup_timeout = \"3s\"\n\n{}\
         [target.local_tls]\nmode = \"local-ca\"\nhosts = [\"db.internal\", \"localhost\"]\n\n\
         [[listener]]\nlisten = \"{strict}\"\ntarget = \"strict\"\n\n\
         [[target]]\nname = \"strict\"\nupstream = \"{}\"\npassword_file = \"{}\"\n\
         [target.local_tls]\nmode = \"local-ca\"\nrequire_tls = true\n",
        single_target_toml(listen, &pg.url(), &pw),
        pg.url(),
        pw.display()
    );
    let gw = Gateway::start(
        GatewayOptions::with_config(listen, body)
            .arg("--policy")
            .arg("default"),
    )
    .expect("start gateway");
    let ca = gw.state_dir.join("local-ca/ca.pem");
    Setup {
        pg,
        gw,
        strict,
        ca,
        _dir: dir,
    }
}

impl Setup {
    /// psql through `addr` with extra conninfo; (stdout, stderr, success).
    fn psql_at(&self, addr: SocketAddr, conninfo: &str, sql: &str) -> (String, String, bool) {
        let full = format!(
            "hostaddr={} port={} user=agent dbname=app {conninfo}",
            addr.ip(),
            addr.port()
        );
        testkit::psql(self.pg.bindir(), &full, sql).expect("run psql")
    }

    fn psql(&self, conninfo: &str, sql: &str) -> (String, String, bool) {
        self.psql_at(self.gw.listen, conninfo, sql)
    }

    /// A query a plain psql still gets answered: the gateway kept serving.
    fn still_serves(&self) {
        let (out, err, ok) = self.psql("sslmode=disable", "SELECT 40 + 2");
        assert!(
            ok && out.trim() == "42",
            "gateway stopped serving: {err}\n{}",
            self.gw.log()
        );
    }

    fn log(&self) -> String {
        self.gw.log()
    }

    /// Whether `needle` reaches the log within 5 s.
    fn log_shows(&self, needle: &str) -> bool {
        self.gw.log_shows(needle, Duration::from_secs(5))
    }
}

/// psql's own account of the connection: TLS or not, from the client's side.
fn conninfo_says_tls(out: &str) -> bool {
    out.contains("SSL connection (protocol: TLS")
}

#[test]
fn psql_connects_with_require_verify_ca_and_verify_full() {
    let s = start();
    let ca = s.ca.display().to_string();
    let key = s.gw.state_dir.join("local-ca/ca.key");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is private");

    // `portcullis local-ca` names the file to give agents as sslrootcert.
    let cfg = s.gw.config_path.clone().unwrap();
    let out = std::process::Command::new(testkit::portcullis_bin())
        .args(["local-ca", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ca);

    for conninfo in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca sslrootcert={ca}"),
        format!("host=db.internal sslmode=verify-full sslrootcert={ca}"),
        format!("host=localhost sslmode=verify-full sslrootcert={ca}"),
        // An address in the DSN: no SNI, the certificate names the address dialled.
        format!("host=127.0.0.1 sslmode=verify-full sslrootcert={ca}"),
    ] {
        let (out, err, ok) = s.psql(&conninfo, "\\conninfo");
        assert!(ok, "{conninfo}: {err}\n{}", s.log());
        assert!(conninfo_says_tls(&out), "{conninfo}: not TLS: {out}");
        // Data over TLS, and the default policy's masking still applies.
        let (out, err, ok) = s.psql(&conninfo, &format!("SELECT '{EMAIL}' AS contact, 7 * 6"));
        assert!(ok, "{conninfo}: {err}\n{}", s.log());
        assert!(out.contains("|42"), "{conninfo}: {out}");
        assert!(!out.contains(EMAIL), "{conninfo}: unmasked over TLS: {out}");
    }
    // Many TLS records both ways in one session.
    let (out, err, ok) = s.psql(
        &format!("host=db.internal sslmode=verify-full sslrootcert={ca}"),
        "SELECT count(*), sum(length(repeat(md5(g::text), 20))) FROM generate_series(1, 100000) g",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "100000|64000000");

    // The default target still takes plaintext (require_tls is off), and libpq's default
    // sslmode=prefer now gets TLS.
    let (out, _, ok) = s.psql("sslmode=disable", "\\conninfo");
    assert!(ok && !conninfo_says_tls(&out), "{out}");
    let (out, _, ok) = s.psql("", "\\conninfo");
    assert!(ok && conninfo_says_tls(&out), "{out}");
    assert!(s.log_shows("client_tls=true"), "{}", s.log());
    assert!(!s.log().contains("PRIVATE KEY"), "key material in the log");
}

#[test]
fn verify_full_refuses_a_name_the_target_does_not_answer_to_and_verify_ca_another_ca() {
    let s = start();
    let ca = s.ca.display().to_string();
    let (_, err, ok) = s.psql(
        &format!("host=wrong.example sslmode=verify-full sslrootcert={ca}"),
        "SELECT 1",
    );
    assert!(!ok, "verify-full accepted a certificate for another name");
    assert!(err.contains("does not match host name"), "{err}");
    // The same name under `require` connects: only the check failed.
    let (_, err, ok) = s.psql("host=wrong.example sslmode=require", "SELECT 1");
    assert!(ok, "{err}");

    // A CA the gateway does not hold.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    for mode in ["verify-ca", "verify-full"] {
        let (_, err, ok) = s.psql(
            &format!(
                "host=db.internal sslmode={mode} sslrootcert={}",
                other.display()
            ),
            "SELECT 1",
        );
        assert!(!ok, "{mode} accepted a certificate from an untrusted CA");
        assert!(err.contains("certificate verify failed"), "{mode}: {err}");
    }
    s.still_serves();
}

#[test]
fn require_tls_refuses_plaintext_and_takes_tls() {
    let s = start();
    let (_, err, ok) = s.psql_at(s.strict, "sslmode=disable", "SELECT 1");
    assert!(!ok, "a plaintext client got through a require_tls target");
    assert!(err.contains("requires TLS"), "{err}");
    let (out, err, ok) = s.psql_at(s.strict, "sslmode=require", "\\conninfo");
    assert!(ok && conninfo_says_tls(&out), "{err}{out}");
    // The strict target's hosts default to localhost (its upstream is an address).
    let (_, err, ok) = s.psql_at(
        s.strict,
        &format!(
            "host=localhost sslmode=verify-full sslrootcert={}",
            s.ca.display()
        ),
        "SELECT 1",
    );
    assert!(ok, "{err}");
}

// ---- PostgreSQL 17 direct TLS and raw attempts, driven byte by byte ----

fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp
}

fn startup_message() -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for s in ["user", "agent", "database", "app", ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn query(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend(((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// Reads backend messages until `until` (a type byte); returns them as (type, body).
fn read_until(r: &mut impl Read, until: u8) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut got = Vec::new();
    loop {
        let mut head = [0u8; 5];
        r.read_exact(&mut head)
            .map_err(|e| format!("{e} after {got:?}"))?;
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0; len - 4];
        r.read_exact(&mut body).map_err(|e| e.to_string())?;
        let t = head[0];
        got.push((t, body));
        if t == until || t == b'E' {
            return Ok(got);
        }
    }
}

fn error_text(messages: &[(u8, Vec<u8>)]) -> String {
    messages
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| String::from_utf8_lossy(b).replace('\0', " "))
        .collect()
}

fn client_config(ca: &Path, alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    if alpn {
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(cfg)
}

fn tls_client(
    s: &Setup,
    tcp: TcpStream,
    alpn: bool,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("db.internal").unwrap();
    let conn = rustls::ClientConnection::new(client_config(&s.ca, alpn), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A whole session over TLS: startup, a query, its (masked) row.
fn session(tls: &mut (impl Read + Write)) -> Result<String, String> {
    tls.write_all(&startup_message())
        .map_err(|e| e.to_string())?;
    let hello = read_until(tls, b'Z')?;
    if hello.iter().any(|(t, _)| *t == b'E') {
        return Err(error_text(&hello));
    }
    tls.write_all(&query(&format!("SELECT '{EMAIL}' AS contact, 6 * 7")))
        .map_err(|e| e.to_string())?;
    let reply = read_until(tls, b'Z')?;
    let row = reply
        .iter()
        .find(|(t, _)| *t == b'D')
        .ok_or_else(|| format!("no row: {}", error_text(&reply)))?;
    Ok(String::from_utf8_lossy(&row.1).into_owned())
}

#[test]
fn direct_tls_with_alpn_postgresql_runs_a_session_and_without_alpn_is_refused() {
    let s = start();
    // PostgreSQL 17 direct TLS: the first bytes are the ClientHello.
    let mut tls = tls_client(&s, connect(s.gw.listen), true);
    let row = session(&mut tls).unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    assert!(row.contains("42"), "{row}");
    assert!(!row.contains(EMAIL), "unmasked: {row}");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"postgresql"[..]));

    // The SSLRequest path with rustls's client, ALPN offered as libpq 17 does.
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&SSL_REQUEST).unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    let mut tls = tls_client(&s, tcp, true);
    let row = session(&mut tls).unwrap();
    assert!(row.contains("42") && !row.contains(EMAIL), "{row}");

    // Direct TLS without ALPN: PostgreSQL 17 refuses it, so does the gateway, in words.
    let mut tls = tls_client(&s, connect(s.gw.listen), false);
    let e = session(&mut tls).unwrap_err();
    assert!(e.contains("ALPN"), "{e}");

    // A ClientHello offering only another protocol fails the handshake.
    let mut cfg = (*client_config(&s.ca, false)).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("db.internal").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, connect(s.gw.listen));
    assert!(session(&mut tls).is_err());
    s.still_serves();
}

/// Reads what the gateway says until it closes; Err if it neither answers nor closes.
fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    match tcp.read_to_end(&mut all) {
        Ok(_) => all,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => all,
        Err(e) => panic!("the gateway neither answered nor closed: {e}"),
    }
}

#[test]
fn attempts_to_get_around_the_handshake_fail_clearly_and_the_gateway_keeps_serving() {
    let s = start();

    // A plaintext StartupMessage after the gateway said 'S'.
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&SSL_REQUEST).unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    tcp.write_all(&startup_message()).unwrap();
    let got = read_to_close(&mut tcp);
    // Nothing but a TLS alert (record type 0x15) comes back: no session in plaintext.
    assert!(
        got.first().is_none_or(|b| *b == 0x15),
        "plaintext after 'S' got {got:?}"
    );
    s.still_serves();

    // Garbage instead of a ClientHello.
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&SSL_REQUEST).unwrap();
    tcp.read_exact(&mut answer).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
        .unwrap();
    read_to_close(&mut tcp);
    // And garbage that starts like a TLS record (direct TLS).
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    read_to_close(&mut tcp);
    s.still_serves();

    // Two SSLRequests in one write: the second is plaintext sent before any TLS, which must
    // not be taken as coming over it (CVE-2021-23214).
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&[SSL_REQUEST, SSL_REQUEST].concat()).unwrap();
    let got = read_to_close(&mut tcp);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("unencrypted data after SSL request"),
        "{text}"
    );

    // An SSLRequest again inside TLS.
    let mut tls = tls_client(&s, connect(s.gw.listen), true);
    tls.write_all(&SSL_REQUEST).unwrap();
    let e = read_until(&mut tls, b'Z').map(|m| error_text(&m));
    assert!(
        e.as_ref()
            .is_ok_and(|t| t.contains("SSLRequest sent again")),
        "{e:?}"
    );

    // GSSENCRequest is still answered 'N', and the startup goes on (here over TLS).
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&GSSENC_REQUEST).unwrap();
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    tcp.write_all(&SSL_REQUEST).unwrap();
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"S");
    let mut tls = tls_client(&s, tcp, true);
    session(&mut tls).unwrap();

    // A client that says SSLRequest and then nothing: bounded by startup_timeout (3s here).
    let mut tcp = connect(s.gw.listen);
    tcp.write_all(&SSL_REQUEST).unwrap();
    tcp.read_exact(&mut answer).unwrap();
    let started = std::time::Instant::now();
    read_to_close(&mut tcp);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "worker held past the timeout"
    );

    // The gateway logs after it closes, and its log reaches us through a pipe: wait for it.
    let timed_out = "local TLS handshake not completed within the startup timeout";
    assert!(s.log_shows(timed_out), "{}", s.log());
    let log = s.log();
    assert!(log.contains("local TLS handshake failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    s.still_serves();
}

#[test]
fn a_configured_certificate_is_served_and_a_readable_key_stops_the_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let ca = testkit::tls::TestCa::new("Operator CA").unwrap();
    let (cert_pem, key_pem) = ca.server_cert(&["orders.db.example"]).unwrap();
    let (cert, key, ca_file) = (
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "{}[target.local_tls]\nmode = \"files\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        single_target_toml(listen, &pg.url(), &pw),
        cert.display(),
        key.display()
    );
    let options = || {
        GatewayOptions::with_config(listen, body.clone())
            .arg("--policy")
            .arg("default")
    };
    let e = Gateway::start(options())
        .err()
        .expect("started with a key file others can read")
        .to_string();
    assert!(e.contains("chmod 600"), "{e}");
    let body_line = key_pem.lines().nth(1).unwrap();
    assert!(!e.contains(body_line), "the key reached the log");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let gw = Gateway::start(options()).expect("start gateway");
    let run = |host: &str| {
        testkit::psql(
            pg.bindir(),
            &format!(
                "host={host} hostaddr=127.0.0.1 port={} user=agent dbname=app \
                 sslmode=verify-full sslrootcert={}",
                listen.port(),
                ca_file.display()
            ),
            "\\conninfo",
        )
        .unwrap()
    };
    let (out, err, ok) = run("orders.db.example");
    assert!(ok && conninfo_says_tls(&out), "{err}\n{}", gw.log());
    let (_, err, ok) = run("other.db.example");
    assert!(!ok && err.contains("does not match host name"), "{err}");
    assert!(!gw.log().contains(body_line), "the key reached the log");
}
