//! Masking through the real gateway and a real PostgreSQL: text and binary results, prepared
//! statements, json/jsonb values and COPY TO STDOUT, with the built-in `default` policy.

use std::time::Duration;

use testkit::{Gateway, GatewayOptions, Postgres};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const EMAIL: &str = "alice.smith@example.com";
/// A Luhn-valid test card number, and a 16-digit number that is not one.
const CARD: &str = "4111 1111 1111 1111";
const NOT_A_CARD: &str = "4111111111111112";
const SSN: &str = "123-45-6789";

struct Setup {
    pg: Postgres,
    gw: Gateway,
    _dir: tempfile::TempDir,
}

fn start(policy: &str) -> Setup {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql(&format!(
        "CREATE TABLE people (id int, contact text, note text, ref text, doc jsonb, secret_token text);
         INSERT INTO people VALUES
           (1, '{EMAIL}', 'card {CARD} on file', '{NOT_A_CARD}', '{{\"user\": {{\"mail\": \"{EMAIL}\", \"n\": 7}}}}', 'tok-123'),
           (2, 'nobody', 'ssn {SSN}', 'order 42', '{{\"clean\": true}}', NULL);
         GRANT ALL ON people TO app;"
    ))
    .expect("seed table");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw)
            .arg("--policy")
            .arg(policy),
    )
    .expect("start gateway");
    Setup { pg, gw, _dir: dir }
}

async fn connect(gw: &Gateway) -> Client {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    tokio::spawn(conn);
    client
}

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
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

