//! The statements' full text, for `recordings list --grep`: FTS5 in its own SQLite file beside
//! the index, filled by the search itself from the segments, as far as the index got when it
//! runs. Tokenizing each statement as it was recorded cost the recorder a fifth of its CPU per
//! simple query, for texts that are mostly never searched; a search pays for the statements
//! recorded since the last one instead. The segments are the record: this file can be deleted,
//! and the next search rebuilds it.

use std::collections::{BTreeSet, HashSet};
use std::hash::{BuildHasher as _, RandomState};
use std::path::Path;

use anyhow::Context as _;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::encode::{REQUEST, SESSION_END};
use super::index::{indexed_seq, open_derived, set_indexed_seq};
use super::types::{Entry, Record};

pub const TEXTS_FILE: &str = "texts.sqlite";

/// The layout, in SQLite's `user_version`. A file of any other is emptied and rebuilt.
const SCHEMA_VERSION: i64 = 1;

/// A search that finds another catching up waits for it this long, at most.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A full-text document holds one session's new statements, up to this size.
const DOC_BYTES: usize = 64 << 10;

/// Between two statements of a document: a token that no statement's text puts there, so that a
/// phrase never matches across a statement boundary. U+E000 is a private-use character, which
/// the `unicode61` tokenizer keeps as a token of its own.
const STATEMENT_BREAK: &str = " \u{e000} ";

/// The record variants a catch-up reads: requests, and session ends to forget their texts.
const VARIANTS: [u32; 2] = [REQUEST, SESSION_END];

pub struct Texts {
    db: Connection,
}

