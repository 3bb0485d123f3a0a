//! Reloads reach live sessions: a SIGHUP that tightens masking or policy applies at the next
//! statement of a session that was open across it, not only to sessions opened afterwards.

use std::time::{Duration, Instant};

use testkit::{Gateway, GatewayOptions, Postgres};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const EMAIL: &str = "alice.smith@example.com";

const OPEN: &str = "name = \"open\"\nmode = \"enforce\"\nunparsable = \"allow\"\n\
default_action = \"allow\"\nfunction_call = \"allow\"\n";

/// The same, but e-mail addresses are masked and deletes are refused.
const TIGHT: &str = "name = \"tight\"\nmode = \"enforce\"\nunparsable = \"allow\"\n\
default_action = \"allow\"\nfunction_call = \"allow\"\n\n\
[[rules]]\nname = \"no-delete\"\nrisks = [\"delete_without_where\"]\naction = \"block\"\n\
reason = \"deletes are off\"\n\n\
[mask]\ndetectors = [\"email\"]\ndefault_style = \"redact\"\n";

async fn connect(gw: &Gateway) -> Client {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    tokio::spawn(conn);
    client
}

async fn contact(client: &Client) -> String {
    let msgs = client
        .simple_query("SELECT contact FROM people")
        .await
        .expect("select");
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("one row")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_open_across_a_reload_gets_the_new_mask_and_rules() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql(&format!(
        "CREATE TABLE people (contact text); INSERT INTO people VALUES ('{EMAIL}');
         GRANT ALL ON people TO app;"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, OPEN).unwrap();
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw)
            .arg("--policy")
            .arg(policy.display().to_string()),
    )
    .expect("start gateway");

    let live = connect(&gw).await;
    assert_eq!(
        contact(&live).await,
        EMAIL,
        "nothing masked before the reload"
    );

    std::fs::write(&policy, TIGHT).unwrap();
    gw.signal(1);
    // A fresh session shows when the reload has landed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fresh = connect(&gw).await;
        if contact(&fresh).await != EMAIL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never applied:\n{}",
            gw.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let after = contact(&live).await;
    assert_ne!(
        after, EMAIL,
        "the live session's next result is masked by the reloaded rules"
    );
    assert!(!after.contains("alice"), "{after}");
    let err = live
        .simple_query("DELETE FROM people")
        .await
        .expect_err("the live session's next statement follows the reloaded policy");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("42501"),
        "{err}"
    );
}
