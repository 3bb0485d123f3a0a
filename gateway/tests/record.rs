//! Session recording against real files and real processes: round trip through the CLI,
//! tampering caught with the right exit code, SIGKILL mid-write, a full filesystem, and no
//! secret in the recording directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis::record::segment::{self, Segment, list_segments};
use portcullis::record::*;

#[path = "support/stored.rs"]
mod stored;
use stored::{contains, everything_stored};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

struct Env {
    _tmp: tempfile::TempDir,
    state: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().to_owned();
        Env { _tmp: tmp, state }
    }
    fn dir(&self) -> PathBuf {
        self.state.join("recordings")
    }
    fn key(&self) -> PathBuf {
        self.state.join("keys/recording.key")
    }
    fn pubkey(&self) -> PathBuf {
        self.state.join("keys/recording.key.pub")
    }
    fn config(&self) -> RecordingConfig {
        RecordingConfig {
            origin: Some("test/portcullis".into()),
            commit_interval: Duration::from_millis(2),
            ..Default::default()
        }
    }
    /// The ids `recordings list` gives with these filters.
    fn listed(&self, filters: &[&str]) -> Vec<u64> {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(filters);
        let v: serde_json::Value = serde_json::from_str(&stdout(&self.cli(&args))).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_u64().unwrap())
            .collect()
    }
    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.dir(), args)
    }
    fn verify(&self, extra: &[&str]) -> (i32, String) {
        let pubkey = self.pubkey();
        let mut args = vec!["verify", "--pubkey", pubkey.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Restarts the recorder over what is on disk, then checks that `verify` passes and names the
    /// recovery of `segment` (`what`: the offset cut at and the bytes dropped).
    fn restart_records_the_recovery(&self, segment: &Path, what: &str) {
        Recorder::start(&self.config(), &self.state)
            .unwrap()
            .shutdown();
        let (code, text) = self.verify(&[]);
        assert_eq!(code, 0, "{text}");
        let name = segment.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            text.contains(&format!("recovery: recovered {name} {what}")),
            "{text}"
        );
    }
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("recordings")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run portcullis")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `recordings export --format jsonl`: its text, and each line parsed.
fn export_jsonl(env: &Env) -> (String, Vec<serde_json::Value>) {
    let out = stdout(&env.cli(&["export", "--format", "jsonl"]));
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, lines)
}

fn b(s: &str) -> Option<Bytes> {
    Some(Bytes::from(s))
}

fn query(text: &str) -> Request {
    Request {
        kind: RequestKind::Query,
        statement: None,
        text: text.into(),
        params: vec![],
    }
}

/// A session with every kind of record; returns its id and what was handed in, in order.
fn record_everything(handle: &RecorderHandle) -> (u64, Vec<Record>) {
    let start = SessionStart {
        agent: Some("claude".into()),
        pid: Some(4242),
        exe: Some("/usr/bin/python3".into()),
        cgroup: Some("/portcullis-agents/claude".into()),
        subject: Some("alice@example.com".into()),
        groups: vec!["analysts".into()],
        actor: Some("planner".into()),
        token_sha256: Some(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        ),
        client_addr: Some("127.0.0.1:50000".into()),
        target: "local".into(),
        database: "shop".into(),
        upstream_user: "app".into(),
    };
    let mut handed = vec![Record::SessionStart(start.clone())];
    let mut s = handle.begin(start).unwrap();
    let send = |handed: &mut Vec<Record>, s: &mut SessionRecorder, r: Record| {
        handed.push(r.clone());
        match r {
            Record::Request(q) => s.request(q).unwrap().wait().unwrap(),
            Record::Verdict(v) => s.verdict(v).unwrap(),
            Record::Columns(c) => s.columns(c).unwrap(),
            Record::Rows(r) => s.rows(r).unwrap(),
            Record::CopyData(d) => s.copy_data(d).unwrap(),
            Record::Notice(n) => s.notice(n).unwrap(),
            Record::Error(n) => s.error(n).unwrap(),
            Record::Notification {
                pid,
                channel,
                payload,
            } => s.notification(pid, channel, payload).unwrap(),
            other => panic!("not sent this way: {other:?}"),
        }
    };
    // Simple query with masked values, a NULL, unicode and a binary value.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("SELECT id, email, note, raw FROM customers")),
    );
    send(
        &mut handed,
        &mut s,
        Record::Verdict(Verdict::allow(Some("default/read".into()))),
    );
    send(
        &mut handed,
        &mut s,
        Record::Columns(vec![
            Column {
                name: "id".into(),
                type_oid: 23,
                format: 0,
            },
            Column {
                name: "email".into(),
                type_oid: 25,
                format: 0,
            },
            Column {
                name: "note".into(),
                type_oid: 25,
                format: 0,
            },
            Column {
                name: "raw".into(),
                type_oid: 17,
                format: 1,
            },
        ]),
    );
    send(
        &mut handed,
        &mut s,
        Record::Rows(vec![
            vec![
                b("1"),
                b("a***@example.com"),
                b("héllo | wörld"),
                Some(Bytes(vec![0, 159, 255])),
            ],
            vec![b("2"), b("b***@example.com"), None, Some(Bytes(vec![]))],
        ]),
    );
    s.complete("SELECT 2", 48, 212, Duration::from_micros(1500))
        .unwrap();
    handed.push(Record::Complete(Complete {
        tag: "SELECT 2".into(),
        rows: 2,
        bytes_in: 48,
        bytes_out: 212,
        latency_us: 1500,
        truncated: None,
    }));
    // Extended protocol with a parameter.
    send(
        &mut handed,
        &mut s,
        Record::Request(Request {
            kind: RequestKind::Execute,
            statement: Some("s1".into()),
            text: "UPDATE orders SET state = $1 WHERE id = 7".into(),
            params: vec![b("shipped")],
        }),
    );
    send(&mut handed, &mut s, Record::Verdict(Verdict::allow(None)));
    send(
        &mut handed,
        &mut s,
        Record::Notice(Notice {
            severity: "NOTICE".into(),
            code: "00000".into(),
            message: "trigger fired".into(),
            detail: None,
        }),
    );
    s.complete("UPDATE 1", 60, 30, Duration::from_micros(800))
        .unwrap();
    handed.push(Record::Complete(Complete {
        tag: "UPDATE 1".into(),
        rows: 0,
        bytes_in: 60,
        bytes_out: 30,
        latency_us: 800,
        truncated: None,
    }));
    // COPY in.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("COPY items FROM STDIN")),
    );
    send(&mut handed, &mut s, Record::Verdict(Verdict::allow(None)));
    send(
        &mut handed,
        &mut s,
        Record::CopyData(Bytes::from("1\tbolt\n2\tnut\n")),
    );
    s.complete("COPY 2", 40, 20, Duration::from_micros(900))
        .unwrap();
    handed.push(Record::Complete(Complete {
        tag: "COPY 2".into(),
        rows: 0,
        bytes_in: 40,
        bytes_out: 20,
        latency_us: 900,
        truncated: None,
    }));
    // An error.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("SELECT * FROM missing")),
    );
    send(&mut handed, &mut s, Record::Verdict(Verdict::allow(None)));
    send(
        &mut handed,
        &mut s,
        Record::Error(Notice {
            severity: "ERROR".into(),
            code: "42P01".into(),
            message: "relation \"missing\" does not exist".into(),
            detail: None,
        }),
    );
    s.complete("", 30, 90, Duration::from_micros(300)).unwrap();
    handed.push(Record::Complete(Complete {
        tag: "".into(),
        rows: 0,
        bytes_in: 30,
        bytes_out: 90,
        latency_us: 300,
        truncated: None,
    }));
    // A blocked statement.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("DROP TABLE customers")),
    );
    send(
        &mut handed,
        &mut s,
        Record::Verdict(Verdict {
            action: Action::Block,
            rule: Some("default/no-ddl".into()),
            reason: Some("DDL is not allowed".into()),
            approval_id: None,
            approver: None,
            decided_at_us: None,
        }),
    );
    // Held, then approved by a human.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("DELETE FROM orders WHERE id = 7")),
    );
    let hold = Verdict {
        action: Action::Hold,
        rule: Some("default/approve-delete".into()),
        reason: None,
        approval_id: Some(17),
        approver: None,
        decided_at_us: None,
    };
    send(&mut handed, &mut s, Record::Verdict(hold.clone()));
    send(
        &mut handed,
        &mut s,
        Record::Verdict(Verdict {
            action: Action::Approved,
            approver: Some("bob@example.com".into()),
            decided_at_us: Some(1_764_500_000_000_000),
            ..hold
        }),
    );
    send(
        &mut handed,
        &mut s,
        Record::Notification {
            pid: 99,
            channel: "orders".into(),
            payload: "deleted 7".into(),
        },
    );
    s.complete("DELETE 1", 40, 20, Duration::from_micros(700))
        .unwrap();
    handed.push(Record::Complete(Complete {
        tag: "DELETE 1".into(),
        rows: 0,
        bytes_in: 40,
        bytes_out: 20,
        latency_us: 700,
        truncated: None,
    }));
    // A result over the target's max_response_bytes (100): recorded in part, counted in full.
    send(
        &mut handed,
        &mut s,
        Record::Request(query("SELECT payload FROM big")),
    );
    send(&mut handed, &mut s, Record::Verdict(Verdict::allow(None)));
    let big: Vec<Row> = (0..10).map(|i| vec![b(&format!("{i:040}"))]).collect();
    s.rows(big.clone()).unwrap();
    handed.push(Record::Rows(big[..2].to_vec()));
    s.complete("SELECT 10", 30, 500, Duration::from_micros(400))
        .unwrap();
    handed.push(Record::Complete(Complete {
        tag: "SELECT 10".into(),
        rows: 10,
        bytes_in: 30,
        bytes_out: 500,
        latency_us: 400,
        truncated: Some(Truncation {
            rows_recorded: 2,
            bytes_recorded: 80,
        }),
    }));
    let id = s.id();
    s.end("client closed").unwrap();
    handed.push(Record::SessionEnd {
        reason: "client closed".into(),
    });
    (id, handed)
}

