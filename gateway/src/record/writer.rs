//! The recorder thread: encodes entries, group-commits them as zstd blocks, signs checkpoints,
//! keeps the index, and rolls to a new segment whenever a write or sync fails (a failed fsync
//! leaves the page cache in an unknown state, so that file is never synced again).
//!
//! A group commit writes; a sync follows at `sync_interval`, or at once for whoever waits on
//! durability. On this kind of host an `fdatasync` costs about 200 µs of CPU, several times a
//! group's own work at a few hundred statements a second. Blocks written and not yet synced are
//! kept until they are, so that a failed sync rewrites them into a new segment.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_channel::oneshot;

use super::checkpoint::{Checkpoint, Signer};
use super::config::RecordingConfig;
use super::encode;
use super::index::{Index, IndexEntry, Indexed};
use super::merkle::Frontier;
use super::segment::{
    Damage, RECORD_HEADER, Segment, SegmentHeader, encode_block, encode_checkpoint, encode_header,
    frame_in_place, list_segments, segment_path,
};
use super::types::{Entry, Record};
use super::{Health, Queue, RecordError, Shared, now_us};

pub(super) enum Msg {
    /// Records a session encoded: each a `u32` length (LE) and its payload after `seq`
    /// (`encode::Tail`). `bytes` were counted against the queue's bound.
    Records {
        records: Vec<u8>,
        bytes: usize,
        durable: Option<oneshot::Sender<Result<(), RecordError>>>,
    },
    /// Commit what is queued, then answer.
    Flush(oneshot::Sender<Result<(), RecordError>>),
    /// Commit, sign a last checkpoint and stop.
    Shutdown,
}

/// A block encoded and waiting to reach the disk.
struct Sealed {
    bytes: Vec<u8>,
    /// Tree state after this block (data blocks only).
    after: Option<Frontier>,
    checkpoint: Option<String>,
    waiters: Vec<oneshot::Sender<Result<(), RecordError>>>,
    last_seq: HashMap<u64, u64>,
}

struct Open {
    path: PathBuf,
    file: File,
    /// Where the header ends.
    data_start: u64,
    len: u64,
    /// Where the last successful sync left the file.
    synced: u64,
    opened: Instant,
}

pub(super) struct Writer {
    dir: PathBuf,
    cfg: RecordingConfig,
    origin: String,
    signer: Signer,
    shared: Arc<Shared>,
    seg: Option<Open>,
    next_segment: u32,
    /// Tree over every record encoded so far.
    frontier: Frontier,
    /// Tree over every record on disk.
    durable: Frontier,
    last_checkpoint: u64,
    last_checkpoint_at: Instant,
    /// Extension lines for the next checkpoint (recovery notes); forces one.
    pending_notes: Vec<String>,
    session_ended: bool,
    raw: Vec<u8>,
    raw_first_seq: u64,
    raw_count: u32,
    raw_last_at: i64,
    raw_since: Option<Instant>,
    waiters: Vec<oneshot::Sender<Result<(), RecordError>>>,
    /// The records the index keeps, in seq order, from the last index update on, durable or
    /// not: those before `durable` go to the index, in place (entries are large, and moving
    /// them from block to block cost more than the index's own work on them).
    index_entries: Vec<IndexEntry>,
    index_last_seq: HashMap<u64, u64>,
    /// The last record's session and seq, not yet in `index_last_seq`: consecutive records are
    /// mostly one session's, and a map update for each cost more than numbering the record.
    last_pushed: Option<(u64, u64)>,
    unwritten: VecDeque<Sealed>,
    /// Written to the open segment since its last sync, in order.
    unsynced: VecDeque<Sealed>,
    last_sync: Instant,
    flushes: Vec<oneshot::Sender<Result<(), RecordError>>>,
    index: Option<Index>,
    /// The newest seq per session of durable records not yet in the index, and since when.
    index_later: HashMap<u64, u64>,
    index_since: Option<Instant>,
    ship: Option<(std::sync::mpsc::Sender<String>, std::thread::JoinHandle<()>)>,
    zstd: zstd::bulk::Compressor<'static>,
}

/// A record as a session hands it over: the entry's fields after `seq`, then the record itself
/// (its variant first) as `record`.
struct Handed<'a> {
    at_us: i64,
    session: u64,
    stmt: u32,
    variant: u32,
    record: &'a [u8],
}

