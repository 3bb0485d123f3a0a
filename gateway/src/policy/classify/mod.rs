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

use std::collections::HashMap;
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
}

impl Risk {
    pub const ALL: [Risk; 17] = [
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

fn classify_unguarded(sql: &str) -> Classification {
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, sql).tokenize_with_location() {
        Ok(t) => t,
        Err(e) => {
            return Classification {
                statements: vec![StatementClass::unparsable(e.to_string())],
                fingerprint: hash_text(sql),
            };
        }
    };
    let fingerprint = fingerprint(&tokens);
    // `U&"\0070g_read_file"` is one identifier to PostgreSQL, but sqlparser reads `U & "..."`.
    if has_unicode_identifier(sql) {
        return Classification {
            statements: vec![StatementClass::unparsable(
                "Unicode-escaped identifiers (U&\"...\") are not supported".into(),
            )],
            fingerprint,
        };
    }
    if tokens.iter().all(|t| is_trivia(&t.token)) {
        return Classification {
            statements: Vec::new(),
            fingerprint,
        };
    }
    // Split at every `;` token (those in strings, comments and dollar quotes are inside other
    // tokens), as PostgreSQL does, rather than trusting sqlparser's statement boundaries: its COPY
    // parser takes everything after `COPY .. FROM STDIN;` as inline data, which would hide
    // `COPY t FROM STDIN; DROP TABLE t`. A statement sqlparser cannot parse does not hide the others,
    // and the few it cannot parse at all (DO, LOCK, ALTER SYSTEM, ...) get their proper class.
    let statements = tokens
        .split(|t| t.token == Token::SemiColon)
        .filter(|frag| !frag.iter().all(|t| is_trivia(&t.token)))
        .flat_map(classify_fragment)
        .collect();
    Classification {
        statements,
        fingerprint,
    }
}

fn is_trivia(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::EOF)
}

fn has_unicode_identifier(sql: &str) -> bool {
    sql.as_bytes()
        .windows(3)
        .any(|w| w[0] | 0x20 == b'u' && w[1] == b'&' && w[2] == b'"')
}

/// Classifies the tokens of one statement (no `;` among them).
fn classify_fragment(frag: &[TokenWithSpan]) -> Vec<StatementClass> {
    let parse = |tokens: Vec<TokenWithSpan>| {
        Parser::new(&PostgreSqlDialect {})
            .with_tokens_with_locations(tokens)
            .parse_statements()
    };
    let first = first_word(frag);
    let mut parsed = if first.is_some_and(|w| w.eq_ignore_ascii_case("TABLE")) {
        // `TABLE t ...` is `SELECT * FROM t ...`, which sqlparser does take.
        let mut tokens = Vec::with_capacity(frag.len() + 2);
        let mut replaced = false;
        for t in frag {
            if !replaced && !is_trivia(&t.token) {
                replaced = true;
                tokens.extend(
                    [
                        Token::make_keyword("SELECT"),
                        Token::Mul,
                        Token::Whitespace(sqlparser::tokenizer::Whitespace::Space),
                        Token::make_keyword("FROM"),
                    ]
                    .map(TokenWithSpan::wrap),
                );
            } else {
                tokens.push(t.clone());
            }
        }
        parse(tokens)
    } else {
        parse(frag.to_vec())
    };
    if parsed.is_err() && first.is_some_and(|w| w.eq_ignore_ascii_case("COPY")) {
        // sqlparser wants `COPY .. FROM STDIN` followed by `;` and inline data up to `\.`; on the
        // wire the data comes in CopyData messages, so supply an empty data section.
        let mut tokens = frag.to_vec();
        tokens.extend([Token::SemiColon, Token::Backslash, Token::Period].map(TokenWithSpan::wrap));
        parsed = parse(tokens);
    }
    match parsed {
        // Anything taken as inline data was statement text.
        Ok(stmts)
            if stmts
                .iter()
                .any(|s| matches!(s, Statement::Copy { values, .. } if !values.is_empty())) =>
        {
            vec![StatementClass::unparsable(
                "unexpected text after COPY .. FROM STDIN".into(),
            )]
        }
        Ok(stmts) => stmts.iter().map(classify_statement).collect(),
        Err(e) => vec![
            classify_by_keywords(frag).unwrap_or_else(|| StatementClass::unparsable(e.to_string())),
        ],
    }
}

