//! Credential injection: the agent connects as anyone with no password; the gateway
//! authenticates upstream with SCRAM-SHA-256 (also over TLS, where -PLUS channel binding is
//! available), md5, cleartext password or trust, from a password file or an environment variable.

use testkit::tls::TestCa;
use testkit::{Gateway, GatewayOptions, Harness, HbaAuth, Postgres, skip_in_direct};

async fn assert_session_is_app(h: &Harness, what: &str) {
    let out = h.must(
        h.endpoint()
            .psql(h.bindir(), "SELECT current_user, session_user"),
        what,
    );
    assert!(out.success, "{what}: psql: {}\n{}", out.stderr, h.context());
    assert_eq!(out.stdout.trim(), "app|app", "{what}\n{}", h.context());
    if h.is_direct() {
        // Direct, tokio-postgres authenticates itself: the same check, driver-side.
        let c = h.must(h.endpoint().connect().await, what);
        let u: String = h
            .must(c.query_one("SELECT current_user::text", &[]).await, what)
            .get(0);
        assert_eq!(u, "app");
        return;
    }
    // Through the gateway the client's user name and (absent) password do not matter.
    for user in ["agent", "postgres", "someone-else"] {
        let mut ep = h.endpoint();
        ep.user = user.into();
        let c = h.must(ep.connect().await, &format!("{what}: connect as {user}"));
        let u: String = h
            .must(c.query_one("SELECT current_user::text", &[]).await, what)
            .get(0);
        assert_eq!(
            u,
            "app",
            "{what}: client user {user} runs as the target's role\n{}",
            h.context()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_auth_methods() {
    for auth in [
        HbaAuth::Scram,
        HbaAuth::Md5,
        HbaAuth::Password,
        HbaAuth::Trust,
    ] {
        let h = Harness::builder()
            .postgres(Postgres::builder().auth(auth))
            .start()
            .unwrap_or_else(|e| panic!("start with {auth:?}: {e:#}"));
        assert_session_is_app(&h, &format!("{auth:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_verified_tls() {
    let ca = TestCa::new("Portcullis test CA").unwrap();
    let h = Harness::builder()
        .postgres(Postgres::builder().tls(ca.server_tls(true).unwrap()))
        .file("ca.pem", ca.cert_pem())
        .upstream_param("sslmode", "verify-full")
        .upstream_param("sslrootcert", "@ca.pem")
        .start()
        .expect("start");
    let out = h.must(
        h.endpoint().psql(
            h.bindir(),
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ),
        "psql",
    );
    assert!(out.success, "psql: {}\n{}", out.stderr, h.context());
    assert_eq!(out.stdout.trim(), "app|t");
    if h.is_direct() {
        // The server offers SCRAM-SHA-256-PLUS over this TLS: libpq insists on it here.
        let mut ep = h.endpoint();
        ep.params.push(("channel_binding".into(), "require".into()));
        let out = h.must(
            ep.psql(h.bindir(), "SELECT 1"),
            "psql channel_binding=require",
        );
        assert!(out.success, "channel binding: {}", out.stderr);
    }
}

#[test]
fn password_from_environment_variable() {
    if skip_in_direct(
        "password_from_environment_variable",
        "it tests the gateway's --password-env",
    ) {
        return;
    }
    let pg = Postgres::start().expect("start PostgreSQL");
    let gw = Gateway::start(GatewayOptions {
        target: None,
        args: vec![
            "--target".into(),
            pg.url(),
            "--password-env".into(),
            "PORTCULLIS_TEST_UPSTREAM_PASSWORD".into(),
        ],
        env: vec![(
            "PORTCULLIS_TEST_UPSTREAM_PASSWORD".into(),
            pg.password.clone(),
        )],
        listen: None,
        config: None,
    })
    .expect("start the gateway with --password-env");
    let (out, err, ok) =
        testkit::psql(pg.bindir(), &gw.conninfo("app"), "SELECT current_user").expect("psql");
    assert!(ok, "psql: {err}\n{}", gw.log_tail(40));
    assert_eq!(out.trim(), "app");
    assert!(
        !gw.log().contains(&pg.password),
        "the password from the environment reached the log"
    );
}