fn assert_no_pii(text: &str, ctx: &str) {
    for secret in [EMAIL, CARD, SSN, "tok-123"] {
        assert!(
            !text.contains(secret),
            "{ctx}: {secret:?} reached the client: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn text_results_are_masked_and_clean_values_pass() {
    let s = start("default");
    let client = connect(&s.gw).await;
    let got = rows(
        &client
            .simple_query(
                "SELECT id, contact, note, ref, doc::text, secret_token FROM people ORDER BY id",
            )
            .await
            .unwrap(),
    );
    let flat = format!("{got:?}");
    assert_no_pii(&flat, "simple query");
    // A Luhn-invalid 16-digit number is not a card: it passes untouched, as does clean text.
    assert_eq!(got[0][3].as_deref(), Some(NOT_A_CARD));
    assert_eq!(got[1][1].as_deref(), Some("nobody"));
    assert_eq!(got[1][3].as_deref(), Some("order 42"));
    // The detector replaced only the card inside the note; the rest of the text stays.
    let note = got[0][2].as_deref().unwrap();
    assert!(
        note.starts_with("card ") && note.ends_with(" on file"),
        "{note}"
    );
    // json: the email inside the document is masked, the document still parses.
    let doc: serde_json::Value =
        serde_json::from_str(got[0][4].as_deref().unwrap()).expect("masked json is json");
    assert_eq!(doc["user"]["n"], 7);
    assert_ne!(doc["user"]["mail"], EMAIL);
    // The same rows read directly are intact (the gateway masks; the data is untouched).
    let direct =
        s.pg.app_superuser_sql("SELECT contact FROM people WHERE id = 1")
            .unwrap();
    assert_eq!(direct.trim(), EMAIL);
}

/// An agent cannot slide PII past the scan's 64-byte blocks. Values built in SQL (no column or
/// table rule applies to them) put an SSN, a card and an email at every offset across the first
/// two block edges, in text long enough for full blocks (classified 32 bytes at a time where the
/// CPU has AVX2): after letters, and after short numbers and clock times, which the scan clears
/// in bulk.
#[tokio::test(flavor = "multi_thread")]
async fn pii_at_every_offset_across_the_scans_blocks_is_masked() {
    let s = start("default");
    let client = connect(&s.gw).await;
    let sql = format!(
        "SELECT n, repeat('x', n) || ' {SSN} {CARD} {EMAIL}' || repeat(' tail', 20),
                repeat('v 1.5 ', n / 6) || repeat('y', n % 6) || ' {SSN}, {CARD}; {EMAIL} '
                    || repeat('10:30 ', 12)
         FROM generate_series(0, 140) n"
    );
    let got = rows(&client.simple_query(&sql).await.unwrap());
    assert_eq!(got.len(), 141);
    for row in &got {
        let offset = row[0].as_deref().unwrap();
        assert_no_pii(&format!("{row:?}"), &format!("PII after {offset} bytes"));
        // Only the PII is rewritten: the padding on both sides comes back as it went.
        let n: usize = offset.parse().unwrap();
        let letters = row[1].as_deref().unwrap();
        assert!(
            letters.starts_with(&"x".repeat(n)) && letters.ends_with(" tail"),
            "{letters}"
        );
        let numbers = row[2].as_deref().unwrap();
        assert!(
            numbers.starts_with(&"v 1.5 ".repeat(n / 6)) && numbers.ends_with("10:30 "),
            "{numbers}"
        );
    }
}

/// Values that are one lower-case word (hex digests, ids) skip the scan, so an agent shapes PII
/// to look like one: a card of 17 to 19 digits is itself such a word, and PII joined to a digest
/// by a space or an `@` is not one. Short and past a 64-byte block. The digests themselves come
/// back as they went.
#[tokio::test(flavor = "multi_thread")]
async fn pii_shaped_like_a_lowercase_digest_is_still_masked() {
    let s = start("default");
    let client = connect(&s.gw).await;
    const LONG_CARD: &str = "4111111111111111656";
    let sql = format!(
        "SELECT md5(n::text), md5(n::text) || md5((-n)::text),
                '{LONG_CARD}', md5(n::text) || ' {CARD}',
                md5(n::text) || md5((-n)::text) || ' {CARD}', left(md5(n::text), 8) || '{EMAIL}'
         FROM generate_series(1, 50) n"
    );
    let got = rows(&client.simple_query(&sql).await.unwrap());
    assert_eq!(got.len(), 50);
    let direct = s
        .pg
        .app_superuser_sql("SELECT md5(n::text) || md5((-n)::text) FROM generate_series(1, 50) n")
        .unwrap();
    let digests: Vec<&str> = direct.lines().map(str::trim).collect();
    for (row, digest) in got.iter().zip(&digests) {
        let flat = format!("{row:?}");
        assert_no_pii(&flat, "digest-shaped values");
        assert!(
            !flat.contains(LONG_CARD),
            "a 19-digit card reached the client: {flat}"
        );
        // Clean digests pass untouched, 32 and 64 characters.
        assert_eq!(row[1].as_deref(), Some(*digest));
        assert_eq!(row[0].as_deref(), Some(&digest[..32]));
        // Only the card is rewritten after the digest.
        let joined = row[3].as_deref().unwrap();
        assert!(
            joined.starts_with(&format!("{} ", &digest[..32])),
            "{joined}"
        );
    }
}

/// Values masked in the `partial` style keep their length, so the gateway writes their rows back
/// over the ones they replace in its read buffer rather than gathering a copy of the result. Many
/// such rows between clean ones, in results that take several reads, in text (simple query) and
/// binary (prepared) format, come back masked, in order, and with every other value as it went.
#[tokio::test(flavor = "multi_thread")]
async fn partial_masked_rows_between_clean_ones_come_back_in_order() {
    let s = start("default");
    let client = connect(&s.gw).await;
    let sql = "SELECT g, CASE WHEN g % 3 = 0 THEN 'user' || g || '@example.com' END AS email, \
               repeat('n', g % 50) || ' row ' || g AS note FROM generate_series(1, 3000) g";
    let simple = rows(&client.simple_query(sql).await.unwrap());
    let prepared: Vec<Vec<Option<String>>> = client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| vec![Some(r.get::<_, i32>(0).to_string()), r.get(1), r.get(2)])
        .collect();
    for (format, got) in [("text", simple), ("binary", prepared)] {
        assert_eq!(got.len(), 3000, "{format}");
        for (i, row) in got.iter().enumerate() {
            let g = i + 1;
            assert_eq!(row[0], Some(g.to_string()), "{format}");
            let note = format!("{} row {g}", "n".repeat(g % 50));
            assert_eq!(row[2], Some(note), "{format}");
            match &row[1] {
                None => assert!(g % 3 != 0, "{format}: row {g} lost its email"),
                Some(email) => {
                    assert_eq!(g % 3, 0, "{format}: row {g} gained an email: {email}");
                    let original = format!("user{g}@example.com");
                    assert_eq!(email.len(), original.len(), "{format}: {email}");
                    assert!(
                        email.starts_with("****") && email.ends_with("e.com"),
                        "{email}"
                    );
                    assert!(!email.contains(&format!("user{g}")), "{format}: {email}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_results_of_prepared_statements_are_masked() {
    let s = start("default");
    let client = connect(&s.gw).await;
    // tokio-postgres prepares once and executes without a Describe, in binary format.
    let stmt = client
        .prepare("SELECT contact, note, doc, secret_token FROM people WHERE id = $1")
        .await
        .unwrap();
    for _ in 0..3 {
        let row = client.query_one(&stmt, &[&1i32]).await.unwrap();
        let contact: String = row.get(0);
        let note: String = row.get(1);
        let doc: serde_json::Value = row.get(2);
        let token: Option<String> = row.get(3);
        assert_no_pii(&format!("{contact} {note} {doc} {token:?}"), "binary");
        assert!(
            contact.ends_with(".com") || contact.contains('*'),
            "partial style keeps a tail: {contact}"
        );
        assert_eq!(doc["user"]["n"], 7);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_to_stdout_rows_are_masked() {
    let s = start("default");
    let client = connect(&s.gw).await;
    let stream = client
        .copy_out("COPY (SELECT id, contact, note FROM people ORDER BY id) TO STDOUT")
        .await
        .expect("COPY through the gateway");
    use futures_util::StreamExt;
    let chunks: Vec<_> = stream.collect().await;
    let mut text = String::new();
    for c in chunks {
        text.push_str(std::str::from_utf8(&c.expect("copy data")).unwrap());
    }
    assert_no_pii(&text, "COPY");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("nobody"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_mode_still_masks() {
    let s = start("observe");
    let client = connect(&s.gw).await;
    let got = client
        .simple_query("SELECT contact, note FROM people WHERE id = 1")
        .await
        .unwrap();
    assert_no_pii(&format!("{:?}", rows(&got)), "observe");
    // And nothing is blocked: a write goes through in shadow mode.
    tokio::time::timeout(
        Duration::from_secs(10),
        client.simple_query("UPDATE people SET ref = 'x' WHERE id = 2"),
    )
    .await
    .expect("observe mode holds nothing")
    .expect("observe mode blocks nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn table_column_rules_follow_the_catalog_through_aliases() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.app_superuser_sql(
        "CREATE TABLE staff (id int, badge text); INSERT INTO staff VALUES (1, 'B-7781-QX');
         CREATE TABLE visitors (id int, badge text); INSERT INTO visitors VALUES (1, 'V-0001-AA');
         GRANT SELECT ON staff, visitors TO app;",
    )
    .expect("seed tables");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "name = \"badges\"\nmode = \"enforce\"\nunparsable = \"allow\"\ndefault_action = \"allow\"\nfunction_call = \"allow\"\n\n\
         [mask]\ndetectors = []\n\n[[mask.columns]]\ntable = \"public.staff\"\ncolumn = \"badge\"\nstyle = \"redact\"\n",
    )
    .unwrap();
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw)
            .arg("--policy")
            .arg(policy.to_str().unwrap()),
    )
    .expect("start gateway");
    let client = connect(&gw).await;
    // An alias does not hide where the column comes from: the catalog says staff.badge.
    let got = rows(
        &client
            .simple_query("SELECT badge AS b FROM staff")
            .await
            .unwrap(),
    );
    assert_eq!(got[0][0].as_deref(), Some("****"), "{got:?}");
    // The same column name in another table is not the rule's.
    let got = rows(
        &client
            .simple_query("SELECT badge FROM visitors")
            .await
            .unwrap(),
    );
    assert_eq!(got[0][0].as_deref(), Some("V-0001-AA"), "{got:?}");
}