impl<'a> Handed<'a> {
    fn parse(tail: &'a [u8]) -> Option<Handed<'a>> {
        let (at_us, session, stmt, variant, record) = encode::take_head(tail)?;
        Some(Handed {
            at_us,
            session,
            stmt,
            variant,
            record,
        })
    }
}

const RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// Written blocks are synced once this many bytes of them wait, whatever `sync_interval` says:
/// they are kept in memory until then.
const SYNC_BYTES: u64 = 8 << 20;

/// Durable records wait at most this long for the index (one SQLite transaction for all of
/// them, rather than one per group commit: the index is derived, and rebuilt at start).
const INDEX_INTERVAL: Duration = Duration::from_secs(1);

impl Writer {
    /// Opens the directory: recovers a torn tail, catches the index up, and returns the writer
    /// with the next session id. Runs on the caller's thread, before any session exists.
    pub(super) fn open(
        dir: &Path,
        key_file: &Path,
        cfg: &RecordingConfig,
        shared: Arc<Shared>,
    ) -> anyhow::Result<(Writer, u64)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let origin = cfg.origin();
        let signer = Signer::load_or_create(key_file, &origin)?;
        let mut w = Writer {
            dir: dir.to_owned(),
            cfg: cfg.clone(),
            origin,
            signer,
            shared,
            seg: None,
            next_segment: 1,
            frontier: Frontier::default(),
            durable: Frontier::default(),
            last_checkpoint: 0,
            last_checkpoint_at: Instant::now(),
            pending_notes: Vec::new(),
            session_ended: false,
            raw: Vec::new(),
            raw_first_seq: 0,
            raw_count: 0,
            raw_last_at: 0,
            raw_since: None,
            waiters: Vec::new(),
            index_entries: Vec::new(),
            index_last_seq: HashMap::new(),
            last_pushed: None,
            unwritten: VecDeque::new(),
            unsynced: VecDeque::new(),
            last_sync: Instant::now(),
            flushes: Vec::new(),
            index: None,
            index_later: Default::default(),
            index_since: None,
            ship: None,
            zstd: zstd::bulk::Compressor::new(cfg.zstd_level)
                .context("setting up zstd compression")?,
        };
        let recovered = w.recover()?;
        let mut index = Index::open(dir).context("opening the recording index")?;
        let next_session = catch_up(dir, &mut index, w.frontier.size())? + 1;
        w.index = Some(index);
        if let Some(r) = recovered {
            w.push(Entry {
                seq: 0,
                at_us: now_us(),
                session: 0,
                stmt: 0,
                record: r,
            });
        }
        w.ship = spawn_shipper(&w.cfg.ship_command, w.cfg.ship_timeout);
        w.commit(true);
        w.index_now();
        if let Some(Health::Failed(e)) = w.shared.health() {
            bail!(
                "the recording directory {} is not writable: {e}",
                dir.display()
            );
        }
        Ok((w, next_session))
    }

