//! Masking that follows the data: an adversarial corpus, a randomized differential test, COPY
//! under masking, error/notice/notification masking, and sessions that survive refusals. Every
//! statement runs through the real gateway against a real PostgreSQL with tokio-postgres, in text
//! (simple query) and binary (extended protocol) result formats, and every byte the gateway sends
//! the client is recorded by a relay in between and searched for the canary values.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::{Gateway, GatewayOptions, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Values of masked columns. None appears in any SQL text a test sends.
const CANARIES: &[&str] = &[
    "Zk4ssncanary1",
    "Zk4ssncanary2",
    "Hx2pwcanary1",
    "Hx2pwcanary2",
    "Qv7emailcanary1",
    "Qv7emailcanary2",
    "Jt5jsonssn9",
];

const SCHEMA: &str = "
    CREATE TABLE users (id int PRIMARY KEY, name text, email text, ssn text, password_hash text,
                        profile jsonb, score int);
    INSERT INTO users VALUES
      (1, 'alice', 'Qv7emailcanary1', 'Zk4ssncanary1', 'Hx2pwcanary1', '{\"nick\": \"al\"}', 10),
      (2, 'bob', 'Qv7emailcanary2', 'Zk4ssncanary2', 'Hx2pwcanary2',
       '{\"nick\": \"bo\", \"ssn\": \"Jt5jsonssn9\"}', 20);
    CREATE TABLE orders (id int, user_id int, note text, amount numeric);
    INSERT INTO orders VALUES (1, 1, 'first order', 9.50), (2, 2, 'second, \"quoted\"', 12.00),
      (3, 2, E'tab\\there', NULL);
    CREATE VIEW v_users AS SELECT id, ssn AS s, name FROM users;
    CREATE VIEW v_deep AS SELECT upper(s) AS u, name FROM v_users;
    CREATE FUNCTION leak(int) RETURNS text LANGUAGE sql AS 'SELECT ssn FROM users WHERE id = $1';
    ANALYZE users;
    GRANT ALL ON users, orders, v_users, v_deep TO app;
    GRANT EXECUTE ON FUNCTION leak(int) TO app;";

/// Relays one connection at a time to `upstream`, recording what flows back to the client.
struct Relay {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect(upstream).await.unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Relay { addr, seen }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

struct Setup {
    pg: Postgres,
    _gw: Gateway,
    relay: Relay,
    _dir: tempfile::TempDir,
}

/// The built-in `default` policy's text with extra `[mask]` keys.
fn default_policy_with(dir: &std::path::Path, mask_extra: &str) -> String {
    let text = include_str!("../src/policy/builtin/default.toml")
        .replace("name = \"default\"", "name = \"default-variant\"")
        .replace("[mask]\n", &format!("[mask]\n{mask_extra}\n"));
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn start(policy: impl FnOnce(&std::path::Path) -> String) -> Setup {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql(SCHEMA).expect("seed schema");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let policy = policy(dir.path());
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw)
            .arg("--policy")
            .arg(policy),
    )
    .expect("start gateway");
    let relay = Relay::start(gw.listen).await;
    Setup {
        pg,
        _gw: gw,
        relay,
        _dir: dir,
    }
}

/// Through the recording relay to the gateway (which injects the real credential).
fn conninfo_via(addr: std::net::SocketAddr) -> String {
    format!(
        "host={} port={} user=agent dbname=app sslmode=disable",
        addr.ip(),
        addr.port()
    )
}