#[test]
fn round_trip_show_export_list_replay_reproduce_what_was_handed_in() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.target.insert(
        "local".into(),
        config::TargetRecording {
            max_response_bytes: Some(100),
        },
    );
    cfg.strict = true;
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let handle = recorder.handle();
    let (id, handed) = record_everything(&handle);
    let other = handle
        .begin(SessionStart {
            agent: Some("cron".into()),
            target: "warehouse".into(),
            ..Default::default()
        })
        .unwrap();
    let other_id = other.id();
    other.end("done").unwrap();
    handle.flush().wait().unwrap();
    let status = handle.status();
    assert_eq!(status.state, "ok");
    assert!(status.checkpoints >= 2, "{status:?}");
    recorder.shutdown();

    // JSON lines: each record exactly as handed in, in order.
    let (_, lines) = export_jsonl(&env);
    let mine: Vec<&serde_json::Value> = lines.iter().filter(|l| l["session"] == id).collect();
    assert_eq!(mine.len(), handed.len());
    for (got, want) in mine.iter().zip(&handed) {
        assert_eq!(got["record"], serde_json::to_value(want).unwrap());
    }
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // Binary values survive byte for byte.
    let rows = &mine[4]["record"]["rows"];
    assert_eq!(rows[0][3]["base64"], "AJ//");
    assert_eq!(rows[0][2], "héllo | wörld");
    assert!(rows[1][2].is_null());

    // The transcript reads like psql.
    let show = stdout(&env.cli(&["show", &id.to_string()]));
    for want in [
        "SELECT id, email, note, raw FROM customers",
        " id | email            | note          | raw",
        " 1  | a***@example.com | héllo | wörld | \\x009fff",
        "(2 rows)",
        "SELECT 2 · 1.500 ms",
        "params: 'shipped'",
        "COPY data: 1\tbolt",
        "ERROR: relation \"missing\" does not exist (SQLSTATE 42P01)",
        "block (rule default/no-ddl): DDL is not allowed",
        "approved (rule default/approve-delete) approval #17 by bob@example.com",
        "Asynchronous notification \"orders\" with payload \"deleted 7\"",
        "recording cut at 2 of 10 rows (80 bytes, max_response_bytes)",
        "session ended: client closed",
        "agent claude pid 4242 exe /usr/bin/python3",
        "subject alice@example.com groups [analysts] actor planner",
    ] {
        assert!(show.contains(want), "missing {want:?} in:\n{show}");
    }
    let replay = stdout(&env.cli(&["replay", &id.to_string(), "--speed", "1000"]));
    assert_eq!(replay, show);

    // OCSF: a Connect per session and an event per statement; the blocked one says so.
    let out = stdout(&env.cli(&["export", "--format", "ocsf"]));
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().all(|e| e["class_uid"] == 6005));
    let uid = id.to_string();
    let mine: Vec<_> = events
        .iter()
        .filter(|e| e["actor"]["session"]["uid"] == uid)
        .collect();
    assert_eq!(mine.len(), 8, "{mine:#?}");
    assert_eq!(mine[0]["activity_name"], "Connect");
    assert_eq!(mine[0]["type_uid"], 600503);
    let drop = mine
        .iter()
        .find(|e| e["query_info"]["query_string"] == "DROP TABLE customers")
        .unwrap();
    assert_eq!(drop["disposition"], "Blocked");
    assert_eq!(drop["policy"]["name"], "default/no-ddl");
    let delete = mine
        .iter()
        .find(|e| e["query_info"]["query_string"] == "DELETE FROM orders WHERE id = 7")
        .unwrap();
    assert_eq!(delete["activity_name"], "Delete");
    assert_eq!(delete["unmapped"]["approver"], "bob@example.com");
    assert_eq!(mine[1]["actor"]["user"]["name"], "alice@example.com");
    assert_eq!(mine[1]["count"], 2);

    // The index answers each filter.
    let ids = |args: &[&str]| env.listed(args);
    assert_eq!(ids(&[]), vec![id, other_id]);
    assert_eq!(ids(&["--agent", "claude"]), vec![id]);
    assert_eq!(ids(&["--subject", "alice@example.com"]), vec![id]);
    assert_eq!(ids(&["--target", "warehouse"]), vec![other_id]);
    assert_eq!(ids(&["--verdict", "block"]), vec![id]);
    assert_eq!(ids(&["--verdict", "approved"]), vec![id]);
    assert_eq!(ids(&["--grep", "orders"]), vec![id]);
    assert_eq!(ids(&["--grep", "\"nowhere"]), Vec::<u64>::new());
    assert_eq!(ids(&["--since", "1h"]), vec![id, other_id]);
    assert_eq!(ids(&["--until", "2000-01-01"]), Vec::<u64>::new());
    let table = stdout(&env.cli(&["list"]));
    assert!(
        table.contains("claude") && table.contains("client closed"),
        "{table}"
    );

    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
}