    /// Finds where the log ends. A torn tail of the newest segment is cut off; anything else
    /// damaged there stops the start, so nothing is written after a tampered record.
    fn recover(&mut self) -> anyhow::Result<Option<Record>> {
        let segments = list_segments(&self.dir)?;
        let Some((number, path)) = segments.last().cloned() else {
            return Ok(None);
        };
        self.next_segment = number + 1;
        let seg = match Segment::open(&path) {
            Ok(s) => s,
            Err((_, Some(_))) if std::fs::metadata(&path)?.len() < 4096 => {
                // A segment whose header never reached the disk: start over from the one before.
                let bytes = std::fs::metadata(&path)?.len();
                std::fs::remove_file(&path)?;
                let mut r = self.recover()?;
                self.next_segment = number + 1;
                let note = Record::Recovery {
                    segment: file_name(&path),
                    offset: 0,
                    bytes_dropped: bytes,
                };
                self.pending_notes
                    .push(format!("recovered {} 0 {bytes}", file_name(&path)));
                r.get_or_insert(note);
                return Ok(r);
            }
            Err((e, _)) => {
                return Err(e).with_context(|| format!("opening {}", path.display()));
            }
        };
        let mut frontier = Frontier::from_parts(seg.header.first_seq, seg.header.frontier.clone())
            .with_context(|| format!("{}: bad frontier in its header", path.display()))?;
        let (blocks, damage) = seg.blocks();
        let mut last_checkpoint = None;
        let mut end = seg.data_start;
        for b in &blocks {
            if b.is_checkpoint {
                last_checkpoint = Some(b.first_seq);
            } else {
                let records = b.records().map_err(|d| {
                    anyhow::anyhow!(
                        "{}: {d:?}; refusing to append after damage (run `portcullis recordings \
                         verify`)",
                        path.display()
                    )
                })?;
                for r in &records {
                    frontier.push_leaf(r);
                }
            }
            end = b.end();
        }
        if let Some(cp) = last_checkpoint {
            self.last_checkpoint = cp;
        }
        self.frontier = frontier.clone();
        self.durable = frontier;
        match damage {
            None => Ok(None),
            Some(Damage::Corrupt { offset, what }) => bail!(
                "{} is damaged at offset {offset}: {what}; refusing to append after it (run \
                 `portcullis recordings verify`)",
                path.display()
            ),
            Some(Damage::Torn { offset }) => {
                let dropped = seg.len() - offset;
                debug_assert_eq!(offset, end);
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(offset)?;
                f.sync_all()?;
                let name = file_name(&path);
                tracing::warn!(
                    segment = %name, offset, bytes_dropped = dropped,
                    "recording: cut a torn tail left by a crash"
                );
                self.pending_notes
                    .push(format!("recovered {name} {offset} {dropped}"));
                Ok(Some(Record::Recovery {
                    segment: name,
                    offset,
                    bytes_dropped: dropped,
                }))
            }
        }
    }

    pub(super) fn run(mut self, queue: &Queue) {
        let mut inbox = Vec::new();
        loop {
            queue.take(&mut inbox);
            let mut stop = false;
            for msg in inbox.drain(..) {
                // Shutdown comes last from its sender; anything after it is dropped, as before.
                if stop || self.handle(msg, queue) {
                    stop = true;
                    continue;
                }
                if self.raw.len() >= self.cfg.commit_bytes {
                    self.commit(false);
                }
            }
            if stop {
                self.commit(true);
                self.index_now();
                break;
            }
            let due = self.raw.len() >= self.cfg.commit_bytes
                || !self.flushes.is_empty()
                || self
                    .raw_since
                    .is_some_and(|t| t.elapsed() >= self.cfg.commit_interval)
                || matches!(self.shared.health(), Some(Health::Failed(_)))
                || (self.frontier.size() > self.last_checkpoint
                    && self.last_checkpoint_at.elapsed() >= self.cfg.checkpoint_interval)
                || self.sync_due();
            if due {
                self.commit(false);
            }
            if self.index_due() {
                self.index_now();
            }
            let mut wait = match (self.raw_since, self.shared.health()) {
                (_, Some(Health::Failed(_))) => RETRY_INTERVAL,
                (Some(since), _) => self.cfg.commit_interval.saturating_sub(since.elapsed()),
                (None, _) => self
                    .cfg
                    .checkpoint_interval
                    .saturating_sub(self.last_checkpoint_at.elapsed())
                    .max(Duration::from_millis(10)),
            };
            if let Some(t) = self.index_since {
                wait = wait.min(INDEX_INTERVAL.saturating_sub(t.elapsed()));
            }
            if !self.unsynced.is_empty() {
                wait = wait.min(
                    self.cfg
                        .sync_interval
                        .saturating_sub(self.last_sync.elapsed()),
                );
            }
            // Records waiting for their group commit: sleep until it is due, whatever comes.
            queue.sleep(wait, self.raw_since.is_some() || !self.flushes.is_empty());
        }
        // The last checkpoints leave the host before the recorder is done.
        if let Some((tx, thread)) = self.ship.take() {
            drop(tx);
            let _ = thread.join();
        }
    }