fn first_word(frag: &[TokenWithSpan]) -> Option<&str> {
    match &frag.iter().find(|t| !is_trivia(&t.token))?.token {
        Token::Word(w) if w.quote_style.is_none() => Some(&w.value),
        _ => None,
    }
}

/// Classes for statements sqlparser cannot parse, from their leading keywords. Only commands whose
/// keywords alone fix a verdict at least as strict as a full parse would are recognised.
fn classify_by_keywords(frag: &[TokenWithSpan]) -> Option<StatementClass> {
    let words: Vec<String> = frag
        .iter()
        .filter(|t| !is_trivia(&t.token))
        .take(3)
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            _ => String::new(),
        })
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let role_word = |s: &str| matches!(s, "ROLE" | "USER" | "GROUP");
    let c = |command, kind, risk: Option<Risk>| {
        let mut c = StatementClass::new(command, kind);
        if let Some(r) = risk {
            c.risks.insert(r);
        }
        Some(c.finish())
    };
    match w(0) {
        "DO" => c("DO", Kind::Admin, Some(Risk::DoBlock)),
        // SET [SESSION | LOCAL] SESSION AUTHORIZATION ...
        "SET"
            if (w(1) == "SESSION" && w(2) == "AUTHORIZATION")
                || (matches!(w(1), "SESSION" | "LOCAL") && w(2) == "SESSION") =>
        {
            c(
                "SET SESSION AUTHORIZATION",
                Kind::Session,
                Some(Risk::SetSessionAuthorization),
            )
        }
        // SET [SESSION | LOCAL] ROLE TO ... (the generic form sqlparser does not take)
        "SET" if w(1) == "ROLE" || (matches!(w(1), "SESSION" | "LOCAL") && w(2) == "ROLE") => {
            c("SET ROLE", Kind::Session, Some(Risk::SetRole))
        }
        // RESET returns a setting to its session default: it cannot raise privileges.
        "RESET" => c("RESET", Kind::Session, None),
        "ALTER" if w(1) == "SYSTEM" => c("ALTER SYSTEM", Kind::Admin, Some(Risk::Alter)),
        "ALTER" if role_word(w(1)) || w(1) == "DEFAULT" => {
            c("ALTER ROLE", Kind::Dcl, Some(Risk::Alter))
        }
        "ALTER" => c("ALTER", Kind::Ddl, Some(Risk::Alter)),
        "CREATE" if role_word(w(1)) => c("CREATE ROLE", Kind::Dcl, None),
        "CREATE" | "COMMENT" | "SECURITY" | "IMPORT" => c("CREATE", Kind::Ddl, None),
        "DROP" if role_word(w(1)) || w(1) == "OWNED" => c("DROP ROLE", Kind::Dcl, Some(Risk::Drop)),
        "DROP" => c("DROP", Kind::Ddl, Some(Risk::Drop)),
        "REASSIGN" => c("REASSIGN OWNED", Kind::Dcl, None),
        "GRANT" => c("GRANT", Kind::Dcl, Some(Risk::Grant)),
        "REVOKE" => c("REVOKE", Kind::Dcl, Some(Risk::Revoke)),
        "TRUNCATE" => c("TRUNCATE", Kind::Write, Some(Risk::Truncate)),
        "LOCK" => c("LOCK", Kind::Write, None),
        "REFRESH" => c("REFRESH MATERIALIZED VIEW", Kind::Write, None),
        "CHECKPOINT" | "LOAD" | "CLUSTER" | "REINDEX" | "VACUUM" | "ANALYZE" => {
            c("ADMIN", Kind::Admin, None)
        }
        _ => None,
    }
}

