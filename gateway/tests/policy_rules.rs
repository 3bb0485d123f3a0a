//! Rule selection (agent, groups, target, database, kinds, risks, objects), first-match order,
//! the `unparsable` and `default_action` settings, and `policy check` errors with file:line:column.

use std::process::Command;

use portcullis::policy::{
    self, Action, ClassifyCache, Identity, Policy, PolicyError, Request, TargetRef,
};

const TEAM: &str = r#"
name = "team"
default_action = "block"
allowed_procedures = ["public.refresh_*", "refresh_*"]

[[rules]]
name = "secrets"
touches = ["public.secrets", "vault.*"]
action = "block"
reason = "secrets are off limits"

[[rules]]
name = "ops-writes"
agents = ["ops-*"]
kinds = ["write"]
action = "allow"

[[rules]]
name = "oncall-writes"
groups = "oncall"
kinds = "write"
action = "allow"

[[rules]]
name = "staging"
targets = ["staging-*"]
kinds = ["write", "ddl"]
action = "allow"

[[rules]]
name = "jobs"
objects = ["public.jobs", "public.job_*"]
kinds = ["write"]
action = "allow"

[[rules]]
name = "analytics-only"
databases = ["analytics"]
kinds = ["read"]
action = "allow"

[[rules]]
name = "calls"
risks = ["call"]
action = "block"

[[rules]]
name = "writes"
kinds = ["write"]
action = "approve"

[[rules]]
name = "reads"
kinds = ["read", "session"]
databases = ["app"]
action = "allow"
"#;

fn team() -> Policy {
    policy::load_str(TEAM, "team.toml", None).expect("team policy compiles")
}

fn decide(
    p: &Policy,
    agent: Option<&str>,
    groups: &[&str],
    target: &str,
    db: &str,
    sql: &str,
) -> (Action, String) {
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let id = Identity {
        agent,
        groups: &groups,
        ..Identity::default()
    };
    let target = TargetRef {
        name: target,
        database: db,
    };
    let v = p.decide(
        &id,
        &target,
        &Request::Query(sql),
        &mut ClassifyCache::new(8),
    );
    (v.action, v.rule.to_string())
}

fn r(a: Action, rule: &str) -> (Action, String) {
    (a, rule.to_owned())
}

use Action::{Allow, Approve, Block};

#[test]
fn rules_select_by_agent_group_target_and_database() {
    let p = team();
    let write = "UPDATE t SET a = 1 WHERE id = 1";
    assert_eq!(
        decide(&p, Some("ops-bot"), &[], "prod", "app", write),
        r(Allow, "ops-writes")
    );
    assert_eq!(
        decide(&p, Some("claude"), &[], "prod", "app", write),
        r(Approve, "writes")
    );
    // An unattributed connection never matches an agent selector, not even "*".
    assert_eq!(
        decide(&p, None, &[], "prod", "app", write),
        r(Approve, "writes")
    );
    assert_eq!(
        decide(&p, Some("claude"), &["dev", "oncall"], "prod", "app", write),
        r(Allow, "oncall-writes")
    );
    assert_eq!(
        decide(&p, Some("claude"), &["dev"], "prod", "app", write),
        r(Approve, "writes")
    );
    assert_eq!(
        decide(&p, Some("claude"), &[], "staging-eu", "app", write),
        r(Allow, "staging")
    );
    assert_eq!(
        decide(
            &p,
            Some("claude"),
            &[],
            "staging-eu",
            "app",
            "CREATE TABLE x (a int)"
        ),
        r(Allow, "staging")
    );
    assert_eq!(
        decide(
            &p,
            Some("claude"),
            &[],
            "prod",
            "app",
            "CREATE TABLE x (a int)"
        ),
        r(Block, "default_action")
    );
    assert_eq!(
        decide(&p, Some("claude"), &[], "prod", "analytics", "SELECT 1"),
        r(Allow, "analytics-only")
    );
    assert_eq!(
        decide(&p, Some("claude"), &[], "prod", "app", "SELECT 1"),
        r(Allow, "reads")
    );
    // No rule for reads of another database: the default action decides.
    assert_eq!(
        decide(&p, Some("claude"), &[], "prod", "other", "SELECT 1"),
        r(Block, "default_action")
    );
}