/// Statements' full text is indexed by the searches, not by the recorder: each `--grep` takes in
/// what was recorded since the last, while the gateway records beside it.
#[test]
fn each_search_finds_what_was_recorded_since_the_last_one() {
    let env = Env::new();
    let recorder = Recorder::start(&env.config(), &env.state).unwrap();
    let handle = recorder.handle();
    let session = |text: &str| -> u64 {
        let mut s = handle.begin(SessionStart::default()).unwrap();
        let id = s.id();
        drop(s.request(query(text)).unwrap());
        s.end("client closed").unwrap();
        handle.flush().wait().unwrap();
        id
    };
    let grep = |text: &str| env.listed(&["--grep", text]);
    let texts = env.dir().join(portcullis::record::texts::TEXTS_FILE);

    let first = session("SELECT * FROM alpha_orders");
    assert!(!texts.exists(), "the recorder keeps no full text");
    assert_eq!(grep("alpha_orders"), vec![first]);
    let second = session("DELETE FROM beta_orders WHERE id = 7");
    assert_eq!(grep("beta_orders WHERE"), vec![second]);
    assert_eq!(grep("alpha_orders"), vec![first]);
    assert_eq!(grep("orders"), vec![first, second]);

    // The full text is derived: deleted, the next search rebuilds it from the segments.
    recorder.shutdown();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", texts.display()));
    }
    assert_eq!(grep("orders"), vec![first, second]);
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn no_secret_reaches_the_recording_directory() {
    let env = Env::new();
    let password = "canary-Upstream-Pa55word-91b2";
    let token = "eyJhbGciOiJSUzI1NiJ9.canary-agent-token.c2lnbmF0dXJl";
    let unmasked = "4111-1111-1111-1111";
    // The canary password sits in the target's password file under the state dir, as an operator
    // would put it, and the gateway runs from a config naming it.
    let pw_file = env.state.join("upstream.password");
    std::fs::write(&pw_file, password).unwrap();
    let text = format!(
        "[gateway]\nstate_dir = \"{}\"\n[[target]]\nname = \"local\"\n\
         upstream = \"postgres://app@127.0.0.1:5432/shop\"\npassword_file = \"{}\"\n\
         [recording]\ncommit_interval = \"2ms\"\norigin = \"test/portcullis\"\n",
        env.state.display(),
        pw_file.display()
    );
    let config = portcullis::config::Config::parse(&text, "test").unwrap();
    let recorder = Recorder::start(&config.recording, &config.state_dir).unwrap();
    let handle = recorder.handle();
    use sha2::Digest as _;
    let mut s = handle
        .begin(SessionStart {
            token_sha256: Some(format!("{:x}", sha2::Sha256::digest(token))),
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    s.request(query("SELECT card FROM payments")).unwrap();
    s.rows(vec![vec![b("****-****-****-1111")]]).unwrap();
    s.complete("SELECT 1", 10, 10, Duration::ZERO).unwrap();
    s.end("done").unwrap();
    handle.flush().wait().unwrap();
    recorder.shutdown();
    // A search builds the statements' full text, so the scan below reads it too.
    assert_eq!(env.listed(&["--grep", "payments"]).len(), 1);
    assert!(
        env.dir()
            .join(portcullis::record::texts::TEXTS_FILE)
            .exists()
    );
    let key = std::fs::read_to_string(env.key()).unwrap();
    // PRIVATE+KEY+<name>+<key id>+<base64 key>: the key's base64 may itself hold a '+'.
    let seed = key.trim().splitn(5, '+').nth(4).unwrap().to_owned();
    assert!(
        seed.len() > 40,
        "the key file's encoded key: {}",
        seed.len()
    );
    let stored = everything_stored(&env.dir());
    assert!(stored.len() > 3);
    for blob in &stored {
        for canary in [password, token, unmasked, &seed, "PRIVATE+KEY"] {
            assert!(
                !contains(blob, canary.as_bytes()),
                "{canary} is in the recording"
            );
        }
    }
    // What was handed in is there, so the scan looks at the right bytes.
    assert!(stored.iter().any(|b| contains(b, b"****-****-****-1111")));
}

/// A recording of several segments with a checkpoint after each session.
fn build_log(env: &Env, sessions: usize) {
    let mut cfg = env.config();
    cfg.segment_bytes = 4096;
    cfg.ship_command = vec![
        "sh".into(),
        "-c".into(),
        format!("cat > {}/shipped-$(date +%s%N)", env.state.display()),
    ];
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let handle = recorder.handle();
    for i in 0..sessions {
        let mut s = handle
            .begin(SessionStart {
                agent: Some(format!("agent{i}")),
                target: "local".into(),
                ..Default::default()
            })
            .unwrap();
        for q in 0..3 {
            s.request(query(&format!("SELECT {i}, {q}"))).unwrap();
            use sha2::Digest as _;
            let rows = (0..8)
                .map(|r| {
                    let h = format!("{:x}", sha2::Sha256::digest(format!("{i} {q} {r}")));
                    vec![b(&h.repeat(3))]
                })
                .collect();
            s.rows(rows).unwrap();
            s.complete("SELECT 8", 1, 2, Duration::ZERO).unwrap();
            handle.flush().wait().unwrap();
        }
        s.end("done").unwrap();
        handle.flush().wait().unwrap();
    }
    recorder.shutdown();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A fresh copy of a built environment, to damage.
fn clone_env(env: &Env) -> Env {
    let copy = Env::new();
    copy_dir(&env.state, &copy.state);
    copy
}

/// (offset, length, is_checkpoint) of each block of a segment.
fn block_spans(path: &Path) -> Vec<(usize, usize, bool)> {
    let seg = Segment::open(path).unwrap();
    let (blocks, _) = seg.blocks();
    blocks
        .iter()
        .map(|b| {
            (
                b.offset as usize,
                (b.end() - b.offset) as usize,
                b.is_checkpoint,
            )
        })
        .collect()
}

#[test]
fn verify_names_each_kind_of_tampering_with_its_exit_code() {
    let base = Env::new();
    build_log(&base, 6);
    let (code, text) = base.verify(&[]);
    assert_eq!(code, 0, "{text}");
    let segs = list_segments(&base.dir()).unwrap();
    assert!(segs.len() >= 3, "want several segments, got {}", segs.len());

    // A flipped byte in a record block.
    let env = clone_env(&base);
    let path = &list_segments(&env.dir()).unwrap()[1].1;
    let (off, len, _) = block_spans(path).into_iter().find(|s| !s.2).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[off + len / 2] ^= 0x20;
    std::fs::write(path, &bytes).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("TAMPERED") && text.contains("first bad record: seq"),
        "{text}"
    );

    // A deleted record, with every CRC made to fit again.
    let env = clone_env(&base);
    let path = &list_segments(&env.dir()).unwrap()[1].1;
    let seg = Segment::open(path).unwrap();
    let (blocks, _) = seg.blocks();
    let victim = blocks
        .iter()
        .find(|b| !b.is_checkpoint && b.count >= 2)
        .unwrap();
    let records = victim.records().unwrap();
    let mut raw = Vec::new();
    for r in records.iter().skip(1) {
        segment::frame_record(&mut raw, r);
    }
    let forged = segment::encode_block(
        &mut zstd::bulk::Compressor::new(1).unwrap(),
        &raw,
        victim.first_seq,
        victim.count - 1,
        victim.last_at_us,
    )
    .unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes.splice(victim.offset as usize..victim.end() as usize, forged);
    let first = victim.first_seq;
    drop(blocks);
    drop(seg);
    std::fs::write(path, &bytes).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains(&format!("seq {first}")), "{text}");

    // Two record blocks swapped.
    let env = clone_env(&base);
    let (path, spans) = list_segments(&env.dir())
        .unwrap()
        .into_iter()
        .map(|(_, p)| {
            let spans: Vec<_> = block_spans(&p).into_iter().filter(|s| !s.2).collect();
            (p, spans)
        })
        .find(|(_, s)| s.len() >= 2)
        .expect("a segment with two record blocks");
    let bytes = std::fs::read(&path).unwrap();
    let (a, b) = (spans[0], spans[1]);
    let mut swapped = bytes[..a.0].to_vec();
    swapped.extend_from_slice(&bytes[b.0..b.0 + b.1]);
    swapped.extend_from_slice(&bytes[a.0 + a.1..b.0]);
    swapped.extend_from_slice(&bytes[a.0..a.0 + a.1]);
    swapped.extend_from_slice(&bytes[b.0 + b.1..]);
    std::fs::write(&path, &swapped).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("reordered"), "{text}");

    // A segment replaced by the same-numbered segment of another recorder's log.
    let env = clone_env(&base);
    let other = Env::new();
    build_log(&other, 6);
    let name = list_segments(&env.dir()).unwrap()[1]
        .1
        .file_name()
        .unwrap()
        .to_owned();
    std::fs::copy(other.dir().join(&name), env.dir().join(&name)).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains(name.to_str().unwrap()), "{text}");

    // A deleted segment in the middle.
    let env = clone_env(&base);
    std::fs::remove_file(&list_segments(&env.dir()).unwrap()[1].1).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("missing"), "{text}");

    // A truncated tail, caught by a checkpoint shipped off the host earlier.
    let env = clone_env(&base);
    let shipped = newest_shipped(&env.state);
    let segs = list_segments(&env.dir()).unwrap();
    std::fs::remove_file(&segs.last().unwrap().1).unwrap();
    let before_last = &segs[segs.len() - 2].1;
    let spans = block_spans(before_last);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(before_last)
        .unwrap();
    f.set_len(spans[0].0 as u64 + spans[0].1 as u64).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(
        code, 0,
        "without the outside checkpoint the cut is invisible: {text}"
    );
    let (code, text) = env.verify(&["--checkpoint", shipped.to_str().unwrap()]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("TRUNCATED"), "{text}");

    // The intact log is consistent with that checkpoint.
    let (code, text) = base.verify(&["--checkpoint", shipped.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("consistent with the given checkpoint"),
        "{text}"
    );

    // No public key, or the wrong one.
    let (code, text) = cli_verify_with(&base, Path::new("/nonexistent/recording.key.pub"));
    assert_eq!(code, 4, "{text}");
    let (code, text) = cli_verify_with(&base, &other.pubkey());
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not in the public key file"), "{text}");
}