async fn connect_str(conninfo: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn connect_relay(s: &Setup) -> Client {
    connect_str(&conninfo_via(s.relay.addr)).await
}

async fn connect_direct(s: &Setup) -> Client {
    connect_str(&format!(
        "host={} port={} user=app password={} dbname=app sslmode=disable",
        s.pg.host, s.pg.port, s.pg.password
    ))
    .await
}

/// Every form a canary could take in the bytes.
fn leaks(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes).to_lowercase();
    let mut found = Vec::new();
    for c in CANARIES {
        let lower = c.to_lowercase();
        let forms = [
            lower.clone(),
            lower.chars().rev().collect::<String>(),
            hex(c.as_bytes()),
            base64(c.as_bytes()).to_lowercase(),
        ];
        for f in forms {
            if text.contains(&f) {
                found.push(format!("{c} as {f}"));
            }
        }
    }
    found
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | (x as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    s
}

/// The corpus: templates over each masked column, and attempts of their own.
fn corpus() -> Vec<String> {
    let templates = [
        "SELECT {c} FROM users",
        "SELECT {c} AS x FROM users",
        "SELECT u.{c} AS \"Name\" FROM users u",
        "SELECT {c} || '' FROM users",
        "SELECT upper({c}) FROM users",
        "SELECT lower({c}) x FROM users",
        "SELECT substr({c}, 2) FROM users",
        "SELECT replace({c}, 'a', 'b') FROM users",
        "SELECT reverse({c}) FROM users",
        "SELECT {c}::text AS t FROM users",
        "SELECT CAST({c} AS varchar(100)) FROM users",
        "SELECT CASE WHEN id > 0 THEN {c} END FROM users",
        "SELECT coalesce({c}, 'x') FROM users",
        "SELECT concat('a', {c}) FROM users",
        "SELECT format('%s!', {c}) FROM users",
        "SELECT string_agg({c}, ',') FROM users",
        "SELECT array_agg({c}) FROM users",
        "SELECT ARRAY[{c}] FROM users",
        "SELECT (array_agg({c}))[1] FROM users",
        "SELECT max({c}) FROM users",
        "SELECT first_value({c}) OVER (ORDER BY id) FROM users",
        "SELECT lag({c}) OVER () FROM users",
        "SELECT x FROM (SELECT {c} AS x FROM users) s",
        "SELECT * FROM (SELECT {c} FROM users) s(q)",
        "WITH c AS (SELECT {c} AS q FROM users) SELECT q FROM c",
        "WITH RECURSIVE r(n, v) AS (SELECT 1, {c} FROM users UNION ALL SELECT n + 1, v FROM r WHERE n < 2) SELECT v FROM r",
        "SELECT (SELECT {c} FROM users LIMIT 1)",
        "SELECT ARRAY(SELECT {c} FROM users)",
        "SELECT l.v FROM users u CROSS JOIN LATERAL (SELECT u.{c} AS v) l",
        "SELECT name FROM users UNION ALL SELECT {c} FROM users",
        "SELECT {c} FROM users INTERSECT SELECT {c} FROM users",
        "SELECT json_build_object('k', {c}) FROM users",
        "SELECT jsonb_build_object('k', {c}, 'id', id) FROM users",
        "SELECT json_agg({c}) FROM users",
        "SELECT to_json({c}) FROM users",
        "SELECT row_to_json(t) FROM (SELECT id, {c} AS z FROM users) t",
        "SELECT ROW(id, {c}) FROM users",
        "SELECT encode(convert_to({c}, 'UTF8'), 'base64') FROM users",
        "SELECT encode(convert_to({c}, 'UTF8'), 'hex') FROM users",
        "SELECT {c}::int FROM users",
        "SELECT 1 FROM users WHERE {c}::int > 0",
        "SELECT to_number({c}, '999') FROM users",
        "SELECT {c} FROM users u JOIN orders o ON o.user_id = u.id",
        "SELECT query_to_xml('select {c} from users', true, true, '')",
        "SELECT xmlelement(name x, {c}) FROM users",
        "SELECT string_to_array({c}, 'a') FROM users",
        "SELECT regexp_replace({c}, '(.)', '\\1 ', 'g') FROM users",
        "SELECT translate({c}, 'abc', 'xyz') FROM users",
        "SELECT left({c}, 100) || right({c}, 0) FROM users",
        "SELECT unnest(ARRAY[{c}]) FROM users",
        "SELECT * FROM unnest((SELECT array_agg({c}) FROM users))",
        "SELECT jsonb_build_object('a', {c})->>'a' FROM users",
        "SELECT (row_to_json(u))->>'{c}' FROM users u",
        "SELECT {c} COLLATE \"C\" FROM users",
        "SELECT DISTINCT ON (id) {c} FROM users",
        "VALUES ((SELECT {c} FROM users LIMIT 1))",
        "SELECT * FROM (VALUES (1)) v, LATERAL (SELECT {c} FROM users LIMIT 1) l",
        "SELECT pg_notify('c', {c}) FROM users",
        "SELECT {c} FROM public.users",
        "SELECT \"{c}\" FROM \"users\"",
        "SELECT users.{c} FROM users",
        "SELECT 1 / 0, {c} FROM users",
        "SELECT {c}::date FROM users",
        "SELECT {c}::jsonb FROM users",
        "SELECT {c}::uuid FROM users",
        "SELECT length({c}), {c} || id FROM users",
        "SELECT id, {c} FROM users WHERE id = 1 UNION SELECT 3, 'x'",
    ];
    let mut out = Vec::new();
    for t in templates {
        for c in ["ssn", "password_hash", "email"] {
            out.push(t.replace("{c}", c));
        }
    }
    out.extend(
        [
            "SELECT row_to_json(u) FROM users u",
            "SELECT to_jsonb(u) FROM users u",
            "SELECT json_agg(u) FROM users u",
            "SELECT (u.*)::text FROM users u",
            "SELECT u FROM users u",
            "SELECT t.* FROM users t",
            "SELECT * FROM users",
            "SELECT * FROM v_users",
            "SELECT s AS x FROM v_users",
            "SELECT * FROM v_deep",
            "SELECT leak(id) FROM users",
            "SELECT leak(1)",
            "SELECT * FROM users JOIN orders USING (id)",
            "SELECT * FROM users NATURAL JOIN orders",
            "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'users'",
            "SELECT profile FROM users",
            "SELECT profile::text FROM users",
            "SELECT profile->>'ssn' FROM users",
            "SELECT profile->'ssn' FROM users",
            "SELECT profile #>> '{ssn}' FROM users",
            "SELECT jsonb_extract_path_text(profile, 'ssn') FROM users",
            "SELECT jsonb_each_text(profile) FROM users",
            "SELECT * FROM jsonb_each_text((SELECT profile FROM users WHERE id = 2))",
            "SELECT * FROM jsonb_each_text((SELECT to_jsonb(u) FROM users u LIMIT 1))",
            "SELECT table_to_xml('users', true, true, '')",
            "SELECT query_to_xml('select * from users', true, true, '')",
            "SELECT * FROM users u, LATERAL (SELECT u.ssn || u.email AS z) x",
            "SELECT id, name FROM users; SELECT ssn AS innocent FROM users",
            "SELECT 1; SELECT upper(password_hash) FROM users; SELECT 2",
            "WITH d AS (SELECT * FROM users) SELECT d FROM d",
            "SELECT (SELECT json_agg(x) FROM (SELECT ssn FROM users) x)",
            "SELECT array_to_string(array_agg(ssn), '') FROM users",
            "SELECT string_agg(ssn || password_hash || email, '|' ORDER BY id) FROM users",
            "SELECT hstore(u)::text FROM users u",
            "SELECT xmlforest(ssn, email) FROM users",
            "SELECT ssn FROM users WHERE false UNION ALL SELECT ssn FROM users",
            "SELECT name AS ssn_copy FROM users",
            "SELECT EXISTS (SELECT 1 FROM users WHERE ssn = 'x')",
            "SELECT count(*) FROM users WHERE email LIKE '%canary%'",
            "SELEKT ssn FROM users",
            "DECLARE c CURSOR FOR SELECT ssn FROM users",
        ]
        .map(str::to_owned),
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn adversarial_corpus_leaks_nothing_in_text_or_binary() {
    let s = start(|_| "default".to_owned()).await;
    let corpus = corpus();
    assert!(corpus.len() >= 150, "{} attempts", corpus.len());
    let client = connect_relay(&s).await;
    let mut failures = Vec::new();
    for sql in &corpus {
        s.relay.take();
        let text = client.simple_query(sql).await;
        let _ = client
            .simple_query("SELECT 1")
            .await
            .expect("session survives");
        let seen = s.relay.take();
        let l = leaks(&seen);
        if !l.is_empty() {
            failures.push(format!("text: {sql}: {l:?}"));
        }
        drop(text);
        // Binary: extended protocol, every result column in binary format.
        let binary = client.query(sql.as_str(), &[]).await;
        let _ = client
            .simple_query("SELECT 1")
            .await
            .expect("session survives");
        let seen = s.relay.take();
        let l = leaks(&seen);
        if !l.is_empty() {
            failures.push(format!("binary: {sql}: {l:?}"));
        }
        drop(binary);
    }
    assert!(
        failures.is_empty(),
        "{} leaks:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn texts(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn unmasked_columns_come_back_exactly_as_direct() {
    let s = start(|_| "default".to_owned()).await;
    let via = connect_relay(&s).await;
    let direct = connect_direct(&s).await;
    // (query, clean columns)
    let cases: &[(&str, &[usize])] = &[
        (
            "SELECT id, name, score, upper(name), ssn FROM users ORDER BY id",
            &[0, 1, 2, 3],
        ),
        (
            "SELECT u.id, o.note, o.amount, u.password_hash FROM users u JOIN orders o ON o.user_id = u.id ORDER BY o.id",
            &[0, 1, 2],
        ),
        (
            "WITH c AS (SELECT id, name AS n, ssn FROM users) SELECT n, id, ssn FROM c ORDER BY id",
            &[0, 1],
        ),
        (
            "SELECT name FROM users UNION ALL SELECT note FROM orders ORDER BY 1",
            &[0],
        ),
        (
            "SELECT json_build_object('n', name, 'id', id)::text FROM users ORDER BY id",
            &[0],
        ),
        (
            "SELECT id, profile->>'nick' FROM users ORDER BY id",
            &[0, 1],
        ),
        ("SELECT * FROM orders ORDER BY id", &[0, 1, 2, 3]),
        ("SELECT count(*), sum(score) FROM users", &[0, 1]),
        (
            "SELECT name, row_number() OVER (ORDER BY id) FROM users",
            &[0, 1],
        ),
        ("SELECT id, name FROM v_users ORDER BY id", &[0, 1]),
    ];
    for (sql, clean) in cases {
        let g = texts(&via.simple_query(sql).await.unwrap());
        let d = texts(&direct.simple_query(sql).await.unwrap());
        assert_eq!(g.len(), d.len(), "{sql}");
        for (gr, dr) in g.iter().zip(&d) {
            for &i in *clean {
                assert_eq!(gr[i], dr[i], "{sql}: column {i}");
            }
        }
        // Binary too: the raw bytes of clean columns are identical.
        let g = via.query(*sql, &[]).await.unwrap();
        let d = direct.query(*sql, &[]).await.unwrap();
        for (gr, dr) in g.iter().zip(&d) {
            for &i in *clean {
                let gv: Option<Raw> = gr.get(i);
                let dv: Option<Raw> = dr.get(i);
                assert_eq!(gv, dv, "{sql}: binary column {i}");
            }
        }
    }
    // row_to_json keeps the clean keys and hides the masked ones.
    let g = texts(
        &via.simple_query("SELECT row_to_json(u) FROM users u ORDER BY id")
            .await
            .unwrap(),
    );
    let doc: serde_json::Value = serde_json::from_str(g[0][0].as_deref().unwrap()).unwrap();
    assert_eq!(doc["name"], "alice");
    assert_eq!(doc["score"], 10);
    assert_ne!(doc["ssn"], "Zk4ssncanary1");
}

/// Any column's raw bytes, for byte-for-byte comparison.
#[derive(Debug, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Deterministic xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_expr(rng: &mut Rng, depth: u32) -> String {
    if depth == 0 || rng.below(3) == 0 {
        return rng
            .pick(&[
                "u.ssn",
                "u.password_hash",
                "u.email",
                "u.name",
                "o.note",
                "u.id::text",
            ])
            .to_owned();
    }
    let e = random_expr(rng, depth - 1);
    match rng.below(10) {
        0 => format!("upper({e})"),
        1 => format!("({e} || '-')"),
        2 => format!("substr({e}, 1)"),
        3 => format!("coalesce({e}, 'x')"),
        4 => format!("CASE WHEN u.id > 0 THEN {e} ELSE 'y' END"),
        5 => format!("({e})::text"),
        6 => format!("concat({e}, {})", random_expr(rng, depth - 1)),
        7 => format!("reverse(reverse({e}))"),
        8 => format!("lower({e})"),
        _ => format!("trim({e})"),
    }
}

fn random_query(rng: &mut Rng) -> String {
    let n = 1 + rng.below(3);
    let cols: Vec<String> = (0..n)
        .map(|i| format!("{} AS a{i}", random_expr(rng, 3)))
        .collect();
    let base = format!(
        "SELECT {} FROM users u JOIN orders o ON o.user_id = u.id",
        cols.join(", ")
    );
    match rng.below(7) {
        0 => base,
        1 => format!("SELECT * FROM ({base}) s"),
        2 => format!("WITH w AS ({base}) SELECT * FROM w"),
        3 => format!("{base} UNION ALL {base}"),
        4 => format!("SELECT row_to_json(s)::text FROM ({base}) s"),
        5 => format!("SELECT json_agg(s) FROM ({base}) s"),
        _ => format!("SELECT (SELECT a0 FROM ({base}) s LIMIT 1)"),
    }
}

async fn leaking_queries(s: &Setup, seed: u64, n: usize) -> Vec<String> {
    let client = connect_relay(s).await;
    let mut rng = Rng(seed);
    let mut leaked = Vec::new();
    for _ in 0..n {
        let sql = random_query(&mut rng);
        s.relay.take();
        let _ = client.simple_query(&sql).await;
        let _ = client.query(sql.as_str(), &[]).await;
        client
            .simple_query("SELECT 1")
            .await
            .expect("session survives");
        if !leaks(&s.relay.take()).is_empty() {
            leaked.push(sql);
        }
    }
    leaked
}

#[tokio::test(flavor = "multi_thread")]
async fn randomized_differential_finds_leaks_only_without_lineage() {
    let on = start(|_| "default".to_owned()).await;
    let leaked = leaking_queries(&on, 0x5eed_1234_abcd_0001, 80).await;
    assert!(
        leaked.is_empty(),
        "with lineage, leaks:\n{}",
        leaked.join("\n")
    );
    let off = start(|dir| default_policy_with(dir, "danger_disable_lineage = true")).await;
    let leaked = leaking_queries(&off, 0x5eed_1234_abcd_0001, 80).await;
    assert!(
        !leaked.is_empty(),
        "the same queries without lineage must leak, or the test proves nothing"
    );
}

async fn copy_bytes(client: &Client, sql: &str) -> Result<Vec<u8>, tokio_postgres::Error> {
    use futures_util::StreamExt;
    let stream = client.copy_out(sql).await?;
    let chunks: Vec<_> = stream.collect().await;
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

async fn copy_checks(s: &Setup) {
    let via = connect_relay(s).await;
    let direct = connect_direct(s).await;
    for sql in [
        "COPY orders TO STDOUT",
        "COPY orders TO STDOUT (FORMAT csv)",
        "COPY orders TO STDOUT (FORMAT csv, HEADER, DELIMITER ';')",
        "COPY orders TO STDOUT (FORMAT binary)",
        "COPY orders (note, id) TO STDOUT",
        "COPY (SELECT * FROM orders ORDER BY id) TO STDOUT",
        "COPY (SELECT id, note FROM orders) TO STDOUT (FORMAT csv)",
        "COPY (SELECT id, note, amount FROM orders) TO STDOUT (FORMAT binary)",
        "COPY (SELECT id, name FROM users ORDER BY id) TO STDOUT",
    ] {
        let g = copy_bytes(&via, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let d = copy_bytes(&direct, sql).await.unwrap();
        assert_eq!(g, d, "{sql}: byte for byte");
    }
    for sql in [
        "COPY users TO STDOUT",
        "COPY users TO STDOUT (FORMAT csv)",
        "COPY users TO STDOUT (FORMAT binary)",
        "COPY users (ssn, id) TO STDOUT",
        "COPY (SELECT upper(ssn), email AS e FROM users) TO STDOUT",
        "COPY (SELECT row_to_json(u) FROM users u) TO STDOUT",
        "COPY (SELECT * FROM v_deep) TO STDOUT (FORMAT csv)",
        "COPY (SELECT id, password_hash AS x FROM users) TO STDOUT (FORMAT binary)",
    ] {
        s.relay.take();
        let g = copy_bytes(&via, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(
            leaks(&g).is_empty() && leaks(&s.relay.take()).is_empty(),
            "{sql}"
        );
        if sql == "COPY users TO STDOUT" {
            let text = String::from_utf8(g).unwrap();
            assert!(text.starts_with("1\talice\t"), "clean columns stay: {text}");
        }
    }
    via.simple_query("SELECT 1")
        .await
        .expect("session survives COPY");
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_to_stdout_under_default_policy() {
    let s = start(|_| "default".to_owned()).await;
    copy_checks(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_to_stdout_under_observe_policy() {
    let s = start(|_| "observe".to_owned()).await;
    copy_checks(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_notices_and_notifications_are_masked() {
    let s = start(|_| "default".to_owned()).await;
    let client = connect_relay(&s).await;
    s.relay.take();
    let err = client
        .simple_query("SELECT ssn::int FROM users")
        .await
        .expect_err("not an integer");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "22P02", "SQLSTATE intact");
    assert!(db.message().contains("\"****\""), "{}", db.message());
    assert!(leaks(&s.relay.take()).is_empty());
    // A notice raised with a detector's kind of value.
    let _ = client
        .simple_query("DO $$ BEGIN RAISE NOTICE 'mail alice.smith@example.com'; END $$")
        .await;
    let seen = String::from_utf8_lossy(&s.relay.take()).into_owned();
    assert!(!seen.contains("alice.smith@example.com"), "{seen}");

    // pg_notify of a masked value is refused at the gate, naming the rule.
    let err = client
        .simple_query("SELECT pg_notify('c', ssn) FROM users")
        .await
        .expect_err("refused");
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("mask.columns["), "{}", db.message());

    // A listener through the gateway gets payloads through the detectors.
    let listener = connect_relay(&s).await;
    listener.simple_query("LISTEN c").await.unwrap();
    s.relay.take();
    let direct = connect_direct(&s).await;
    direct
        .simple_query("NOTIFY c, 'card 4111 1111 1111 1111 and {\"ssn\": \"Jt5jsonssn9\"}'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    listener.simple_query("SELECT 1").await.unwrap();
    let seen = s.relay.take();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("card "), "the notification arrived: {text}");
    assert!(!text.contains("4111 1111 1111 1111"), "{text}");

    // json keys named like a masked column are masked inside documents.
    let got = texts(
        &client
            .simple_query("SELECT profile FROM users WHERE id = 2")
            .await
            .unwrap(),
    );
    let doc: serde_json::Value = serde_json::from_str(got[0][0].as_deref().unwrap()).unwrap();
    assert_eq!(doc["nick"], "bo");
    assert_ne!(doc["ssn"], "Jt5jsonssn9");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_refusals_in_and_out_of_transactions() {
    let s = start(|dir| default_policy_with(dir, "unknown_lineage = \"block\"")).await;
    let client = connect_relay(&s).await;
    for (refused, rule) in [
        // Refused by the policy's own rules before masking looks at it; a refusal all the same.
        (
            "SELECT query_to_xml('select ssn from users', true, true, '')",
            "",
        ),
        (
            "SELECT most_common_vals::text FROM pg_stats",
            "mask.unknown_lineage",
        ),
        ("SELECT leak(1) FROM users", ""),
        (
            "SELECT pg_notify('c', password_hash) FROM users",
            "mask.columns[",
        ),
    ] {
        let err = client.simple_query(refused).await.expect_err(refused);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{refused}: {err}"));
        assert_eq!(db.code().code(), "42501", "{refused}");
        assert!(db.message().contains(rule), "{refused}: {}", db.message());
        client
            .simple_query("SELECT 1")
            .await
            .expect("usable after a refusal");
        let err = client.query(refused, &[]).await.expect_err(refused);
        assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
        client
            .query("SELECT 1", &[])
            .await
            .expect("usable after an extended refusal");
    }
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert!(client.simple_query("SELECT leak(2)").await.is_err());
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("aborted transaction");
    assert_eq!(err.as_db_error().unwrap().code().code(), "25P02");
    client.simple_query("ROLLBACK").await.unwrap();
    let got = texts(&client.simple_query("SELECT 41 + 1").await.unwrap());
    assert_eq!(got[0][0].as_deref(), Some("42"));
    // COPY and a clean query still work after all that.
    let out = copy_bytes(&client, "COPY orders TO STDOUT").await.unwrap();
    assert_eq!(
        out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(),
        3
    );
}

/// The default policy with DDL allowed and a short catalog TTL.
fn ddl_policy(dir: &std::path::Path) -> String {
    let path = default_policy_with(dir, "catalog_ttl = \"2s\"");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "kinds = [\"ddl\"]\naction = \"block\"",
        "kinds = [\"ddl\"]\naction = \"allow\"",
    );
    assert!(text.contains("kinds = [\"ddl\"]\naction = \"allow\""));
    std::fs::write(&path, text).unwrap();
    path
}

/// `SELECT name, x FROM <view> ORDER BY id`, by simple query (text) and prepared (binary).
async fn view_rows(client: &Client, view: &str) -> Vec<(String, String)> {
    let sql = format!("SELECT name, x FROM {view} ORDER BY id");
    let simple = texts(&client.simple_query(&sql).await.expect(&sql));
    let prepared = client.query(&sql, &[]).await.expect(&sql);
    let rows: Vec<(String, String)> = simple
        .iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let binary: Vec<(String, String)> = prepared.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, binary, "text and binary agree");
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn live_sessions_read_the_catalog_again_after_ddl_and_after_its_ttl() {
    let s = start(ddl_policy).await;
    let a = connect_relay(&s).await;
    let b = connect_relay(&s).await;
    a.simple_query("SELECT name FROM users").await.unwrap();
    b.simple_query("SELECT name FROM users").await.unwrap();

    // DDL through the gateway: this session and the other one see the new view at once. With
    // the catalog read at connect, `name` would be of unknown lineage and redacted.
    a.simple_query("CREATE VIEW v_new AS SELECT id, name, ssn AS x FROM users")
        .await
        .unwrap();
    for (who, client) in [("the session that ran the DDL", &a), ("another", &b)] {
        let rows = view_rows(client, "v_new").await;
        assert_eq!(
            rows[0].0, "alice",
            "{who}: an unmasked column of the new view"
        );
        assert_ne!(
            rows[0].1, "Zk4ssncanary1",
            "{who}: the renamed ssn stays masked"
        );
    }

    // DDL outside the gateway: until the TTL the view is unknown and fails closed; after it,
    // the session reads the catalog again at its next statement.
    s.pg.app_superuser_sql(
        "CREATE VIEW v_out AS SELECT id, name, password_hash AS x FROM users;
         GRANT SELECT ON v_out TO app;",
    )
    .unwrap();
    let before = view_rows(&a, "v_out").await;
    assert_ne!(before[0].0, "alice", "unknown to the session yet: redacted");
    assert_ne!(before[0].1, "Hx2pwcanary1");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for client in [&a, &b] {
        let rows = view_rows(client, "v_out").await;
        assert_eq!(rows[0].0, "alice", "known after the TTL");
        assert_ne!(
            rows[0].1, "Hx2pwcanary1",
            "password_hash under another name"
        );
    }
    let leaked = leaks(&s.relay.take());
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
}