#[test]
fn first_matching_rule_wins() {
    let p = team();
    // `secrets` comes before `ops-writes`: even ops bots cannot write secrets.
    assert_eq!(
        decide(
            &p,
            Some("ops-bot"),
            &[],
            "prod",
            "app",
            "DELETE FROM secrets WHERE id = 1"
        ),
        r(Block, "secrets")
    );
    assert_eq!(
        decide(
            &p,
            Some("ops-bot"),
            &[],
            "prod",
            "app",
            "SELECT * FROM vault.keys"
        ),
        r(Block, "secrets")
    );
    // A read touching a secret in a sub-select is caught too.
    assert_eq!(
        decide(
            &p,
            Some("claude"),
            &[],
            "prod",
            "app",
            "SELECT * FROM t WHERE id IN (SELECT id FROM secrets)"
        ),
        r(Block, "secrets")
    );
    let v = team().decide(
        &Identity {
            agent: Some("claude"),
            groups: &[],
            ..Identity::default()
        },
        &TargetRef {
            name: "prod",
            database: "app",
        },
        &Request::Query("SELECT * FROM secrets"),
        &mut ClassifyCache::new(1),
    );
    assert!(
        v.reason.starts_with("secrets are off limits: SELECT"),
        "{}",
        v.reason
    );
}

#[test]
fn objects_must_all_match_but_touches_needs_one() {
    let p = team();
    let a = |sql| decide(&p, Some("claude"), &[], "prod", "app", sql);
    assert_eq!(a("INSERT INTO jobs (a) VALUES (1)"), r(Allow, "jobs"));
    assert_eq!(
        a("UPDATE job_runs SET a = 1 WHERE id = 2"),
        r(Allow, "jobs")
    );
    // Writing jobs from another table is not covered by an `objects` allow.
    assert_eq!(
        a("INSERT INTO jobs SELECT * FROM users"),
        r(Approve, "writes")
    );
    assert_eq!(a("INSERT INTO other.jobs VALUES (1)"), r(Approve, "writes"));
}

#[test]
fn allowed_procedures_remove_the_call_risk() {
    let p = team();
    let a = |sql| decide(&p, Some("claude"), &[], "prod", "app", sql);
    assert_eq!(a("CALL refresh_stats()"), r(Approve, "writes"));
    assert_eq!(a("CALL public.refresh_stats()"), r(Approve, "writes"));
    assert_eq!(a("CALL transfer(1, 2)"), r(Block, "calls"));
    assert_eq!(a("CALL other.refresh_stats()"), r(Block, "calls"));
}

#[test]
fn unparsable_action_is_configurable() {
    for (setting, want) in [("block", Block), ("approve", Approve), ("allow", Allow)] {
        let p = policy::load_str(
            &format!(
                "unparsable = \"{setting}\"\n[[rules]]\nkinds = [\"read\"]\naction = \"allow\"\n"
            ),
            "u.toml",
            None,
        )
        .unwrap();
        assert_eq!(
            decide(&p, None, &[], "t", "d", "SELEKT 1"),
            r(want, "unparsable")
        );
        // The setting never loosens a parsable statement in the same request.
        assert_eq!(
            decide(&p, None, &[], "t", "d", "SELEKT 1; DROP TABLE t").0,
            Block
        );
    }
}

