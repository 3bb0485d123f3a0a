//! Session recording: every request and response, after masking, in a tamper-evident log.
//!
//! A [`Recorder`] owns a thread that group-commits entries into zstd blocks of append-only
//! segments (see [`segment`] for the format), keeps an RFC 9162 Merkle tree over them, and signs
//! C2SP checkpoints with an Ed25519 key kept outside the recording directory. A SQLite index of
//! sessions serves `portcullis recordings list`; `--grep` searches an FTS5 index of statement
//! texts that the search itself brings up to date from the segments ([`texts`]).
//!
//! Sessions talk to it through a [`SessionRecorder`]. Every call is non-blocking: it encodes a
//! record and hands it over on a queue bounded in bytes, alone or with the records of the same
//! write ([`SessionRecorder::batch`]) or statement ([`SessionRecorder::hold`]). No file or SQLite
//! I/O happens on the caller's thread, and usually no system call either: the recorder sleeps
//! until its next group commit and takes what accumulated, and only a recorder idle with nothing
//! pending is woken. Callers hand in values **after masking**: the recorder writes exactly what
//! it gets.
//! When recording fails (disk full, write error, queue over its bound) every call returns a
//! [`RecordError`] whose [`sqlstate`](RecordError::sqlstate) the session sends to the client
//! instead of running the statement.
//!
//! ```no_run
//! # async fn session(handle: portcullis::record::RecorderHandle) -> Result<(), portcullis::record::RecordError> {
//! use portcullis::record::*;
//! let mut rec = handle.begin(SessionStart { target: "local".into(), ..Default::default() })?;
//! // In strict mode `durable` resolves once the request is on disk; otherwise at once.
//! let durable = rec.request(Request {
//!     kind: RequestKind::Query, statement: None, text: "SELECT 1".into(), params: vec![],
//! })?;
//! durable.await?;
//! rec.verdict(Verdict::allow(Some("default/read".into())))?;
//! rec.columns(vec![Column { name: "?column?".into(), type_oid: 23, format: 0 }])?;
//! rec.rows(vec![vec![Some(Bytes::from("1"))]])?;
//! rec.complete("SELECT 1", 14, 40, std::time::Duration::from_micros(120))?;
//! rec.end("client closed")?;
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod cli;
pub mod config;
pub(crate) mod encode;
pub mod index;
pub mod merkle;
pub mod read;
pub mod segment;
pub mod texts;
pub mod types;
pub mod verify;
mod writer;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_utils::CachePadded;
use futures_channel::oneshot;

pub use config::{OnFailure, RecordingConfig};
pub use types::{
    Action, Bundled, Bytes, Column, Complete, Entry, Notice, Record, Request, RequestKind, Row,
    SessionStart, Truncation, Verdict,
};

/// Why a statement cannot be recorded; the session refuses it with [`Self::sqlstate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("recording failed: disk full ({0})")]
    DiskFull(String),
    #[error("recording failed: write error ({0})")]
    Io(String),
    #[error("recording failed: the recorder's queue is over its bound")]
    Overloaded,
    #[error("recording failed: the recorder has stopped")]
    Stopped,
}

impl RecordError {
    /// 53100 (disk_full) when space or queue runs out, 58030 (io_error) otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            RecordError::DiskFull(_) | RecordError::Overloaded => "53100",
            RecordError::Io(_) | RecordError::Stopped => "58030",
        }
    }
}

/// Always the gateway's own failure. A full queue drains, so the same statement may succeed a
/// moment later; a full disk or a failed write needs an operator first.
impl crate::error::WireError for RecordError {
    fn side(&self) -> crate::error::Side {
        crate::error::Side::Gateway
    }

    fn retryable(&self) -> bool {
        matches!(self, RecordError::Overloaded)
    }

    fn sqlstate(&self) -> &str {
        RecordError::sqlstate(self)
    }
}

/// Counters for `status` and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub records: AtomicU64,
    /// Record bytes before compression.
    pub bytes_recorded: AtomicU64,
    /// Bytes appended to segments.
    pub bytes_written: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Successful `fdatasync`s of segments.
    pub syncs: AtomicU64,
    pub segments: AtomicU64,
    pub write_failures: AtomicU64,
    pub index_failures: AtomicU64,
    /// Calls refused because recording was failing or the queue was full.
    pub refused: AtomicU64,
    /// Entries dropped under `on_failure = "danger_allow_unrecorded"`.
    pub unrecorded: AtomicU64,
}