fn cli_verify_with(env: &Env, pubkey: &Path) -> (i32, String) {
    let out = env.cli(&["verify", "--pubkey", pubkey.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The shipped checkpoint with the largest tree.
fn newest_shipped(state: &Path) -> PathBuf {
    let mut best = None;
    for e in std::fs::read_dir(state).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("shipped-")
        {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let size: u64 = text.lines().nth(1).unwrap().parse().unwrap();
        if best.as_ref().is_none_or(|(s, _)| size > *s) {
            best = Some((size, p));
        }
    }
    best.expect("checkpoints were shipped").1
}

#[test]
fn rotated_keys_keep_old_checkpoints_verifiable_and_prune_leaves_a_signed_tombstone() {
    let env = Env::new();
    build_log(&env, 3);
    let out = env.cli(&[
        "rotate-key",
        "--key-file",
        env.key().to_str().unwrap(),
        "--origin",
        "test/portcullis",
    ]);
    stdout(&out);
    build_log(&env, 3);
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
    let before = list_segments(&env.dir()).unwrap().len();
    let ids = |args: &[&str]| env.listed(args);
    // A search before the prune builds the full text of every session.
    assert_eq!(ids(&["--grep", "SELECT"]).len(), 6);

    let out = env.cli(&[
        "prune",
        "--before",
        "0s",
        "--key-file",
        env.key().to_str().unwrap(),
    ]);
    let said = stdout(&out);
    assert!(said.contains("removed"), "{said}");
    let after = list_segments(&env.dir()).unwrap();
    assert_eq!(after.len(), 1, "all but the newest segment go");
    assert!(before > 1);
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("pruned: records before"), "{text}");
    let kept = ids(&[]);
    assert!(kept.len() < 6, "pruned sessions leave the index: {kept:?}");
    assert_eq!(ids(&["--grep", "SELECT"]), kept, "and the full text");

    // A tombstone cannot be forged without the key.
    let path = env.dir().join("tombstones.log");
    let t = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, t.replacen("frontier ", "frontier AAAA", 1)).unwrap();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
}

fn wait_for_line(child: &mut std::process::Child, want: &str) {
    use std::io::BufRead as _;
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let line = lines.next().expect("a line").unwrap();
    assert_eq!(line, want);
    // Keep draining so the writer never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
}

#[test]
fn sigkill_mid_write_then_restart_verifies_and_records_the_cut() {
    let env = Env::new();
    let key = env.key();
    for round in 0..3 {
        let mut child = Command::new(BIN)
            .args(["recordings", "--dir"])
            .arg(env.dir())
            .args(["load", "--key-file"])
            .arg(&key)
            .args(["--rows", "200", "--commit-bytes", "4000000"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_line(&mut child, "ready");
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (code, text) = env.verify(&[]);
        assert_eq!(code, 0, "after SIGKILL {round}: {text}");
    }
    // Make the tail torn for certain, as a write cut by the kill leaves it: half a block.
    let segs = list_segments(&env.dir()).unwrap();
    let first = &segs[0].1;
    let (off, len, _) = *block_spans(first)
        .iter()
        .find(|s| !s.2)
        .expect("a record block");
    let half = std::fs::read(first).unwrap()[off..off + len / 2].to_vec();
    let last = &segs.last().unwrap().1;
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, &half).unwrap();
    drop(f);
    let Some(segment::Damage::Torn { offset: torn_at }) = Segment::open(last).unwrap().blocks().1
    else {
        panic!("the tail should read as torn");
    };
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("open tail"), "{text}");

    // A restart cuts it, records the cut in a record and a signed checkpoint, and carries on.
    let recorder = Recorder::start(&env.config(), &env.state).unwrap();
    let h = recorder.handle();
    let s = h
        .begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    let id = s.id();
    s.end("after restart").unwrap();
    h.flush().wait().unwrap();
    recorder.shutdown();
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        text.contains(&format!("recovery: recovered {name} {torn_at}")),
        "{text}"
    );
    let export = stdout(&env.cli(&["export"]));
    assert!(export.contains("\"recovery\""), "the cut is a record too");
    let list = stdout(&env.cli(&["list", "--json"]));
    assert!(
        list.contains(&format!("\"id\": {id}")),
        "the index caught up: {list}"
    );
}

