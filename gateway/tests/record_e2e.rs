//! Recording through the real gateway: a session with real clients (tokio-postgres, psql) against
//! a real PostgreSQL, the shipped `default` policy and its masking on; then the recordings CLI
//! reproduces what the clients saw, `verify` passes, and no secret reached the recording
//! directory. Also: a full disk refuses statements with 53100 and service resumes when space
//! returns, and a SIGKILLed gateway's log still verifies after a restart.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use portcullis::record::{Action, Entry, Record, RequestKind};
use testkit::{Gateway, GatewayOptions, Postgres};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

#[path = "support/stored.rs"]
mod stored;
use stored::{contains, everything_stored};

const EMAIL: &str = "alice.smith@example.com";
const TOKEN: &str = "tok-canary-7f3a9c";
/// A bearer token's value, which no recording may hold.
const BEARER_TOKEN: &str = "qz81Vv0TnKp3wXy7";

fn seed(pg: &Postgres) {
    pg.app_superuser_sql(&format!(
        "CREATE TABLE people (id int, contact text, secret_token text, note text);
         INSERT INTO people VALUES (1, '{EMAIL}', '{TOKEN}', 'first'), (2, 'nobody', NULL, 'second');
         GRANT ALL ON people TO app;"
    ))
    .expect("seed table");
}

async fn connect(gw: &Gateway) -> Client {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    tokio::spawn(conn);
    client
}