/// What `status` shows about recording.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecorderStatus {
    /// "ok" or "failing".
    pub state: String,
    pub error: Option<String>,
    pub records: u64,
    pub bytes_recorded: u64,
    pub bytes_written: u64,
    pub checkpoints: u64,
    #[serde(default)]
    pub syncs: u64,
    pub segments: u64,
    pub write_failures: u64,
    pub index_failures: u64,
    pub refused: u64,
    pub unrecorded: u64,
    pub queued_bytes: u64,
}

enum Health {
    Failed(RecordError),
}

struct Shared {
    status: Counters,
    /// Read before every record a session encodes and written only when recording starts or
    /// stops failing: on a cache line of its own, not the one every hand-over writes
    /// (`queued_bytes`), so the read stays a cache hit on every core.
    failing: CachePadded<AtomicBool>,
    error: Mutex<Option<RecordError>>,
    /// Added to by every session's records and taken from by the recorder.
    queued_bytes: CachePadded<AtomicUsize>,
    next_session: AtomicU64,
    max_queue_bytes: usize,
    on_failure: OnFailure,
    strict: bool,
    cfg: RecordingConfig,
}

impl Shared {
    fn health(&self) -> Option<Health> {
        if !self.failing.load(Acquire) {
            return None;
        }
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(Health::Failed)
    }

