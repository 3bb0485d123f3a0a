//! Session recording: every request and response, after masking, in a tamper-evident log.
//!
//! A [`Recorder`] owns a thread that group-commits entries into zstd blocks of append-only
//! segments (see [`segment`] for the format), keeps an RFC 9162 Merkle tree over them, and signs
//! C2SP checkpoints with an Ed25519 key kept outside the recording directory. A SQLite FTS5 index
//! serves `portcullis recordings list`.
//!
//! Sessions talk to it through a [`SessionRecorder`]. Every call is non-blocking: it builds an
//! entry and `try_send`s it over a bounded channel; no file or SQLite I/O happens on the caller's
//! thread. Callers hand in values **after masking**: the recorder writes exactly what it gets.
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
pub mod index;
pub mod merkle;
pub mod read;
pub mod segment;
pub mod types;
pub mod verify;
mod writer;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_channel::oneshot;

pub use config::{OnFailure, RecordingConfig};
pub use types::{
    Action, Bytes, Column, Complete, Entry, Notice, Record, Request, RequestKind, Row,
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

/// Counters for `status` and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub records: AtomicU64,
    /// Record bytes before compression.
    pub bytes_recorded: AtomicU64,
    /// Bytes appended to segments.
    pub bytes_written: AtomicU64,
    pub checkpoints: AtomicU64,
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
    failing: AtomicBool,
    error: Mutex<Option<RecordError>>,
    queued_bytes: AtomicUsize,
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
    tx: Option<SyncSender<writer::Msg>>,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Opens (or creates) the recording directory, cuts a torn tail, catches the index up and
    /// starts the recorder thread. Blocking: call it at daemon start, not from a session.
    pub fn start(cfg: &RecordingConfig, state_dir: &Path) -> anyhow::Result<Recorder> {
        cfg.validate(state_dir).map_err(anyhow::Error::msg)?;
        let shared = Arc::new(Shared {
            status: Counters::default(),
            failing: AtomicBool::new(false),
            error: Mutex::new(None),
            queued_bytes: AtomicUsize::new(0),
            next_session: AtomicU64::new(1),
            max_queue_bytes: cfg.max_queue_bytes,
            on_failure: cfg.on_failure,
            strict: cfg.strict,
            cfg: cfg.clone(),
        });
        if !cfg.enabled {
            return Ok(Recorder {
                handle: RecorderHandle { tx: None, shared },
                thread: None,
            });
        }
        let dir = cfg.dir(state_dir);
        let (w, next_session) =
            writer::Writer::open(&dir, &cfg.key_file(state_dir), cfg, shared.clone())?;
        shared.next_session.store(next_session, Relaxed);
        // Bounded in entries here and in bytes by `max_queue_bytes`.
        let (tx, rx) = std::sync::mpsc::sync_channel(1 << 16);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || w.run(rx))?;
        Ok(Recorder {
            handle: RecorderHandle {
                tx: Some(tx),
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
        if let Some(tx) = self.handle.tx.take() {
            // Sessions may still hold senders: tell the thread to finish rather than wait for them.
            let _ = tx.send(writer::Msg::Shutdown);
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
            ended: false,
            max_response_bytes,
            response: ResponseCount::default(),
        };
        if let Err(e) = rec.send(Record::SessionStart(start), false) {
            rec.ended = true;
            return Err(e);
        }
        Ok(rec)
    }

    /// Resolves once everything sent before it is durable (or recording failed).
    pub fn flush(&self) -> Durable {
        let Some(tx) = &self.tx else {
            return Durable::ready(Ok(()));
        };
        let (otx, orx) = oneshot::channel();
        // A flush may wait for room: it is for shutdown and tests, not the data path.
        match tx.send(writer::Msg::Flush(otx)) {
            Ok(()) => Durable(Inner::Waiting(orx)),
            Err(_) => Durable::ready(Err(RecordError::Stopped)),
        }
    }

    /// `Err` while recording is failing (and refusing).
    pub fn check(&self) -> Result<(), RecordError> {
        match self.shared.health_result() {
            Err(_) if self.shared.on_failure == OnFailure::DangerAllowUnrecorded => Ok(()),
            r => r,
        }
    }

    fn send(
        &self,
        entry: Entry,
        durable: Option<oneshot::Sender<Result<(), RecordError>>>,
    ) -> Result<(), RecordError> {
        let Some(tx) = &self.tx else {
            return Ok(()); // recording disabled (danger_disable)
        };
        let refuse = |e: RecordError| {
            if self.shared.on_failure == OnFailure::DangerAllowUnrecorded {
                self.shared.status.unrecorded.fetch_add(1, Relaxed);
                Ok(())
            } else {
                self.shared.status.refused.fetch_add(1, Relaxed);
                Err(e)
            }
        };
        if let Some(Health::Failed(e)) = self.shared.health() {
            return refuse(e);
        }
        let bytes = entry.record.approx_bytes();
        let queued = self.shared.queued_bytes.fetch_add(bytes, Relaxed);
        if queued + bytes > self.shared.max_queue_bytes {
            self.shared.queued_bytes.fetch_sub(bytes, Relaxed);
            return refuse(RecordError::Overloaded);
        }
        match tx.try_send(writer::Msg::Entry {
            entry,
            bytes,
            durable,
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued_bytes.fetch_sub(bytes, Relaxed);
                refuse(match e {
                    TrySendError::Full(_) => RecordError::Overloaded,
                    TrySendError::Disconnected(_) => RecordError::Stopped,
                })
            }
        }
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

/// One session's recorder, owned by the session. Statement numbers are kept here: `request`
/// starts a statement and every later call belongs to it.
pub struct SessionRecorder {
    handle: RecorderHandle,
    id: u64,
    stmt: u32,
    ended: bool,
    max_response_bytes: Option<u64>,
    response: ResponseCount,
}

impl SessionRecorder {
    /// False when recording is disabled (`danger_disable`): every record would be dropped, so
    /// the record stage does no work for it.
    pub fn is_recording(&self) -> bool {
        self.handle.tx.is_some()
    }

    /// The recording's id, as `portcullis recordings show ID` takes it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True while the recorder's queue is over a quarter of its bound: a session streaming
    /// results should wait before reading more, so a recorder that falls behind slows the
    /// stream instead of filling memory or refusing its records.
    pub fn congested(&self) -> bool {
        let shared = &self.handle.shared;
        shared.queued_bytes.load(Relaxed) > shared.max_queue_bytes / 4
    }

    fn send(&mut self, record: Record, strict: bool) -> Result<Durable, RecordError> {
        let entry = Entry {
            seq: 0, // the recorder numbers entries
            at_us: now_us(),
            session: self.id,
            stmt: self.stmt,
            record,
        };
        if strict && self.handle.shared.strict && self.handle.tx.is_some() {
            let (tx, rx) = oneshot::channel();
            self.handle.send(entry, Some(tx))?;
            return Ok(Durable(Inner::Waiting(rx)));
        }
        self.handle.send(entry, None)?;
        Ok(Durable::ready(Ok(())))
    }

    /// Records a statement (text after the detectors). In `strict` mode forward it only after
    /// the returned [`Durable`] resolves to `Ok`; otherwise it is already resolved.
    pub fn request(&mut self, request: Request) -> Result<Durable, RecordError> {
        self.stmt += 1;
        self.response = ResponseCount::default();
        self.send(Record::Request(request), true)
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
        let r = &mut self.response;
        let mut keep = 0;
        for row in &rows {
            let size: u64 = row.iter().flatten().map(|v| v.0.len() as u64).sum();
            r.rows += 1;
            r.bytes += size;
            let fits = self
                .max_response_bytes
                .is_none_or(|max| r.bytes_recorded + size <= max);
            if fits && !r.truncated {
                r.rows_recorded += 1;
                r.bytes_recorded += size;
                keep += 1;
            } else {
                r.truncated = true;
            }
        }
        rows.truncate(keep);
        if rows.is_empty() {
            // Nothing to write, but a failing recorder still refuses.
            return self.handle.check();
        }
        self.send(Record::Rows(rows), false).map(drop)
    }

    pub fn copy_data(&mut self, data: Bytes) -> Result<(), RecordError> {
        self.send(Record::CopyData(data), false).map(drop)
    }

    pub fn notice(&mut self, notice: Notice) -> Result<(), RecordError> {
        self.send(Record::Notice(notice), false).map(drop)
    }

    pub fn error(&mut self, error: Notice) -> Result<(), RecordError> {
        self.send(Record::Error(error), false).map(drop)
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
        self.send(
            Record::Complete(Complete {
                tag: tag.to_owned(),
                rows: r.rows,
                bytes_in,
                bytes_out,
                latency_us: latency.as_micros() as u64,
                truncated,
            }),
            false,
        )
        .map(drop)
    }

    /// Ends the session; its end gets a checkpoint of its own.
    pub fn end(mut self, reason: &str) -> Result<(), RecordError> {
        self.ended = true;
        self.send(
            Record::SessionEnd {
                reason: reason.to_owned(),
            },
            false,
        )
        .map(drop)
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.send(
                Record::SessionEnd {
                    reason: "session dropped".into(),
                },
                false,
            );
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
