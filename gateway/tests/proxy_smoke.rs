//! The quick-start path end to end: a real PostgreSQL, the real gateway in front of it, psql
//! through the gateway with a made-up user and no password.

use testkit::{Gateway, GatewayOptions, Postgres, psql};

#[test]
fn psql_through_the_gateway_with_injected_credential() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let gw = Gateway::start(GatewayOptions::for_target(&pg, pw)).expect("start gateway");
    let (out, err, ok) = psql(
        pg.bindir(),
        &gw.conninfo("whatever"),
        "SELECT current_user, 40 + 2",
    )
    .unwrap();
    assert!(ok, "psql failed: {err}\n--- gateway log ---\n{}", gw.log());
    assert_eq!(out.trim(), "app|42", "{err}");
    let (out, err, ok) = psql(
        pg.bindir(),
        &gw.conninfo("x"),
        "CREATE TABLE t(a int); INSERT INTO t SELECT generate_series(1,1000); SELECT sum(a) FROM t",
    )
    .unwrap();
    assert!(ok, "{err}\n{}", gw.log());
    assert_eq!(out.lines().last(), Some("500500"), "{out}");
    assert!(
        !gw.log().contains(&pg.password),
        "the upstream password leaked into the log"
    );
}