#[test]
fn an_empty_policy_blocks_everything_but_empty_queries() {
    let p = policy::load_str("", "empty.toml", None).unwrap();
    assert_eq!(p.name(), "policy");
    assert_eq!(
        decide(&p, None, &[], "t", "d", "SELECT 1"),
        r(Block, "default_action")
    );
    assert_eq!(decide(&p, None, &[], "t", "d", ""), r(Allow, "empty"));
    let v = p.decide(
        &Identity::default(),
        &TargetRef {
            name: "t",
            database: "d",
        },
        &Request::Query("SELECT 1"),
        &mut ClassifyCache::new(1),
    );
    assert!(
        v.reason.starts_with("no rule matched: SELECT"),
        "{}",
        v.reason
    );
}

fn error_of(text: &str) -> String {
    match policy::load_str(text, "p.toml", None) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_file_line_column_and_key() {
    let e = error_of(
        "[[rules]]\nkinds = [\"read\"]\naction = \"allow\"\n\n[[rules]]\nname = \"x\"\naction = \"bloc\"\n",
    );
    assert_eq!(
        e,
        "p.toml:7:10: key `rules[1].action`: unknown variant `bloc`, expected one of `allow`, `approve`, `block`"
    );
    let e = error_of("name = \"x\"\nfrobnicate = 1\n");
    assert!(
        e.starts_with("p.toml:2:1: key `frobnicate`: unknown field `frobnicate`"),
        "{e}"
    );
    let e = error_of("[[rules]]\naction = \"allow\"\nagent = \"x\"\n");
    assert!(
        e.starts_with("p.toml:3:1: key `rules[0].agent`: unknown field `agent`"),
        "{e}"
    );
    let e = error_of("[[rules]]\naction = \"allow\"\nkinds = [\"read\", \"wirte\"]\n");
    assert!(
        e.starts_with("p.toml:3:9: key `rules[0].kinds`: unknown variant `wirte`"),
        "{e}"
    );
    let e = error_of("[[rules]]\naction = \"allow\"\nrisks = \"droop\"\n");
    assert!(
        e.starts_with("p.toml:3:9: key `rules[0].risks`: unknown variant `droop`"),
        "{e}"
    );
    let e = error_of("[[rules]]\naction = \"allow\"\nagents = [\"a[b]\"]\n");
    assert!(
        e.starts_with("p.toml:3:10: key `rules[0].agents`: pattern `a[b]`"),
        "{e}"
    );
    let e = error_of("[[rules]]\naction = \"allow\"\ntargets = []\n");
    assert!(
        e.starts_with("p.toml:3:11: key `rules[0].targets`: empty list never matches"),
        "{e}"
    );
    let e = error_of("approval_timeout = \"5 parsecs\"\n");
    assert!(
        e.starts_with("p.toml:1:20: key `approval_timeout`: invalid duration `5 parsecs`"),
        "{e}"
    );
    let e = error_of("approval_timeout = \"0s\"\n");
    assert!(
        e.starts_with("p.toml:1:20: key `approval_timeout`: must be longer than zero"),
        "{e}"
    );
    let e = error_of("mode = \"shadow\"\n");
    assert!(
        e.starts_with(
            "p.toml:1:8: key `mode`: unknown variant `shadow`, expected `enforce` or `observe`"
        ),
        "{e}"
    );
    let e = error_of("unparsable = \"ignore\"\n");
    assert!(e.starts_with("p.toml:1:14: key `unparsable`:"), "{e}");
    let e = error_of("mask = 1\n");
    assert!(
        e.starts_with("p.toml:1:8: key `mask`: invalid type: integer `1`"),
        "{e}"
    );
    let e = error_of(
        "[[rules]]\nname = \"r\"\naction = \"allow\"\n[[rules]]\nname = \"r\"\naction = \"block\"\n",
    );
    assert_eq!(
        e,
        "p.toml:4:1: key `rules[1].name`: rule name `r` is already used by rules[0]"
    );
    let e = error_of("\n[[rules]]\nkinds = [\"read\"]\n");
    assert!(
        e.starts_with("p.toml:2:1: key `rules[0]`: missing field `action`"),
        "{e}"
    );
    // Plain TOML syntax errors have a position but no key.
    let e = error_of("name = \"x\n");
    assert!(e.starts_with("p.toml:1:"), "{e}");
    assert!(!e.contains("key `"), "{e}");
}

#[test]
fn load_resolves_builtins_and_paths() {
    assert_eq!(policy::load("default").unwrap().source(), "builtin:default");
    assert!(matches!(
        policy::load("defualt"),
        Err(PolicyError::NotFound { .. })
    ));
    assert_eq!(
        policy::load("defualt").unwrap_err().to_string(),
        "no built-in policy `defualt` and no such file (built-ins: default, observe)"
    );
    assert!(matches!(
        policy::load("/nonexistent/p.toml"),
        Err(PolicyError::Io { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.toml");
    std::fs::write(&path, "[[rules]]\naction = \"allow\"\n").unwrap();
    let p = policy::load(path.to_str().unwrap()).unwrap();
    assert_eq!(p.name(), "mine");
    assert_eq!(p.source(), path.to_str().unwrap());
    // A file named like a built-in, given as a path, is the file.
    let default_file = dir.path().join("default.toml");
    std::fs::write(&default_file, "name = \"mine-default\"\n").unwrap();
    assert_eq!(
        policy::load(default_file.to_str().unwrap()).unwrap().name(),
        "mine-default"
    );
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
fn policy_check_cli_reports_errors_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rules]]\nkinds = [\"write\"]\naction = \"hold\"\n").unwrap();
    let (ok, _, err) = portcullis(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}:3:10: key `rules[0].action`: unknown variant `hold`",
            bad.display()
        )),
        "{err}"
    );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, TEAM).unwrap();
    let (ok, out, err) = portcullis(&["policy", "check", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ok: policy `team`, mode enforce, 9 rule(s)"),
        "{out}"
    );
    let shadowed = dir.path().join("shadowed.toml");
    std::fs::write(
        &shadowed,
        "[[rules]]\naction = \"allow\"\n[[rules]]\nkinds = [\"ddl\"]\naction = \"block\"\n",
    )
    .unwrap();
    let (ok, out, _) = portcullis(&["policy", "check", shadowed.to_str().unwrap()]);
    assert!(ok);
    assert!(out.contains("warning: rule `rules[0]` matches every statement: the 1 rule(s) after it are never used"), "{out}");
    let (ok, out, _) = portcullis(&["policy", "check", "observe"]);
    assert!(ok);
    assert!(out.contains("mode observe"), "{out}");
}

