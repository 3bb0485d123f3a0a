//! The classifier against PostgreSQL's own parser: mangled SQL (stray quotes, comment markers,
//! dollar quotes, semicolons, `DROP TABLE t` spliced in) that the default policy allows is run on a
//! real server inside a transaction, and the table must survive. A classifier that reads a string
//! or comment boundary differently from PostgreSQL would let a DROP through here.

mod policy_corpus;

use portcullis::policy::{self, Action, ClassifyCache, Identity, Request, TargetRef};
use testkit::Postgres;
use tokio_postgres::{Client, NoTls};

async fn connect(pg: &Postgres) -> Client {
    let conninfo = format!(
        "host={} port={} user={} password={} dbname={}",
        pg.host, pg.port, pg.user, pg.password, pg.database
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

async fn table_exists(client: &Client) -> bool {
    let row = client
        .query_one("SELECT to_regclass('public.t') IS NOT NULL", &[])
        .await
        .expect("check the table");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_mangled_sql_never_drops_the_table_in_postgresql() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql("CREATE TABLE t (a int); ALTER TABLE t OWNER TO app;")
        .unwrap();
    let mut client = connect(&pg).await;
    // The oracle can fail: PostgreSQL does drop the table for a plain smuggled DROP.
    client.batch_execute("BEGIN").await.unwrap();
    client.simple_query("SELECT 1; DROP TABLE t").await.unwrap();
    assert!(!table_exists(&client).await);
    client.batch_execute("ROLLBACK").await.unwrap();
    assert!(table_exists(&client).await);
    let policy = policy::load("default").unwrap();
    let mut cache = ClassifyCache::new(256);
    let mut next = policy_corpus::rng(0x2545_f491_4f6c_dd1d);
    // Start from what is allowed (and from what hides a DROP in a string or comment), so most
    // mangled texts stay allowed and reach PostgreSQL.
    let mut bases: Vec<&str> = policy_corpus::CORPUS
        .iter()
        .copied()
        .filter(|sql| {
            let v = policy.decide(
                &Identity::default(),
                &TargetRef {
                    name: "pg",
                    database: "app",
                },
                &Request::Query(sql),
                &mut cache,
            );
            v.action == Action::Allow
        })
        .collect();
    bases.extend([
        "SELECT 1",
        "SELECT a FROM t WHERE a = 1",
        "SELECT 'x' AS s",
        "SELECT $a$ ; DROP TABLE t $a$",
        "SELECT $$ ; DROP TABLE t $$",
        "SELECT /* ; DROP TABLE t */ 1",
        "SELECT 1 -- ; DROP TABLE t",
        "SELECT '; DROP TABLE t; --'",
        "SELECT E'\\'' , 1",
        "SELECT \"a;b\" FROM (SELECT 1 AS \"a;b\") s",
        "/* /* */ DROP TABLE t; */ SELECT 1",
    ]);
    let (mut tried, mut ran) = (0, 0);
    for i in 0..6000 {
        let sql = policy_corpus::mangle_from(&bases, &mut next);
        let upper = sql.to_ascii_uppercase();
        // COPY switches the protocol into copy mode, which the simple query API does not drive.
        if upper.contains("COPY") {
            continue;
        }
        let v = policy.decide(
            &Identity::default(),
            &TargetRef {
                name: "pg",
                database: "app",
            },
            &Request::Query(&sql),
            &mut cache,
        );
        if v.action != Action::Allow {
            continue;
        }
        tried += 1;
        if client.is_closed() {
            client = connect(&pg).await;
        }
        client.batch_execute("BEGIN").await.unwrap();
        let result = client.simple_query(&sql).await;
        if result.is_ok() {
            ran += 1;
            if !table_exists(&client).await {
                panic!(
                    "case {i}: allowed as {:?} but PostgreSQL dropped the table: {sql:?}",
                    v.class
                );
            }
        }
        let _ = client.batch_execute("ROLLBACK").await;
        if client.is_closed() {
            client = connect(&pg).await;
        }
        assert!(
            table_exists(&client).await,
            "case {i}: {sql:?} dropped the table"
        );
    }
    // The test means something only if PostgreSQL ran a good share of the allowed texts.
    eprintln!("{tried} allowed texts tried, {ran} ran without error on PostgreSQL");
    assert!(tried > 1000 && ran > 300, "tried {tried}, ran {ran}");
}