fn recordings(dir: &Path, args: &[&str]) -> Output {
    Command::new(testkit::portcullis_bin())
        .arg("recordings")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run portcullis recordings")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every entry of the recording directory, through `export --format jsonl`.
fn export(dir: &Path) -> Vec<Entry> {
    let out = recordings(dir, &["export", "--format", "jsonl"]);
    assert!(out.status.success(), "export: {}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until the session's end is on disk (the recorder group-commits on an interval).
fn wait_for_end(dir: &Path) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if dir.exists() {
            let entries = export(dir);
            if entries
                .iter()
                .any(|e| matches!(e.record, Record::SessionEnd { .. }))
            {
                return entries;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the session's end was never recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify(state: &Path) -> (i32, String) {
    let pubkey = state.join("keys/recording.key.pub");
    let out = recordings(
        &state.join("recordings"),
        &["verify", "--pubkey", pubkey.to_str().unwrap()],
    );
    (out.status.code().unwrap_or(-1), text(&out))
}

/// The statements' records, in order: (statement number, record).
fn of_statement(entries: &[Entry], stmt: u32) -> Vec<&Record> {
    entries
        .iter()
        .filter(|e| e.stmt == stmt)
        .map(|e| &e.record)
        .collect()
}

fn rows_of(records: &[&Record]) -> Vec<Vec<Option<Vec<u8>>>> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Rows(rows) => Some(rows),
            _ => None,
        })
        .flatten()
        .map(|row| {
            row.iter()
                .map(|v| v.as_ref().map(|b| b.0.clone()))
                .collect()
        })
        .collect()
}

/// The statement whose request text is `text`.
fn stmt_of(entries: &[Entry], kind: RequestKind, text: &str) -> u32 {
    entries
        .iter()
        .find_map(|e| match &e.record {
            Record::Request(r) if r.kind == kind && r.text == text => Some(e.stmt),
            _ => None,
        })
        .unwrap_or_else(|| {
            let recorded: Vec<&str> = entries
                .iter()
                .filter_map(|e| match &e.record {
                    Record::Request(r) => Some(r.text.as_str()),
                    _ => None,
                })
                .collect();
            panic!("no {kind:?} request {text:?} recorded; recorded: {recorded:#?}")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_round_trips_through_show_and_export_masked_and_verifies() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let pw_file = pg.write_password_file(dir.path()).unwrap();
    let password = std::fs::read_to_string(&pw_file).unwrap();
    let password = password.trim();
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw_file.clone())
            .arg("--policy")
            .arg("default"),
    )
    .expect("start gateway");
    let state = gw.state_dir.clone();
    let rec_dir = state.join("recordings");

    let client = connect(&gw).await;
    // Simple query, with a masked column and a literal the detectors find.
    let simple = format!(
        "SELECT id, contact, secret_token, note FROM people WHERE contact <> '{EMAIL}' OR id = 1 ORDER BY id"
    );
    let got = client.simple_query(&simple).await.expect("simple query");
    let simple_rows: Vec<Vec<Option<Vec<u8>>>> = got
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).map(|v| v.as_bytes().to_vec()))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(simple_rows.len(), 2);
    let seen = format!("{simple_rows:?}");
    assert!(!seen.contains(TOKEN), "the client saw the token: {seen}");

    // Extended query, with parameters (one of them a value the detectors find).
    let extended = "SELECT contact, note FROM people WHERE id = $1 OR contact = $2";
    let ext = client
        .query(extended, &[&2i32, &EMAIL])
        .await
        .expect("extended query");
    let ext_rows: Vec<Vec<Option<Vec<u8>>>> = ext
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get::<_, Option<&str>>(i).map(|v| v.as_bytes().to_vec()))
                .collect()
        })
        .collect();
    assert_eq!(ext_rows.len(), 2);

    // COPY out.
    let copy_sql = "COPY (SELECT id, contact, note FROM people ORDER BY id) TO STDOUT";
    let stream = client.copy_out(copy_sql).await.expect("COPY out");
    let chunks: Vec<_> = stream.collect().await;
    let mut copied = Vec::new();
    for c in chunks {
        copied.extend_from_slice(&c.expect("copy data"));
    }
    assert!(!contains(&copied, EMAIL.as_bytes()), "COPY was masked");

    // Bearer tokens in short statements, where the detectors rule a text out on its vectors
    // before the anchor search: in any case (the scheme's name is case-insensitive), in a
    // literal and as a parameter.
    for prefix in ["Bearer", "bearer", "BEARER", "BeaReR"] {
        let got = client
            .simple_query(&format!("SELECT '{prefix} {BEARER_TOKEN}'"))
            .await
            .expect("a bearer literal");
        assert!(
            !format!("{got:?}").contains(BEARER_TOKEN),
            "the client saw it"
        );
        let param = format!("{prefix} {BEARER_TOKEN}");
        client
            .query("SELECT $1::text", &[&param])
            .await
            .expect("a bearer parameter");
    }

    // An error, and a blocked statement.
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    let blocked = client.simple_query("DROP TABLE people").await.unwrap_err();
    assert_eq!(blocked.code().unwrap().code(), "42501", "{blocked:?}");
    drop(client);

    // psql, in a session of its own.
    let (out, errs, ok) = testkit::psql(
        pg.bindir(),
        &gw.conninfo("app"),
        "SELECT note FROM people WHERE id = 2",
    )
    .unwrap();
    assert!(ok, "psql: {errs}");
    assert!(out.contains("second"), "{out}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let entries = loop {
        let entries = wait_for_end(&rec_dir);
        let ends = entries
            .iter()
            .filter(|e| matches!(e.record, Record::SessionEnd { .. }))
            .count();
        if ends >= 2 {
            break entries;
        }
        assert!(Instant::now() < deadline, "both sessions' ends recorded");
        std::thread::sleep(Duration::from_millis(100));
    };
    let session = entries[0].session;
    let Record::SessionStart(start) = &entries[0].record else {
        panic!("a recording starts with its session: {:?}", entries[0]);
    };
    assert_eq!(start.target, "default", "the quick-start target");
    assert_eq!(start.upstream_user, "app");
    assert!(start.client_addr.is_some());
    let ours: Vec<Entry> = entries
        .iter()
        .filter(|e| e.session == session)
        .cloned()
        .collect();
    let bearer_statements = ours
        .iter()
        .filter(|e| matches!(&e.record, Record::Request(r) if r.text.starts_with("SELECT '")))
        .count();
    assert_eq!(bearer_statements, 4, "each bearer literal was recorded");
    assert!(
        !format!("{entries:?}").contains(BEARER_TOKEN),
        "a bearer token reached the recording"
    );

    // The simple query: its text with the literal redacted, allowed by a rule, its columns, the
    // rows byte for byte as the client got them, and the command tag.
    let redacted = simple.replace(EMAIL, "****");
    let mut texts = ours.iter().filter_map(|e| match &e.record {
        Record::Request(r) => Some(r.text.clone()),
        _ => None,
    });
    assert!(
        texts.any(|t| t.contains("SELECT id, contact") && !t.contains(EMAIL)),
        "the literal was redacted"
    );
    let s = stmt_of(&ours, RequestKind::Query, &redacted);
    let recs = of_statement(&ours, s);
    let verdict = recs.iter().find_map(|r| match r {
        Record::Verdict(v) => Some(v),
        _ => None,
    });
    let verdict = verdict.expect("a verdict");
    assert_eq!(verdict.action, Action::Allow);
    assert!(verdict.rule.is_some(), "{verdict:?}");
    let columns = recs
        .iter()
        .find_map(|r| match r {
            Record::Columns(c) => Some(c),
            _ => None,
        })
        .expect("columns");
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "contact", "secret_token", "note"]);
    assert_eq!(
        rows_of(&recs),
        simple_rows,
        "recorded rows are what the client saw"
    );
    let complete = recs.iter().find_map(|r| match r {
        Record::Complete(c) => Some(c),
        _ => None,
    });
    let complete = complete.expect("a complete");
    assert_eq!(complete.tag, "SELECT 2");
    assert_eq!(complete.rows, 2);
    assert!(complete.bytes_out > 0);

    // The extended query: prepared, then executed with its parameters (the email redacted).
    stmt_of(&ours, RequestKind::Prepare, extended);
    let x = stmt_of(&ours, RequestKind::Execute, extended);
    let recs = of_statement(&ours, x);
    let Record::Request(req) = recs[0] else {
        panic!("{:?}", recs[0]);
    };
    assert_eq!(req.params.len(), 2);
    assert_eq!(
        req.params[0].as_ref().map(|b| b.0.clone()),
        Some(2i32.to_be_bytes().to_vec())
    );
    assert_eq!(
        req.params[1].as_ref().map(|b| b.0.clone()),
        Some(b"****".to_vec())
    );
    assert_eq!(rows_of(&recs), ext_rows, "binary rows byte for byte");

    // COPY: the data as the client got it.
    let c = stmt_of(&ours, RequestKind::Execute, copy_sql);
    let recorded_copy: Vec<u8> = of_statement(&ours, c)
        .iter()
        .filter_map(|r| match r {
            Record::CopyData(b) => Some(b.0.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(recorded_copy, copied);

    // The error, and the blocked statement with its rule.
    let e = stmt_of(&ours, RequestKind::Query, "SELECT 1/0");
    assert!(of_statement(&ours, e).iter().any(
        |r| matches!(r, Record::Error(n) if n.code == "22012" && n.message.contains("division"))
    ));
    let b = stmt_of(&ours, RequestKind::Query, "DROP TABLE people");
    let recs = of_statement(&ours, b);
    assert!(
        recs.iter().any(|r| matches!(r, Record::Verdict(v)
            if v.action == Action::Block && v.rule.as_deref().is_some_and(|r| !r.is_empty()))),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| matches!(r, Record::Error(n) if n.code == "42501"))
    );
    assert!(
        ours.iter().any(
            |e| matches!(&e.record, Record::SessionEnd { reason } if reason.contains("client"))
        )
    );

    // `show` reads like the session: statements, the masked values, the block.
    let out = recordings(&rec_dir, &["show", &session.to_string()]);
    assert!(out.status.success(), "show: {}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("DROP TABLE people"), "{shown}");
    assert!(shown.contains("nobody"), "{shown}");
    assert!(shown.contains("22012"), "{shown}");
    assert!(!shown.contains(TOKEN) && !shown.contains(EMAIL), "{shown}");
    let list = text(&recordings(&rec_dir, &["list", "--json"]));
    assert!(list.contains("default"), "{list}");
    // The full-text search finds the statement by its words, and not by the literal the
    // detectors took out of it: the full text holds only what the recording does.
    let ids = |args: &[&str]| -> Vec<u64> {
        let out = recordings(&rec_dir, &[&["list", "--json"][..], args].concat());
        assert!(out.status.success(), "list: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = v.as_array().unwrap().iter();
        rows.map(|r| r["id"].as_u64().unwrap()).collect()
    };
    assert_eq!(ids(&["--grep", "SELECT id, contact"]), vec![session]);
    assert_eq!(ids(&["--grep", EMAIL]), Vec::<u64>::new());
    assert!(
        rec_dir.join(portcullis::record::texts::TEXTS_FILE).exists(),
        "the full text is built, so the scan below reads it"
    );

    let (code, out) = verify(&state);
    assert_eq!(code, 0, "verify: {out}");

    // Nothing secret anywhere in the recording directory, compressed or not.
    assert!(password.len() >= 8);
    for blob in everything_stored(&rec_dir) {
        for secret in [password, TOKEN, EMAIL] {
            assert!(
                !contains(&blob, secret.as_bytes()),
                "{secret:?} reached the recording directory"
            );
        }
    }
}

/// A small tmpfs the test mounts, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "mount a tmpfs at {}", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn root_or_skip(test: &str) -> bool {
    if testkit::is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run {test} as root"
    );
    eprintln!("SKIPPED {test}: needs root to mount a tmpfs");
    false
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_statements_with_53100_then_service_resumes() {
    if !root_or_skip("a_full_disk_refuses_statements_with_53100_then_service_resumes") {
        return;
    }
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    let _mount = Mount::tmpfs(&mnt, "4m");
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![7u8; 3 << 20]).unwrap();
    let recording = format!(
        "\n[recording]\ndir = \"{}\"\nsegment_bytes = 262144\nzstd_level = -7\n",
        mnt.join("recordings").display()
    );
    let gw = gateway_with(&pg, dir.path(), "", &recording, true);
    let client = connect(&gw).await;
    // Incompressible results until the recorder runs out of room.
    let wide = "SELECT md5(random()::text) || md5(random()::text) || md5(random()::text) \
                FROM generate_series(1, 2000)";
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        assert!(
            Instant::now() < deadline,
            "never refused: {}",
            gw.log_tail(20)
        );
        match client.simple_query(wide).await {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(sqlstate(&refused), "53100", "{refused:?}");
    let message = refused.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("recording failed"), "{message}");

    // While it fails: refused, visibly, and the refused statement never ran.
    let e = client
        .simple_query("SELECT set_config('portcullis.ran', 'yes', false)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "53100", "{e:?}");
    let status = gw.cli(&["status"]).unwrap();
    let status = text(&status);
    assert!(status.contains("recording: failing"), "{status}");
    let metrics_refused = status.contains("refused");
    assert!(metrics_refused, "{status}");

    // Space returns: service resumes, on the same session.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ran = loop {
        match client
            .simple_query("SELECT current_setting('portcullis.ran', true)")
            .await
        {
            Ok(m) => break m,
            Err(e) => {
                assert_eq!(sqlstate(&e), "53100", "{e:?}");
                assert!(Instant::now() < deadline, "service never resumed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let value = ran.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    });
    assert_ne!(
        value.flatten().as_deref(),
        Some("yes"),
        "a refused statement ran"
    );
    let status = text(&gw.cli(&["status"]).unwrap());
    assert!(status.contains("recording: ok"), "{status}");
}

fn approvals_pending(gw: &Gateway, needle: &str) -> Option<u64> {
    let out = gw.cli(&["approvals", "--json"]).unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    list.iter()
        .find(|r| r["status"] == "pending" && r["sql"].as_str().is_some_and(|s| s.contains(needle)))
        .and_then(|r| r["id"].as_u64())
}

/// Waits for the gateway to ask for approval of a statement containing `needle`, approves it,
/// and returns the request id.
async fn approve_when_asked(gw: &Gateway, needle: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        if let Some(id) = approvals_pending(gw, needle) {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "no approval request: {}",
            gw.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = gw.cli(&["approve", &id.to_string()]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    id
}

/// The statement was recorded as held under the `writes` rule with request `id`, then as
/// approved by someone, and it ran.
fn assert_held_then_approved(entries: &[Entry], stmt: u32, id: u64) {
    let verdicts: Vec<_> = of_statement(entries, stmt)
        .into_iter()
        .filter_map(|r| match r {
            Record::Verdict(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert_eq!(verdicts[0].action, Action::Hold);
    assert_eq!(verdicts[0].approval_id, Some(id));
    assert_eq!(verdicts[0].rule.as_deref(), Some("writes"));
    assert_eq!(verdicts[1].action, Action::Approved);
    assert_eq!(verdicts[1].approval_id, Some(id));
    assert!(
        verdicts[1]
            .approver
            .as_deref()
            .is_some_and(|a| !a.is_empty()),
        "{verdicts:?}"
    );
    assert!(verdicts[1].decided_at_us.is_some());
    assert!(
        of_statement(entries, stmt)
            .iter()
            .any(|r| matches!(r, Record::Complete(c) if c.tag == "INSERT 0 1"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_mode_records_an_approved_statement_with_its_approver() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "\n[recording]\nstrict = true\n", true);
    let client = std::sync::Arc::new(connect(&gw).await);
    // Strict: allowed statements run once their request is on disk, simple and extended.
    client.simple_query("SELECT 1").await.expect("simple");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let insert = "INSERT INTO people (id, note) VALUES (3, 'approved')";
    let held = {
        let c = client.clone();
        tokio::spawn(async move { c.simple_query(insert).await })
    };
    let id = approve_when_asked(&gw, "INSERT INTO people").await;
    held.await.unwrap().expect("the approved INSERT runs");
    drop(client);

    let entries = wait_for_end(&gw.state_dir.join("recordings"));
    let s = stmt_of(&entries, RequestKind::Query, insert);
    assert_held_then_approved(&entries, s, id);
    // What the gateway told the client while it held the statement is that statement's too.
    let said = format!("statement held for approval: request {id}");
    assert!(
        of_statement(&entries, s).iter().any(
            |r| matches!(r, Record::Notice(n) if n.code == "01000" && n.message.contains(&said))
        ),
        "{:?}",
        of_statement(&entries, s)
    );
    let session = entries[0].session;
    let shown = text(&recordings(
        &gw.state_dir.join("recordings"),
        &["show", &session.to_string()],
    ));
    let at = shown.find(insert).expect("the INSERT in `show`");
    assert!(shown[at..].contains(&said), "{shown}");
    let (code, out) = verify(&gw.state_dir);
    assert_eq!(code, 0, "verify: {out}");
}

/// A statement too large to classify inline gets its verdict from the classifier thread while
/// held; when that verdict asks for approval, the hold and the decision are recorded as for a
/// small statement: the request id, then who approved it.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_statement_held_for_approval_is_recorded_with_its_approval() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", true);
    let client = std::sync::Arc::new(connect(&gw).await);
    // Past the inline classifier's 256 KiB: decided on the classifier thread.
    let note = "n".repeat(300 * 1024);
    let insert = format!("INSERT INTO people (id, note) VALUES (4, '{note}')");
    let held = {
        let (c, sql) = (client.clone(), insert.clone());
        tokio::spawn(async move { c.simple_query(&sql).await })
    };
    let id = approve_when_asked(&gw, "INSERT INTO people").await;
    held.await.unwrap().expect("the approved INSERT runs");
    drop(client);

    let entries = wait_for_end(&gw.state_dir.join("recordings"));
    let s = stmt_of(&entries, RequestKind::Query, &insert);
    assert_held_then_approved(&entries, s, id);
    let (code, out) = verify(&gw.state_dir);
    assert_eq!(code, 0, "verify: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_mid_session_leaves_a_log_that_verifies_after_restart() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let pw_file = pg.write_password_file(dir.path()).unwrap();
    let shared = dir.path().join("kept");
    let config = |listen| {
        format!(
            "{}\n[recording]\ndir = \"{}\"\nkey_file = \"{}\"\n",
            testkit::single_target_toml(listen, &pg.url(), &pw_file),
            shared.join("recordings").display(),
            shared.join("keys/recording.key").display()
        )
    };
    let start = |listen: std::net::SocketAddr| {
        Gateway::start(
            GatewayOptions::with_config(listen, config(listen))
                .arg("--policy")
                .arg("default"),
        )
        .expect("start gateway")
    };
    let listen = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let gw = start(listen);
    let client = connect(&gw).await;
    let streaming = tokio::spawn(async move {
        loop {
            let r = client
                .simple_query(
                    "SELECT repeat(md5(random()::text), 20) FROM generate_series(1, 5000)",
                )
                .await;
            if r.is_err() {
                return;
            }
        }
    });
    // Kill it while results stream and the recorder writes.
    let rec_dir = shared.join("recordings");
    let deadline = Instant::now() + Duration::from_secs(20);
    let on_disk = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    while on_disk(&rec_dir) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "nothing recorded: {}",
            gw.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.signal(9);
    let _ = tokio::time::timeout(Duration::from_secs(10), streaming).await;
    drop(gw);

    let gw = start(listen);
    let client = connect(&gw).await;
    client
        .simple_query("SELECT 'after the crash'")
        .await
        .expect("query after restart");
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entries = export(&rec_dir);
        if entries.iter().any(
            |e| matches!(&e.record, Record::Request(r) if r.text == "SELECT 'after the crash'"),
        ) && entries
            .iter()
            .any(|e| matches!(e.record, Record::SessionEnd { .. }))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted gateway records");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pubkey = shared.join("keys/recording.key.pub");
    let out = recordings(&rec_dir, &["verify", "--pubkey", pubkey.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after a crash: {}",
        text(&out)
    );
}

/// A policy that allows everything, with the email detector on: what recordings redact.
const ALLOW_WITH_DETECTORS: &str = "name = \"allow-detect\"\nmode = \"enforce\"\n\
unparsable = \"allow\"\ndefault_action = \"allow\"\nfunction_call = \"allow\"\n\n\
[mask]\ndetectors = [\"email\"]\ndefault_style = \"redact\"\n";

/// The one session in `entries` that is not the seed's: (its id, its entries).
fn session_with(entries: &[Entry], needle: &str) -> u64 {
    entries
        .iter()
        .find_map(|e| match &e.record {
            Record::Request(r) if r.text.contains(needle) => Some(e.session),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no session ran {needle:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_from_stdin_data_through_psql_is_recorded_after_the_detectors() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let pw_file = pg.write_password_file(dir.path()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, ALLOW_WITH_DETECTORS).unwrap();
    let gw = Gateway::start(
        GatewayOptions::for_target(&pg, pw_file)
            .arg("--policy")
            .arg(policy.to_str().unwrap()),
    )
    .expect("start gateway");
    let rec_dir = gw.state_dir.join("recordings");

    // psql's \copy sends each line as CopyData; one line carries an email the detectors find.
    let script = format!(
        "\\copy people (id, contact, note) from stdin\n\
         31\tcopy-contact-one\tcopied-row-marker-31\n\
         32\t{EMAIL}\tcopied-row-marker-32\n\
         \\.\n\
         SELECT count(*) FROM people WHERE note LIKE 'copied-row-marker-%';\n"
    );
    let mut child = Command::new(pg.bindir().join("psql"))
        .args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &gw.conninfo("app"),
            "-f",
            "-",
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "psql: {said}");
    assert!(said.contains("COPY 2") && said.contains("\n2\n"), "{said}");

    let entries = wait_for_end(&rec_dir);
    let session = session_with(&entries, "SELECT count(*) FROM people");
    let shown = text(&recordings(&rec_dir, &["show", &session.to_string()]));
    for line in [
        "copied-row-marker-31",
        "copy-contact-one",
        "copied-row-marker-32",
    ] {
        assert!(
            shown.contains(line),
            "{line:?} missing from `show`:\n{shown}"
        );
    }
    assert!(shown.contains("COPY 2"), "{shown}");
    // The data comes before the server's answer to it, in the COPY's statement.
    let ours: Vec<&Entry> = entries.iter().filter(|e| e.session == session).collect();
    let copy_at = ours
        .iter()
        .position(|e| matches!(&e.record, Record::CopyIn(d) if contains(&d.0, b"marker-32")))
        .expect("a CopyIn record");
    let done_at = ours
        .iter()
        .position(|e| matches!(&e.record, Record::Complete(c) if c.tag == "COPY 2"))
        .expect("the COPY's completion");
    assert!(copy_at < done_at);
    assert_eq!(ours[copy_at].stmt, ours[done_at].stmt);
    for blob in everything_stored(&rec_dir) {
        assert!(
            !contains(&blob, EMAIL.as_bytes()),
            "the email in the COPY data reached the recording unredacted"
        );
    }
    let (code, out) = verify(&gw.state_dir);
    assert_eq!(code, 0, "verify: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_over_max_message_bytes_are_counted_and_said_to_be_missing() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "max_message_bytes = 65536\n\n", "", false);
    let rec_dir = gw.state_dir.join("recordings");
    let client = connect(&gw).await;
    let sql = "SELECT n, CASE WHEN n = 2 THEN repeat('x', 100000) ELSE 'small-' || n END \
               FROM generate_series(1, 3) n ORDER BY n";
    let got = client.simple_query(sql).await.expect("the query runs");
    let rows = got
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 3, "the client gets every row, the large one too");
    drop(client);

    let entries = wait_for_end(&rec_dir);
    let s = stmt_of(&entries, RequestKind::Query, sql);
    let recs = of_statement(&entries, s);
    let recorded = rows_of(&recs);
    assert_eq!(recorded.len(), 2, "the rows that fit are recorded");
    assert_eq!(recorded[1][1].as_deref(), Some(&b"small-3"[..]));
    let missing = recs.iter().find_map(|r| match r {
        Record::Unrecorded {
            rows,
            messages,
            bytes,
        } => Some((*rows, *messages, *bytes)),
        _ => None,
    });
    let (rows, messages, bytes) = missing.expect("a record of what is missing");
    assert_eq!((rows, messages), (1, 1));
    assert!(bytes > 100_000, "{bytes}");
    let complete = recs
        .iter()
        .find_map(|r| match r {
            Record::Complete(c) => Some(c),
            _ => None,
        })
        .expect("a complete");
    assert_eq!(complete.tag, "SELECT 3");
    assert_eq!(complete.rows, 3, "the full row count");
    assert!(complete.bytes_out > 100_000, "the full byte count");
    let session = entries
        .iter()
        .find(|e| e.stmt == s)
        .map(|e| e.session)
        .unwrap();
    let shown = text(&recordings(&rec_dir, &["show", &session.to_string()]));
    assert!(
        shown.contains("not recorded: 1 message(s) over max_message_bytes, 1 of them rows"),
        "{shown}"
    );
}

/// A gateway on its own config, with the shipped `default` policy or none.
/// A gateway for `pg` on a free port, its config file the single target with `before` (lines of
/// the harness's `[gateway]` section) and `after` (sections of its own) around it.
fn gateway_with(
    pg: &Postgres,
    dir: &Path,
    before: &str,
    after: &str,
    default_policy: bool,
) -> Gateway {
    let pw_file = pg.write_password_file(dir).unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let body = format!(
        "{before}{}{after}",
        testkit::single_target_toml(listen, &pg.url(), &pw_file)
    );
    let mut opts = GatewayOptions::with_config(listen, body);
    if default_policy {
        opts = opts.arg("--policy").arg("default");
    }
    Gateway::start(opts).expect("start gateway")
}

/// A client whose connection task the test awaits: on a current-thread runtime (where `join!`
/// puts both requests into one write) the task runs only while the test awaits.
async fn connect_here(gw: &Gateway) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(&gw.conninfo("app"), NoTls)
        .await
        .expect("connect through the gateway");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

fn tag_of(records: &[&Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Complete(c) => Some(c.tag.clone()),
            _ => None,
        })
        .collect()
}

fn one_row(value: &str) -> Vec<Vec<Option<Vec<u8>>>> {
    vec![vec![Some(value.as_bytes().to_vec())]]
}

/// Pipelined simple queries: each recorded with its own row and command tag, not the last
/// request's (the server answers them later, in order).
#[tokio::test]
async fn pipelined_statements_are_each_recorded_with_their_own_rows() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", false);
    let rec_dir = gw.state_dir.join("recordings");
    let (client, conn) = connect_here(&gw).await;
    // Both queries leave in one write and the gateway reads them together.
    let (a, b) = futures_util::join!(
        client.simple_query("SELECT 'pipelined-a'"),
        client.simple_query("SELECT 'pipelined-b'")
    );
    a.expect("first pipelined query");
    b.expect("second pipelined query");
    drop(client);
    conn.await.unwrap();
    let entries = wait_for_end(&rec_dir);
    for value in ["pipelined-a", "pipelined-b"] {
        let p = stmt_of(&entries, RequestKind::Query, &format!("SELECT '{value}'"));
        let recs = of_statement(&entries, p);
        assert_eq!(rows_of(&recs), one_row(value), "{recs:?}");
        assert_eq!(tag_of(&recs), ["SELECT 1"], "{recs:?}");
    }
}

/// Pipelined extended-protocol queries with parameters (tokio-postgres prepares both in one
/// write, then binds and executes both): each Execute keeps its parameters, rows and tag, and
/// each statement's description goes with its own Parse.
#[tokio::test]
async fn pipelined_extended_queries_are_each_recorded_with_their_own_rows() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", false);
    let rec_dir = gw.state_dir.join("recordings");
    let (client, conn) = connect_here(&gw).await;
    let (sql_a, sql_b) = (
        "SELECT $1::text AS first_col",
        "SELECT $1::text AS second_col",
    );
    let (a, b) = futures_util::join!(
        client.query(sql_a, &[&"extended-a"]),
        client.query(sql_b, &[&"extended-b"])
    );
    assert_eq!(a.expect("first")[0].get::<_, &str>(0), "extended-a");
    assert_eq!(b.expect("second")[0].get::<_, &str>(0), "extended-b");
    drop(client);
    conn.await.unwrap();
    let entries = wait_for_end(&rec_dir);
    for (sql, value, column) in [
        (sql_a, "extended-a", "first_col"),
        (sql_b, "extended-b", "second_col"),
    ] {
        let prepared = of_statement(&entries, stmt_of(&entries, RequestKind::Prepare, sql));
        let described: Vec<&str> = prepared
            .iter()
            .filter_map(|r| match r {
                Record::Columns(c) => Some(c),
                _ => None,
            })
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(described, [column], "{prepared:?}");
        let run = of_statement(&entries, stmt_of(&entries, RequestKind::Execute, sql));
        let Record::Request(req) = run[0] else {
            panic!("{run:?}");
        };
        assert_eq!(
            req.params,
            [Some(portcullis::record::Bytes(value.as_bytes().to_vec()))]
        );
        assert_eq!(rows_of(&run), one_row(value), "{run:?}");
        assert_eq!(tag_of(&run), ["SELECT 1"], "{run:?}");
    }
}

/// A statement the default policy blocks, between two allowed ones in one pipeline: the
/// gateway's 42501 is that statement's answer, the others keep their rows, and `show` says so.
#[tokio::test]
async fn a_blocked_statement_mid_pipeline_is_recorded_with_its_own_refusal() {
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", true);
    let rec_dir = gw.state_dir.join("recordings");
    let (client, conn) = connect_here(&gw).await;
    let (a, b, c) = futures_util::join!(
        client.simple_query("SELECT 'before-the-block'"),
        client.simple_query("DROP TABLE people"),
        client.simple_query("SELECT 'after-the-block'")
    );
    a.expect("the statement before the blocked one runs");
    assert_eq!(sqlstate(&b.unwrap_err()), "42501");
    c.expect("the statement after the blocked one runs");
    drop(client);
    conn.await.unwrap();
    let entries = wait_for_end(&rec_dir);
    for value in ["before-the-block", "after-the-block"] {
        let recs = of_statement(
            &entries,
            stmt_of(&entries, RequestKind::Query, &format!("SELECT '{value}'")),
        );
        assert_eq!(rows_of(&recs), one_row(value), "{recs:?}");
        assert!(
            !recs.iter().any(|r| matches!(r, Record::Error(_))),
            "{recs:?}"
        );
    }
    let blocked = of_statement(
        &entries,
        stmt_of(&entries, RequestKind::Query, "DROP TABLE people"),
    );
    assert!(
        blocked
            .iter()
            .any(|r| matches!(r, Record::Verdict(v) if v.action == Action::Block)),
        "{blocked:?}"
    );
    assert!(
        blocked.iter().any(|r| matches!(r, Record::Error(n)
            if n.code == "42501" && n.message.contains("blocked by rule"))),
        "{blocked:?}"
    );
    assert!(rows_of(&blocked).is_empty(), "{blocked:?}");
    let session = entries[0].session;
    let shown = text(&recordings(&rec_dir, &["show", &session.to_string()]));
    let drop_at = shown
        .find("DROP TABLE people")
        .expect("the statement in `show`");
    let refusal = shown[drop_at..]
        .find("SQLSTATE 42501")
        .expect("its refusal in `show`");
    assert!(
        shown[drop_at..drop_at + refusal].contains("block (rule"),
        "{shown}"
    );
}

/// One extended-protocol batch from a raw client (Parse, Bind, Describe, Execute per
/// statement): the middle Execute fails, so the server skips
/// the rest of the batch up to Sync; then a batch whose Parse the default policy blocks (the
/// gateway drops the rest of that batch); then one more statement. Each answer, and each
/// absence of one, is recorded where it belongs.
#[test]
fn an_error_mid_batch_skips_to_sync_and_later_statements_keep_their_rows() {
    use testkit::wire::{self, RawConn};
    let pg = Postgres::start().expect("start PostgreSQL");
    seed(&pg);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", true);
    let rec_dir = gw.state_dir.join("recordings");
    let endpoint = testkit::Endpoint {
        host: gw.listen.ip().to_string(),
        port: gw.listen.port(),
        user: "agent".into(),
        password: None,
        dbname: "app".into(),
        params: Vec::new(),
    };
    let mut conn = RawConn::to(&endpoint).expect("connect");
    conn.startup(&endpoint, wire::PROTOCOL_3_0)
        .expect("startup");
    let statement = |sql: &str| {
        [
            wire::parse("", sql),
            wire::bind("", "", &[]),
            wire::describe(b'P', ""),
            wire::execute("", 0),
        ]
        .concat()
    };
    let batch = [
        statement("SELECT 'batch-one'"),
        statement("SELECT 1/0"),
        statement("SELECT 'skipped-by-the-server'"),
        wire::sync(),
        statement("DROP TABLE people"),
        statement("SELECT 'dropped-by-the-gateway'"),
        wire::sync(),
        statement("SELECT 'batch-three'"),
        wire::sync(),
    ]
    .concat();
    conn.send(&batch).unwrap();
    let first = conn.read_until_ready().expect("first batch");
    assert_eq!(
        RawConn::first_column(&first),
        vec![Some("batch-one".to_string())]
    );
    assert_eq!(
        first.iter().find_map(wire::Message::sqlstate).as_deref(),
        Some("22012")
    );
    let second = conn.read_until_ready().expect("second batch");
    assert_eq!(
        second.iter().find_map(wire::Message::sqlstate).as_deref(),
        Some("42501")
    );
    let third = conn.read_until_ready().expect("third batch");
    assert_eq!(
        RawConn::first_column(&third),
        vec![Some("batch-three".to_string())]
    );
    conn.send(&wire::terminate()).unwrap();
    drop(conn);

    let entries = wait_for_end(&rec_dir);
    let run = |sql: &str| of_statement(&entries, stmt_of(&entries, RequestKind::Execute, sql));
    for value in ["batch-one", "batch-three"] {
        let recs = run(&format!("SELECT '{value}'"));
        assert_eq!(rows_of(&recs), one_row(value), "{recs:?}");
        assert_eq!(tag_of(&recs), ["SELECT 1"], "{recs:?}");
        // The portal's description, sent before the Execute, answers for it.
        assert!(
            matches!(recs[1], Record::Columns(c) if c.len() == 1),
            "{recs:?}"
        );
    }
    let failed = run("SELECT 1/0");
    assert!(
        failed
            .iter()
            .any(|r| matches!(r, Record::Error(n) if n.code == "22012")),
        "{failed:?}"
    );
    assert_eq!(tag_of(&failed), [""], "{failed:?}");
    // Sent, recorded, and never answered: the server skipped it.
    let skipped = run("SELECT 'skipped-by-the-server'");
    assert!(
        skipped.iter().all(|r| matches!(r, Record::Request(_))),
        "{skipped:?}"
    );
    let blocked = of_statement(
        &entries,
        stmt_of(&entries, RequestKind::Prepare, "DROP TABLE people"),
    );
    assert!(
        blocked
            .iter()
            .any(|r| matches!(r, Record::Error(n) if n.code == "42501")),
        "{blocked:?}"
    );
    // Dropped by the gateway after the block, as the server drops a failed batch: never sent.
    assert!(!entries.iter().any(
        |e| matches!(&e.record, Record::Request(r) if r.text.contains("dropped-by-the-gateway"))
    ));
}

/// A statement is on disk, with its verdict, while it still runs: a gateway that dies during a
/// long statement leaves it in the log. Simple and extended protocol (tokio-postgres prepares,
/// binds and executes), with the shipped `default` policy.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_is_recorded_with_its_verdict_while_it_still_runs() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway_with(&pg, dir.path(), "", "", true);
    let rec_dir = gw.state_dir.join("recordings");
    let simple = connect(&gw).await;
    let extended = connect(&gw).await;
    let started = Instant::now();
    let running = [
        tokio::spawn(async move { simple.simple_query("SELECT pg_sleep(30)").await.map(drop) }),
        tokio::spawn(async move {
            extended
                .query("SELECT pg_sleep($1::float8)", &[&30f64])
                .await
                .map(drop)
        }),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let recorded = |entries: &[Entry], kind: RequestKind, text: &str| {
        entries
            .iter()
            .any(|e| matches!(&e.record, Record::Request(r) if r.kind == kind && r.text == text))
            && {
                let stmt = stmt_of(entries, kind, text);
                kind == RequestKind::Execute
                    || of_statement(entries, stmt)
                        .iter()
                        .any(|r| matches!(r, Record::Verdict(v) if v.action == Action::Allow))
            }
    };
    loop {
        let entries = if rec_dir.exists() {
            export(&rec_dir)
        } else {
            Vec::new()
        };
        if recorded(&entries, RequestKind::Query, "SELECT pg_sleep(30)")
            && recorded(
                &entries,
                RequestKind::Execute,
                "SELECT pg_sleep($1::float8)",
            )
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running statements are not on disk: {:#?}",
            entries.iter().map(|e| &e.record).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        running.iter().all(|t| !t.is_finished()) && started.elapsed() < Duration::from_secs(30),
        "the statements finished before their records were seen"
    );
    for t in running {
        t.abort();
    }
}