    /// Takes one message; true on `Shutdown`. A hand-over's buffer goes back to the queue.
    fn handle(&mut self, msg: Msg, queue: &Queue) -> bool {
        match msg {
            Msg::Records {
                records,
                bytes,
                durable,
            } => {
                self.shared.queued_bytes.fetch_sub(bytes, Relaxed);
                self.push_records(&records);
                queue.give_back(records);
                if let Some(tx) = durable {
                    self.waiters.push(tx);
                }
            }
            Msg::Flush(tx) => self.flushes.push(tx),
            Msg::Shutdown => return true,
        }
        false
    }

    /// The recorder's own entries (recovery notes).
    fn push(&mut self, entry: Entry) {
        let tail = postcard::to_stdvec(&encode::Tail {
            at_us: entry.at_us,
            session: entry.session,
            stmt: entry.stmt,
            record: &entry.record,
        });
        match tail {
            Ok(tail) => match Handed::parse(&tail) {
                Some(handed) => self.push_run(&[handed]),
                None => tracing::error!("recording: an entry does not decode after encoding"),
            },
            Err(e) => tracing::error!("recording: an entry does not encode: {e}"),
        }
    }

    /// Takes a hand-over's records (each a `u32` length, then its tail). Each run of one
    /// statement's records becomes one record, and one Merkle leaf: a simple query's request
    /// and verdict, or its columns, row and completion, hash and frame once rather than once
    /// each.
    fn push_records(&mut self, mut rest: &[u8]) {
        let mut run: Vec<Handed> = Vec::new();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
            let (one, next) = tail.split_at(len);
            rest = next;
            let Some(handed) = Handed::parse(one) else {
                tracing::error!("recording: a session's record does not decode; dropped");
                continue;
            };
            if run
                .last()
                .is_some_and(|r| (r.session, r.stmt) != (handed.session, handed.stmt))
            {
                self.push_run(&run);
                run.clear();
            }
            run.push(handed);
        }
        if !run.is_empty() {
            self.push_run(&run);
        }
    }

    /// Numbers one statement's records and appends them to the pending block as one record:
    /// the record itself when it is alone, a `Record::Bundle` of them otherwise.
    fn push_run(&mut self, run: &[Handed]) {
        let (first, last) = (&run[0], &run[run.len() - 1]);
        let seq = self.frontier.size();
        // Framed where it is written: the payload is `seq` (postcard's varint) and the tail.
        let at = self.raw.len();
        self.raw.extend_from_slice(&[0; RECORD_HEADER]);
        encode::varint(&mut self.raw, seq);
        encode::tail_head(&mut self.raw, first.at_us, first.session, first.stmt);
        if let [one] = run {
            self.raw.extend_from_slice(one.record);
        } else {
            encode::bundle_head(&mut self.raw, run.len());
            for r in run {
                encode::bundled(&mut self.raw, r.at_us, r.record);
            }
        }
        frame_in_place(&mut self.raw, at);
        let payload = &self.raw[at + RECORD_HEADER..];
        self.frontier.push_leaf(payload);
        if self.raw_count == 0 {
            self.raw_first_seq = seq;
            self.raw_since = Some(Instant::now());
        }
        self.raw_count += 1;
        self.raw_last_at = last.at_us;
        self.shared.status.records.fetch_add(1, Relaxed);
        let session = first.session;
        match &mut self.last_pushed {
            Some((last, last_seq)) if *last == session => *last_seq = seq,
            other => {
                if let Some((last, last_seq)) = other.replace((session, seq)) {
                    self.index_last_seq.insert(last, last_seq);
                }
            }
        }
        for r in run.iter().filter(|r| encode::INDEXED.contains(&r.variant)) {
            // A request only counts: its text is left undecoded.
            let what = if r.variant == encode::REQUEST {
                Ok(Some(Indexed::Request))
            } else {
                postcard::from_bytes::<Record>(r.record).map(Indexed::of)
            };
            match what {
                Ok(Some(what)) => {
                    self.session_ended |= matches!(what, Indexed::End { .. });
                    self.index_entries.push(IndexEntry {
                        seq,
                        at_us: r.at_us,
                        session,
                        what,
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::error!("recording: a record does not decode for the index: {e}"),
            }
        }
    }

    /// Seals what is pending (and a checkpoint when one is due) and writes it all.
    fn commit(&mut self, force_checkpoint: bool) {
        if self.raw_count > 0 {
            if let Some((session, seq)) = self.last_pushed.take() {
                self.index_last_seq.insert(session, seq);
            }
            match encode_block(
                &mut self.zstd,
                &self.raw,
                self.raw_first_seq,
                self.raw_count,
                self.raw_last_at,
            ) {
                Ok(bytes) => {
                    self.shared
                        .status
                        .bytes_recorded
                        .fetch_add(self.raw.len() as u64, Relaxed);
                    self.unwritten.push_back(Sealed {
                        bytes,
                        after: Some(self.frontier.clone()),
                        checkpoint: None,
                        waiters: std::mem::take(&mut self.waiters),
                        last_seq: std::mem::take(&mut self.index_last_seq),
                    });
                }
                Err(e) => tracing::error!("recording: zstd failed: {e}"),
            }
            self.raw.clear();
            self.raw_count = 0;
            self.raw_since = None;
        }
        let size = self.frontier.size();
        let due = force_checkpoint
            || !self.pending_notes.is_empty()
            || self.session_ended
            || size >= self.last_checkpoint + self.cfg.checkpoint_records
            || (size > self.last_checkpoint
                && self.last_checkpoint_at.elapsed() >= self.cfg.checkpoint_interval);
        // A session's end is synced at once, so that `list` shows it done and its checkpoint
        // leaves the host without waiting for `sync_interval`.
        let sync = force_checkpoint || self.session_ended;
        if due
            && (size > self.last_checkpoint || !self.pending_notes.is_empty() || force_checkpoint)
        {
            let cp = Checkpoint {
                origin: self.origin.clone(),
                size,
                root: self.frontier.root(),
                extensions: std::mem::take(&mut self.pending_notes),
            };
            let note = self.signer.sign(&cp.body());
            self.unwritten.push_back(Sealed {
                bytes: encode_checkpoint(&note, size, now_us()),
                after: None,
                checkpoint: Some(note),
                waiters: Vec::new(),
                last_seq: HashMap::new(),
            });
            self.last_checkpoint = size;
            self.last_checkpoint_at = Instant::now();
            self.session_ended = false;
        }
        self.write_out(sync);
    }

    /// Written blocks have waited their `sync_interval`.
    fn sync_due(&self) -> bool {
        !self.unsynced.is_empty() && self.last_sync.elapsed() >= self.cfg.sync_interval
    }

    /// Whether what is about to be written must be synced now rather than at `sync_interval`.
    fn sync_now(&self, force: bool) -> bool {
        let waiting = |s: &Sealed| !s.waiters.is_empty();
        force
            || self.sync_due()
            || self.cfg.sync_interval.is_zero()
            || !self.flushes.is_empty()
            || self.unsynced.iter().chain(&self.unwritten).any(waiting)
            || self.seg.as_ref().map_or(0, |s| s.len - s.synced)
                + self
                    .unwritten
                    .iter()
                    .map(|s| s.bytes.len() as u64)
                    .sum::<u64>()
                >= SYNC_BYTES
            || matches!(self.shared.health(), Some(Health::Failed(_)))
    }

    /// Appends every sealed block, and syncs when [`Self::sync_now`] says so. On failure the
    /// blocks not yet synced stay queued for a new segment, waiting callers hear of it, and the
    /// recorder refuses new work until a retry works.
    fn write_out(&mut self, force_sync: bool) {
        let sync = self.sync_now(force_sync);
        if self.unwritten.is_empty() && (self.unsynced.is_empty() || !sync) {
            let flushes = std::mem::take(&mut self.flushes);
            for f in flushes {
                let _ = f.send(self.shared.health_result());
            }
            return;
        }
        match self.try_write(sync) {
            Ok(()) if sync => {
                self.settle();
                for f in std::mem::take(&mut self.flushes) {
                    let _ = f.send(Ok(()));
                }
            }
            Ok(()) => {}
            Err(e) => {
                let err = if e.raw_os_error() == Some(libc::ENOSPC)
                    || e.raw_os_error() == Some(libc::EDQUOT)
                {
                    RecordError::DiskFull(e.to_string())
                } else {
                    RecordError::Io(e.to_string())
                };
                self.shared.status.write_failures.fetch_add(1, Relaxed);
                if self.shared.set_health(Some(err.clone())) {
                    tracing::error!("recording: {err}; refusing new statements");
                }
                for s in &mut self.unwritten {
                    for w in s.waiters.drain(..) {
                        let _ = w.send(Err(err.clone()));
                    }
                }
                for f in std::mem::take(&mut self.flushes) {
                    let _ = f.send(Err(err.clone()));
                }
            }
        }
    }

    /// Everything written is synced: its waiters are answered, its checkpoints leave the host,
    /// and its records may go to the index. Flushes wait for the caller: blocks may still be
    /// unwritten.
    fn settle(&mut self) {
        let mut notes = Vec::new();
        let was_durable = self.durable.size();
        for s in self.unsynced.drain(..) {
            if let Some(after) = s.after {
                self.durable = after;
            }
            for w in s.waiters {
                let _ = w.send(Ok(()));
            }
            notes.extend(s.checkpoint);
            self.index_later.extend(s.last_seq);
        }
        if self.shared.set_health(None) {
            tracing::info!("recording: writes succeed again");
        }
        for note in notes {
            self.shared.status.checkpoints.fetch_add(1, Relaxed);
            tracing::info!(target: "portcullis::record::checkpoint", checkpoint = %super::checkpoint::log_line(&note), "recording checkpoint");
            if let Some((tx, _)) = &self.ship {
                let _ = tx.send(note);
            }
        }
        // Sooner when a session ended or someone waits on a flush, so that `list` shows what
        // is done.
        let to = self.durable.size();
        let from = self.index_entries.partition_point(|e| e.seq < was_durable);
        let now = !self.flushes.is_empty()
            || self.index_entries[from..]
                .iter()
                .take_while(|e| e.seq < to)
                .any(|e| matches!(e.what, Indexed::End { .. }));
        self.index_since.get_or_insert_with(Instant::now);
        if now {
            self.index_now();
        }
    }

    /// Writes the sealed blocks, then syncs if `sync`. A segment is synced before it is closed
    /// for its size or age. On any failure the open segment is cut back to its last sync and
    /// never touched again, and every block since that sync is queued again for a new one.
    fn try_write(&mut self, sync: bool) -> std::io::Result<()> {
        let result = self.write_and_sync(sync);
        if result.is_err() {
            if let Some(seg) = self.seg.take() {
                let _ = seg.file.set_len(seg.synced);
                // A segment left with nothing but its header is removed rather than left behind
                // at every retry.
                if seg.synced == seg.data_start {
                    let _ = std::fs::remove_file(&seg.path);
                }
            }
            while let Some(s) = self.unsynced.pop_back() {
                self.unwritten.push_front(s);
            }
        }
        result
    }

    fn write_and_sync(&mut self, sync: bool) -> std::io::Result<()> {
        let total: u64 = self.unwritten.iter().map(|s| s.bytes.len() as u64).sum();
        let roll = self.seg.as_ref().is_some_and(|s| {
            s.len + total > self.cfg.segment_bytes || s.opened.elapsed() >= self.cfg.segment_max_age
        });
        if roll {
            if !self.unsynced.is_empty() {
                self.sync_segment()?;
                self.settle();
            }
            self.seg = None;
        }
        if self.seg.is_none() && !self.unwritten.is_empty() {
            self.seg = Some(self.new_segment()?);
        }
        while let Some(s) = self.unwritten.pop_front() {
            let seg = self.seg.as_mut().expect("opened above");
            if let Err(e) = seg.file.write_all_at(&s.bytes, seg.len) {
                self.unwritten.push_front(s);
                return Err(e);
            }
            seg.len += s.bytes.len() as u64;
            self.shared
                .status
                .bytes_written
                .fetch_add(s.bytes.len() as u64, Relaxed);
            self.unsynced.push_back(s);
        }
        if sync && !self.unsynced.is_empty() {
            self.sync_segment()?;
        }
        Ok(())
    }

    fn sync_segment(&mut self) -> std::io::Result<()> {
        let seg = self.seg.as_mut().expect("blocks were written to it");
        seg.file.sync_data()?;
        seg.synced = seg.len;
        self.last_sync = Instant::now();
        self.shared.status.syncs.fetch_add(1, Relaxed);
        Ok(())
    }

    fn new_segment(&mut self) -> std::io::Result<Open> {
        let number = self.next_segment;
        self.next_segment += 1;
        let path = segment_path(&self.dir, number);
        let header = encode_header(&SegmentHeader {
            number,
            first_seq: self.durable.size(),
            created_us: now_us(),
            frontier: self.durable.subtrees().to_vec(),
        });
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let made = file
            .write_all(&header)
            .and_then(|()| file.sync_all())
            .and_then(|()| File::open(&self.dir)?.sync_all());
        if let Err(e) = made {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.shared.status.segments.fetch_add(1, Relaxed);
        Ok(Open {
            path,
            file,
            data_start: header.len() as u64,
            len: header.len() as u64,
            synced: header.len() as u64,
            opened: Instant::now(),
        })
    }

    /// The index is due an update: pending long enough, or plenty of it.
    fn index_due(&self) -> bool {
        self.index_since
            .is_some_and(|t| t.elapsed() >= INDEX_INTERVAL || self.index_entries.len() >= 4096)
    }

    /// Applies every durable record the index has not seen, in one transaction.
    fn index_now(&mut self) {
        if self.index_since.take().is_none() {
            return;
        }
        let durable = self.durable.size();
        let ready = self.index_entries.partition_point(|e| e.seq < durable);
        let last_seq = std::mem::take(&mut self.index_later);
        if let Some(index) = &mut self.index
            && let Err(e) = index.apply(&self.index_entries[..ready], &last_seq, durable)
        {
            // The index is derived data: the next start rebuilds what is missing.
            self.shared.status.index_failures.fetch_add(1, Relaxed);
            tracing::warn!("recording index: {e}");
        }
        self.index_entries.drain(..ready);
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Indexes records the index has not seen; returns the largest session id.
fn catch_up(dir: &Path, index: &mut Index, size: u64) -> anyhow::Result<u64> {
    let from = index.indexed_seq()?;
    if from < size {
        let mut entries = Vec::new();
        let mut last_seq = HashMap::new();
        let mut max_session = 0;
        super::read::for_each_entry(dir, from, size, |e| {
            last_seq.insert(e.session, e.seq);
            max_session = max_session.max(e.session);
            entries.extend(IndexEntry::of(e));
            Ok(true)
        })?;
        index.apply(&entries, &last_seq, size)?;
        return Ok(index.max_session()?.max(max_session));
    }
    Ok(index.max_session()?)
}

/// Pipes each checkpoint to the configured command, off the recorder thread. A command that
/// fails, cannot start or outlives `timeout` (then killed) is logged and recording goes on;
/// after a timeout only the newest waiting checkpoint is shipped (it covers the ones before), so
/// a stuck command neither piles checkpoints up nor holds the recorder's shutdown for long.
fn spawn_shipper(
    argv: &[String],
    timeout: Duration,
) -> Option<(std::sync::mpsc::Sender<String>, std::thread::JoinHandle<()>)> {
    let (program, args) = argv.split_first()?;
    let (program, args) = (program.clone(), args.to_vec());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let thread = std::thread::Builder::new()
        .name("recorder-ship".into())
        .spawn(move || {
            let mut behind = false;
            while let Ok(mut note) = rx.recv() {
                if behind {
                    let mut dropped = 0;
                    for newer in rx.try_iter() {
                        note = newer;
                        dropped += 1;
                    }
                    if dropped > 0 {
                        tracing::warn!(
                            "recording: {dropped} checkpoint(s) not shipped while {program} was slow; the newest one, \
                             shipped now, covers them"
                        );
                    }
                }
                behind = false;
                match ship(&program, &args, &note, timeout) {
                    Ok(s) if s.success() => {}
                    Ok(s) => tracing::warn!(
                        "recording: checkpoint ship command {program} failed ({s}); recording goes on"
                    ),
                    Err(e) => {
                        behind = e.kind() == std::io::ErrorKind::TimedOut;
                        tracing::warn!(
                            "recording: checkpoint ship command {program}: {e}; recording goes on"
                        );
                    }
                }
            }
        })
        .ok()?;
    Some((tx, thread))
}

/// Runs the ship command once with `note` on its stdin; always reaps it.
fn ship(
    program: &str,
    args: &[String],
    note: &str,
    timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    // A command that exits without reading its input is its own failure, told by its status.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(note.as_bytes());
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "did not finish within {} (ship_timeout) and was killed",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