/// A 2 MiB tmpfs, half taken by `filler`, unmounted on drop; `None` (said loudly) when not
/// root, which CI refuses.
struct SmallDisk {
    env: Env,
    mnt: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    fn mount(test: &str) -> Option<SmallDisk> {
        if !testkit::is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run this as root"
            );
            eprintln!("SKIPPED {test}: needs root to mount a tmpfs");
            return None;
        }
        let env = Env::new();
        let mnt = env.state.join("small");
        std::fs::create_dir_all(&mnt).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        let filler = mnt.join("filler");
        let disk = SmallDisk { env, mnt, filler };
        std::fs::write(&disk.filler, vec![7u8; 1 << 20]).unwrap();
        Some(disk)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn a_full_disk_refuses_statements_then_resumes_when_space_returns() {
    let Some(disk) =
        SmallDisk::mount("a_full_disk_refuses_statements_then_resumes_when_space_returns")
    else {
        return;
    };
    let (env, mnt, filler) = (&disk.env, disk.mnt.clone(), disk.filler.clone());
    let mut cfg = env.config();
    cfg.dir = Some(mnt.join("recordings"));
    cfg.segment_bytes = 256 << 10;
    cfg.zstd_level = -7;
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let h = recorder.handle();
    let row: Row = (0..8)
        .map(|i| {
            Some(Bytes(
                (0..64)
                    .map(|j| (i * 131 + j * 17) as u8 ^ rand::random::<u8>())
                    .collect(),
            ))
        })
        .collect();
    // Fill the filesystem until the recorder refuses.
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    'fill: while Instant::now() < deadline {
        let mut s = match h.begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        }) {
            Ok(s) => s,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        for _ in 0..10 {
            let r = s
                .request(query("SELECT * FROM wide"))
                .and_then(|_| s.rows(vec![row.clone(); 50]));
            if let Err(e) = r.and_then(|()| h.flush().wait()) {
                refused = Some(e);
                break 'fill;
            }
        }
        let _ = s.end("done");
    }
    let err = refused.expect("the recorder refused once the disk was full");
    assert_eq!(err.sqlstate(), "53100", "{err}");
    assert!(err.to_string().contains("recording failed"), "{err}");
    let status = h.status();
    assert_eq!(status.state, "failing", "{status:?}");
    assert!(status.error.unwrap().contains("disk full"));
    // Nothing new is accepted while it fails.
    let attempt = h.begin(SessionStart {
        target: "local".into(),
        ..Default::default()
    });
    assert_eq!(attempt.err().map(|e| e.sqlstate()), Some("53100"));
    assert!(h.status().refused > 0);

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.status().state != "ok" {
        assert!(
            Instant::now() < deadline,
            "recording never resumed: {:?}",
            h.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = h
        .begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    s.request(query("SELECT 'after'")).unwrap();
    s.end("resumed").unwrap();
    h.flush().wait().unwrap();
    recorder.shutdown();
    let (code, text) = {
        let pubkey = env.pubkey();
        let out = cli(
            &mnt.join("recordings"),
            &["verify", "--pubkey", pubkey.to_str().unwrap()],
        );
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    assert_eq!(code, 0, "the log stays whole across the failure: {text}");
    let export = stdout(&cli(&mnt.join("recordings"), &["export"]));
    assert!(export.contains("SELECT 'after'"));
}

#[test]
fn a_full_queue_refuses_without_blocking_the_caller() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.max_queue_bytes = 64 << 10;
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let h = recorder.handle();
    let mut s = h
        .begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    let row: Row = vec![Some(Bytes(vec![b'x'; 16 << 10]))];
    let started = Instant::now();
    let mut refused = None;
    for _ in 0..10_000 {
        if let Err(e) = s.rows(vec![row.clone(); 4]) {
            refused = Some(e);
            break;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(refused, Some(RecordError::Overloaded));
    assert_eq!(RecordError::Overloaded.sqlstate(), "53100");
    assert!(h.status().refused >= 1);
    drop(s);
    recorder.shutdown();
}

#[test]
fn the_cli_finds_recordings_and_key_through_config_and_state_dir() {
    let env = Env::new();
    let recorder = Recorder::start(&env.config(), &env.state).unwrap();
    let handle = recorder.handle();
    let mut s = handle
        .begin(SessionStart {
            agent: Some("found-by-config".into()),
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    s.request(query("SELECT 1")).unwrap();
    s.end("done").unwrap();
    recorder.shutdown();

    // The gateway's own config names the state dir; the CLI reads it like `serve` does.
    let config = env.state.join("portcullis.toml");
    std::fs::write(
        &config,
        format!("[gateway]\nstate_dir = \"{}\"\n", env.state.display()),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("recordings")
            .args(args)
            .env_remove("PORTCULLIS_RECORDINGS_DIR")
            .output()
            .unwrap()
    };
    let by_config = stdout(&run(&["--config", config.to_str().unwrap(), "list"]));
    assert!(by_config.contains("found-by-config"), "{by_config}");
    let state = env.state.to_str().unwrap();
    let by_state = stdout(&run(&["list", "--state-dir", state]));
    assert!(by_state.contains("found-by-config"), "{by_state}");
    // verify finds the public key where the config keeps it, with no --pubkey.
    let verified = stdout(&run(&["--config", config.to_str().unwrap(), "verify"]));
    assert!(verified.starts_with("OK:"), "{verified}");

    // A recording directory elsewhere, named in [recording]: found there, not under state_dir.
    let moved = env.state.join("elsewhere");
    std::fs::rename(env.dir(), &moved).unwrap();
    std::fs::write(
        &config,
        format!(
            "[gateway]\nstate_dir = \"{state}\"\n\n[recording]\ndir = \"{}\"\n",
            moved.display()
        ),
    )
    .unwrap();
    let moved_list = stdout(&run(&["--config", config.to_str().unwrap(), "list"]));
    assert!(moved_list.contains("found-by-config"), "{moved_list}");
    let missing = run(&["list", "--state-dir", state]);
    assert!(
        !missing.status.success(),
        "nothing left under the state dir"
    );
}

/// What this test process logs (the recorder's warnings come from its shipper thread).
fn captured_log() -> String {
    static LOG: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    let log = LOG.get_or_init(|| {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        log
    });
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records `sessions` sessions, each ended (and so checkpointed), then shuts the recorder down;
/// returns how many checkpoints it signed and its state.
fn record_sessions(env: &Env, cfg: &RecordingConfig, sessions: usize) -> (u64, String) {
    let recorder = Recorder::start(cfg, &env.state).unwrap();
    let handle = recorder.handle();
    for i in 0..sessions {
        let mut s = handle
            .begin(SessionStart {
                target: "local".into(),
                ..Default::default()
            })
            .unwrap();
        s.request(query(&format!("SELECT {i}"))).unwrap();
        s.complete("SELECT 1", 1, 2, Duration::ZERO).unwrap();
        s.end("done").unwrap();
        handle.flush().wait().expect("recording goes on");
    }
    recorder.shutdown();
    let status = handle.status();
    (status.checkpoints, status.state)
}

#[test]
fn ship_command_gets_every_signed_checkpoint_and_its_failures_are_logged_not_fatal() {
    captured_log();
    // A command that keeps what it is given, one file per run.
    let env = Env::new();
    let shipped = env.state.join("shipped");
    std::fs::create_dir_all(&shipped).unwrap();
    let mut cfg = env.config();
    cfg.ship_command = vec![
        "sh".into(),
        "-c".into(),
        format!("cat > \"$(mktemp -p {} note.XXXXXX)\"", shipped.display()),
    ];
    let (checkpoints, state) = record_sessions(&env, &cfg, 4);
    assert_eq!(state, "ok");
    // One per session's end at least, and the shutdown's.
    assert!(checkpoints >= 4, "{checkpoints}");
    let verifiers = checkpoint::Verifier::read_file(&env.pubkey()).unwrap();
    let mut sizes = Vec::new();
    for e in std::fs::read_dir(&shipped).unwrap() {
        let path = e.unwrap().path();
        let note = std::fs::read_to_string(&path).unwrap();
        // A C2SP signed note: origin, tree size, root hash, a blank line, "— origin signature".
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(lines[0], "test/portcullis", "{note}");
        assert_eq!(lines[3], "", "{note}");
        assert!(lines[4].starts_with("\u{2014} test/portcullis "), "{note}");
        let cp = checkpoint::open_checkpoint(&note, &verifiers)
            .unwrap_or_else(|e| panic!("{e}: {note}"));
        sizes.push(cp.size);
        let (code, text) = env.verify(&["--checkpoint", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{text}");
    }
    assert_eq!(
        sizes.len() as u64,
        checkpoints,
        "each checkpoint shipped once: {sizes:?}"
    );
    // Each session's end among them.
    sizes.sort_unstable();
    sizes.dedup();
    assert!(sizes.len() >= 4, "{sizes:?}");

    // A command that cannot start, one that fails, one that never ends: each is logged, and
    // every session is still recorded and verifies.
    for (argv, expect) in [
        (vec!["/nonexistent/portcullis-ship"], "No such file"),
        (vec!["sh", "-c", "exit 7"], "exit status: 7"),
        (vec!["sleep", "30"], "was killed"),
    ] {
        let argv: Vec<String> = argv.into_iter().map(str::to_owned).collect();
        let env = Env::new();
        let mut cfg = env.config();
        cfg.ship_command = argv.clone();
        cfg.ship_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let (checkpoints, state) = record_sessions(&env, &cfg, 3);
        assert_eq!(state, "ok", "{argv:?}");
        assert!(checkpoints >= 3, "{argv:?}: {checkpoints}");
        // A stuck command is killed, and the newest checkpoint goes next: the shutdown does not
        // wait for each one in turn.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{argv:?}: {:?}",
            started.elapsed()
        );
        let list = stdout(&env.cli(&["list", "--json"]));
        assert_eq!(list.matches("\"id\"").count(), 3, "{argv:?}: {list}");
        let (code, text) = env.verify(&[]);
        assert_eq!(code, 0, "{argv:?}: {text}");
        let program = &argv[0];
        let log = captured_log();
        let said = log
            .lines()
            .filter(|l| l.contains("checkpoint ship command") && l.contains(program.as_str()))
            .find(|l| l.contains(expect) && l.contains("recording goes on"));
        assert!(
            said.is_some(),
            "{argv:?} not logged with {expect:?}:\n{log}"
        );
    }
}

/// Polls `cond` on the recorder's status for up to ten seconds.
fn wait_status(h: &RecorderHandle, what: &str, cond: impl Fn(&RecorderStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = h.status();
        if cond(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A recorder with `sync_interval` (and `strict`), its status once started, and a session.
fn syncing_every(
    sync_interval: Duration,
    strict: bool,
) -> (Env, Recorder, RecorderStatus, SessionRecorder) {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.sync_interval = sync_interval;
    cfg.strict = strict;
    cfg.checkpoint_records = 3;
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let before = recorder.handle().status();
    let session = recorder
        .handle()
        .begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        })
        .unwrap();
    (env, recorder, before, session)
}

#[test]
fn a_group_commit_writes_at_once_and_syncs_at_sync_interval_or_for_whoever_waits() {
    let (env, recorder, before, mut s) = syncing_every(Duration::from_secs(3600), false);
    let h = recorder.handle();
    // A checkpoint after every 3 records: the session's start, this request and the next.
    s.request(query("SELECT 'written'")).unwrap();
    s.request(query("SELECT 'and again'")).unwrap();
    // The group commit writes the session and its end's checkpoint to the segment, where a
    // crash of the gateway cannot take them...
    let deadline = Instant::now() + Duration::from_secs(10);
    let newest = list_segments(&env.dir()).unwrap().last().unwrap().1.clone();
    loop {
        let seg = Segment::open(&newest).unwrap();
        let (blocks, damage) = seg.blocks();
        if damage.is_none() && blocks.iter().any(|b| b.is_checkpoint && b.first_seq > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "never written: {damage:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...but does not sync them, and the checkpoint does not leave the host (log, ship
    // command) before what it covers is on disk: a power cut could otherwise leave a shipped
    // checkpoint ahead of the log.
    let written = h.status();
    assert_eq!(written.syncs, before.syncs, "synced before sync_interval");
    assert_eq!(written.checkpoints, before.checkpoints, "{written:?}");

    // Whoever waits for durability gets a sync at once: a flush...
    h.flush().wait().unwrap();
    let flushed = h.status();
    assert_eq!(flushed.syncs, before.syncs + 1, "{flushed:?}");
    assert_eq!(flushed.checkpoints, before.checkpoints + 1, "{flushed:?}");
    // ...and a session's end, so that `list` shows it done.
    s.end("done").unwrap();
    wait_status(&h, "a session's end synced", |st| st.syncs > flushed.syncs);
    recorder.shutdown();
    assert_eq!(env.verify(&[]).0, 0);

    // ...and strict mode's statement, which runs only once its request is on disk.
    let (_env, recorder, before, mut s) = syncing_every(Duration::from_secs(3600), true);
    let h = recorder.handle();
    s.request(query("SELECT 'strict'")).unwrap().wait().unwrap();
    assert_eq!(h.status().syncs, before.syncs + 1);
    s.end("done").unwrap();
    recorder.shutdown();

    // Nobody waiting: the sync comes at sync_interval, and the checkpoint leaves with it.
    let (env, recorder, before, mut s) = syncing_every(Duration::from_millis(50), false);
    let h = recorder.handle();
    s.request(query("SELECT 'later'")).unwrap();
    s.request(query("SELECT 'and later'")).unwrap();
    wait_status(&h, "synced at sync_interval", |st| {
        st.syncs > before.syncs && st.checkpoints > before.checkpoints
    });
    s.end("done").unwrap();
    recorder.shutdown();
    assert_eq!(env.verify(&[]).0, 0);
}

#[test]
fn records_written_and_not_yet_synced_outlive_a_failed_write_in_a_new_segment() {
    let Some(disk) = SmallDisk::mount(
        "records_written_and_not_yet_synced_outlive_a_failed_write_in_a_new_segment",
    ) else {
        return;
    };
    let (env, mnt, filler) = (&disk.env, disk.mnt.clone(), disk.filler.clone());
    let mut cfg = env.config();
    cfg.dir = Some(mnt.join("recordings"));
    cfg.zstd_level = -7;
    // Nothing syncs before the disk is full, and the segment has room to grow (the default 64
    // MiB): the write that fails cuts blocks that were written and never synced, which must
    // reach the next segment rather than be lost.
    cfg.sync_interval = Duration::from_secs(3600);
    let recorder = Recorder::start(&cfg, &env.state).unwrap();
    let h = recorder.handle();
    // Random values, so that the disk fills in a few dozen statements rather than after
    // thousands that compress to nothing.
    let rows = || -> Vec<Row> {
        (0..50)
            .map(|_| {
                (0..8)
                    .map(|_| Some(Bytes((0..64).map(|_| rand::random::<u8>()).collect())))
                    .collect()
            })
            .collect()
    };
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    'fill: while Instant::now() < deadline {
        let Ok(mut s) = h.begin(SessionStart {
            target: "local".into(),
            ..Default::default()
        }) else {
            break;
        };
        for _ in 0..10 {
            let n = accepted.len();
            let r = s
                .request(query(&format!("SELECT 'r{n}'")))
                .and_then(|_| s.rows(rows()));
            if r.is_err() {
                break 'fill;
            }
            accepted.push(n);
            // Paced so that group commits, not the queue's bound, meet the full disk.
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = s.end("done");
    }
    let failing = h.status();
    assert_eq!(failing.state, "failing", "{failing:?}");
    assert!(failing.error.unwrap().contains("disk full"));
    assert!(accepted.len() > 20, "{}", accepted.len());

    std::fs::remove_file(&filler).unwrap();
    wait_status(&h, "recording resumed", |st| st.state == "ok");
    h.flush().wait().unwrap();
    recorder.shutdown();
    let pubkey = env.pubkey();
    let out = cli(
        &mnt.join("recordings"),
        &["verify", "--pubkey", pubkey.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let export = stdout(&cli(&mnt.join("recordings"), &["export"]));
    let lost: Vec<_> = accepted
        .iter()
        .filter(|n| !export.contains(&format!("SELECT 'r{n}'")))
        .collect();
    assert!(lost.is_empty(), "accepted and lost: {lost:?}");
}

#[test]
fn a_zero_filled_tail_left_by_a_power_cut_is_cut_like_a_torn_write_and_zeroed_blocks_are_not() {
    let env = Env::new();
    let (_, state) = record_sessions(&env, &env.config(), 3);
    assert_eq!(state, "ok");
    let segs = list_segments(&env.dir()).unwrap();
    let last = segs.last().unwrap().1.clone();
    let whole = std::fs::read(&last).unwrap();

    // A file system without a journal may keep a file's new size and not the data written
    // into it: the tail reads as zeros. That is a write that never finished.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0; 4096]).unwrap();
    drop(f);
    let Some(segment::Damage::Torn { offset }) = Segment::open(&last).unwrap().blocks().1 else {
        panic!("a zero-filled tail should read as torn");
    };
    assert_eq!(offset, whole.len() as u64);
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 0, "{text}");
    env.restart_records_the_recovery(&last, &format!("{offset} 4096"));

    // Zeros over a block that other blocks follow hide records: that is tampering, not a cut.
    let (off, len, _) = *block_spans(&last)
        .iter()
        .find(|s| !s.2)
        .expect("a record block");
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[off..off + len].fill(0);
    std::fs::write(&last, &bytes).unwrap();
    assert!(matches!(
        Segment::open(&last).unwrap().blocks().1,
        Some(segment::Damage::Corrupt { .. })
    ));
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("TAMPERED"), "{text}");
}

/// Rewrites the first record (anywhere in the log) that `edit` changes, re-framing it and
/// re-encoding its block so that every CRC fits: what an agent with write access to the
/// directory would do. True when a record was changed.
fn rewrite_a_record(env: &Env, edit: impl Fn(&mut Entry) -> bool) -> bool {
    for (_, path) in list_segments(&env.dir()).unwrap() {
        let seg = Segment::open(&path).unwrap();
        let (blocks, _) = seg.blocks();
        for block in blocks.iter().filter(|b| !b.is_checkpoint) {
            let mut raw = Vec::new();
            let mut changed = false;
            for payload in block.records().unwrap() {
                let mut entry: Entry = postcard::from_bytes(&payload).unwrap();
                if !changed && edit(&mut entry) {
                    changed = true;
                    segment::frame_record(&mut raw, &postcard::to_stdvec(&entry).unwrap());
                } else {
                    segment::frame_record(&mut raw, &payload);
                }
            }
            if !changed {
                continue;
            }
            let forged = segment::encode_block(
                &mut zstd::bulk::Compressor::new(1).unwrap(),
                &raw,
                block.first_seq,
                block.count,
                block.last_at_us,
            )
            .unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.splice(block.offset as usize..block.end() as usize, forged);
            drop(blocks);
            drop(seg);
            std::fs::write(&path, &bytes).unwrap();
            return true;
        }
    }
    false
}

#[test]
fn a_statements_records_handed_over_together_are_one_leaf_read_back_one_by_one() {
    let env = Env::new();
    let recorder = Recorder::start(&env.config(), &env.state).unwrap();
    let h = recorder.handle();
    let mut s = h.begin(SessionStart::default()).unwrap();
    // As the gate and the response tap hand them over: the request with its verdict, then the
    // result of one write to the client.
    s.hold();
    s.request(query("SELECT email FROM customers")).unwrap();
    s.verdict(Verdict::allow(Some("default/read".into())))
        .unwrap();
    s.hand_over().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let mut batch = s.batch();
    batch
        .columns(vec![Column {
            name: "email".into(),
            type_oid: 25,
            format: 0,
        }])
        .unwrap();
    batch.rows(vec![vec![b("a***@example.com")]]).unwrap();
    batch
        .complete("SELECT 1", 30, 60, Duration::from_micros(900))
        .unwrap();
    drop(batch);
    let id = s.id();
    s.end("done").unwrap();
    h.flush().wait().unwrap();
    // The session's start, the request and verdict, the result, the end: four leaves.
    assert_eq!(h.status().records, 4, "{:?}", h.status());
    recorder.shutdown();
    assert_eq!(env.verify(&[]).0, 0);

    // Every record reads back on its own, with its own time; the bundled ones share a seq.
    let (out, mut lines) = export_jsonl(&env);
    lines.retain(|l| l["session"] == id);
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| {
            let r = &l["record"];
            r.as_object()
                .map_or(r.to_string(), |o| o.keys().next().unwrap().clone())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "session_start",
            "request",
            "verdict",
            "columns",
            "rows",
            "complete",
            "session_end"
        ],
        "{out}"
    );
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs[1], seqs[2], "{seqs:?}");
    assert_eq!(seqs[3..6], [seqs[3]; 3], "{seqs:?}");
    assert_eq!(seqs[6], seqs[3] + 1, "{seqs:?}");
    let times: Vec<i64> = lines.iter().map(|l| l["at_us"].as_i64().unwrap()).collect();
    assert!(
        times[3] >= times[2] + 3000,
        "each record keeps its own time: {times:?}"
    );
    let show = stdout(&env.cli(&["show", &id.to_string()]));
    assert!(
        show.contains("a***@example.com") && show.contains("(1 row)"),
        "{show}"
    );

    // A bundled value edited back to what the mask hid, every CRC made to fit: caught.
    let edited = clone_env(&env);
    assert!(rewrite_a_record(&edited, |e| match &mut e.record {
        Record::Bundle(records) => records.iter_mut().any(|r| match &mut r.record {
            Record::Rows(rows) => {
                rows[0][0] = b("alice@example.com");
                true
            }
            _ => false,
        }),
        _ => false,
    }));
    let (code, text) = edited.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("TAMPERED"), "{text}");

    // The verdict moved in front of its request inside the bundle: caught too.
    let reordered = clone_env(&env);
    assert!(rewrite_a_record(&reordered, |e| match &mut e.record {
        Record::Bundle(records) if matches!(records[0].record, Record::Request(_)) => {
            records.swap(0, 1);
            true
        }
        _ => false,
    }));
    let (code, text) = reordered.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("TAMPERED"), "{text}");
}

/// A session that ends, or is dropped, between `hold` and `hand_over` (a statement cut off by
/// its connection's end) still records what it held, its end after it, and leaves nothing
/// counted against the queue's bound.
#[test]
fn a_session_ended_or_dropped_inside_a_hold_records_what_it_held_and_its_end() {
    let env = Env::new();
    let recorder = Recorder::start(&env.config(), &env.state).unwrap();
    let h = recorder.handle();
    let mut ended = h.begin(SessionStart::default()).unwrap();
    ended.hold();
    ended.request(query("SELECT 'held then ended'")).unwrap();
    let ended_id = ended.id();
    ended.end("client gone").unwrap();
    let mut dropped = h.begin(SessionStart::default()).unwrap();
    dropped.hold();
    dropped
        .request(query("SELECT 'held then dropped'"))
        .unwrap();
    let dropped_id = dropped.id();
    drop(dropped);
    h.flush().wait().unwrap();
    assert_eq!(h.status().queued_bytes, 0, "{:?}", h.status());
    recorder.shutdown();

    let (out, lines) = export_jsonl(&env);
    for (id, text, reason) in [
        (ended_id, "held then ended", "client gone"),
        (dropped_id, "held then dropped", "session dropped"),
    ] {
        let records: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["session"] == id)
            .map(|l| &l["record"])
            .collect();
        assert_eq!(records.len(), 3, "session {id}: {out}");
        assert!(records[1].to_string().contains(text), "{out}");
        assert_eq!(records[2]["session_end"]["reason"], reason, "{out}");
    }
}

/// A crash right after the recorder created a segment can leave its header cut anywhere, even
/// inside its length field. That is a header never written: the readers and the recorder's
/// restart must treat it so, rather than fail (they panicked on a cut between 8 and 11 bytes).
#[test]
fn a_segment_header_cut_inside_its_length_field_is_a_header_never_written() {
    let env = Env::new();
    let (_, state) = record_sessions(&env, &env.config(), 2);
    assert_eq!(state, "ok");
    let (number, last) = list_segments(&env.dir()).unwrap().pop().unwrap();
    let whole = std::fs::read(&last).unwrap();
    let next = segment::segment_path(&env.dir(), number + 1);
    for cut in [8, 10, 11] {
        std::fs::write(&next, &whole[..cut]).unwrap();
        let (code, text) = env.verify(&[]);
        assert_eq!(code, 0, "cut at {cut}: {text}");
        assert!(text.contains("header not written yet"), "{text}");
        let export = stdout(&env.cli(&["export", "--format", "jsonl"]));
        assert_eq!(export.lines().count(), 2 * 4, "cut at {cut}: {export}");
    }
    env.restart_records_the_recovery(&next, "0 11");
}

/// A record forged with a time past year 9999, every CRC recomputed: `verify` calls it
/// tampering, and `show` and `export` print what they read rather than abort.
#[test]
fn a_forged_time_past_year_9999_is_printed_not_a_crash() {
    let env = Env::new();
    let (_, state) = record_sessions(&env, &env.config(), 1);
    assert_eq!(state, "ok");
    let session = std::cell::Cell::new(0);
    assert!(rewrite_a_record(&env, |e| {
        session.set(e.session);
        e.at_us = i64::MAX;
        true
    }));
    let (code, text) = env.verify(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("TAMPERED"), "{text}");
    let forged = format!("{} µs after the epoch", i64::MAX);
    let jsonl = stdout(&env.cli(&["export", "--format", "jsonl"]));
    assert!(jsonl.contains(&forged), "{jsonl}");
    stdout(&env.cli(&["export", "--format", "ocsf"]));
    let show = stdout(&env.cli(&["show", &session.get().to_string()]));
    assert!(show.contains("SELECT 0"), "{show}");
}