/// Resolves an identifier the way PostgreSQL does in a UTF-8 database.
fn resolve(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

/// Resolved name parts; a part that is not a plain identifier resolves to `None`.
fn name_parts(name: &ObjectName) -> Vec<Option<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(resolve(i)),
            ObjectNamePart::Function(_) => None,
        })
        .collect()
}

/// `schema.table` for a relation name.
fn relation(name: &ObjectName) -> String {
    let parts: Vec<String> = name_parts(name)
        .into_iter()
        .map(|p| p.unwrap_or_else(|| "?".into()))
        .collect();
    match parts.as_slice() {
        [] => "?".into(),
        [t] if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        [t] => format!("public.{t}"),
        [.., s, t] => format!("{s}.{t}"),
    }
}

fn is_dangerous_function(name: &str) -> bool {
    DANGEROUS_FUNCTIONS.contains(&name)
        || DANGEROUS_FUNCTION_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// The text of a constant (what PostgreSQL would see after unquoting). `SET x = off` takes a bare
/// word as a value, so `words` admits identifiers; in function arguments they are columns.
fn literal_text(e: &Expr, words: bool) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            Value::Number(n, _) => Some(n.clone()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        },
        Expr::Identifier(i) if words => Some(i.value.clone()),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => literal_text(expr, words),
        _ => None,
    }
}

fn arg_list(args: &FunctionArguments) -> &[FunctionArg] {
    match args {
        FunctionArguments::List(l) => &l.args,
        FunctionArguments::None | FunctionArguments::Subquery(_) => &[],
    }
}

fn arg_exprs(args: &[FunctionArg]) -> Vec<&Expr> {
    args.iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e))
            | FunctionArg::Named {
                arg: FunctionArgExpr::Expr(e),
                ..
            }
            | FunctionArg::ExprNamed {
                arg: FunctionArgExpr::Expr(e),
                ..
            } => Some(e),
            _ => None,
        })
        .collect()
}

/// The risk of setting `name` to `value` (`None`: not a literal we can read).
fn setting_risk(name: &str, value: Option<&str>) -> Option<Risk> {
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        "role" => return Some(Risk::SetRole),
        "session_authorization" => return Some(Risk::SetSessionAuthorization),
        _ => {}
    }
    let (_, safe) = UNSAFE_SETTINGS.iter().find(|(n, _)| *n == name)?;
    match value {
        Some(v) if safe.contains(&v.trim().to_ascii_lowercase().as_str()) => None,
        _ => Some(Risk::UnsafeSetting),
    }
}

fn classify_statement(stmt: &Statement) -> StatementClass {
    let mut v = StatementVisitor {
        class: StatementClass::new("", Kind::Read),
        noexec: Vec::new(),
        ctes: Vec::new(),
        skip_relation: false,
    };
    let _ = stmt.visit(&mut v);
    let mut class = v.class;
    class.objects.sort_unstable();
    class.objects.dedup();
    class.functions.sort_unstable();
    class.functions.dedup();
    class.procedures.sort_unstable();
    class.procedures.dedup();
    class.finish()
}

struct StatementVisitor {
    class: StatementClass,
    /// One entry per statement being visited: true when it does not execute what it contains
    /// (plain `EXPLAIN`), so nested statements add objects but no kind or statement risks.
    noexec: Vec<bool>,
    /// CTE names in scope: relations with these names are not tables.
    ctes: Vec<String>,
    /// Set when the next relation visited is the name of a table function, not a table.
    skip_relation: bool,
}

impl StatementVisitor {
    fn executes(&self) -> bool {
        !self.noexec.iter().any(|n| *n)
    }

    fn raise(&mut self, kind: Kind) {
        if self.executes() && kind > self.class.kind {
            self.class.kind = kind;
        }
    }

