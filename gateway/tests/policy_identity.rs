//! Rules that select by who the agent is: `subjects`, `groups` and `actors` from the verified
//! token, beside `agents`; and `portcullis policy explain --subject --group --actor`.

use std::process::Command;

use portcullis::policy::{self, Action, ClassifyCache, Identity, Policy, Request, TargetRef};

const WHO: &str = r#"
name = "who"
default_action = "block"

[[rules]]
name = "no-agent-for-alice-writes"
subjects = ["alice@example.com"]
actors = ["agent-*"]
kinds = ["write"]
action = "approve"
reason = "an agent writing for alice needs a human"

[[rules]]
name = "contractors-read-only"
subjects = ["*@contractor.example"]
kinds = ["write", "ddl"]
action = "block"

[[rules]]
name = "dba-anything"
groups = ["dba"]
action = "allow"

[[rules]]
name = "people-write"
subjects = ["*@example.com", "*@contractor.example"]
kinds = ["read", "write"]
action = "allow"
"#;

fn who() -> Policy {
    policy::load_str(WHO, "who.toml", None).expect("policy compiles")
}

fn decide(subject: Option<&str>, groups: &[&str], actors: &[&str], sql: &str) -> (Action, String) {
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let actors: Vec<String> = actors.iter().map(|a| a.to_string()).collect();
    let id = Identity {
        agent: Some("claude"),
        groups: &groups,
        subject,
        actors: &actors,
    };
    let target = TargetRef {
        name: "prod",
        database: "app",
    };
    let v = who().decide(
        &id,
        &target,
        &Request::Query(sql),
        &mut ClassifyCache::new(8),
    );
    (v.action, v.rule.to_string())
}

const WRITE: &str = "UPDATE orders SET state = 'paid' WHERE id = 1";

#[test]
fn subjects_and_actors_select_rules() {
    use Action::*;
    let r = |a, rule: &str| (a, rule.to_owned());
    assert_eq!(
        decide(Some("alice@example.com"), &[], &[], WRITE),
        r(Allow, "people-write"),
        "alice herself"
    );
    assert_eq!(
        decide(Some("alice@example.com"), &[], &["agent-7"], WRITE),
        r(Approve, "no-agent-for-alice-writes"),
        "an agent acting for alice"
    );
    assert_eq!(
        decide(
            Some("alice@example.com"),
            &[],
            &["orchestrator", "agent-7"],
            WRITE
        ),
        r(Approve, "no-agent-for-alice-writes"),
        "any actor of the chain matches"
    );
    assert_eq!(
        decide(Some("bob@contractor.example"), &["dba"], &[], WRITE),
        r(Block, "contractors-read-only"),
        "rule order: the contractor block comes before the dba allow"
    );
    assert_eq!(
        decide(Some("bob@contractor.example"), &[], &[], "SELECT 1"),
        r(Allow, "people-write")
    );
    assert_eq!(
        decide(
            Some("carol@elsewhere.example"),
            &["dba"],
            &[],
            "DROP TABLE t"
        ),
        r(Allow, "dba-anything")
    );
}

#[test]
fn a_connection_without_a_verified_identity_matches_no_subject_or_actor_rule() {
    use Action::*;
    assert_eq!(
        decide(None, &[], &[], WRITE),
        (Block, "default_action".to_owned())
    );
    // An actor rule never matches an undelegated session, whatever its subject.
    assert_eq!(
        decide(Some("alice@example.com"), &[], &[], WRITE).1,
        "people-write"
    );
}

#[test]
fn bad_subject_and_actor_patterns_name_the_key() {
    for key in ["subjects", "actors"] {
        let text = format!("[[rules]]\naction = \"allow\"\n{key} = [\"a[b]\"]\n");
        let e = policy::load_str(&text, "p.toml", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("key `rules[0].{key}`")), "{e}");
    }
}

fn portcullis(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_explain_takes_subject_group_and_actor() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("who.toml");
    std::fs::write(&file, WHO).unwrap();
    let file = file.to_str().unwrap();
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "policy", "explain", "--target", "prod", "--policy", file, "--json",
        ];
        args.extend_from_slice(extra);
        args.push(WRITE);
        let (ok, out, err) = portcullis(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        (
            v["action"].as_str().unwrap().to_owned(),
            v["rule"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        explain(&["--subject", "alice@example.com", "--actor", "agent-7"]),
        ("approve".into(), "no-agent-for-alice-writes".into())
    );
    assert_eq!(
        explain(&["--subject", "alice@example.com"]),
        ("allow".into(), "people-write".into())
    );
    assert_eq!(
        explain(&["--subject", "x@else.example", "--group", "dba"]),
        ("allow".into(), "dba-anything".into())
    );
    assert_eq!(explain(&[]), ("block".into(), "default_action".into()));
}