impl Texts {
    pub fn open(dir: &Path) -> anyhow::Result<Texts> {
        let path = dir.join(TEXTS_FILE);
        create(&path, dir).with_context(|| format!("creating {}", path.display()))?;
        // Per document its session and the seq of its last statement (for prune). The
        // full-text table keeps no copy of the text (`content=''`); `contentless_delete` lets
        // prune remove documents.
        let db = open_derived(
            &path,
            SCHEMA_VERSION,
            BUSY_TIMEOUT,
            "DROP TABLE IF EXISTS statements_fts; DROP TABLE IF EXISTS docs;",
            "CREATE TABLE IF NOT EXISTS docs(
                 id INTEGER PRIMARY KEY, session INTEGER NOT NULL, last_seq INTEGER NOT NULL);
             CREATE VIRTUAL TABLE IF NOT EXISTS statements_fts
                 USING fts5(text, content='', contentless_delete=1);",
        )?;
        Ok(Texts { db })
    }

    /// Records before this seq are in the full text.
    pub fn indexed_seq(&self) -> rusqlite::Result<u64> {
        indexed_seq(&self.db)
    }

    /// Adds the statements of the records from [`Self::indexed_seq`] up to `until`, in one
    /// transaction: a search running beside it waits, then finds nothing left to add. `until` is
    /// the session index's own `indexed_seq`: the recorder indexes only records already synced,
    /// and a record past that could still be lost to a power cut and its seq written again.
    pub fn catch_up(&mut self, dir: &Path, until: u64) -> anyhow::Result<()> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let from = indexed_seq(&tx)?;
        let mut docs = Docs::default();
        let next = super::read::for_each_entry_of(dir, from, until, &VARIANTS, |e| {
            docs.add(&tx, &e)
                .context("adding statements to the full-text index")?;
            Ok(true)
        })?;
        docs.finish(&tx)?;
        if next > from {
            set_indexed_seq(&tx, next)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds entries in one transaction, as a catch-up does, up to `next_seq`.
    #[cfg(test)]
    fn apply(&mut self, entries: &[Entry], next_seq: u64) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        let from = indexed_seq(&tx)?;
        let mut docs = Docs::default();
        for e in entries.iter().filter(|e| e.seq >= from) {
            docs.add(&tx, e)?;
        }
        docs.finish(&tx)?;
        set_indexed_seq(&tx, next_seq)?;
        tx.commit()
    }

    /// The sessions with a statement that holds `text` as a phrase: its words, in order.
    pub fn sessions_matching(&self, text: &str) -> rusqlite::Result<BTreeSet<u64>> {
        // A phrase query: the operator's text is matched, never parsed as FTS syntax.
        let phrase = format!("\"{}\"", text.replace('"', "\"\""));
        let mut stmt = self.db.prepare(
            "SELECT DISTINCT session FROM docs WHERE id IN
                 (SELECT rowid FROM statements_fts WHERE statements_fts MATCH ?1)",
        )?;
        let sessions = stmt.query_map(params![phrase], |r| r.get::<_, i64>(0))?;
        sessions.map(|s| s.map(|s| s as u64)).collect()
    }

    /// Drops the documents of sessions that prune removed: those written before `before_seq`
    /// by a session not in `alive`. Returns how many.
    pub fn forget_before(
        &mut self,
        before_seq: u64,
        alive: &HashSet<u64>,
    ) -> rusqlite::Result<usize> {
        let tx = self.db.transaction()?;
        let doomed: Vec<i64> = {
            let mut stmt = tx.prepare("SELECT id, session FROM docs WHERE last_seq < ?1")?;
            let rows = stmt.query_map(params![before_seq as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.filter(|r| r.as_ref().map_or(true, |(_, s)| !alive.contains(s)))
                .map(|r| r.map(|(id, _)| id))
                .collect::<rusqlite::Result<_>>()?
        };
        for id in &doomed {
            tx.prepare_cached("DELETE FROM statements_fts WHERE rowid = ?1")?
                .execute(params![id])?;
            tx.prepare_cached("DELETE FROM docs WHERE id = ?1")?
                .execute(params![id])?;
        }
        tx.commit()?;
        Ok(doomed.len())
    }
}

/// Makes the file if it is not there: readable by the owner's group at most, as the daemon's
/// files are (`UMask=0027`), and owned by the recording directory's owner, so that a search run
/// as root leaves no file that the service's user cannot open. SQLite gives its `-wal` and `-shm`
/// files the same mode and owner.
fn create(path: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    };
    let owner = std::fs::metadata(dir)?;
    match std::os::unix::fs::fchown(&file, Some(owner.uid()), Some(owner.gid())) {
        // Only root may give a file away; anyone else's search made a file of its own.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// Documents being filled: per session, its statement texts not yet written, joined by
/// `STATEMENT_BREAK`. A session's document is written when it reaches `DOC_BYTES`, when the
/// session ends, and at the end of the catch-up.
#[derive(Default)]
struct Docs {
    open: foldhash::HashMap<u64, Doc>,
    seen: SeenTexts,
}

#[derive(Default)]
struct Doc {
    text: String,
    last_seq: u64,
}

impl Docs {
    fn add(&mut self, tx: &Transaction, e: &Entry) -> rusqlite::Result<()> {
        match &e.record {
            Record::Request(r) if self.seen.first(e.session, &r.text) => {
                let doc = self.open.entry(e.session).or_default();
                if !doc.text.is_empty() {
                    doc.text.push_str(STATEMENT_BREAK);
                }
                doc.text.push_str(&r.text);
                doc.last_seq = e.seq;
                if doc.text.len() >= DOC_BYTES {
                    let full = std::mem::take(doc);
                    write_doc(tx, e.session, &full)?;
                }
            }
            Record::SessionEnd { .. } => {
                self.seen.end(e.session);
                if let Some(doc) = self.open.remove(&e.session) {
                    write_doc(tx, e.session, &doc)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self, tx: &Transaction) -> rusqlite::Result<()> {
        for (session, doc) in self.open {
            write_doc(tx, session, &doc)?;
        }
        Ok(())
    }
}

fn write_doc(tx: &Transaction, session: u64, doc: &Doc) -> rusqlite::Result<()> {
    if doc.text.is_empty() {
        return Ok(());
    }
    tx.prepare_cached("INSERT INTO docs(session, last_seq) VALUES (?1, ?2)")?
        .execute(params![session as i64, doc.last_seq as i64])?;
    // A plain insert: a REPLACE would make FTS5 flush its pending terms to look the rowid up.
    tx.prepare_cached("INSERT INTO statements_fts(rowid, text) VALUES (?1, ?2)")?
        .execute(params![tx.last_insert_rowid(), doc.text])?;
    Ok(())
}

/// Per live session, the hashes of the statement texts already in its full text: a session that
/// repeats a statement is found by its first occurrence.
#[derive(Default)]
struct SeenTexts {
    by_session: foldhash::HashMap<u64, foldhash::HashSet<u64>>,
    /// Hashes in `by_session`, all sessions together.
    count: usize,
    hasher: RandomState,
}

impl SeenTexts {
    /// True the first time a session sends a text.
    fn first(&mut self, session: u64, text: &str) -> bool {
        if self.count >= SEEN_TEXTS {
            self.by_session.clear();
            self.count = 0;
        }
        let hash = self.hasher.hash_one(text);
        let first = self.by_session.entry(session).or_default().insert(hash);
        self.count += usize::from(first);
        first
    }

    fn end(&mut self, session: u64) {
        if let Some(texts) = self.by_session.remove(&session) {
            self.count -= texts.len();
        }
    }
}

/// At most this many text hashes in all (about a megabyte), whatever the number of sessions and
/// however long they live, or whether their end was ever recorded; then every set starts over,
/// and repeats are indexed again (harmless: a search names sessions).
const SEEN_TEXTS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::index::tests::{end, query, start};
    use crate::record::{Recorder, RecordingConfig, Request, RequestKind, SessionStart};

    fn grep(texts: &Texts, text: &str) -> Vec<u64> {
        texts.sessions_matching(text).unwrap().into_iter().collect()
    }

    fn documents(texts: &Texts) -> i64 {
        texts
            .db
            .query_row("SELECT count(*) FROM docs", [], |r| r.get(0))
            .unwrap()
    }

    fn fresh() -> (tempfile::TempDir, Texts) {
        let dir = tempfile::tempdir().unwrap();
        let texts = Texts::open(dir.path()).unwrap();
        (dir, texts)
    }

    #[test]
    fn a_search_is_a_phrase_and_never_fts_syntax() {
        let (_dir, mut texts) = fresh();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT x FROM orders"),
            query(1, 2, 2, "SELECT x FROM users WHERE name = 'o\"brien'"),
        ];
        texts.apply(&batch, 3).unwrap();
        assert_eq!(grep(&texts, "orders"), vec![1]);
        assert_eq!(grep(&texts, "FROM users"), vec![1], "a phrase");
        assert_eq!(
            grep(&texts, "users FROM"),
            Vec::<u64>::new(),
            "words out of order"
        );
        assert_eq!(
            grep(&texts, "o\"brien"),
            vec![1],
            "a quote is text, not syntax"
        );
        assert_eq!(
            grep(&texts, "orders OR users"),
            Vec::<u64>::new(),
            "OR is a word"
        );
        assert_eq!(documents(&texts), 1, "one document per session");
        // The same records again add nothing: they are before `indexed_seq`.
        texts.apply(&batch, 3).unwrap();
        assert_eq!(documents(&texts), 1);
    }

    #[test]
    fn a_phrase_never_spans_two_statements() {
        let (_dir, mut texts) = fresh();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT * FROM orders"),
            query(1, 2, 2, "DELETE FROM users"),
        ];
        texts.apply(&batch, 3).unwrap();
        assert_eq!(grep(&texts, "FROM orders"), vec![1]);
        assert_eq!(grep(&texts, "DELETE FROM users"), vec![1]);
        assert_eq!(grep(&texts, "orders DELETE"), Vec::<u64>::new());
        assert_eq!(
            grep(&texts, "orders \u{e000} DELETE"),
            vec![1],
            "only through the break"
        );
    }

    #[test]
    fn a_repeated_statement_is_indexed_once_per_session() {
        let (_dir, mut texts) = fresh();
        let text = "SELECT x FROM orders WHERE id = $1";
        texts
            .apply(
                &[start(1, 0), query(1, 1, 1, text), query(1, 2, 2, text)],
                3,
            )
            .unwrap();
        assert_eq!(documents(&texts), 1);
        // A later session with the same text is found too.
        texts
            .apply(&[end(1, 3), start(2, 4), query(2, 1, 5, text)], 6)
            .unwrap();
        assert_eq!(grep(&texts, "FROM orders"), vec![1, 2]);
        assert_eq!(documents(&texts), 2);
    }

    #[test]
    fn texts_seen_are_forgotten_at_session_end_and_bounded_in_all() {
        let mut docs = Docs::default();
        docs.seen.first(1, "SELECT 1");
        docs.seen.first(1, "SELECT 2");
        assert_eq!(docs.seen.count, 2);
        docs.seen.end(1);
        assert_eq!((docs.seen.by_session.len(), docs.seen.count), (0, 0));
        // Sessions whose end never comes hold no more than the bound between them.
        for i in 0..SEEN_TEXTS + 10 {
            docs.seen.first(10 + i as u64 % 7, &format!("SELECT {i}"));
        }
        assert!(docs.seen.count <= SEEN_TEXTS, "{}", docs.seen.count);
        let held: usize = docs.seen.by_session.values().map(|s| s.len()).sum();
        assert_eq!(held, docs.seen.count);
    }

    #[test]
    fn a_long_session_is_split_into_documents_that_each_find_it() {
        let (_dir, mut texts) = fresh();
        let statements: Vec<String> = (0..3000)
            .map(|i| format!("SELECT payload FROM events WHERE tag = 'tag{i}'"))
            .collect();
        let mut batch = vec![start(1, 0)];
        batch.extend((0..3000).map(|i| query(1, i + 1, u64::from(i) + 1, &statements[i as usize])));
        texts.apply(&batch, 3001).unwrap();
        let bytes: usize = statements
            .iter()
            .map(|t| t.len() + STATEMENT_BREAK.len())
            .sum();
        assert_eq!(
            documents(&texts) as usize,
            bytes.div_ceil(DOC_BYTES),
            "{bytes} bytes of text"
        );
        for i in [0, 1499, 2999] {
            assert_eq!(grep(&texts, &format!("tag{i}")), vec![1], "tag{i}");
        }
    }

    #[test]
    fn prune_drops_the_documents_of_the_sessions_it_removed_only() {
        let (_dir, mut texts) = fresh();
        let batch = [
            start(1, 0),
            query(1, 1, 1, "SELECT x FROM old_orders"),
            end(1, 2),
            // Alive across the pruned point: its early statement stays searchable.
            start(2, 3),
            query(2, 1, 4, "SELECT x FROM long_lived"),
            start(3, 10),
            query(3, 1, 11, "SELECT x FROM new_orders"),
        ];
        texts.apply(&batch, 12).unwrap();
        let alive = HashSet::from([2, 3]);
        assert_eq!(texts.forget_before(8, &alive).unwrap(), 1);
        assert_eq!(grep(&texts, "old_orders"), Vec::<u64>::new());
        assert_eq!(grep(&texts, "long_lived"), vec![2]);
        assert_eq!(grep(&texts, "new_orders"), vec![3]);
    }

    #[test]
    fn the_file_is_no_wider_than_the_index_and_belongs_to_the_directorys_owner() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let root = testkit::is_root();
        if root {
            // The service's user owns the directory; the operator searches as root.
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        } else {
            eprintln!("SKIPPED the owner half of this test: needs root to give a file away");
        }
        // Open while checked: SQLite removes its `-wal` file with the last connection.
        let texts = Texts::open(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(TEXTS_FILE)).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o037,
            0,
            "{:o}",
            meta.permissions().mode()
        );
        if root {
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
            let wal = std::fs::metadata(dir.path().join(format!("{TEXTS_FILE}-wal"))).unwrap();
            assert_eq!(wal.uid(), 65534, "SQLite's own files follow");
        }
        drop(texts);
    }

    #[test]
    fn a_file_of_another_layout_is_rebuilt_from_the_first_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join(TEXTS_FILE)).unwrap();
            db.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO meta VALUES ('indexed_seq', 40);
                 PRAGMA user_version = 99;",
            )
            .unwrap();
        }
        let texts = Texts::open(dir.path()).unwrap();
        assert_eq!(texts.indexed_seq().unwrap(), 0);
    }

    fn request(text: &str) -> Request {
        Request {
            kind: RequestKind::Query,
            statement: None,
            text: text.into(),
            params: vec![],
        }
    }

    /// Records sessions of one statement each, through a real recorder.
    fn record(state: &Path, statements: &[&str]) {
        let recorder = Recorder::start(&RecordingConfig::default(), state).unwrap();
        for text in statements {
            let mut rec = recorder.handle().begin(SessionStart::default()).unwrap();
            drop(rec.request(request(text)).unwrap());
            rec.rows(vec![vec![Some(crate::record::Bytes::from("42"))]])
                .unwrap();
            rec.end("done").unwrap();
        }
        recorder.handle().flush().wait().unwrap();
    }

    /// How far the session index got: what a search takes in.
    fn durable(dir: &Path) -> u64 {
        crate::record::index::Index::open(dir)
            .unwrap()
            .indexed_seq()
            .unwrap()
    }

    #[test]
    fn each_search_takes_in_what_was_recorded_since_the_last() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("recordings");
        record(state.path(), &["SELECT * FROM first_table"]);
        let mut texts = Texts::open(&dir).unwrap();
        // Only up to where the session index got: the session's start (seq 0), not its request.
        texts.catch_up(&dir, 1).unwrap();
        assert_eq!(grep(&texts, "first_table"), Vec::<u64>::new());
        assert!(texts.indexed_seq().unwrap() <= 1);
        texts.catch_up(&dir, durable(&dir)).unwrap();
        assert_eq!(grep(&texts, "first_table"), vec![1]);
        let after_first = texts.indexed_seq().unwrap();
        assert!(after_first > 0);

        // A restart, more sessions: only they are read and added.
        record(state.path(), &["SELECT * FROM second_table", "SELECT 42"]);
        texts.catch_up(&dir, durable(&dir)).unwrap();
        assert_eq!(grep(&texts, "second_table"), vec![2]);
        assert_eq!(grep(&texts, "first_table"), vec![1]);
        assert_eq!(documents(&texts), 3);
        assert!(texts.indexed_seq().unwrap() > after_first);

        // Nothing new: nothing added, and a deleted file is rebuilt whole.
        texts.catch_up(&dir, durable(&dir)).unwrap();
        assert_eq!(documents(&texts), 3);
        drop(texts);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("{TEXTS_FILE}{suffix}")));
        }
        let mut texts = Texts::open(&dir).unwrap();
        texts.catch_up(&dir, durable(&dir)).unwrap();
        assert_eq!(grep(&texts, "second_table"), vec![2]);
        assert_eq!(
            grep(&texts, "42"),
            vec![3],
            "a value in a row is not a statement's text"
        );
    }
}