    fn risk(&mut self, risk: Risk) {
        if self.executes() {
            self.class.risks.insert(risk);
        }
    }

    fn object(&mut self, name: &ObjectName) {
        self.class.objects.push(relation(name));
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let parts = name_parts(name);
        let Some(Some(last)) = parts.last() else {
            // Not a plain identifier: cannot tell what it resolves to.
            self.class.risks.insert(Risk::DangerousFunction);
            self.class.functions.push("?".into());
            return;
        };
        if last == "set_config" {
            self.class.reads_literals = true;
            let args = arg_exprs(args);
            match args.first().and_then(|e| literal_text(e, false)) {
                Some(setting) => {
                    let value = args.get(1).and_then(|e| literal_text(e, false));
                    if let Some(r) = setting_risk(&setting, value.as_deref()) {
                        self.class.risks.insert(r);
                    }
                }
                None => {
                    self.class.risks.insert(Risk::DangerousFunction);
                    self.class.functions.push(last.clone());
                }
            }
            return;
        }
        // Functions are flagged even under plain EXPLAIN: the planner may evaluate them.
        if is_dangerous_function(last) {
            self.class.risks.insert(Risk::DangerousFunction);
            self.class.functions.push(last.clone());
        }
        if WRITE_FUNCTIONS.contains(&last.as_str()) {
            self.raise(Kind::Write);
        }
    }

    fn set(&mut self, set: &Set) {
        self.class.reads_literals = true;
        let mut check = |name: &ObjectName, value: Option<&Expr>| {
            // Custom settings are qualified (`app.user_id`): only a bare name is a server setting.
            let name = name_parts(name)
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect::<Vec<_>>()
                .join(".");
            let value = value.and_then(|v| literal_text(v, true));
            if let Some(r) = setting_risk(&name, value.as_deref()) {
                self.risk(r);
            }
        };
        match set {
            Set::SingleAssignment {
                variable, values, ..
            } => check(
                variable,
                if values.len() == 1 {
                    values.first()
                } else {
                    None
                },
            ),
            Set::ParenthesizedAssignments { variables, .. } => {
                for v in variables {
                    check(v, None);
                }
            }
            Set::MultipleAssignments { assignments } => {
                for a in assignments {
                    check(&a.name, Some(&a.value));
                }
            }
            Set::SetRole { role_name, .. } => {
                if role_name.is_some() {
                    self.risk(Risk::SetRole);
                }
            }
            Set::SetNames { charset_name, .. } => {
                if let Some(r) = setting_risk("client_encoding", Some(&charset_name.value)) {
                    self.risk(r);
                }
            }
            Set::SetTimeZone { .. }
            | Set::SetNamesDefault {}
            | Set::SetTransaction { .. }
            | Set::SetSessionParam(_) => {}
        }
    }

