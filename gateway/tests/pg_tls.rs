//! TLS on the upstream leg, with certificates made at test time. The client leg stays plaintext
//! loopback; the gateway speaks TLS to PostgreSQL per the target's sslmode. Direct mode runs the
//! same checks with psql using those sslmode settings itself.

use testkit::tls::TestCa;
use testkit::{Harness, Postgres, ServerTls};

const SSL_IN_USE: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// PostgreSQL with `tls` (None: no TLS at all), the gateway's target carrying `params`, and
/// `ca.pem` written when given.
fn tls_harness(tls: Option<ServerTls>, params: &[(&str, &str)], ca_pem: Option<String>) -> Harness {
    let mut pg = Postgres::builder();
    if let Some(t) = tls {
        pg = pg.tls(t);
    }
    let mut b = Harness::builder().postgres(pg);
    if let Some(pem) = ca_pem {
        b = b.file("ca.pem", pem);
    }
    for (k, v) in params {
        b = b.upstream_param(k, v);
    }
    b.start()
        .expect("start PostgreSQL with TLS (and the gateway unless direct)")
}

/// Runs `sql` with psql through the test endpoint, failing with context on error.
fn psql_ok(h: &Harness, sql: &str) -> String {
    let out = h.must(h.endpoint().psql(h.bindir(), sql), "psql");
    assert!(
        out.success,
        "psql -c {sql:?} failed: {}\n{}",
        out.stderr,
        h.context()
    );
    out.stdout
}

/// Through the gateway, tokio-postgres (extended protocol, many round trips) over the TLS leg.
async fn driver_traffic(h: &Harness) {
    if h.is_direct() {
        eprintln!("direct: tokio-postgres here has no TLS connector; psql covered this leg");
        return;
    }
    let c = h.must(h.endpoint().connect().await, "connect");
    let ssl: bool = h
        .must(c.query_one(SSL_IN_USE, &[]).await, "pg_stat_ssl")
        .get(0);
    assert!(ssl, "the upstream leg of a driver session uses TLS");
    let stmt = h.must(c.prepare("SELECT $1::int4 * 2").await, "prepare");
    for i in 0..500 {
        let v: i32 = h.must(c.query_one(&stmt, &[&i]).await, "execute").get(0);
        assert_eq!(v, i * 2);
    }
    let rows = h.must(
        c.query(
            "SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
            &[],
        )
        .await,
        "100k rows over TLS",
    );
    assert_eq!(rows.len(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca() {
    let ca = TestCa::new("Portcullis test CA").unwrap();
    let h = tls_harness(
        Some(ca.server_tls(true).unwrap()),
        &[("sslmode", "verify-full"), ("sslrootcert", "@ca.pem")],
        Some(ca.cert_pem()),
    );
    assert_eq!(psql_ok(&h, SSL_IN_USE).trim(), "t", "{}", h.context());
    // Enough data to span many TLS records in both directions.
    let out = psql_ok(
        &h,
        "SELECT count(*), sum(length(repeat(md5(g::text), 20))) FROM generate_series(1, 200000) g",
    );
    assert_eq!(out.trim(), "200000|128000000");
    let out = psql_ok(
        &h,
        "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 50000) g",
    );
    assert_eq!(out.trim().len(), 32 * 50_000);
    driver_traffic(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_verifying() {
    // The server's CA is given to nobody: `require` encrypts but does not verify.
    let ca = TestCa::new("Unknown CA").unwrap();
    let h = tls_harness(
        Some(ca.server_tls(true).unwrap()),
        &[("sslmode", "require")],
        None,
    );
    assert_eq!(psql_ok(&h, SSL_IN_USE).trim(), "t", "{}", h.context());
    driver_traffic(&h).await;
}

#[test]
fn verify_full_against_another_ca_fails_clearly() {
    let server_ca = TestCa::new("Server CA").unwrap();
    let other_ca = TestCa::new("Some other CA").unwrap();
    let mut h = tls_harness(
        Some(server_ca.server_tls(true).unwrap()),
        &[("sslmode", "verify-full"), ("sslrootcert", "@ca.pem")],
        Some(other_ca.cert_pem()),
    );
    let out = h.must(h.endpoint().psql(h.bindir(), "SELECT 1"), "psql");
    assert!(
        !out.success,
        "connected although the server certificate is from another CA\n{}",
        h.context()
    );
    let lower = out.stderr.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl"),
        "the client's error names the certificate/TLS failure: {}\n{}",
        out.stderr,
        h.context()
    );
    h.assert_gateway_alive();
}

#[test]
fn verify_ca_ignores_the_name_verify_full_does_not() {
    let ca = TestCa::new("Portcullis test CA").unwrap();
    // A certificate for another host name: right CA, wrong name for 127.0.0.1.
    let tls = ca.server_tls_for(&["db.internal.example"], true).unwrap();

    let h = tls_harness(
        Some(tls.clone()),
        &[("sslmode", "verify-ca"), ("sslrootcert", "@ca.pem")],
        Some(ca.cert_pem()),
    );
    assert_eq!(
        psql_ok(&h, SSL_IN_USE).trim(),
        "t",
        "verify-ca\n{}",
        h.context()
    );
    drop(h);

    let mut h = tls_harness(
        Some(tls),
        &[("sslmode", "verify-full"), ("sslrootcert", "@ca.pem")],
        Some(ca.cert_pem()),
    );
    let out = h.must(h.endpoint().psql(h.bindir(), "SELECT 1"), "psql");
    assert!(
        !out.success,
        "verify-full accepted a certificate for another name\n{}",
        h.context()
    );
    let lower = out.stderr.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("name") || lower.contains("tls"),
        "the error explains the name mismatch: {}\n{}",
        out.stderr,
        h.context()
    );
    h.assert_gateway_alive();
}

#[test]
fn hostssl_only_server_refuses_plaintext_upstream() {
    let ca = TestCa::new("Portcullis test CA").unwrap();
    let h = tls_harness(
        Some(ca.server_tls(true).unwrap()),
        &[("sslmode", "disable")],
        None,
    );
    let out = h.must(h.endpoint().psql(h.bindir(), "SELECT 1"), "psql");
    assert!(
        !out.success,
        "a hostssl-only server accepted a plaintext upstream\n{}",
        h.context()
    );
    assert!(
        out.stderr.contains("no pg_hba.conf entry") || out.stderr.contains("encryption"),
        "PostgreSQL's refusal reaches the client: {}\n{}",
        out.stderr,
        h.context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_uses_tls_when_offered() {
    let ca = TestCa::new("Portcullis test CA").unwrap();
    let h = tls_harness(
        Some(ca.server_tls(false).unwrap()),
        &[("sslmode", "prefer")],
        None,
    );
    assert_eq!(psql_ok(&h, SSL_IN_USE).trim(), "t", "{}", h.context());
    driver_traffic(&h).await;
    drop(h);

    // No TLS on the server: prefer falls back to plaintext.
    let h = tls_harness(None, &[("sslmode", "prefer")], None);
    assert_eq!(psql_ok(&h, SSL_IN_USE).trim(), "f", "{}", h.context());
}
