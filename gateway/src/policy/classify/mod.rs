//! SQL classification: what a statement is (kind), what makes it risky (risks) and what it touches
//! (objects). Pure: text in, [`Classification`] out, so it can be cached by statement text and
//! fuzzed without a database.
//!
//! The classifier parses with sqlparser's PostgreSQL dialect and walks the whole tree, so a risk
//! anywhere (a CTE that deletes, a dangerous function in a sub-select, the statement inside
//! `EXPLAIN ANALYZE`) marks the statement. Where sqlparser and PostgreSQL could read the same
//! text differently, the classifier refuses to guess: the statement is `unparsable` (denied by
//! default), or, for a few statements sqlparser cannot parse, classified by its leading keywords
//! with a verdict at least as strict as a full parse would give.
//!
//! Name resolution follows PostgreSQL: unquoted identifiers fold to lower case (ASCII only, as in
//! a UTF-8 database), quoted ones are taken exactly, so `PG_READ_FILE(..)` is `pg_read_file` but
//! `"PG_READ_FILE"(..)` is a different (user) function. A dangerous function is recognised
//! whatever its schema qualification (`pg_catalog.pg_read_file`, `app.pg_catalog.pg_read_file`,
//! `evil.pg_read_file`): only its last name part counts.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlparser::ast::{
    CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GrantObjects,
    Ident, ObjectName, ObjectNamePart, ObjectType, Query, Set, SetExpr, Statement, TableFactor,
    Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

mod cache;
mod fingerprint;
mod keywords;
mod shape;
pub(crate) use shape::numeric_shape_key;
mod split;
mod visitor;

pub use cache::{ClassifyCache, MAX_CACHED_TEXT};
use fingerprint::hash_text;
use split::classify_unguarded;

/// What a statement does, from least to most severe. A statement that nests others (a CTE with
/// `DELETE`, `EXPLAIN ANALYZE`, `CREATE TABLE .. AS`) takes the most severe kind it contains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `SELECT`, `SHOW`, `COPY .. TO STDOUT`, plain `EXPLAIN`, `FETCH`.
    Read,
    /// Transaction control, ordinary `SET`/`RESET`, `PREPARE`, `DEALLOCATE`, `DISCARD`, `LISTEN`.
    Session,
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`, `COPY .. FROM STDIN`, `CALL`, SQL-level
    /// `EXECUTE` (the prepared text is not visible), `LOCK`, `REFRESH MATERIALIZED VIEW`.
    Write,
    /// `CREATE`, `ALTER`, `DROP`, `COMMENT` of schema objects; `SELECT .. INTO`.
    Ddl,
    /// `GRANT`, `REVOKE`, roles and users.
    Dcl,
    /// `VACUUM`, `ANALYZE`, `CHECKPOINT`, `ALTER SYSTEM`, `LOAD`, `DO`, and anything unrecognised.
    Admin,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Read,
        Kind::Session,
        Kind::Write,
        Kind::Ddl,
        Kind::Dcl,
        Kind::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Session => "session",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Dcl => "dcl",
            Kind::Admin => "admin",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason for a rule to look twice at a statement, beyond its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Risk {
    /// The text could not be parsed (or could be read differently by PostgreSQL).
    Unparsable,
    /// `DELETE` whose `WHERE` is missing or references no column (`WHERE true`, `WHERE 1=1`).
    DeleteWithoutWhere,
    /// `UPDATE` whose `WHERE` is missing or references no column.
    UpdateWithoutWhere,
    Truncate,
    Drop,
    Alter,
    Grant,
    Revoke,
    /// `COPY .. TO PROGRAM` / `COPY .. FROM PROGRAM`: runs a shell command on the server.
    CopyProgram,
    /// `COPY` to or from a server-side file (`STDIN`/`STDOUT` are fine).
    CopyFile,
    /// A call to a function from [`DANGEROUS_FUNCTIONS`] / [`DANGEROUS_FUNCTION_PREFIXES`].
    DangerousFunction,
    /// `SET ROLE`, `SET role = ..`, `set_config('role', ..)`.
    SetRole,
    /// `SET SESSION AUTHORIZATION`, `set_config('session_authorization', ..)`.
    SetSessionAuthorization,
    /// A setting that changes how the server reads SQL text or bypasses triggers
    /// (see [`UNSAFE_SETTINGS`]), or `set_config` with a name that is not a literal.
    UnsafeSetting,
    /// `DO` block: arbitrary procedural code.
    DoBlock,
    /// `CALL` of a procedure. The policy removes this risk when every procedure called is in its
    /// `allowed_procedures` list, so rules see it only for unlisted procedures.
    Call,
    /// A FunctionCall protocol message (fast-path call by OID).
    FunctionCall,
    /// `SET ROLE NONE`, `RESET ROLE`, `RESET SESSION AUTHORIZATION`, `DISCARD ALL`: back to the
    /// login's own role. Harmless by itself; the gateway refuses it in sessions where it set a
    /// role for the session's identity (`[[target.role]]`).
    ResetRole,
}

impl Risk {
    pub const ALL: [Risk; 18] = [
        Risk::Unparsable,
        Risk::DeleteWithoutWhere,
        Risk::UpdateWithoutWhere,
        Risk::Truncate,
        Risk::Drop,
        Risk::Alter,
        Risk::Grant,
        Risk::Revoke,
        Risk::CopyProgram,
        Risk::CopyFile,
        Risk::DangerousFunction,
        Risk::SetRole,
        Risk::SetSessionAuthorization,
        Risk::UnsafeSetting,
        Risk::DoBlock,
        Risk::Call,
        Risk::FunctionCall,
        Risk::ResetRole,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Unparsable => "unparsable",
            Risk::DeleteWithoutWhere => "delete_without_where",
            Risk::UpdateWithoutWhere => "update_without_where",
            Risk::Truncate => "truncate",
            Risk::Drop => "drop",
            Risk::Alter => "alter",
            Risk::Grant => "grant",
            Risk::Revoke => "revoke",
            Risk::CopyProgram => "copy_program",
            Risk::CopyFile => "copy_file",
            Risk::DangerousFunction => "dangerous_function",
            Risk::SetRole => "set_role",
            Risk::SetSessionAuthorization => "set_session_authorization",
            Risk::UnsafeSetting => "unsafe_setting",
            Risk::DoBlock => "do_block",
            Risk::Call => "call",
            Risk::FunctionCall => "function_call",
            Risk::ResetRole => "reset_role",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Risk`]s as a bit set: matching a rule against it is one AND.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RiskSet(u32);