    /// Command and kind of one statement (nested statements come through here too); records its
    /// risks and the objects its children do not visit as relations.
    fn statement(&mut self, stmt: &Statement) -> (&'static str, Kind) {
        use Statement as S;
        match stmt {
            S::Query(q) => {
                if let Some(into) = select_into(&q.body) {
                    self.object(into);
                    return ("SELECT INTO", Kind::Ddl);
                }
                ("SELECT", Kind::Read)
            }
            S::Insert(_) => ("INSERT", Kind::Write),
            S::Update { selection, .. } => {
                if !filters_rows(selection.as_ref()) {
                    self.risk(Risk::UpdateWithoutWhere);
                }
                ("UPDATE", Kind::Write)
            }
            S::Delete(d) => {
                if !filters_rows(d.selection.as_ref()) {
                    self.risk(Risk::DeleteWithoutWhere);
                }
                for t in &d.tables {
                    self.object(t);
                }
                ("DELETE", Kind::Write)
            }
            S::Merge { .. } => ("MERGE", Kind::Write),
            S::Truncate { .. } => {
                self.risk(Risk::Truncate);
                ("TRUNCATE", Kind::Write)
            }
            S::Copy {
                source, to, target, ..
            } => {
                if let CopySource::Table { table_name, .. } = source {
                    self.object(table_name);
                }
                match target {
                    CopyTarget::Program { .. } => self.risk(Risk::CopyProgram),
                    CopyTarget::File { .. } => self.risk(Risk::CopyFile),
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
                ("COPY", if *to { Kind::Read } else { Kind::Write })
            }
            S::Call(f) => {
                let name = name_parts(&f.name)
                    .into_iter()
                    .map(|p| p.unwrap_or_else(|| "?".into()))
                    .collect::<Vec<_>>()
                    .join(".");
                self.function(&f.name, arg_list(&f.args));
                self.class.procedures.push(name);
                self.risk(Risk::Call);
                ("CALL", Kind::Write)
            }
            S::Execute { .. } => ("EXECUTE", Kind::Write),
            S::Prepare { .. } => ("PREPARE", Kind::Session),
            S::Explain { .. } => ("EXPLAIN", Kind::Read),
            S::ExplainTable { .. } => ("EXPLAIN", Kind::Read),
            S::Set(set) => {
                self.set(set);
                ("SET", Kind::Session)
            }
            S::ShowVariable { .. }
            | S::ShowVariables { .. }
            | S::ShowStatus { .. }
            | S::ShowCreate { .. }
            | S::ShowColumns { .. }
            | S::ShowTables { .. }
            | S::ShowViews { .. }
            | S::ShowFunctions { .. }
            | S::ShowDatabases { .. }
            | S::ShowSchemas { .. }
            | S::ShowObjects(_)
            | S::ShowCollation { .. }
            | S::ShowCharset(_) => ("SHOW", Kind::Read),
            S::StartTransaction { .. } => ("BEGIN", Kind::Session),
            S::Commit { .. } => ("COMMIT", Kind::Session),
            S::Rollback { .. } => ("ROLLBACK", Kind::Session),
            S::Savepoint { .. } => ("SAVEPOINT", Kind::Session),
            S::ReleaseSavepoint { .. } => ("RELEASE", Kind::Session),
            S::Discard { .. } => ("DISCARD", Kind::Session),
            S::Deallocate { .. } => ("DEALLOCATE", Kind::Session),
            S::LISTEN { .. } => ("LISTEN", Kind::Session),
            S::UNLISTEN { .. } => ("UNLISTEN", Kind::Session),
            S::NOTIFY { .. } => ("NOTIFY", Kind::Session),
            S::Declare { .. } => ("DECLARE", Kind::Read),
            S::Fetch { .. } => ("FETCH", Kind::Read),
            S::Close { .. } => ("CLOSE", Kind::Session),
            S::CreateTable(_) => ("CREATE TABLE", Kind::Ddl),
            S::CreateView { name, .. } => {
                self.object(name);
                ("CREATE VIEW", Kind::Ddl)
            }
            S::CreateIndex(_) => ("CREATE INDEX", Kind::Ddl),
            S::CreateSchema { .. } => ("CREATE SCHEMA", Kind::Ddl),
            S::CreateDatabase { .. } => ("CREATE DATABASE", Kind::Ddl),
            S::CreateFunction(_) => ("CREATE FUNCTION", Kind::Ddl),
            S::CreateProcedure { .. } => ("CREATE PROCEDURE", Kind::Ddl),
            S::CreateTrigger(_) => ("CREATE TRIGGER", Kind::Ddl),
            S::CreateSequence { .. } => ("CREATE SEQUENCE", Kind::Ddl),
            S::CreateDomain(_) => ("CREATE DOMAIN", Kind::Ddl),
            S::CreateType { .. } => ("CREATE TYPE", Kind::Ddl),
            S::CreateExtension { .. } => ("CREATE EXTENSION", Kind::Ddl),
            S::CreatePolicy { .. } => ("CREATE POLICY", Kind::Ddl),
            S::CreateServer(_) => ("CREATE SERVER", Kind::Ddl),
            S::CreateVirtualTable { .. } => ("CREATE TABLE", Kind::Ddl),
            S::Comment { .. } => ("COMMENT", Kind::Ddl),
            S::RenameTable(_) => {
                self.risk(Risk::Alter);
                ("ALTER TABLE", Kind::Ddl)
            }
            S::AlterTable { .. } => {
                self.risk(Risk::Alter);
                ("ALTER TABLE", Kind::Ddl)
            }
            S::AlterIndex { .. }
            | S::AlterView { .. }
            | S::AlterType(_)
            | S::AlterSchema(_)
            | S::AlterPolicy { .. } => {
                self.risk(Risk::Alter);
                ("ALTER", Kind::Ddl)
            }
            S::Drop {
                object_type, names, ..
            } => {
                self.risk(Risk::Drop);
                match object_type {
                    ObjectType::Role | ObjectType::User => ("DROP ROLE", Kind::Dcl),
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => {
                        for n in names {
                            self.object(n);
                        }
                        ("DROP TABLE", Kind::Ddl)
                    }
                    _ => ("DROP", Kind::Ddl),
                }
            }
            S::DropFunction { .. }
            | S::DropProcedure { .. }
            | S::DropDomain(_)
            | S::DropTrigger(_)
            | S::DropExtension { .. }
            | S::DropPolicy { .. } => {
                self.risk(Risk::Drop);
                ("DROP", Kind::Ddl)
            }
            S::CreateRole { .. } | S::CreateUser(_) => ("CREATE ROLE", Kind::Dcl),
            S::AlterRole { .. } => {
                self.risk(Risk::Alter);
                ("ALTER ROLE", Kind::Dcl)
            }
            S::Grant { objects, .. } => {
                self.risk(Risk::Grant);
                if let Some(GrantObjects::Tables(t)) = objects {
                    for n in t {
                        self.object(n);
                    }
                }
                ("GRANT", Kind::Dcl)
            }
            S::Revoke { objects, .. } => {
                self.risk(Risk::Revoke);
                if let Some(GrantObjects::Tables(t)) = objects {
                    for n in t {
                        self.object(n);
                    }
                }
                ("REVOKE", Kind::Dcl)
            }
            S::Analyze { .. } => ("ANALYZE", Kind::Admin),
            S::Vacuum(_) => ("VACUUM", Kind::Admin),
            // Other dialects' statements, procedural blocks, and anything added to sqlparser later.
            _ => ("ADMIN", Kind::Admin),
        }
    }
}

/// `ANALYZE` in `EXPLAIN (...)` options, unless explicitly off.
fn is_analyze_on(o: &sqlparser::ast::UtilityOption) -> bool {
    o.name.value.eq_ignore_ascii_case("analyze")
        && !o
            .arg
            .as_ref()
            .and_then(|a| literal_text(a, true))
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "false" | "off" | "0"))
}

