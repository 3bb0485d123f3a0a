//! The SQLite index: sessions and statements, with FTS5 over statement text. It is derived from
//! the segments: `indexed_seq` says how far it got, and the recorder catches up at start.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params};

use super::types::{Entry, Record, RequestKind};

pub const INDEX_FILE: &str = "index.sqlite";

/// The index's layout, in SQLite's `user_version`. An index of any other is rebuilt.
const SCHEMA_VERSION: i64 = 2;

pub struct Index {
    db: Connection,
}

/// One row of `portcullis recordings list`.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct SessionRow {
    pub id: u64,
    pub started_us: i64,
    pub ended_us: Option<i64>,
    pub agent: Option<String>,
    pub subject: Option<String>,
    pub target: String,
    pub database: String,
    pub upstream_user: String,
    pub end_reason: Option<String>,
    pub statements: u64,
    pub blocked: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The filters of `recordings list`; `None` matches everything.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub agent: Option<String>,
    pub subject: Option<String>,
    pub target: Option<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub verdict: Option<String>,
    pub rule: Option<String>,
    pub grep: Option<String>,
}

impl Index {
    pub fn open(dir: &Path) -> rusqlite::Result<Index> {
        let db = Connection::open(dir.join(INDEX_FILE))?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL with NORMAL sync: a crash may lose the last batches, which the catch-up redoes.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            // An index of another layout (or none): start empty at seq 0, and the recorder's
            // catch-up rebuilds it from the segments, which are the record.
            db.execute_batch(
                "DROP TABLE IF EXISTS statements_fts; DROP TABLE IF EXISTS statements;
                 DROP TABLE IF EXISTS sessions; DROP TABLE IF EXISTS meta;",
            )?;
        }
        // The full-text table keeps no copy of the text (`content=''`): `statements` holds it,
        // and a match is joined back by rowid. `contentless_delete` lets prune remove entries.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS sessions(
                 id INTEGER PRIMARY KEY, started_us INTEGER NOT NULL, ended_us INTEGER,
                 agent TEXT, subject TEXT, target TEXT NOT NULL, database TEXT NOT NULL,
                 upstream_user TEXT NOT NULL, end_reason TEXT,
                 statements INTEGER NOT NULL DEFAULT 0, blocked INTEGER NOT NULL DEFAULT 0,
                 first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS statements(
                 session INTEGER NOT NULL, stmt INTEGER NOT NULL, at_us INTEGER NOT NULL,
                 kind TEXT NOT NULL, text TEXT NOT NULL, verdict TEXT, rule TEXT, approver TEXT,
                 seq INTEGER NOT NULL, PRIMARY KEY(session, stmt));
             CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_us);
             CREATE VIRTUAL TABLE IF NOT EXISTS statements_fts
                 USING fts5(text, content='', contentless_delete=1);",
        )?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Index { db })
    }

    /// Records up to (not including) this seq are indexed.
    pub fn indexed_seq(&self) -> rusqlite::Result<u64> {
        let v: Option<i64> = self
            .db
            .query_row(
                "SELECT value FROM meta WHERE key = 'indexed_seq'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    pub fn max_session(&self) -> rusqlite::Result<u64> {
        let v: Option<i64> = self
            .db
            .query_row("SELECT max(id) FROM sessions", [], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Adds a batch of entries in one transaction. `entries` may skip records the index does not
    /// need (rows, COPY data); `last_seq` maps every session in the batch to its newest seq and
    /// `next_seq` is the first seq after the batch. A statement whose verdict is in the same
    /// batch is written once, with it, and each session's counters once per batch: the index
    /// costs two inserts per statement (its row and its full-text entry).
    pub fn apply(
        &mut self,
        entries: &[Entry],
        last_seq: &HashMap<u64, u64>,
        next_seq: u64,
    ) -> rusqlite::Result<()> {
        // A verdict for a request earlier in this batch, by the request's place in `entries`.
        let mut verdict_of: HashMap<(u64, u32), usize> = HashMap::new();
        let mut decided: HashMap<usize, Decided<'_>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            match &e.record {
                Record::Request(_) => {
                    verdict_of.insert((e.session, e.stmt), i);
                }
                Record::Verdict(v) => {
                    if let Some(&at) = verdict_of.get(&(e.session, e.stmt)) {
                        // As successive UPDATEs would leave it: the last action, and the last
                        // rule and approver given.
                        let d = decided.entry(at).or_default();
                        d.action = Some(v.action.as_str());
                        d.rule = v.rule.as_deref().or(d.rule);
                        d.approver = v.approver.as_deref().or(d.approver);
                    }
                }
                _ => {}
            }
        }
        let mut counts: HashMap<u64, (u64, u64)> = HashMap::new();
        let tx = self.db.transaction()?;
        for (i, e) in entries.iter().enumerate() {
            match &e.record {
                Record::SessionStart(s) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO sessions(id, started_us, agent, subject, target,
                             database, upstream_user, first_seq, last_seq)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                    )?
                    .execute(params![
                        e.session as i64,
                        e.at_us,
                        s.agent,
                        s.subject,
                        s.target,
                        s.database,
                        s.upstream_user,
                        e.seq as i64
                    ])?;
                }
                Record::Request(r) => {
                    let v = decided.get(&i);
                    let added = tx
                        .prepare_cached(
                            "INSERT OR IGNORE INTO statements(session, stmt, at_us, kind, text,
                                 seq, verdict, rule, approver)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        )?
                        .execute(params![
                            e.session as i64,
                            e.stmt,
                            e.at_us,
                            kind_name(r.kind),
                            r.text,
                            e.seq as i64,
                            v.and_then(|v| v.action),
                            v.and_then(|v| v.rule),
                            v.and_then(|v| v.approver),
                        ])?;
                    if added == 0 {
                        // Indexed already (the same record: `indexed_seq` commits with the
                        // rows, so only a broken catch-up could bring it twice).
                        continue;
                    }
                    // A plain insert: a REPLACE would make FTS5 flush its pending terms to look
                    // the rowid up, a segment per statement.
                    tx.prepare_cached("INSERT INTO statements_fts(rowid, text) VALUES (?1, ?2)")?
                        .execute(params![tx.last_insert_rowid(), r.text])?;
                    counts.entry(e.session).or_default().0 += 1;
                }
                Record::Verdict(v) => {
                    if !verdict_of.contains_key(&(e.session, e.stmt)) {
                        tx.prepare_cached(
                            "UPDATE statements SET verdict = ?3, rule = coalesce(?4, rule),
                                 approver = coalesce(?5, approver)
                             WHERE session = ?1 AND stmt = ?2",
                        )?
                        .execute(params![
                            e.session as i64,
                            e.stmt,
                            v.action.as_str(),
                            v.rule,
                            v.approver
                        ])?;
                    }
                    if matches!(
                        v.action,
                        super::types::Action::Block | super::types::Action::Denied
                    ) {
                        counts.entry(e.session).or_default().1 += 1;
                    }
                }
                Record::SessionEnd { reason } => {
                    tx.prepare_cached(
                        "UPDATE sessions SET ended_us = ?2, end_reason = ?3 WHERE id = ?1",
                    )?
                    .execute(params![e.session as i64, e.at_us, reason])?;
                }
                _ => {}
            }
        }
        for (session, seq) in last_seq {
            let (statements, blocked) = counts.get(session).copied().unwrap_or_default();
            tx.prepare_cached(
                "UPDATE sessions SET last_seq = max(last_seq, ?2), statements = statements + ?3,
                     blocked = blocked + ?4
                 WHERE id = ?1",
            )?
            .execute(params![
                *session as i64,
                *seq as i64,
                statements as i64,
                blocked as i64
            ])?;
        }
        tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES ('indexed_seq', ?1)")?
            .execute(params![next_seq as i64])?;
        tx.commit()
    }

    pub fn session(&self, id: u64) -> rusqlite::Result<Option<SessionRow>> {
        self.db
            .query_row(
                &format!("{SELECT_SESSIONS} WHERE id = ?1"),
                params![id as i64],
                session_row,
            )
            .optional()
    }

    pub fn list(&self, f: &Filter) -> rusqlite::Result<Vec<SessionRow>> {
        let mut sql = format!("{SELECT_SESSIONS} WHERE 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if let Some(v) = &f.agent {
            arg(&mut sql, " AND agent = ?", v.clone().into());
        }
        if let Some(v) = &f.subject {
            arg(&mut sql, " AND subject = ?", v.clone().into());
        }
        if let Some(v) = &f.target {
            arg(&mut sql, " AND target = ?", v.clone().into());
        }
        if let Some(v) = f.since_us {
            arg(
                &mut sql,
                " AND coalesce(ended_us, 9223372036854775807) >= ?",
                v.into(),
            );
        }
        if let Some(v) = f.until_us {
            arg(&mut sql, " AND started_us <= ?", v.into());
        }
        if let Some(v) = &f.verdict {
            arg(
                &mut sql,
                " AND id IN (SELECT session FROM statements WHERE verdict = ?)",
                v.clone().into(),
            );
        }
        if let Some(v) = &f.rule {
            arg(
                &mut sql,
                " AND id IN (SELECT session FROM statements WHERE rule = ?)",
                v.clone().into(),
            );
        }
        if let Some(v) = &f.grep {
            // A phrase query: the operator's text is matched, never parsed as FTS syntax.
            let phrase = format!("\"{}\"", v.replace('"', "\"\""));
            arg(
                &mut sql,
                " AND id IN (SELECT session FROM statements WHERE rowid IN
                     (SELECT rowid FROM statements_fts WHERE statements_fts MATCH ?))",
                phrase.into(),
            );
        }
        sql.push_str(" ORDER BY id");
        let mut stmt = self.db.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), session_row)?;
        rows.collect()
    }

    /// Drops sessions that ended before a time (after `prune` removed their segments).
    pub fn forget_before(&mut self, before_seq: u64) -> rusqlite::Result<usize> {
        let tx = self.db.transaction()?;
        let n = tx.execute(
            "DELETE FROM sessions WHERE last_seq < ?1",
            params![before_seq as i64],
        )?;
        tx.execute(
            "DELETE FROM statements_fts WHERE rowid IN
                 (SELECT rowid FROM statements WHERE session NOT IN (SELECT id FROM sessions))",
            [],
        )?;
        tx.execute(
            "DELETE FROM statements WHERE session NOT IN (SELECT id FROM sessions)",
            [],
        )?;
        tx.commit()?;
        Ok(n)
    }
}