    fn health_result(&self) -> Result<(), RecordError> {
        match self.health() {
            Some(Health::Failed(e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Sets or clears the failure; true when that changed the state.
    fn set_health(&self, error: Option<RecordError>) -> bool {
        let failing = error.is_some();
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        self.failing.swap(failing, Release) != failing
    }
}

/// The running recorder. Dropping it (or [`Recorder::shutdown`]) commits what is queued and signs
/// a final checkpoint.
pub struct Recorder {
    handle: RecorderHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A cheap, cloneable way in for sessions and the admin API.
#[derive(Clone)]
pub struct RecorderHandle {
    /// `None` when recording is turned off (`danger_disable`).
    queue: Option<Arc<Queue>>,
    shared: Arc<Shared>,
}

/// Messages on their way to the recorder thread. A push is a lock and a vector push: the
/// recorder wakes by itself when its group commit is due, so a session wakes it (a futex call,
/// and a context switch on the recorder's side) only when it sleeps with nothing pending, or when
/// a flush, the shutdown or a full batch cannot wait.
struct Queue {
    msgs: Mutex<Vec<writer::Msg>>,
    /// The recorder sleeps with nothing pending: the next push wakes it.
    idle: AtomicBool,
    /// The recorder has stopped (or died): pushes fail with [`RecordError::Stopped`].
    closed: AtomicBool,
    /// The recorder thread, set by itself before it first sleeps.
    thread: OnceLock<std::thread::Thread>,
    /// Hand-over buffers the recorder has read, for sessions to encode into again. A buffer
    /// allocated on a session's thread and freed on the recorder's costs both threads more in
    /// the allocator than a simple query's records cost to encode. Shared by every session and
    /// bounded ([`SPARES`] of at most [`SPARE_BYTES`]), so an idle session holds none.
    spares: Mutex<Vec<Vec<u8>>>,
}

/// How many emptied hand-over buffers the queue keeps.
const SPARES: usize = 32;

/// A hand-over buffer larger than this (a wide result's) is freed, not kept.
const SPARE_BYTES: usize = 64 << 10;

impl Queue {
    fn new() -> Queue {
        Queue {
            msgs: Mutex::new(Vec::new()),
            idle: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            thread: OnceLock::new(),
            spares: Mutex::new(Vec::new()),
        }
    }

    /// A session's side: an emptied hand-over buffer, if one is kept.
    fn spare(&self) -> Option<Vec<u8>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// The recorder's side: keeps a read hand-over buffer for a session to fill again, unless
    /// it is large or enough are kept; it is freed then.
    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() > SPARE_BYTES {
            return;
        }
        let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < SPARES {
            buf.clear();
            spares.push(buf);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<writer::Msg>> {
        self.msgs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, msg: writer::Msg, urgent: bool) -> Result<(), RecordError> {
        {
            let mut q = self.lock();
            if self.closed.load(Acquire) {
                return Err(RecordError::Stopped);
            }
            q.push(msg);
        }
        if urgent || (self.idle.load(Relaxed) && self.idle.swap(false, AcqRel)) {
            self.wake();
        }
        Ok(())
    }

    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// The recorder's side: everything queued, swapped for `spare` (kept for reuse).
    fn take(&self, spare: &mut Vec<writer::Msg>) {
        std::mem::swap(&mut *self.lock(), spare);
    }

    /// The recorder's side: sleeps up to `wait`, or until a push that cannot wait. With
    /// `pending` false nothing is waiting to be committed, so the next push wakes it too.
    fn sleep(&self, wait: Duration, pending: bool) {
        let _ = self.thread.set(std::thread::current());
        if pending {
            std::thread::park_timeout(wait);
            return;
        }
        self.idle.store(true, SeqCst);
        // A push between the recorder's last take and the flag above saw it clear.
        if !self.lock().is_empty() {
            self.idle.store(false, Relaxed);
            return;
        }
        std::thread::park_timeout(wait);
        self.idle.store(false, Relaxed);
    }

    /// The recorder's side, as it exits: later pushes fail, and what is still queued is dropped
    /// (its waiters hear [`RecordError::Stopped`]).
    fn close(&self) {
        let mut q = self.lock();
        self.closed.store(true, Release);
        q.clear();
    }
}

impl Recorder {
    /// Opens (or creates) the recording directory, cuts a torn tail, catches the index up and
    /// starts the recorder thread. Blocking: call it at daemon start, not from a session.
    pub fn start(cfg: &RecordingConfig, state_dir: &Path) -> anyhow::Result<Recorder> {
        cfg.validate(state_dir).map_err(anyhow::Error::msg)?;
        let shared = Arc::new(Shared {
            status: Counters::default(),
            failing: CachePadded::new(AtomicBool::new(false)),
            error: Mutex::new(None),
            queued_bytes: CachePadded::new(AtomicUsize::new(0)),
            next_session: AtomicU64::new(1),
            max_queue_bytes: cfg.max_queue_bytes,
            on_failure: cfg.on_failure,
            strict: cfg.strict,
            cfg: cfg.clone(),
        });
        if !cfg.enabled {
            return Ok(Recorder {
                handle: RecorderHandle {
                    queue: None,
                    shared,
                },
                thread: None,
            });
        }
        let dir = cfg.dir(state_dir);
        let (w, next_session) =
            writer::Writer::open(&dir, &cfg.key_file(state_dir), cfg, shared.clone())?;
        shared.next_session.store(next_session, Relaxed);
        // Bounded in bytes by `max_queue_bytes`.
        let queue = Arc::new(Queue::new());
        let rx = queue.clone();
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                // Closed however the thread ends, so that sessions are refused, not queued.
                struct Close(Arc<Queue>);
                impl Drop for Close {
                    fn drop(&mut self) {
                        self.0.close();
                    }
                }
                let close = Close(rx);
                w.run(&close.0);
            })?;
        Ok(Recorder {
            handle: RecorderHandle {
                queue: Some(queue),
                shared,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> RecorderHandle {
        self.handle.clone()
    }

    /// Commits everything, signs a last checkpoint and waits for the thread. Sessions still
    /// holding handles get [`RecordError::Stopped`] afterwards.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(queue) = self.handle.queue.take() {
            // Sessions may still hold handles: tell the thread to finish rather than wait for them.
            let _ = queue.push(writer::Msg::Shutdown, true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RecorderHandle {
    pub fn status(&self) -> RecorderStatus {
        let c = &self.shared.status;
        let error = self.shared.health_result().err();
        RecorderStatus {
            state: if error.is_some() { "failing" } else { "ok" }.into(),
            error: error.map(|e| e.to_string()),
            records: c.records.load(Relaxed),
            bytes_recorded: c.bytes_recorded.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
            checkpoints: c.checkpoints.load(Relaxed),
            syncs: c.syncs.load(Relaxed),
            segments: c.segments.load(Relaxed),
            write_failures: c.write_failures.load(Relaxed),
            index_failures: c.index_failures.load(Relaxed),
            refused: c.refused.load(Relaxed),
            unrecorded: c.unrecorded.load(Relaxed),
            queued_bytes: self.shared.queued_bytes.load(Relaxed) as u64,
        }
    }

    /// Starts recording a session. Fails when recording is failing, like any other call.
    pub fn begin(&self, start: SessionStart) -> Result<SessionRecorder, RecordError> {
        let id = self.shared.next_session.fetch_add(1, Relaxed);
        let max_response_bytes = self.shared.cfg.max_response_bytes(&start.target);
        let mut rec = SessionRecorder {
            handle: self.clone(),
            id,
            stmt: 0,
            answering: None,
            ended: false,
            max_response_bytes,
            response: ResponseCount::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            batching: false,
            batch_at_us: None,
            last_columns: LastColumns::default(),
        };
        if let Err(e) = rec.send(Record::SessionStart(start), false) {
            rec.ended = true;
            return Err(e);
        }
        Ok(rec)
    }

    /// Resolves once everything sent before it is durable (or recording failed).
    pub fn flush(&self) -> Durable {
        let Some(queue) = &self.queue else {
            return Durable::ready(Ok(()));
        };
        let (otx, orx) = oneshot::channel();
        match queue.push(writer::Msg::Flush(otx), true) {
            Ok(()) => Durable(Inner::Waiting(orx)),
            Err(e) => Durable::ready(Err(e)),
        }
    }

    /// `Err` while recording is failing (and refusing).
    pub fn check(&self) -> Result<(), RecordError> {
        match self.shared.health_result() {
            Err(_) if self.shared.on_failure == OnFailure::DangerAllowUnrecorded => Ok(()),
            r => r,
        }
    }

    /// Counts `bytes` of a record about to be encoded against the queue's bound. `Ok(false)`:
    /// drop it (recording is off, or failing under `danger_allow_unrecorded`).
    fn reserve(&self, bytes: usize) -> Result<bool, RecordError> {
        if self.queue.is_none() {
            return Ok(false); // recording disabled (danger_disable)
        }
        let refuse = |e: RecordError| {
            if self.shared.on_failure == OnFailure::DangerAllowUnrecorded {
                self.shared.status.unrecorded.fetch_add(1, Relaxed);
                Ok(false)
            } else {
                self.shared.status.refused.fetch_add(1, Relaxed);
                Err(e)
            }
        };
        if let Some(Health::Failed(e)) = self.shared.health() {
            return refuse(e);
        }
        let queued = self.shared.queued_bytes.fetch_add(bytes, Relaxed);
        if queued + bytes > self.shared.max_queue_bytes {
            self.shared.queued_bytes.fetch_sub(bytes, Relaxed);
            return refuse(RecordError::Overloaded);
        }
        Ok(true)
    }

    /// Hands encoded records, reserved as `bytes`, to the recorder.
    fn submit(
        &self,
        records: Vec<u8>,
        bytes: usize,
        durable: Option<oneshot::Sender<Result<(), RecordError>>>,
    ) -> Result<(), RecordError> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        // A batch's worth waiting (or a good part of the queue's bound) is taken now rather
        // than at the interval.
        let cfg = &self.shared.cfg;
        let queued = self.shared.queued_bytes.load(Relaxed);
        let full = queued >= cfg.commit_bytes.min(cfg.max_queue_bytes / 8);
        let msg = writer::Msg::Records {
            records,
            bytes,
            durable,
        };
        queue.push(msg, full).inspect_err(|_| {
            self.shared.queued_bytes.fetch_sub(bytes, Relaxed);
            self.shared.status.refused.fetch_add(1, Relaxed);
        })
    }
}

#[derive(Debug, Default)]
struct ResponseCount {
    rows: u64,
    bytes: u64,
    rows_recorded: u64,
    bytes_recorded: u64,
    truncated: bool,
}

impl ResponseCount {
    /// Counts a row of `size` value bytes; true when it is recorded. Past `max` bytes every
    /// later row of the response is only counted.
    fn admit(&mut self, size: u64, max: Option<u64>) -> bool {
        self.rows += 1;
        self.bytes += size;
        let fits = max.is_none_or(|max| self.bytes_recorded + size <= max);
        if fits && !self.truncated {
            self.rows_recorded += 1;
            self.bytes_recorded += size;
            true
        } else {
            self.truncated = true;
            false
        }
    }
}

/// One session's recorder, owned by the session. Statement numbers are kept here: `request`
/// starts a statement, and later calls belong to it; responses belong to the statement set by
/// [`Self::answer`] once it is called (the server answers pipelined statements later, in order).
pub struct SessionRecorder {
    handle: RecorderHandle,
    id: u64,
    stmt: u32,
    /// The statement responses are recorded under; `None`: the last request's.
    answering: Option<u32>,
    ended: bool,
    max_response_bytes: Option<u64>,
    response: ResponseCount,
    /// Records encoded here and not yet handed over, each `u32` length (LE) then its payload
    /// after `seq`; their bytes are already counted against the queue's bound.
    pending: Vec<u8>,
    pending_bytes: usize,
    /// Inside a [`Batch`]: records wait for its end (or [`SUBMIT_BYTES`]).
    batching: bool,
    /// The time the records of the current batch or held statement all carry, read at the
    /// first of them: one clock read a hand-over rather than one a record (a simple query has
    /// five), for records made within microseconds of each other.
    batch_at_us: Option<i64>,
    /// The last RowDescription recorded, and its encoding.
    last_columns: LastColumns,
}

#[derive(Default)]
struct LastColumns {
    body: Vec<u8>,
    encoded: Vec<u8>,
}

/// A RowDescription body larger than this is not kept for reuse (idle sessions would hold it).
const COLUMNS_KEPT: usize = 8 << 10;

/// A session hands its pending records over at least every this many bytes.
const SUBMIT_BYTES: usize = 256 << 10;

/// Records of one write to the client, handed to the recorder together when it drops (see
/// [`SessionRecorder::batch`]).
pub struct Batch<'a>(&'a mut SessionRecorder);

impl std::ops::Deref for Batch<'_> {
    type Target = SessionRecorder;
    fn deref(&self) -> &SessionRecorder {
        self.0
    }
}

impl std::ops::DerefMut for Batch<'_> {
    fn deref_mut(&mut self) -> &mut SessionRecorder {
        self.0
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.0.batching = false;
        // A refusal is counted; the next statement hears of it.
        let _ = self.0.submit(None);
    }
}

/// `Extend` for a borrowed buffer, so that a failed encoding leaves the buffer to be cut back.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl SessionRecorder {
    /// False when recording is disabled (`danger_disable`): every record would be dropped, so
    /// the record stage does no work for it.
    pub fn is_recording(&self) -> bool {
        self.handle.queue.is_some()
    }

    /// The recording's id, as `portcullis recordings show ID` takes it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The last request's statement number (0 before the first).
    pub fn stmt(&self) -> u32 {
        self.stmt
    }

    /// The statement responses are recorded under, once [`Self::answer`] set one.
    pub fn answering(&self) -> Option<u32> {
        self.answering
    }

    /// Responses from here on answer statement `stmt`, and count towards its `complete`.
    pub fn answer(&mut self, stmt: u32) {
        if self.answering != Some(stmt) {
            self.answering = Some(stmt);
            self.response = ResponseCount::default();
        }
    }

    /// `Err` while recording is failing, as the next record would be refused.
    pub fn check(&self) -> Result<(), RecordError> {
        self.handle.check()
    }

    /// True while the recorder's queue is over a quarter of its bound: a session streaming
    /// results should wait before reading more, so a recorder that falls behind slows the
    /// stream instead of filling memory or refusing its records.
    pub fn congested(&self) -> bool {
        let shared = &self.handle.shared;
        shared.queued_bytes.load(Relaxed) > shared.max_queue_bytes / 4
    }

    /// Several records handed over as one, when the returned guard drops: a session's
    /// response tap takes one per write to the client.
    pub fn batch(&mut self) -> Batch<'_> {
        self.batching = true;
        self.batch_at_us = None;
        Batch(self)
    }

    /// Records wait for [`Self::hand_over`], as in a [`Batch`]: the gate holds a request back
    /// until its verdict, so that the two reach the recorder together. Strict mode still hands a
    /// request over at once, to wait for it.
    pub fn hold(&mut self) {
        self.batching = true;
        self.batch_at_us = None;
    }

    /// Hands over what [`Self::hold`] kept back.
    pub fn hand_over(&mut self) -> Result<(), RecordError> {
        self.batching = false;
        self.submit(None)
    }

    fn send(&mut self, record: Record, strict: bool) -> Result<Durable, RecordError> {
        let approx = record.approx_bytes();
        let stmt = match &record {
            Record::Request(_) | Record::Verdict(_) | Record::CopyIn(_) => self.stmt,
            Record::SessionStart(_) | Record::SessionEnd { .. } => self.stmt,
            _ => self.answering.unwrap_or(self.stmt),
        };
        let encoded = self.encode(&record, stmt, approx)?;
        self.sent(encoded, strict)
    }

    /// After a record's encoding: hands it over now when strict mode waits for it (returning
    /// what it waits on), or when no batch or held statement keeps it.
    fn sent(&mut self, encoded: bool, strict: bool) -> Result<Durable, RecordError> {
        if encoded && strict && self.handle.shared.strict {
            let (tx, rx) = oneshot::channel();
            self.submit(Some(tx))?;
            return Ok(Durable(Inner::Waiting(rx)));
        }
        self.submit_unless_batching()?;
        Ok(Durable::ready(Ok(())))
    }

    /// Encodes a record (a [`Record`], or `encode`'s borrowed RowDescription) into `pending`;
    /// `Ok(false)` when it is not to be recorded (see [`RecorderHandle::reserve`]).
    fn encode<R: ?Sized + serde::Serialize>(
        &mut self,
        record: &R,
        stmt: u32,
        approx: usize,
    ) -> Result<bool, RecordError> {
        self.encode_with(stmt, approx, |out| {
            postcard::to_extend(record, Append(out))
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    /// [`Self::encode`] with the record itself written by `write`, after the entry's fields
    /// that precede it.
    fn encode_with(
        &mut self,
        stmt: u32,
        approx: usize,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) -> Result<bool, RecordError> {
        if !self.handle.reserve(approx)? {
            return Ok(false);
        }
        if self.pending.capacity() == 0
            && let Some(spare) = self.handle.queue.as_ref().and_then(|q| q.spare())
        {
            self.pending = spare;
        }
        let at = self.pending.len();
        // One allocation per hand-over in the common case, not a doubling per record: room made
        // for a record has space for the small ones after it too (a result's completion after
        // its rows), whose growth would copy the rows again.
        if self.pending.capacity() - at < approx {
            self.pending.reserve(approx + 1024);
        }
        self.pending.extend_from_slice(&[0; 4]);
        // The entry's fields before its record, as `Tail` lays them out; `write` appends the
        // record itself.
        let at_us = match self.batching {
            true => *self.batch_at_us.get_or_insert_with(now_us),
            false => now_us(),
        };
        encode::tail_head(&mut self.pending, at_us, self.id, stmt);
        let written = write(&mut self.pending);
        match written {
            Ok(()) => {
                let len = (self.pending.len() - at - 4) as u32;
                self.pending[at..at + 4].copy_from_slice(&len.to_le_bytes());
                self.pending_bytes += approx;
                Ok(true)
            }
            Err(e) => {
                // Only a bug gets here: the record is dropped loudly rather than half-written.
                self.pending.truncate(at);
                self.handle.shared.queued_bytes.fetch_sub(approx, Relaxed);
                tracing::error!("recording: a record does not encode: {e}");
                Ok(false)
            }
        }
    }

    /// Hands the pending records over; `durable` resolves once they are on disk.
    fn submit(
        &mut self,
        durable: Option<oneshot::Sender<Result<(), RecordError>>>,
    ) -> Result<(), RecordError> {
        if self.pending.is_empty() && durable.is_none() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending);
        let bytes = std::mem::take(&mut self.pending_bytes);
        self.handle.submit(records, bytes, durable)
    }

    /// Records a statement (text after the detectors). In `strict` mode forward it only after
    /// the returned [`Durable`] resolves to `Ok`; otherwise it is already resolved.
    pub fn request(&mut self, request: Request) -> Result<Durable, RecordError> {
        let request = request.borrowed();
        self.request_of(
            request.kind,
            request.statement,
            request.text,
            request.params,
        )
    }

    /// [`Self::request`] from borrowed parts, encoded where they lie: a statement's text is not
    /// copied into a record first (every simple query's would be).
    pub fn request_of(
        &mut self,
        kind: RequestKind,
        statement: Option<&str>,
        text: &str,
        params: &[Option<Bytes>],
    ) -> Result<Durable, RecordError> {
        self.stmt += 1;
        if self.answering.is_none() {
            self.response = ResponseCount::default();
        }
        let request = types::RequestRef {
            kind,
            statement,
            text,
            params,
        };
        let encoded = self.encode_with(self.stmt, request.approx_bytes(), |out| {
            encode::request(out, &request)
        })?;
        self.sent(encoded, true)
    }

    pub fn verdict(&mut self, verdict: Verdict) -> Result<(), RecordError> {
        self.send(Record::Verdict(verdict), false).map(drop)
    }

    pub fn columns(&mut self, columns: Vec<Column>) -> Result<(), RecordError> {
        self.send(Record::Columns(columns), false).map(drop)
    }

    /// Masked rows as the client received them. Beyond the target's `max_response_bytes` rows
    /// are counted but not recorded; [`Self::complete`] notes the cut.
    pub fn rows(&mut self, mut rows: Vec<Row>) -> Result<(), RecordError> {
        let mut keep = 0;
        for row in &rows {
            let size: u64 = row.iter().flatten().map(|v| v.0.len() as u64).sum();
            if self.response.admit(size, self.max_response_bytes) {
                keep += 1;
            }
        }
        rows.truncate(keep);
        if rows.is_empty() {
            // Nothing to write, but a failing recorder still refuses.
            return self.handle.check();
        }
        self.send(Record::Rows(rows), false).map(drop)
    }

    /// [`Self::rows`] for one row as the client received it: a DataRow body, encoded onto `batch`
    /// (as a row of `Record::Rows`, for [`Self::encoded_rows`]) in the pass that checks it. False
    /// when it is not recorded: past the target's `max_response_bytes` (it is counted), or a body
    /// that does not check.
    pub fn data_row(&mut self, body: &[u8], batch: &mut Vec<u8>) -> bool {
        let max = self.max_response_bytes;
        if self.response.truncated {
            if let Some((_, size)) = encode::data_row(body) {
                self.response.admit(size, max);
            }
            return false;
        }
        let start = batch.len();
        match encode::data_row_into(body, batch) {
            Some(size) if self.response.admit(size, max) => true,
            Some(_) => {
                batch.truncate(start);
                false
            }
            None => false,
        }
    }

    /// Hands over `count` rows that [`Self::data_row`] encoded onto `rows`, as one `Record::Rows`.
    pub fn encoded_rows(&mut self, rows: &[u8], count: usize) -> Result<(), RecordError> {
        let stmt = self.answering.unwrap_or(self.stmt);
        self.encode_with(stmt, 64 + rows.len(), |out| {
            encode::rows_head(out, count);
            out.extend_from_slice(rows);
            Ok(())
        })?;
        self.submit_unless_batching()
    }

    /// [`Self::columns`] for a RowDescription body as the client received it, encoded without a
    /// copy. `Ok(false)` when it does not check (a name that is not UTF-8): the caller records a
    /// lossy copy. A session repeats a few result shapes, so the last body's encoding is kept
    /// and reused while the next is the same bytes.
    pub fn row_description(&mut self, body: &[u8]) -> Result<bool, RecordError> {
        let mut last = std::mem::take(&mut self.last_columns);
        if last.encoded.is_empty() || last.body != body {
            last.body.clear();
            last.encoded.clear();
            let written = encode::row_description(body)
                .and_then(|count| encode::RowDescription { body, count }.write(&mut last.encoded));
            if written.is_none() {
                last.encoded.clear();
                self.last_columns = last;
                return Ok(false);
            }
            last.body.extend_from_slice(body);
        }
        let stmt = self.answering.unwrap_or(self.stmt);
        let encoded = self.encode_with(stmt, 64 + last.encoded.len(), |out| {
            out.extend_from_slice(&last.encoded);
            Ok(())
        });
        if last.body.len() <= COLUMNS_KEPT {
            self.last_columns = last;
        }
        encoded?;
        self.submit_unless_batching().map(|()| true)
    }

    pub fn copy_data(&mut self, data: Bytes) -> Result<(), RecordError> {
        self.send(Record::CopyData(data), false).map(drop)
    }

    /// COPY FROM STDIN data the client sent, after the detectors.
    pub fn copy_in(&mut self, data: Bytes) -> Result<(), RecordError> {
        self.send(Record::CopyIn(data), false).map(drop)
    }

    /// Results sent to the client but too large to record: counted in the statement's
    /// [`Self::complete`], and said so in a record of their own.
    pub fn unrecorded(&mut self, rows: u64, messages: u64, bytes: u64) -> Result<(), RecordError> {
        self.response.rows += rows;
        self.response.bytes += bytes;
        self.send(
            Record::Unrecorded {
                rows,
                messages,
                bytes,
            },
            false,
        )
        .map(drop)
    }

    pub fn notice(&mut self, notice: Notice) -> Result<(), RecordError> {
        self.send(Record::Notice(notice), false).map(drop)
    }

    pub fn error(&mut self, error: Notice) -> Result<(), RecordError> {
        self.send(Record::Error(error), false).map(drop)
    }

    /// A notice the gateway itself sent the client about the statement it is deciding (the last
    /// request): recorded under that statement, whatever the server is answering meanwhile.
    pub fn told(&mut self, notice: Notice) -> Result<(), RecordError> {
        let answering = self.answering.replace(self.stmt);
        let sent = self.send(Record::Notice(notice), false).map(drop);
        self.answering = answering;
        sent
    }

    pub fn notification(
        &mut self,
        pid: u32,
        channel: String,
        payload: String,
    ) -> Result<(), RecordError> {
        self.send(
            Record::Notification {
                pid,
                channel,
                payload,
            },
            false,
        )
        .map(drop)
    }

    /// Ends the statement's response: command tag (empty on error), wire bytes each way, latency.
    pub fn complete(
        &mut self,
        tag: &str,
        bytes_in: u64,
        bytes_out: u64,
        latency: Duration,
    ) -> Result<(), RecordError> {
        let r = std::mem::take(&mut self.response);
        let truncated = r.truncated.then_some(Truncation {
            rows_recorded: r.rows_recorded,
            bytes_recorded: r.bytes_recorded,
        });
        let counts = [r.rows, bytes_in, bytes_out, latency.as_micros() as u64];
        let stmt = self.answering.unwrap_or(self.stmt);
        self.encode_with(stmt, 64 + tag.len(), |out| {
            encode::complete(out, tag, counts, truncated.as_ref());
            Ok(())
        })?;
        self.submit_unless_batching()
    }

    /// Hands the pending records over unless a batch or a held statement keeps them, or they
    /// grew past [`SUBMIT_BYTES`].
    fn submit_unless_batching(&mut self) -> Result<(), RecordError> {
        if !self.batching || self.pending.len() >= SUBMIT_BYTES {
            self.submit(None)?;
        }
        Ok(())
    }

    /// Ends the session; its end gets a checkpoint of its own.
    pub fn end(mut self, reason: &str) -> Result<(), RecordError> {
        self.send_end(reason.to_owned()).map(drop)
    }

    /// Records the session's end, once. Whatever a hold or batch kept back is handed over with
    /// it, not dropped with the session.
    fn send_end(&mut self, reason: String) -> Result<Durable, RecordError> {
        self.ended = true;
        self.batching = false;
        self.send(Record::SessionEnd { reason }, false)
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.send_end("session dropped".into());
        }
    }
}

impl Verdict {
    pub fn allow(rule: Option<String>) -> Verdict {
        Verdict {
            action: Action::Allow,
            rule,
            reason: None,
            approval_id: None,
            approver: None,
            decided_at_us: None,
        }
    }
}

enum Inner {
    Ready(Option<Result<(), RecordError>>),
    Waiting(oneshot::Receiver<Result<(), RecordError>>),
}

/// Resolves when a record is durable (strict mode) or at once. Works on any executor.
pub struct Durable(Inner);

impl Durable {
    fn ready(r: Result<(), RecordError>) -> Durable {
        Durable(Inner::Ready(Some(r)))
    }

    /// Waits on the current thread: for tests, tools and shutdown, never an io_uring worker.
    pub fn wait(self) -> Result<(), RecordError> {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Arc::new(Unpark(std::thread::current())).into();
        let mut cx = Context::from_waker(&waker);
        let mut fut = self;
        loop {
            if let Poll::Ready(r) = Pin::new(&mut fut).poll(&mut cx) {
                return r;
            }
            std::thread::park();
        }
    }
}

impl Future for Durable {
    type Output = Result<(), RecordError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Inner::Ready(r) => Poll::Ready(r.take().unwrap_or(Ok(()))),
            Inner::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(RecordError::Stopped))),
        }
    }
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emptied hand-over buffers wait for sessions, but never a wide result's, nor more than the
    /// bound: what the queue keeps does not grow with sessions or results.
    #[test]
    fn the_queue_keeps_a_bounded_number_of_small_emptied_buffers() {
        let queue = Queue::new();
        assert!(queue.spare().is_none());
        queue.give_back(Vec::with_capacity(SPARE_BYTES + 1));
        assert!(queue.spare().is_none(), "a large buffer is freed");
        for _ in 0..SPARES + 5 {
            queue.give_back(vec![7u8; 100]);
        }
        let kept: Vec<Vec<u8>> = std::iter::from_fn(|| queue.spare()).collect();
        assert_eq!(kept.len(), SPARES);
        assert!(kept.iter().all(|b| b.is_empty() && b.capacity() >= 100));
    }

    /// A request encoded from borrowed parts is the record serde writes, and its queue weight too.
    #[test]
    fn a_request_from_borrowed_parts_encodes_as_its_record() {
        let params = [Some(Bytes(b"x\0y".to_vec())), None, Some(Bytes(Vec::new()))];
        for (kind, statement, text, params) in [
            (RequestKind::Query, None, "SELECT 1", &[][..]),
            (
                RequestKind::Prepare,
                Some("s1"),
                "SELECT $1, $2, $3",
                &[][..],
            ),
            (
                RequestKind::Execute,
                Some(""),
                "SELECT $1, $2, $3",
                &params[..],
            ),
            (RequestKind::Query, None, "", &[][..]),
            (RequestKind::Http, None, "GET api/v1/ünïcode?q=1", &[][..]),
        ] {
            let fields = types::RequestRef {
                kind,
                statement,
                text,
                params,
            };
            let mut ours = Vec::new();
            encode::request(&mut ours, &fields).unwrap();
            let record = Record::Request(Request {
                kind,
                statement: statement.map(str::to_owned),
                text: text.to_owned(),
                params: params.to_vec(),
            });
            assert_eq!(ours, postcard::to_stdvec(&record).unwrap(), "{text}");
            assert_eq!(fields.approx_bytes(), record.approx_bytes());
            assert_eq!(fields.approx_bytes(), 64 + text.len() + params.len() * 8);
        }
    }
}