/// The target of `SELECT .. INTO`, wherever the `INTO` sits in a set operation.
fn select_into(body: &SetExpr) -> Option<&ObjectName> {
    match body {
        SetExpr::Select(s) => s.into.as_ref().map(|i| &i.name),
        SetExpr::Query(q) => select_into(&q.body),
        SetExpr::SetOperation { left, right, .. } => {
            select_into(left).or_else(|| select_into(right))
        }
        _ => None,
    }
}

/// Whether a `WHERE` clause can filter rows: it exists and mentions a column. `WHERE true` or
/// `WHERE 1 = 1` affect every row, just like no `WHERE`.
fn filters_rows(selection: Option<&Expr>) -> bool {
    struct Columns(bool);
    impl Visitor for Columns {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if matches!(
                e,
                Expr::Identifier(_)
                    | Expr::CompoundIdentifier(_)
                    | Expr::CompoundFieldAccess { .. }
            ) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let Some(e) = selection else { return false };
    let mut v = Columns(false);
    let _ = e.visit(&mut v);
    v.0
}

impl Visitor for StatementVisitor {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        let (command, kind) = self.statement(stmt);
        if self.class.command.is_empty() {
            self.class.command = command;
        }
        self.raise(kind);
        // `EXPLAIN` runs what it explains only with ANALYZE.
        let noexec = match stmt {
            Statement::Explain {
                analyze, options, ..
            } => {
                self.class.reads_literals |= options.is_some();
                !(*analyze || options.iter().flatten().any(is_analyze_on))
            }
            _ => false,
        };
        self.noexec.push(noexec);
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &Statement) -> ControlFlow<()> {
        self.noexec.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.ctes.push(resolve(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            // `FROM pg_ls_dir('.')` parses as a table with arguments.
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.skip_relation = true;
                self.function(name, &args.args);
            }
            TableFactor::Function { name, args, .. } => self.function(name, args),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.skip_relation) {
            return ControlFlow::Continue(());
        }
        if let [ObjectNamePart::Identifier(i)] = name.0.as_slice()
            && self.ctes.contains(&resolve(i))
        {
            return ControlFlow::Continue(());
        }
        self.object(name);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            self.function(&f.name, arg_list(&f.args));
        }
        ControlFlow::Continue(())
    }
}

