//! The SQLite index: sessions, and the verdicts and rules their statements met. It is derived
//! from the segments: `indexed_seq` says how far it got, and the recorder catches up at start.
//! The statements' full text is kept apart, and filled by the searches ([`super::texts`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use foldhash::{HashMapExt as _, HashSetExt as _};
use rusqlite::{Connection, OptionalExtension as _, params};

use super::types::{Action, Entry, Record, SessionStart};

pub const INDEX_FILE: &str = "index.sqlite";

/// The index's layout, in SQLite's `user_version`. An index of any other is rebuilt.
const SCHEMA_VERSION: i64 = 4;

pub struct Index {
    db: Connection,
}

/// What the index keeps of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Indexed {
    Start(Box<SessionStart>),
    /// A request only counts: its text is the full text's ([`super::texts`]).
    Request,
    Verdict {
        action: Action,
        rule: Option<String>,
    },
    End {
        reason: String,
    },
}

impl Indexed {
    /// `None` for a record the index does not keep.
    pub fn of(record: Record) -> Option<Indexed> {
        Some(match record {
            Record::SessionStart(s) => Indexed::Start(Box::new(s)),
            Record::Request(_) => Indexed::Request,
            Record::Verdict(v) => Indexed::Verdict {
                action: v.action,
                rule: v.rule,
            },
            Record::SessionEnd { reason } => Indexed::End { reason },
            _ => return None,
        })
    }
}

/// An entry as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub at_us: i64,
    pub session: u64,
    pub what: Indexed,
}

impl IndexEntry {
    pub fn of(e: Entry) -> Option<IndexEntry> {
        Some(IndexEntry {
            seq: e.seq,
            at_us: e.at_us,
            session: e.session,
            what: Indexed::of(e.record)?,
        })
    }
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
}

impl Index {
    pub fn open(dir: &Path) -> rusqlite::Result<Index> {
        // What `list` filters on, per session: the verdicts and rules its statements met. The
        // segments keep each statement; the index only finds sessions, so it costs a few rows
        // per session and batch rather than rows per statement. An index of another layout is
        // rebuilt by the recorder's catch-up.
        let db = open_derived(
            &dir.join(INDEX_FILE),
            SCHEMA_VERSION,
            std::time::Duration::from_secs(5),
            "DROP TABLE IF EXISTS statements_fts; DROP TABLE IF EXISTS statements;
             DROP TABLE IF EXISTS texts; DROP TABLE IF EXISTS verdicts;
             DROP TABLE IF EXISTS sessions;",
            "CREATE TABLE IF NOT EXISTS sessions(
                 id INTEGER PRIMARY KEY, started_us INTEGER NOT NULL, ended_us INTEGER,
                 agent TEXT, subject TEXT, target TEXT NOT NULL, database TEXT NOT NULL,
                 upstream_user TEXT NOT NULL, end_reason TEXT,
                 statements INTEGER NOT NULL DEFAULT 0, blocked INTEGER NOT NULL DEFAULT 0,
                 first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS verdicts(
                 session INTEGER NOT NULL, verdict TEXT NOT NULL, rule TEXT NOT NULL, -- '' for none
                 PRIMARY KEY(session, verdict, rule)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_us);",
        )?;
        Ok(Index { db })
    }

    /// Records up to (not including) this seq are indexed.
    pub fn indexed_seq(&self) -> rusqlite::Result<u64> {
        indexed_seq(&self.db)
    }