#[test]
fn policy_explain_cli_prints_verdict_rule_reason_and_class() {
    let (ok, out, err) = portcullis(&[
        "policy",
        "explain",
        "--agent",
        "claude",
        "--target",
        "prod",
        "SELECT 1; DROP TABLE app.users",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("verdict:     block"), "{out}");
    assert!(out.contains("rule:        no-ddl"), "{out}");
    assert!(
        out.contains("statement 2 of 2: DROP TABLE (ddl, drop) on app.users"),
        "{out}"
    );
    assert!(
        out.contains("statement 1: SELECT (read) -> allow (rule reads)"),
        "{out}"
    );

    let (ok, out, err) = portcullis(&[
        "policy",
        "explain",
        "--agent",
        "claude",
        "--target",
        "prod",
        "--database",
        "app",
        "--policy",
        "observe",
        "--json",
        "DELETE FROM t WHERE id = 1",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["action"], "allow");
    assert_eq!(v["shadow"], "approve");
    assert_eq!(v["rule"], "writes");
    assert_eq!(v["kind"], "write");
    assert_eq!(v["objects"][0], "public.t");
    assert_eq!(v["statements"][0]["command"], "DELETE");
    assert_eq!(v["fingerprint"].as_str().map(str::len), Some(16));

    let (ok, _, err) = portcullis(&[
        "policy", "explain", "--target", "prod", "--policy", "nope", "SELECT 1",
    ]);
    assert!(!ok);
    assert!(err.contains("no built-in policy `nope`"), "{err}");
}