fn hash_text(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

fn fingerprint(tokens: &[TokenWithSpan]) -> u64 {
    let mut norm = String::with_capacity(tokens.len() * 6);
    let significant = tokens.iter().map(|t| &t.token).filter(|t| !is_trivia(t));
    for t in significant {
        if !norm.is_empty() {
            norm.push(' ');
        }
        match t {
            Token::Word(w) if w.quote_style.is_none() => {
                norm.push_str(&w.value.to_ascii_lowercase())
            }
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::Placeholder(_) => norm.push('?'),
            other => norm.push_str(&other.to_string()),
        }
    }
    let trimmed = norm.trim_matches(|c| c == ';' || c == ' ');
    hash_text(trimmed)
}

/// Bounded cache of classifications, owned by one worker thread (no locks). A statement is cached
/// by its shape (see [`shape_key`]) when its class holds for every text of that shape, so
/// `... WHERE id = 1` and `... WHERE id = 2` are classified once; otherwise by its exact text.
/// Eviction is CLOCK (second chance): a hit sets a bit, the hand clears bits until it finds an
/// entry not used since its last pass.
pub struct ClassifyCache {
    /// Exact texts and shape keys; a shape key starts with NUL, an exact text never does.
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
    /// Reused for each request's shape key.
    shape: String,
    hits: u64,
    misses: u64,
}

struct Slot {
    key: Arc<str>,
    value: Arc<Classification>,
    referenced: bool,
}

/// Texts longer than this are classified every time instead of filling the cache.
pub const MAX_CACHED_TEXT: usize = 16 * 1024;

impl Default for ClassifyCache {
    fn default() -> Self {
        ClassifyCache::new(4096)
    }
}

impl ClassifyCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ClassifyCache {
            index: HashMap::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            hand: 0,
            capacity,
            shape: String::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The classification of `sql`, from the cache or freshly computed.
    pub fn classify(&mut self, sql: &str) -> Arc<Classification> {
        // A leading NUL (never in a protocol text) could make an exact key look like a shape key.
        if sql.len() > MAX_CACHED_TEXT || sql.starts_with('\0') {
            self.misses += 1;
            return Arc::new(classify(sql));
        }
        let mut shape = std::mem::take(&mut self.shape);
        let shaped = shape_key(sql, &mut shape);
        let cached = if shaped {
            self.get(&shape).or_else(|| self.get(sql))
        } else {
            self.get(sql)
        };
        let value = cached.unwrap_or_else(|| {
            self.misses += 1;
            let value = Arc::new(classify(sql));
            let key = if shaped && value.holds_for_shape() {
                &shape
            } else {
                sql
            };
            self.insert(key, value.clone());
            value
        });
        self.shape = shape;
        value
    }

    fn get(&mut self, key: &str) -> Option<Arc<Classification>> {
        let &i = self.index.get(key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        self.hits += 1;
        Some(slot.value.clone())
    }

    fn insert(&mut self, key: &str, value: Arc<Classification>) {
        let key: Arc<str> = Arc::from(key);
        if self.slots.len() < self.capacity {
            self.index.insert(key.clone(), self.slots.len());
            self.slots.push(Slot {
                key,
                value,
                referenced: false,
            });
            return;
        }
        loop {
            let slot = &mut self.slots[self.hand];
            if slot.referenced {
                slot.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            self.index.remove(&slot.key);
            self.index.insert(key.clone(), self.hand);
            *slot = Slot {
                key,
                value,
                referenced: false,
            };
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// (hits, misses) since creation, for metrics.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// Writes into `out` the shape of `sql`: NUL, then the text with each numeric literal replaced by
/// `?` and the inside of each string literal by `?`; everything else (words, quoted identifiers,
/// comments, operators) is kept byte for byte. Two texts of one shape differ only inside literals,
/// so they parse to the same tree with other constants. Returns false, leaving `out` unspecified,
/// for any text whose literal boundaries a simple scanner could place differently from
/// PostgreSQL or sqlparser: backslashes (escape strings, `standard_conforming_strings = off`),
/// `$` (dollar quotes, parameters), `U&` literals, nested or unterminated comments and quotes.
fn shape_key(sql: &str, out: &mut String) -> bool {
    let b = sql.as_bytes();
    let is_word_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    if b.iter().any(|&c| c == b'\\' || c == b'$') || has_unicode_literal(b) {
        return false;
    }
    out.clear();
    out.push('\0');
    let mut copied = 0; // b[copied..i] is still to be copied verbatim
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // A string literal; `''` is a quote inside it.
                let Some(end) = closing_quote(b, i + 1, b'\'') else {
                    return false;
                };
                out.push_str(&sql[copied..=i]);
                out.push_str("?'");
                i = end + 1;
                copied = i;
            }
            b'"' => match closing_quote(b, i + 1, b'"') {
                Some(end) => i = end + 1,
                None => return false,
            },
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n' || c == b'\r')
                    .map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let body = &sql[i + 2..];
                let Some(end) = body.find("*/") else {
                    return false;
                };
                if body[..end].contains("/*") {
                    return false;
                }
                i += 2 + end + 2;
            }
            c if c.is_ascii_digit()
                && (i == 0 || !(is_word_byte(b[i - 1]) || b[i - 1] == b'.')) =>
            {
                let end = number_end(b, i);
                if b.get(end).is_some_and(|&c| is_word_byte(c) || c == b'.') {
                    // `1abc`, `1.`, `0x1f`: not a plain number to both lexers; keep it.
                    i = end;
                    continue;
                }
                out.push_str(&sql[copied..i]);
                out.push('?');
                i = end;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied..]);
    true
}

/// `U&'..'` and `U&"..."`, whose escapes a plain scanner does not read.
fn has_unicode_literal(b: &[u8]) -> bool {
    b.windows(2).any(|w| w[0] | 0x20 == b'u' && w[1] == b'&')
}

/// The index of the quote closing a literal opened just before `from`, skipping doubled quotes.
fn closing_quote(b: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    loop {
        i += b[i..].iter().position(|&c| c == quote)?;
        if b.get(i + 1) == Some(&quote) {
            i += 2;
        } else {
            return Some(i);
        }
    }
}

/// The end of the number starting at `start`: digits, an optional fraction, an optional exponent.
fn number_end(b: &[u8], start: usize) -> usize {
    let digits = |i: usize| i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = digits(start);
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign);
        }
    }
    i
}

#[cfg(test)]
mod tests {
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
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
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