const SELECT_SESSIONS: &str = "SELECT id, started_us, ended_us, agent, subject, target, database,
    upstream_user, end_reason, statements, blocked, first_seq, last_seq FROM sessions";

fn session_row(r: &rusqlite::Row) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: r.get::<_, i64>(0)? as u64,
        started_us: r.get(1)?,
        ended_us: r.get(2)?,
        agent: r.get(3)?,
        subject: r.get(4)?,
        target: r.get(5)?,
        database: r.get(6)?,
        upstream_user: r.get(7)?,
        end_reason: r.get(8)?,
        statements: r.get::<_, i64>(9)? as u64,
        blocked: r.get::<_, i64>(10)? as u64,
        first_seq: r.get::<_, i64>(11)? as u64,
        last_seq: r.get::<_, i64>(12)? as u64,
    })
}

/// How `statements.kind` names a request kind (its serde name).
fn kind_name(kind: RequestKind) -> &'static str {
    match kind {
        RequestKind::Query => "query",
        RequestKind::Prepare => "prepare",
        RequestKind::Execute => "execute",
        RequestKind::FunctionCall => "function_call",
        RequestKind::CopyIn => "copy_in",
        RequestKind::Http => "http",
    }
}

/// A statement's verdicts within one batch.
#[derive(Default)]
struct Decided<'a> {
    action: Option<&'static str>,
    rule: Option<&'a str>,
    approver: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::types::{Request, SessionStart};

    fn start(session: u64, seq: u64) -> Entry {
        Entry {
            seq,
            at_us: seq as i64,
            session,
            stmt: 0,
            record: Record::SessionStart(SessionStart {
                target: "main".into(),
                database: "app".into(),
                upstream_user: "agent".into(),
                ..Default::default()
            }),
        }
    }

    fn query(session: u64, stmt: u32, seq: u64, text: &str) -> Entry {
        Entry {
            seq,
            at_us: seq as i64,
            session,
            stmt,
            record: Record::Request(Request {
                kind: RequestKind::Query,
                statement: None,
                text: text.into(),
                params: Vec::new(),
            }),
        }
    }

    fn grep(index: &Index, text: &str) -> Vec<u64> {
        let filter = Filter {
            grep: Some(text.into()),
            ..Default::default()
        };
        index.list(&filter).unwrap().iter().map(|s| s.id).collect()
    }

    fn full_text_entries(index: &Index) -> i64 {
        // A contentless table counts its documents only through a query: every row holds `x`.
        index
            .db
            .query_row(
                "SELECT count(*) FROM statements_fts WHERE statements_fts MATCH 'x'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_batch_indexed_twice_is_found_once_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(dir.path()).unwrap();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT x FROM orders"),
            query(1, 2, 2, "SELECT x FROM users WHERE name = 'o\"brien'"),
        ];
        let last = HashMap::from([(1, 2)]);
        index.apply(&batch, &last, 3).unwrap();
        // The same records applied again leave the index as it was.
        let mut again = Index::open(dir.path()).unwrap();
        again.apply(&batch[1..], &last, 3).unwrap();
        assert_eq!(grep(&again, "orders"), vec![1]);
        assert_eq!(grep(&again, "FROM users"), vec![1], "a phrase");
        assert_eq!(
            grep(&again, "users FROM"),
            Vec::<u64>::new(),
            "words out of order"
        );
        assert_eq!(
            grep(&again, "o\"brien"),
            vec![1],
            "a quote is text, not syntax"
        );
        assert_eq!(full_text_entries(&again), 2, "one entry per statement");
        let counted: i64 = again
            .db
            .query_row("SELECT count(*) FROM statements", [], |r| r.get(0))
            .unwrap();
        assert_eq!(counted, 2);
        assert_eq!(again.session(1).unwrap().unwrap().statements, 2);
    }

    #[test]
    fn pruned_sessions_leave_no_full_text_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::open(dir.path()).unwrap();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT x FROM old_orders"),
            start(2, 2),
            query(2, 1, 3, "SELECT x FROM new_orders"),
        ];
        index
            .apply(&batch, &HashMap::from([(1, 1), (2, 3)]), 4)
            .unwrap();
        assert_eq!(index.forget_before(2).unwrap(), 1);
        assert_eq!(grep(&index, "old_orders"), Vec::<u64>::new());
        assert_eq!(grep(&index, "new_orders"), vec![2]);
        assert_eq!(full_text_entries(&index), 1);
    }

    #[test]
    fn an_index_of_the_old_layout_is_emptied_for_the_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The first layout: the full-text table kept its own copy and the session columns.
            let db = Connection::open(dir.path().join(INDEX_FILE)).unwrap();
            db.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('indexed_seq', 40);
                 CREATE VIRTUAL TABLE statements_fts
                     USING fts5(text, session UNINDEXED, stmt UNINDEXED);
                 INSERT INTO statements_fts VALUES ('SELECT 1', 1, 1);",
            )
            .unwrap();
        }
        let mut index = Index::open(dir.path()).unwrap();
        assert_eq!(
            index.indexed_seq().unwrap(),
            0,
            "rebuilt from the first record"
        );
        index
            .apply(
                &[start(1, 0), query(1, 1, 1, "SELECT x")],
                &HashMap::from([(1, 1)]),
                2,
            )
            .unwrap();
        assert_eq!(grep(&index, "select"), vec![1]);
        assert_eq!(full_text_entries(&index), 1);
        drop(index);
        let reopened = Index::open(dir.path()).unwrap();
        assert_eq!(reopened.indexed_seq().unwrap(), 2, "the new layout is kept");
    }
}