impl RiskSet {
    pub const EMPTY: RiskSet = RiskSet(0);

    pub fn with(self, r: Risk) -> RiskSet {
        RiskSet(self.0 | 1 << r as u8)
    }
    pub fn without(self, r: Risk) -> RiskSet {
        RiskSet(self.0 & !(1 << r as u8))
    }
    pub fn insert(&mut self, r: Risk) {
        *self = self.with(r);
    }
    pub fn contains(self, r: Risk) -> bool {
        self.0 & (1 << r as u8) != 0
    }
    pub fn intersects(self, other: RiskSet) -> bool {
        self.0 & other.0 != 0
    }
    pub fn union(self, other: RiskSet) -> RiskSet {
        RiskSet(self.0 | other.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Risk> {
        Risk::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

impl FromIterator<Risk> for RiskSet {
    fn from_iter<I: IntoIterator<Item = Risk>>(iter: I) -> Self {
        iter.into_iter().fold(RiskSet::EMPTY, RiskSet::with)
    }
}

impl fmt::Debug for RiskSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for RiskSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// Functions that read or write server files, run remote or dynamic SQL, signal other backends,
/// change server state, or change the session's identity. Matched on the resolved last name part.
pub const DANGEROUS_FUNCTIONS: &[&str] = &[
    // server files
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    // other backends and the server itself
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_log_backend_memory_contexts",
    "pg_import_system_collations",
    // SQL text executed out of sight of the classifier
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    // identity and settings (`set_config` with a literal, harmless setting name is let through)
    "set_config",
];

/// Name prefixes of dangerous function families.
pub const DANGEROUS_FUNCTION_PREFIXES: &[&str] = &[
    "pg_ls_",          // pg_ls_dir, pg_ls_logdir, pg_ls_waldir, pg_ls_tmpdir, ...
    "pg_file_",        // adminpack: pg_file_write, pg_file_rename, pg_file_unlink, ...
    "dblink",          // dblink, dblink_exec, dblink_connect(_u), dblink_send_query, ...
    "pg_stat_reset",   // pg_stat_reset, pg_stat_reset_shared, ...
    "pg_replication_", // pg_replication_origin_*, pg_replication_slot_advance
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_",    // pg_copy_physical_replication_slot, pg_copy_logical_replication_slot
    "pg_logical_", // pg_logical_slot_get_changes, pg_logical_emit_message, ...
];

/// Functions that modify data although they are called from a `SELECT`: the statement is a write.
pub const WRITE_FUNCTIONS: &[&str] = &[
    "setval",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
];

/// Settings whose change is a risk (`unsafe_setting`) unless set to the listed safe values:
/// `standard_conforming_strings = off` and a client encoding other than UTF-8 make PostgreSQL read
/// quotes and backslashes differently from the classifier (the `'a\''; DROP ..` smuggling trick);
/// `session_replication_role` disables triggers and foreign keys.
pub const UNSAFE_SETTINGS: &[(&str, &[&str])] = &[
    (
        "standard_conforming_strings",
        &["on", "true", "yes", "1", "default"],
    ),
    ("client_encoding", &["utf8", "utf-8", "unicode", "default"]),
    ("session_replication_role", &["origin", "default"]),
];

/// One statement's class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatementClass {
    /// The top-level command, e.g. `SELECT`, `DELETE`, `DROP TABLE`, `COPY`.
    pub command: &'static str,
    pub kind: Kind,
    pub risks: RiskSet,
    /// Relations touched, as `schema.table` (unqualified names are taken as `public.name`, or
    /// `pg_catalog.name` for `pg_*`; CTE names are not relations). Sorted, without duplicates.
    pub objects: Vec<String>,
    /// Dangerous functions called (resolved names, as PostgreSQL would look them up).
    pub functions: Vec<String>,
    /// Procedures named by `CALL` (resolved, as written: `schema.name` or `name`).
    pub procedures: Vec<String>,
    /// Why the statement is unparsable, for `policy explain` (never sent to clients: the parser's
    /// message can quote the statement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
    /// Set when the class depends on a literal's value (`SET x = off`, `set_config('x', ..)`,
    /// `EXPLAIN (ANALYZE off)`): such statements are cached by exact text, never by shape.
    #[serde(skip)]
    reads_literals: bool,
    /// [`StatementClass::describe`], built once when classified so verdicts on cached statements
    /// do not format it again.
    #[serde(skip)]
    summary: String,
}

impl StatementClass {
    fn new(command: &'static str, kind: Kind) -> Self {
        StatementClass {
            command,
            kind,
            risks: RiskSet::EMPTY,
            objects: Vec::new(),
            functions: Vec::new(),
            procedures: Vec::new(),
            parse_error: None,
            reads_literals: false,
            summary: String::new(),
        }
    }

    /// The class of a FunctionCall message.
    pub(super) fn function_call(oid: u32) -> Self {
        let mut c = StatementClass::new("FUNCTION CALL", Kind::Admin);
        c.risks.insert(Risk::FunctionCall);
        c.functions.push(format!("oid:{oid}"));
        c.finish()
    }

    /// The class of an HTTP request: nothing policy can inspect yet.
    pub(super) fn http() -> Self {
        StatementClass::new("HTTP", Kind::Admin).finish()
    }

    /// Fills in the summary; every constructor path ends here.
    fn finish(mut self) -> Self {
        self.summary = self.summarize();
        self
    }

    fn unparsable(error: String) -> Self {
        let mut c = StatementClass::new("UNPARSABLE", Kind::Admin);
        c.risks.insert(Risk::Unparsable);
        c.parse_error = Some(error);
        c.finish()
    }

    /// A short description for verdict reasons and logs, e.g. `DROP TABLE (ddl, drop) on public.t`;
    /// never includes literals.
    pub fn describe(&self) -> &str {
        &self.summary
    }

    fn summarize(&self) -> String {
        let mut s = format!("{} ({}", self.command, self.kind);
        for r in self.risks.iter() {
            s.push_str(", ");
            s.push_str(r.as_str());
        }
        s.push(')');
        if !self.functions.is_empty() {
            s.push_str(" calling ");
            s.push_str(&self.functions.join(", "));
        }
        if !self.procedures.is_empty() {
            s.push_str(" of ");
            s.push_str(&self.procedures.join(", "));
        }
        if !self.objects.is_empty() {
            s.push_str(" on ");
            s.push_str(&self.objects.join(", "));
        }
        s
    }
}

/// The class of one request text: every statement in it, and its fingerprint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Classification {
    pub statements: Vec<StatementClass>,
    /// Hash of the normalized token stream (comments and whitespace dropped, unquoted words lower
    /// case, literals and `$n` parameters replaced by `?`): `DELETE FROM t WHERE id = 5` and
    /// `delete from t where id = $1` share it. Stable across runs and builds (SHA-256 based), so it
    /// can scope approval grants stored on disk.
    #[serde(serialize_with = "serialize_fingerprint")]
    pub fingerprint: u64,
}

fn serialize_fingerprint<S: serde::Serializer>(fp: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{fp:016x}"))
}

impl Classification {
    /// True when every text of the same shape (the same tokens, other literal values) has this
    /// class: every statement parsed and none depends on a literal's value.
    fn holds_for_shape(&self) -> bool {
        self.statements
            .iter()
            .all(|s| !s.reads_literals && !s.risks.contains(Risk::Unparsable))
    }

    /// The most severe kind of any statement (`Read` for an empty query).
    pub fn kind(&self) -> Kind {
        self.statements
            .iter()
            .map(|s| s.kind)
            .max()
            .unwrap_or(Kind::Read)
    }

    /// Every risk of every statement.
    pub fn risks(&self) -> RiskSet {
        self.statements
            .iter()
            .fold(RiskSet::EMPTY, |a, s| a.union(s.risks))
    }

    /// Every object touched, sorted, without duplicates.
    pub fn objects(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .statements
            .iter()
            .flat_map(|s| s.objects.iter().map(String::as_str))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Classifies a request text (one or many statements). Never fails: what cannot be classified is
/// `unparsable`.
pub fn classify(sql: &str) -> Classification {
    // The parser is third-party code on hostile input: should it panic, the statement is
    // unparsable (denied by default) and the worker thread lives on.
    std::panic::catch_unwind(|| classify_unguarded(sql)).unwrap_or_else(|_| Classification {
        statements: vec![StatementClass::unparsable(
            "the SQL parser failed on this text".into(),
        )],
        fingerprint: hash_text(sql),
    })
}

#[cfg(test)]
mod tests {
    use super::shape::shape_key;
    use super::*;

    fn shape(sql: &str) -> Option<String> {
        let mut out = String::new();
        shape_key(sql, &mut out).then(|| out[1..].to_string())
    }

    #[test]
    fn shape_replaces_literals_only() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?;")
        );
        assert_eq!(
            shape("select * from t1 where a = 'it''s' and b > -1.5e-3 and c = E'x'").as_deref(),
            Some("select * from t1 where a = '?' and b > -? and c = E'?'")
        );
        // Digits in words, quoted identifiers and comments are not literals.
        assert_eq!(
            shape(
                r#"SELECT "col 1", x2 FROM t -- 7 o'clock
/* 9 'a' */ WHERE y = 3"#
            )
            .as_deref(),
            Some(
                r#"SELECT "col 1", x2 FROM t -- 7 o'clock
/* 9 'a' */ WHERE y = ?"#
            )
        );
        // Numbers glued to words are kept whole.
        assert_eq!(
            shape("SELECT 1abc, 0x1f, 1.").as_deref(),
            Some("SELECT 1abc, 0x1f, 1.")
        );
    }

    #[test]
    fn shape_refuses_what_a_simple_scanner_could_misread() {
        for sql in [
            r"SELECT 'a\'' ; DROP TABLE t; --'",
            "SELECT $1",
            "SELECT $q$x$q$",
            "SELECT U&'\\0041'",
            "SELECT u&\"x\"",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT 1 /* a /* nested */ 'x' */",
            "SELECT 1 /* unterminated",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    /// A comment that hides a quote must not pair it with a quote in code.
    #[test]
    fn shape_keeps_statement_boundaries() {
        let a = shape("SELECT 1 -- a'\n, 2 --'").unwrap();
        let b = shape("SELECT 1 -- a'\n; DROP TABLE t --'").unwrap();
        assert_ne!(a, b);
        let a = shape("SELECT 1 -- a'\r, 2 --'").unwrap();
        let b = shape("SELECT 1 -- a'\r; DROP TABLE t --'").unwrap();
        assert_ne!(a, b);
    }

    /// Texts of one shape, with pieces that trip lexers (quotes in comments, `;` in strings, `\r`
    /// ending a comment), classify alike whenever the cache would share a class.
    #[test]
    fn texts_of_one_shape_classify_alike() {
        const VALUES: &[&str] = &[
            "1",
            "2.5",
            "3e5",
            "'a'",
            "'x;DROP TABLE t'",
            "'it''s'",
            "x1",
            "\"q1\"",
            "E'a'",
            "-7",
            "(1)",
            "'a' -- '\n",
            "/* 1 */ 2",
        ];
        const TAILS: &[&str] = &[
            "",
            " -- a'\n, 'x'",
            " -- a'\r; DROP TABLE t",
            " /* '1' */",
            "; DROP TABLE t",
            "; SELECT 1",
            "; SET client_encoding = 'sql_ascii'",
            "; SET client_encoding = 'utf8'",
            "; SELECT set_config('role', 'r', false)",
            " --'\n; DROP TABLE t --'",
            " LIMIT 10",
        ];
        let mut next = crate::testing::xorshift(0x2545_f491_4f6c_dd1d);
        let mut shared = 0;
        for _ in 0..3000 {
            let values: Vec<&str> = (0..1 + next(3))
                .map(|_| VALUES[next(VALUES.len())])
                .collect();
            let a = format!(
                "SELECT {} FROM t WHERE id = {}{}",
                values.join(", "),
                VALUES[next(VALUES.len())],
                TAILS[next(TAILS.len())]
            );
            // Another text: digits and letters changed (inside literals, comments and names), or
            // a stretch replaced by statement text, which only a literal can hide.
            let b: String = if next(2) == 0 {
                a.chars()
                    .map(|c| match c {
                        '0'..='9' => char::from(b'0' + next(10) as u8),
                        'a' | 'x' | 'r' if next(2) == 0 => 'z',
                        c => c,
                    })
                    .collect()
            } else {
                let (i, j) = (next(a.len() + 1), next(a.len() + 1));
                let (i, j) = (i.min(j), i.max(j));
                let splice = ["; DROP TABLE t; ", "DELETE FROM t", "2", ";"][next(4)];
                format!("{}{splice}{}", &a[..i], &a[j..])
            };
            let (mut ka, mut kb) = (String::new(), String::new());
            if a == b || !(shape_key(&a, &mut ka) && shape_key(&b, &mut kb) && ka == kb) {
                continue;
            }
            let class = classify(&a);
            if class.holds_for_shape() {
                shared += 1;
                assert_eq!(class, classify(&b), "{a:?} and {b:?}");
            }
        }
        assert!(
            shared > 200,
            "too few shared shapes to mean anything: {shared}"
        );
    }

    #[test]
    fn cache_shares_a_class_across_literals_but_not_across_settings() {
        let mut cache = ClassifyCache::new(16);
        let a = cache.classify("SELECT * FROM t WHERE id = 1");
        let b = cache.classify("SELECT * FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.stats(), (1, 1));

        let on = cache.classify("SET standard_conforming_strings = 'on'");
        let off = cache.classify("SET standard_conforming_strings = 'off'");
        assert!(!on.risks().contains(Risk::UnsafeSetting));
        assert!(off.risks().contains(Risk::UnsafeSetting));
        let safe = cache.classify("SELECT set_config('application_name', 'x', false)");
        let unsafe_ =
            cache.classify("SELECT set_config('session_replication_role', 'replica', false)");
        assert!(!safe.risks().contains(Risk::UnsafeSetting));
        assert!(unsafe_.risks().contains(Risk::UnsafeSetting));
        let plain = cache.classify("EXPLAIN (ANALYZE false) DELETE FROM t");
        let analyze = cache.classify("EXPLAIN (ANALYZE true) DELETE FROM t");
        assert_ne!(plain.kind(), analyze.kind());
        // Every cached answer is the one a fresh classification gives.
        for sql in [
            "SELECT * FROM t WHERE id = 3",
            "SET standard_conforming_strings = 'off'",
            "EXPLAIN (ANALYZE true) DELETE FROM t",
        ] {
            assert_eq!(*cache.classify(sql), classify(sql), "{sql}");
        }
    }
}