    pub fn max_session(&self) -> rusqlite::Result<u64> {
        let v: Option<i64> = self
            .db
            .query_row("SELECT max(id) FROM sessions", [], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Adds a batch of entries in one transaction. `last_seq` maps every session in the batch to its newest seq and
    /// `next_seq` is the first seq after the batch. Entries the index holds already (before
    /// `indexed_seq`) are skipped.
    pub fn apply(
        &mut self,
        entries: &[IndexEntry],
        last_seq: &HashMap<u64, u64>,
        next_seq: u64,
    ) -> rusqlite::Result<()> {
        let mut verdicts = foldhash::HashSet::<(u64, &str, &str)>::new();
        let mut counts = foldhash::HashMap::<u64, (u64, u64)>::new();
        let indexed = self.indexed_seq()?;
        let tx = self.db.transaction()?;
        for e in entries.iter().filter(|e| e.seq >= indexed) {
            match &e.what {
                Indexed::Start(s) => {
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
                Indexed::Request => counts.entry(e.session).or_default().0 += 1,
                Indexed::Verdict { action, rule } => {
                    let rule = rule.as_deref().unwrap_or_default();
                    verdicts.insert((e.session, action.as_str(), rule));
                    if matches!(action, Action::Block | Action::Denied) {
                        counts.entry(e.session).or_default().1 += 1;
                    }
                }
                Indexed::End { reason } => {
                    tx.prepare_cached(
                        "UPDATE sessions SET ended_us = ?2, end_reason = ?3 WHERE id = ?1",
                    )?
                    .execute(params![e.session as i64, e.at_us, reason])?;
                }
            }
        }
        for (session, verdict, rule) in verdicts {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO verdicts(session, verdict, rule) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![session as i64, verdict, rule])?;
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
        set_indexed_seq(&tx, next_seq)?;
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
                " AND id IN (SELECT session FROM verdicts WHERE verdict = ?)",
                v.clone().into(),
            );
        }
        if let Some(v) = &f.rule {
            arg(
                &mut sql,
                " AND id IN (SELECT session FROM verdicts WHERE rule = ? AND rule <> '')",
                v.clone().into(),
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
            "DELETE FROM verdicts WHERE session NOT IN (SELECT id FROM sessions)",
            [],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Every session the index holds.
    pub fn session_ids(&self) -> rusqlite::Result<HashSet<u64>> {
        let mut stmt = self.db.prepare("SELECT id FROM sessions")?;
        let ids = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        ids.map(|id| id.map(|id| id as u64)).collect()
    }
}

/// Opens a SQLite file derived from the segments (this index, and the full text of
/// [`super::texts`]), in WAL with NORMAL sync: a crash may lose its last batches, which the next
/// catch-up redoes. A file of a layout other than `version` (or a new one) is emptied with `drop`
/// and starts again at seq 0; `create` then makes its tables, beside `meta` for `indexed_seq`.
pub(super) fn open_derived(
    path: &Path,
    version: i64,
    busy: std::time::Duration,
    drop: &str,
    create: &str,
) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.busy_timeout(busy)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    let found: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found != version {
        db.execute_batch(drop)?;
        db.execute_batch("DROP TABLE IF EXISTS meta;")?;
    }
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )?;
    db.execute_batch(create)?;
    db.pragma_update(None, "user_version", version)?;
    Ok(db)
}

/// Records before this seq are in a file [`open_derived`] opened.
pub(super) fn indexed_seq(db: &Connection) -> rusqlite::Result<u64> {
    let v: Option<i64> = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'indexed_seq'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

pub(super) fn set_indexed_seq(db: &Connection, seq: u64) -> rusqlite::Result<()> {
    db.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES ('indexed_seq', ?1)")?
        .execute(params![seq as i64])?;
    Ok(())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::types::{Request, RequestKind, Verdict};

    pub(crate) fn start(session: u64, seq: u64) -> Entry {
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

    pub(crate) fn query(session: u64, stmt: u32, seq: u64, text: &str) -> Entry {
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

    pub(crate) fn end(session: u64, seq: u64) -> Entry {
        Entry {
            seq,
            at_us: seq as i64,
            session,
            stmt: 0,
            record: Record::SessionEnd {
                reason: "client closed".into(),
            },
        }
    }

    fn verdict(session: u64, stmt: u32, seq: u64, action: Action, rule: Option<&str>) -> Entry {
        Entry {
            seq,
            at_us: seq as i64,
            session,
            stmt,
            record: Record::Verdict(Verdict {
                action,
                rule: rule.map(Into::into),
                ..Verdict::allow(None)
            }),
        }
    }

    /// Applies entries as the recorder hands them over: only what the index keeps.
    fn apply(index: &mut Index, entries: &[Entry], last_seq: &[(u64, u64)], next_seq: u64) {
        let kept: Vec<IndexEntry> = entries.iter().cloned().filter_map(IndexEntry::of).collect();
        let last_seq = last_seq.iter().copied().collect();
        index.apply(&kept, &last_seq, next_seq).unwrap();
    }

    fn ids(index: &Index) -> Vec<u64> {
        let rows = index.list(&Filter::default()).unwrap();
        rows.iter().map(|s| s.id).collect()
    }

    /// An index in a directory of its own, kept as long as the directory is.
    fn fresh() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        (dir, index)
    }

    #[test]
    fn a_batch_indexed_twice_is_counted_once() {
        let (dir, mut index) = fresh();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT x FROM orders"),
            query(1, 2, 2, "SELECT x FROM users"),
            end(1, 3),
        ];
        let last = [(1, 3)];
        apply(&mut index, &batch, &last, 4);
        // The same records applied again leave the index as it was.
        let mut again = Index::open(dir.path()).unwrap();
        apply(&mut again, &batch[1..], &last, 4);
        let session = again.session(1).unwrap().unwrap();
        assert_eq!(session.statements, 2);
        assert_eq!((session.first_seq, session.last_seq), (0, 3));
        assert_eq!(session.end_reason.as_deref(), Some("client closed"));
        assert_eq!(ids(&again), vec![1]);
    }

    #[test]
    fn a_session_matches_every_verdict_and_rule_its_statements_met() {
        let (_dir, mut index) = fresh();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "DELETE FROM orders"),
            verdict(1, 1, 2, Action::Hold, Some("default/hold-delete")),
            start(2, 3),
            query(2, 1, 4, "SELECT 1"),
            verdict(2, 1, 5, Action::Allow, None),
        ];
        apply(&mut index, &batch, &[(1, 2), (2, 5)], 6);
        // The approval comes in a later batch.
        apply(
            &mut index,
            &[verdict(1, 1, 6, Action::Denied, None)],
            &[(1, 6)],
            7,
        );
        let list = |verdict: Option<&str>, rule: Option<&str>| -> Vec<u64> {
            let filter = Filter {
                verdict: verdict.map(Into::into),
                rule: rule.map(Into::into),
                ..Default::default()
            };
            index.list(&filter).unwrap().iter().map(|s| s.id).collect()
        };
        assert_eq!(list(Some("hold"), None), vec![1]);
        assert_eq!(list(Some("denied"), None), vec![1]);
        assert_eq!(list(Some("allow"), None), vec![2]);
        assert_eq!(list(Some("block"), None), Vec::<u64>::new());
        assert_eq!(list(None, Some("default/hold-delete")), vec![1]);
        assert_eq!(
            list(None, Some("")),
            Vec::<u64>::new(),
            "no rule is no match"
        );
        assert_eq!(index.session(1).unwrap().unwrap().blocked, 1);
    }

    #[test]
    fn pruned_sessions_leave_no_rows_behind() {
        let (_dir, mut index) = fresh();
        let batch = [
            start(1, 0),
            verdict(1, 1, 1, Action::Block, Some("default/drop")),
            start(2, 2),
            verdict(2, 1, 3, Action::Allow, None),
        ];
        apply(&mut index, &batch, &[(1, 1), (2, 3)], 4);
        assert_eq!(index.forget_before(2).unwrap(), 1);
        assert_eq!(ids(&index), vec![2]);
        assert_eq!(index.session_ids().unwrap(), HashSet::from([2]));
        let verdicts: i64 = index
            .db
            .query_row("SELECT count(*) FROM verdicts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(verdicts, 1);
    }

    #[test]
    fn an_index_of_an_old_layout_is_emptied_for_the_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The third layout: the full text lived in the index, filled by the recorder.
            let db = Connection::open(dir.path().join(INDEX_FILE)).unwrap();
            db.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('indexed_seq', 40);
                 CREATE TABLE texts(id INTEGER PRIMARY KEY, session INTEGER NOT NULL);
                 CREATE VIRTUAL TABLE statements_fts
                     USING fts5(text, content='', contentless_delete=1);
                 INSERT INTO statements_fts(rowid, text) VALUES (1, 'SELECT 1');
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let mut index = Index::open(dir.path()).unwrap();
        assert_eq!(
            index.indexed_seq().unwrap(),
            0,
            "rebuilt from the first record"
        );
        let tables: i64 = index
            .db
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('texts', 'statements_fts')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the full text left the index");
        apply(&mut index, &[start(1, 0)], &[(1, 0)], 1);
        assert_eq!(ids(&index), vec![1]);
        drop(index);
        let reopened = Index::open(dir.path()).unwrap();
        assert_eq!(reopened.indexed_seq().unwrap(), 1, "the new layout is kept");
    }
}
