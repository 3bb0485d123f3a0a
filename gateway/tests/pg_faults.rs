//! Faults: the gateway killed with SIGKILL while a statement waits for approval. After a restart
//! on the same state dir the request is denied, cannot be approved, and nothing reached the
//! server.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use portcullis::policy::{ApprovalRecord, Status};
use testkit::{Gateway, GatewayOptions, Postgres, free_port, single_target_toml};

fn start(pg: &Postgres, pw: &Path, state: &Path) -> Gateway {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    Gateway::start(
        GatewayOptions::with_config(listen, single_target_toml(listen, &pg.url(), pw))
            .arg("--policy")
            .arg("default")
            .arg("--state-dir")
            .arg(state.display().to_string()),
    )
    .expect("start gateway")
}

fn approvals(gw: &Gateway) -> Vec<ApprovalRecord> {
    let out = gw.cli(&["approvals", "--json"]).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_while_held_denies_the_statement_after_restart() {
    let pg = Postgres::start().unwrap();
    pg.app_superuser_sql("CREATE TABLE t (id int); ALTER TABLE t OWNER TO app;")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let state = dir.path().join("state");
    let mut gw = start(&pg, &pw, &state);

    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let held = tokio::spawn(async move { client.simple_query("INSERT INTO t VALUES (1)").await });
    let mut id = None;
    for _ in 0..300 {
        if let Some(r) = approvals(&gw)
            .into_iter()
            .find(|r| r.status == Status::Pending && r.sql.contains("INSERT INTO t"))
        {
            id = Some(r.id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = id.expect("the INSERT is held");

    gw.signal(9);
    for _ in 0..200 {
        if gw.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        held.await.unwrap().is_err(),
        "the client's statement fails with its gateway"
    );

    let gw = start(&pg, &pw, &state);
    let rec = approvals(&gw)
        .into_iter()
        .find(|r| r.id == id)
        .expect("the request survives in the store");
    assert_eq!(rec.status, Status::Denied);
    assert_eq!(rec.reason.as_deref(), Some("gateway restarted"));
    let out = gw.cli(&["approve", &id.to_string()]).unwrap();
    assert!(!out.status.success(), "a denied request cannot be approved");
    assert_eq!(
        pg.app_superuser_sql("SELECT count(*) FROM t")
            .unwrap()
            .trim(),
        "0",
        "nothing reached the server"
    );
}
