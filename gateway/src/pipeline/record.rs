//! The record stage: what the client asked, what was decided, and what the client received, handed
//! to the recorder (`record/`).
//!
//! Requests and verdicts come through [`RecordGate`], which wraps the decide stage's gate: a
//! statement is recorded before policy sees it, and its verdict right after. Responses come
//! through [`ResponseTap`], which frames exactly the bytes written to the client, so what is
//! recorded is what the client saw, after masking. Nothing here does I/O: the recorder's thread
//! compresses and writes. When the recorder cannot take a record, the statement is refused with
//! the recorder's SQLSTATE (53100 or 58030); it never runs unrecorded.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::gate::{Held, PolicyGate};
use crate::daemon::Shared;
use crate::identify::Identity;
use crate::idp::VerifiedIdentity;
use crate::mask::Masker;
use crate::protocol::core::{Blocked, Disposition, Gate, Output, Owed, Request, Seg};
use crate::protocol::postgres::session::MAX_NAMED;
use crate::record::{
    self, Action, Bytes, Column, Durable, Notice, RecordError, RequestKind, SessionRecorder,
    SessionStart, Verdict,
};
use crate::route::Target;

/// Rows and COPY data are handed to the recorder in batches of about this many bytes (and at
/// the end of every read from the server), not one record per row.
const BATCH_BYTES: usize = 256 << 10;

/// The row buffer a session keeps between results, at most.
const KEEP_BYTES: usize = 1 << 10;

/// The rule name a refusal for recording reports in logs.
const RULE: &str = "recording";

/// A statement the recorder could not take: refused with its SQLSTATE and a message that says
/// recording failed.
pub fn refusal(e: &RecordError) -> Disposition {
    Disposition::Block(refused(e))
}

fn refused(e: &RecordError) -> Blocked {
    Blocked {
        rule: RULE.into(),
        reason: e.to_string(),
        sqlstate: Some(e.sqlstate()),
    }
}

/// Begins a session's recording: who (identify's peer), where (target, database, upstream user).
pub fn begin(
    shared: &Arc<Shared>,
    identity: &Identity,
    who: Option<&VerifiedIdentity>,
    target: &Target,
    upstream_user: &str,
) -> Result<Rc<RefCell<SessionRecord>>, RecordError> {
    let peer = &identity.peer;
    // The IdP's claims and a hash of the token, never the token itself.
    let rec = shared.recorder.begin(SessionStart {
        agent: peer.agent.clone(),
        pid: peer.pid,
        exe: peer.exe.clone(),
        cgroup: peer.cgroup.clone(),
        subject: who.map(|w| w.subject.clone()),
        groups: who.map(|w| w.groups.clone()).unwrap_or_default(),
        actor: who.and_then(|w| w.actors.first().cloned()),
        token_sha256: who.map(|w| w.token_hash.clone()),
        client_addr: Some(identity.client_addr.to_string()),
        target: target.config.name.clone(),
        database: target.config.upstream.database.clone(),
        upstream_user: upstream_user.to_owned(),
    })?;
    let cfg = shared.config();
    Ok(Rc::new(RefCell::new(SessionRecord {
        rec: Some(rec),
        shared: shared.clone(),
        generation: shared.policy_generation(),
        masker: shared.masker(),
        strict: cfg.recording.strict,
        statements: HashMap::new(),
        portals: HashMap::new(),
        durable: None,
        approval: None,
        copy_in: Vec::new(),
        response: Responses::new(cfg.max_message_bytes),
    })))
}

/// A Bind's parameters, waiting for the Execute that runs them.
struct Bound {
    /// Shared with each Execute's record, not copied for it.
    statement: Rc<str>,
    params: Vec<Option<Bytes>>,
    bytes: u64,
}

/// One session's recording, shared by its two pumps (which run on the same thread).
pub struct SessionRecord {
    /// `None` once the session's end is recorded.
    rec: Option<SessionRecorder>,
    shared: Arc<Shared>,
    generation: u64,
    /// The detectors requests pass through before they are recorded.
    masker: Masker,
    strict: bool,
    /// Prepared statements' recorded texts by name, for their Executes (shared, not copied,
    /// for each).
    statements: HashMap<String, Rc<str>>,
    portals: HashMap<String, Bound>,
    /// Strict mode: the request record the held statement waits for.
    durable: Option<Durable>,
    /// The approval a held statement waits for: id and rule.
    approval: Option<(u64, String)>,
    /// COPY FROM STDIN data not yet handed to the recorder.
    copy_in: Vec<u8>,
    response: Responses,
}

impl SessionRecord {
    /// The recording's id (`portcullis recordings show ID`).
    pub fn id(&self) -> Option<u64> {
        self.rec.as_ref().map(SessionRecorder::id)
    }

    /// Records the session's end; later calls do nothing.
    pub fn end(&mut self, reason: &str) {
        let _ = self.flush_copy_in(true);
        if let Some(rec) = self.rec.take() {
            let _ = rec.end(reason);
        }
    }

    /// False when recording is disabled: the gate and the tap then leave requests and
    /// responses alone rather than build records that would be dropped.
    fn recording(&self) -> bool {
        self.rec.as_ref().is_some_and(SessionRecorder::is_recording)
    }

    fn rec(&mut self) -> Result<&mut SessionRecorder, RecordError> {
        self.rec.as_mut().ok_or(RecordError::Stopped)
    }

    /// Text as it is recorded: what the detectors find redacted.
    fn redacted(&mut self, text: &[u8]) -> Vec<u8> {
        self.redacted_if_found(text)
            .unwrap_or_else(|| text.to_vec())
    }

    /// A statement's text as it is recorded: borrowed as it is, unless the detectors found
    /// something to redact in it.
    fn redacted_str<'t>(&mut self, text: &'t str) -> Cow<'t, str> {
        match self.redacted_if_found(text.as_bytes()) {
            None => Cow::Borrowed(text),
            Some(v) => Cow::Owned(
                String::from_utf8(v)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
        }
    }

    fn redacted_if_found(&mut self, text: &[u8]) -> Option<Vec<u8>> {
        if let Some(m) = self.shared.masker_if_reloaded(&mut self.generation) {
            self.masker = m;
        }
        self.masker.redact_detected(text)
    }

    /// Records a statement and queues it for its response, in the server's order; strict mode
    /// keeps its `Durable`. Queued even when it cannot be recorded: the client is then answered
    /// with the refusal's error, in its place.
    fn request(
        &mut self,
        kind: RequestKind,
        statement: Option<&str>,
        text: &str,
        params: &[Option<Bytes>],
        bytes_in: u64,
    ) -> Result<(), RecordError> {
        let rec = self.rec()?;
        let durable = rec.request_of(kind, statement, text, params);
        let stmt = rec.stmt();
        self.response.request(Answer::of(kind), stmt, bytes_in);
        let durable = durable?;
        if self.strict {
            self.durable = Some(durable);
        }
        Ok(())
    }

    /// The statement the next reply of a message without one of its own goes with.
    fn latest(&self) -> u32 {
        self.rec.as_ref().map_or(0, SessionRecorder::stmt)
    }

    fn verdict(&mut self, verdict: Verdict) -> Result<(), RecordError> {
        self.rec()?.verdict(verdict)
    }

    /// COPY FROM STDIN data on its way to the server. It is batched, but refused at once while
    /// the recorder is failing, so it never reaches the server unrecorded.
    fn copy_in(&mut self, data: &[u8]) -> Result<(), RecordError> {
        self.rec()?.check()?;
        self.copy_in.extend_from_slice(data);
        if self.copy_in.len() >= BATCH_BYTES {
            self.flush_copy_in(false)?;
        }
        Ok(())
    }

    /// Hands the batched COPY FROM STDIN data to the recorder through the detectors: all of it,
    /// or (`all` false) up to its last line end, so that the detectors see whole lines.
    fn flush_copy_in(&mut self, all: bool) -> Result<(), RecordError> {
        if self.copy_in.is_empty() {
            return Ok(());
        }
        let mut data = std::mem::take(&mut self.copy_in);
        let cut = match memchr::memrchr(b'\n', &data) {
            Some(end) if !all => end + 1,
            _ => data.len(),
        };
        let rest = data.split_off(cut);
        let text = self.redacted(&data);
        self.copy_in = rest;
        self.rec()?.copy_in(Bytes(text))
    }

    /// Bounds a per-session name map the way the core bounds the server's: past the cap the
    /// stale names go (their Executes are then recorded by name only).
    fn room<V>(map: &mut HashMap<String, V>, name: &str) {
        if map.len() >= MAX_NAMED && !map.contains_key(name) {
            map.clear();
        }
    }
}

/// The decide stage's gate with the record stage around it.
pub struct RecordGate {
    pub policy: PolicyGate,
    record: Rc<RefCell<SessionRecord>>,
}

impl RecordGate {
    pub fn new(policy: PolicyGate, record: Rc<RefCell<SessionRecord>>) -> Self {
        RecordGate { policy, record }
    }

    /// Where the gateway's own words to the client about a statement it holds are recorded.
    pub fn said(&self) -> Said {
        Said(self.record.clone())
    }

    /// Strict mode: the record a held statement waits for before it may run.
    pub fn take_durable(&mut self) -> Option<Durable> {
        self.record.borrow_mut().durable.take()
    }

    /// Records how a held statement was settled (an operator's decision, or the classifier's
    /// verdict); an outcome that cannot be recorded does not run.
    pub fn settled(&mut self, outcome: Disposition, approver: Option<String>) -> Disposition {
        let mut r = self.record.borrow_mut();
        let approval = r.approval.take();
        let mut v = verdict_of(&outcome, self.policy.last_rule.as_deref());
        if let Some((id, rule)) = approval {
            v.action = match v.action {
                Action::Allow => Action::Approved,
                _ => Action::Denied,
            };
            v.rule = Some(rule);
            v.approval_id = Some(id);
            v.approver = approver;
            v.decided_at_us = Some(record::now_us());
        }
        match r.verdict(v) {
            Err(e) if outcome == Disposition::Allow => refusal(&e),
            _ => outcome,
        }
    }

    /// Holds an allowed statement until its record is durable, in strict mode; a blocked one
    /// waits for nothing.
    fn strict(&self, d: Disposition) -> Disposition {
        let mut r = self.record.borrow_mut();
        match d {
            Disposition::Allow if r.durable.is_some() => Disposition::Hold,
            Disposition::Block(_) => {
                r.durable = None;
                d
            }
            _ => d,
        }
    }
}

fn verdict_of(d: &Disposition, allow_rule: Option<&str>) -> Verdict {
    match d {
        Disposition::Block(b) => Verdict {
            action: Action::Block,
            rule: Some(b.rule.clone()),
            reason: Some(b.reason.clone()),
            ..Verdict::allow(None)
        },
        Disposition::Allow | Disposition::Hold => Verdict::allow(allow_rule.map(str::to_owned)),
    }
}

impl RecordGate {
    /// Records a statement, has policy decide on it, and records the verdict.
    fn record_and_decide(&mut self, request: &Request<'_>) -> Disposition {
        let mut r = self.record.borrow_mut();
        if !r.recording() {
            drop(r);
            return self.policy.check(request);
        }
        if let Err(e) = r.flush_copy_in(true) {
            // Its refusal is the server's answer to a stand-in: it goes with the last statement.
            let answer = match request {
                Request::Parse { .. } => Answer::Parse,
                Request::Query(_) | Request::FunctionCall { .. } | Request::Http { .. } => {
                    Answer::Query
                }
            };
            let latest = Some(r.latest());
            r.response.owe(answer, latest);
            return refusal(&e);
        }
        let (kind, statement, text, bytes_in) = match *request {
            Request::Query(sql) => (RequestKind::Query, None, r.redacted_str(sql), 6),
            Request::Parse { statement, sql } => (
                RequestKind::Prepare,
                Some(statement),
                r.redacted_str(sql),
                statement.len() as u64 + 11,
            ),
            Request::FunctionCall { .. } => (
                RequestKind::FunctionCall,
                None,
                Cow::Owned(request.to_string()),
                13,
            ),
            // A path's query string can carry a credential: redacted like SQL.
            Request::Http { .. } => (
                RequestKind::Http,
                None,
                Cow::Owned(r.redacted_str(&request.to_string()).into_owned()),
                0,
            ),
        };
        if let Some(name) = statement {
            SessionRecord::room(&mut r.statements, name);
            r.statements.insert(name.to_owned(), Rc::from(&*text));
        }
        let bytes_in = bytes_in + text.len() as u64;
        // Recorded before policy sees it: an unrecordable statement opens no approval.
        if let Err(e) = r.request(kind, statement, &text, &[], bytes_in) {
            return refusal(&e);
        }
        drop(r);
        self.policy.last_rule = None;
        let d = self.policy.check(request);
        let mut r = self.record.borrow_mut();
        let verdict = match (&d, &self.policy.held) {
            (Disposition::Hold, Some(Held::Approval { id, rule, .. })) => {
                r.approval = Some((*id, rule.clone()));
                Some(Verdict {
                    action: Action::Hold,
                    rule: Some(rule.clone()),
                    approval_id: Some(*id),
                    ..Verdict::allow(None)
                })
            }
            // The classifier thread's verdict is recorded when it arrives.
            (Disposition::Hold, _) => None,
            (d, _) => Some(verdict_of(d, self.policy.last_rule.as_deref())),
        };
        if let Some(v) = verdict
            && let Err(e) = r.verdict(v)
        {
            // An approval requested for it is withdrawn with its pending decision.
            self.policy.held = None;
            r.approval = None;
            r.durable = None;
            return refusal(&e);
        }
        drop(r);
        self.strict(d)
    }
}

impl Gate for RecordGate {
    fn check(&mut self, request: &Request<'_>) -> Disposition {
        // A statement and its verdict reach the recorder in one hand-over, not two.
        if let Some(rec) = self.record.borrow_mut().rec.as_mut() {
            rec.hold();
        }
        let d = self.record_and_decide(request);
        let mut r = self.record.borrow_mut();
        let handed = r.rec.as_mut().map_or(Ok(()), SessionRecorder::hand_over);
        match handed {
            // A refused statement is not run either way; anything else must not run unrecorded.
            Err(e) if !matches!(d, Disposition::Block(_)) => {
                self.policy.held = None;
                r.approval = None;
                r.durable = None;
                refusal(&e)
            }
            _ => d,
        }
    }

    fn bind(&mut self, portal: &str, statement: &str, body: &[u8]) {
        let mut r = self.record.borrow_mut();
        if !r.recording() {
            return;
        }
        // Its reply goes with the Execute that follows.
        r.response.owe(Answer::Bind, None);
        let params = bind_params(body)
            .into_iter()
            .map(|p| p.map(|v| Bytes(r.redacted(v))))
            .collect();
        SessionRecord::room(&mut r.portals, portal);
        let bound = Bound {
            statement: Rc::from(statement),
            params,
            bytes: body.len() as u64 + 5,
        };
        r.portals.insert(portal.to_owned(), bound);
    }

    fn execute(&mut self, portal: &str) -> Disposition {
        let mut r = self.record.borrow_mut();
        if !r.recording() {
            return Disposition::Allow;
        }
        let (statement, params, bound_bytes) = match r.portals.get_mut(portal) {
            // A portal executed again (after PortalSuspended) runs the same parameters.
            Some(b) => (b.statement.clone(), std::mem::take(&mut b.params), b.bytes),
            None => (Rc::from(""), Vec::new(), 0),
        };
        let text = r.statements.get(&*statement).cloned();
        let bytes_in = bound_bytes + portal.len() as u64 + 10;
        if let Err(e) = r.request(
            RequestKind::Execute,
            Some(&statement),
            text.as_deref().unwrap_or(""),
            &params,
            bytes_in,
        ) {
            return refusal(&e);
        }
        drop(r);
        self.strict(Disposition::Allow)
    }

    fn copy_data(&mut self, data: &[u8]) -> Result<(), Blocked> {
        let mut r = self.record.borrow_mut();
        if !r.recording() {
            return Ok(());
        }
        r.copy_in(data).map_err(|e| refused(&e))
    }

    fn owed(&mut self, message: Owed<'_>) {
        let mut r = self.record.borrow_mut();
        if !r.recording() {
            return;
        }
        let latest = Some(r.latest());
        match message {
            // A portal is described for the Execute that follows; a statement after its Parse.
            Owed::Describe { portal } => {
                r.response
                    .owe(Answer::Describe, if portal { None } else { latest });
            }
            Owed::Close => r.response.owe(Answer::Close, latest),
            Owed::Sync => r.response.owe(Answer::Sync, latest),
            // Refused before policy saw it: recorded as a statement of its own, without its
            // text (the core did not read it), so that its error is not taken for another's.
            Owed::Refused { simple, blocked } => {
                let _ = r.flush_copy_in(true);
                let kind = if simple {
                    RequestKind::Query
                } else {
                    RequestKind::Prepare
                };
                if r.request(kind, None, "", &[], 0).is_ok() {
                    let _ = r.verdict(verdict_of(&Disposition::Block(blocked.clone()), None));
                }
                // Nothing waits on it: the core answers it with its refusal whatever the mode.
                r.durable = None;
            }
        }
    }
}

/// A Bind body's parameter values (the core has checked its framing).
fn bind_params(body: &[u8]) -> Vec<Option<&[u8]>> {
    let mut r = Cursor(body);
    let mut params = Vec::new();
    let parsed = (|| {
        r.cstr()?;
        r.cstr()?;
        let nformats = r.i16()?;
        r.take(2 * usize::try_from(nformats).ok()?)?;
        let n = r.i16()?;
        for _ in 0..n {
            let len = r.i32()?;
            params.push(if len < 0 {
                None
            } else {
                Some(r.take(len as usize)?)
            });
        }
        Some(())
    })();
    if parsed.is_none() {
        params.clear();
    }
    params
}

/// A bounds-checked reader over a message body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = memchr::memchr(0, self.0)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(s)
    }
    fn string(&mut self) -> Option<String> {
        self.cstr().map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

/// Records the NoticeResponses the gateway writes to the client itself while it holds a
/// statement (for an operator's approval), under that statement, as the client got them.
pub struct Said(Rc<RefCell<SessionRecord>>);

impl Said {
    /// A statement that reached an approval only while held (its verdict from the classifier
    /// thread, or a check after a catalog read or a token renewal): its hold is recorded now,
    /// with the request id, so that the decision is recorded as that approval's. A hold that
    /// cannot be recorded refuses the statement, as at check time.
    pub fn held_for_approval(&self, id: u64, rule: &str) -> Result<(), Disposition> {
        let mut r = self.0.borrow_mut();
        if !r.recording() || r.approval.is_some() {
            return Ok(());
        }
        let hold = Verdict {
            action: Action::Hold,
            rule: Some(rule.to_owned()),
            approval_id: Some(id),
            ..Verdict::allow(None)
        };
        r.verdict(hold).map_err(|e| refusal(&e))?;
        r.approval = Some((id, rule.to_owned()));
        Ok(())
    }

    /// Whole messages about to be written to the client; only NoticeResponses are recorded.
    pub fn wrote(&self, mut data: &[u8]) {
        let mut r = self.0.borrow_mut();
        if !r.recording() {
            return;
        }
        let Some(rec) = r.rec.as_mut() else {
            return;
        };
        while data.len() >= 5 && data.len() >= message_len(data) {
            let total = message_len(data);
            if data[0] == b'N' {
                // A failure is the recorder's to count; the next statement is refused.
                let _ = rec.told(notice(&data[5..total]));
            }
            data = &data[total..];
        }
    }
}

/// Reads what is written to the client and records its results.
pub struct ResponseTap {
    record: Rc<RefCell<SessionRecord>>,
}

impl ResponseTap {
    pub fn new(record: Rc<RefCell<SessionRecord>>) -> Self {
        ResponseTap { record }
    }

    /// One write to the client, as the core's output over `input`. Failures to record a
    /// response are the recorder's to count; the next statement is refused.
    pub fn written(&mut self, input: &[u8], out: &Output) {
        let mut guard = self.record.borrow_mut();
        let r = &mut *guard;
        if !r.recording() {
            return;
        }
        // The client's COPY data comes before the server's answer to it.
        let _ = r.flush_copy_in(true);
        let Some(rec) = r.rec.as_mut() else {
            return;
        };
        // One hand-over to the recorder for everything this write holds.
        let mut rec = rec.batch();
        for seg in out.segments() {
            let bytes = match seg {
                Seg::Input(range) => &input[range.clone()],
                Seg::Scratch(range) => &out.scratch()[range.clone()],
            };
            r.response.feed(bytes, &mut rec);
        }
        r.response.flush(&mut rec);
    }
}

impl ResponseTap {
    /// Waits, without blocking the worker, while the recorder is behind (see
    /// [`SessionRecorder::congested`]), so results flow no faster than they are recorded.
    pub async fn keep_pace(&self) {
        let congested = || {
            self.record
                .borrow()
                .rec
                .as_ref()
                .is_some_and(SessionRecorder::congested)
        };
        while congested() {
            compio::time::sleep(PACE).await;
        }
    }
}

/// How long a session waits for a congested recorder before it looks again.
const PACE: std::time::Duration = std::time::Duration::from_millis(2);

/// Which kind of message a reply answers, and so which replies end it (the server answers in
/// the order it was sent, and after an error in a batch skips to Sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A simple Query or a FunctionCall: everything up to ReadyForQuery.
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
}

impl Answer {
    fn of(kind: RequestKind) -> Answer {
        match kind {
            RequestKind::Query
            | RequestKind::FunctionCall
            | RequestKind::CopyIn
            | RequestKind::Http => Answer::Query,
            RequestKind::Prepare => Answer::Parse,
            RequestKind::Execute => Answer::Execute,
        }
    }
}

/// A message the server still owes a reply to.
#[derive(Debug)]
struct Owing {
    answer: Answer,
    /// The statement its reply is recorded under; `None`: the Execute that follows it.
    stmt: Option<u32>,
    /// When the statement was recorded (for its latency), and its wire bytes not yet counted
    /// in a `complete`.
    started: Option<Instant>,
    bytes_in: u64,
}

/// The server-to-client stream, framed again after masking, and the statements it answers: a
/// queue of what the server owes, in its order, pairs each reply with its own statement when
/// the client pipelines. Public for the recording bench (`bench/src/bin/record_query.rs`),
/// which drives it as the tap does.
pub struct Responses {
    /// A message split across writes, kept until it is whole.
    partial: Vec<u8>,
    /// Bytes still to drop of a message larger than `max_message`, not recorded.
    skip: usize,
    max_message: usize,
    owed: VecDeque<Owing>,
    /// Wire bytes of the current statement's reply not yet counted in a `complete`.
    bytes_out: u64,
    /// The statement's recorded rows so far, encoded as `Record::Rows` holds them (kept for
    /// reuse), and how many.
    rows: Vec<u8>,
    row_count: usize,
    copy: Vec<u8>,
    /// The statement's messages too large to record: how many, of which DataRows, and bytes.
    skipped: u64,
    skipped_rows: u64,
    skipped_bytes: u64,
}

impl Responses {
    pub fn new(max_message: usize) -> Self {
        Responses {
            partial: Vec::new(),
            skip: 0,
            max_message,
            owed: VecDeque::new(),
            bytes_out: 0,
            rows: Vec::new(),
            row_count: 0,
            copy: Vec::new(),
            skipped: 0,
            skipped_rows: 0,
            skipped_bytes: 0,
        }
    }

    /// Statement `stmt` was sent (or its stand-in): the server answers it after what it owes
    /// already. Its response is timed from here; `bytes_in` is its request's size on the wire.
    pub fn request(&mut self, answer: Answer, stmt: u32, bytes_in: u64) {
        let started = Some(Instant::now());
        if answer == Answer::Execute {
            // The Bind and the portal's Describe before it are answered as part of it.
            for o in self.owed.iter_mut().rev() {
                if o.stmt.is_some() {
                    break;
                }
                o.stmt = Some(stmt);
                o.started = started;
            }
        }
        self.owed.push_back(Owing {
            answer,
            stmt: Some(stmt),
            started,
            bytes_in,
        });
    }

    /// A message that is no statement of its own: its reply goes with `stmt`, or (`None`) with
    /// the Execute that follows it.
    pub fn owe(&mut self, answer: Answer, stmt: Option<u32>) {
        self.owed.push_back(Owing {
            answer,
            stmt,
            started: None,
            bytes_in: 0,
        });
    }

    /// Bytes written to the client, in order, split anywhere.
    pub fn feed(&mut self, mut data: &[u8], rec: &mut SessionRecorder) {
        loop {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
            if self.partial.is_empty() {
                return self.frames(data, rec);
            }
            // A message split across writes: its header first, then its body.
            if self.partial.len() < 5 {
                let n = (5 - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.partial.len() < 5 {
                    return;
                }
                let total = message_len(&self.partial);
                if total > self.max_message {
                    self.skipped(self.partial[0], total, rec);
                    self.partial.clear();
                    self.skip = total - 5;
                    continue;
                }
            }
            let total = message_len(&self.partial);
            let n = (total - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.partial.len() < total {
                return;
            }
            let msg = std::mem::take(&mut self.partial);
            self.message(msg[0], &msg[5..], rec);
            self.partial = msg;
            self.partial.clear();
        }
    }

    /// Whole messages straight from `data`; a trailing piece is kept for the next write.
    fn frames(&mut self, mut data: &[u8], rec: &mut SessionRecorder) {
        while data.len() >= 5 {
            let total = message_len(data);
            if total > self.max_message {
                self.skipped(data[0], total, rec);
                let n = (total - 5).min(data.len() - 5);
                self.skip = total - 5 - n;
                data = &data[5 + n..];
                continue;
            }
            if data.len() < total {
                break;
            }
            // Rows encode to about their wire size: room for the rest of this write's at once,
            // rather than a doubling (and a copy of the rows so far) every few rows.
            if data[0] == b'D' && self.rows.capacity() - self.rows.len() < total {
                self.rows.reserve(data.len());
            }
            self.message(data[0], &data[5..total], rec);
            data = &data[total..];
        }
        self.partial.extend_from_slice(data);
    }

    /// Makes the head of the queue the statement `rec` records replies under. What was batched
    /// for the previous one is handed over first, under its own number.
    fn answering(&mut self, rec: &mut SessionRecorder) {
        if let Some(stmt) = self.owed.front().and_then(|o| o.stmt)
            && rec.answering() != Some(stmt)
        {
            self.flush(rec);
            rec.answer(stmt);
            self.bytes_out = 0;
        }
    }

    /// A message the client gets whole but the recording cannot: counted for the statement.
    fn skipped(&mut self, tag: u8, total: usize, rec: &mut SessionRecorder) {
        self.answering(rec);
        self.bytes_out += total as u64;
        self.skipped += 1;
        self.skipped_rows += u64::from(tag == b'D');
        self.skipped_bytes += total as u64;
    }

    fn message(&mut self, tag: u8, body: &[u8], rec: &mut SessionRecorder) {
        self.answering(rec);
        self.bytes_out += 5 + body.len() as u64;
        let mut c = Cursor(body);
        match tag {
            b'T' => {
                self.flush(rec);
                // A name that is not UTF-8 is recorded lossily, from a copy.
                if let Ok(false) = rec.row_description(body) {
                    let _ = rec.columns(columns(body).unwrap_or_default());
                }
            }
            b'D' if rec.data_row(body, &mut self.rows) => {
                self.row_count += 1;
                if self.rows.len() >= BATCH_BYTES {
                    self.flush(rec);
                }
            }
            b'd' => {
                self.copy.extend_from_slice(body);
                if self.copy.len() >= BATCH_BYTES {
                    self.flush(rec);
                }
            }
            b'c' => self.flush(rec),
            b'C' => {
                self.flush(rec);
                // Borrowed unless it is not UTF-8: every statement ends here.
                let tag = c.cstr().map(String::from_utf8_lossy).unwrap_or_default();
                self.complete(&tag, rec);
            }
            b'I' => self.complete("", rec),
            b'E' => {
                self.flush(rec);
                let _ = rec.error(notice(body));
                self.complete("", rec);
            }
            b'N' => {
                let _ = rec.notice(notice(body));
            }
            b'A' => {
                let pid = c.i32().unwrap_or(0) as u32;
                let channel = c.string().unwrap_or_default();
                let payload = c.string().unwrap_or_default();
                let _ = rec.notification(pid, channel, payload);
            }
            b'Z' | b's' => self.flush(rec),
            _ => {}
        }
        self.answered(tag);
    }

    /// Settles the queue after a reply, as the server (and the core) do.
    fn answered(&mut self, tag: u8) {
        let head = self.owed.front().map(|o| o.answer);
        let done = match (tag, head) {
            (b'Z', Some(Answer::Query | Answer::Sync)) => true,
            (b'1' | b'2' | b'3' | b'n' | b's', Some(_)) => true,
            (b'T', Some(Answer::Describe)) => true,
            (b'C' | b'I', Some(Answer::Execute)) => true,
            // In a batch the server skips the rest up to Sync; a Query waits for ReadyForQuery.
            (b'E', Some(Answer::Query | Answer::Sync) | None) => false,
            (b'E', Some(_)) => {
                self.owed.pop_front();
                while self.owed.front().is_some_and(|o| o.answer != Answer::Sync) {
                    self.owed.pop_front();
                }
                false
            }
            _ => false,
        };
        if done {
            self.owed.pop_front();
        }
    }

    fn complete(&mut self, tag: &str, rec: &mut SessionRecorder) {
        self.flush(rec);
        if self.skipped > 0 {
            warn!(
                recording = rec.id(),
                messages = self.skipped,
                rows = self.skipped_rows,
                bytes = self.skipped_bytes,
                "results larger than max_message_bytes were sent but not recorded"
            );
            let _ = rec.unrecorded(self.skipped_rows, self.skipped, self.skipped_bytes);
            (self.skipped, self.skipped_rows, self.skipped_bytes) = (0, 0, 0);
        }
        let (bytes_in, latency) = match self.owed.front_mut() {
            Some(o) => (
                std::mem::take(&mut o.bytes_in),
                o.started.map(|t| t.elapsed()).unwrap_or_default(),
            ),
            None => (0, std::time::Duration::ZERO),
        };
        let _ = rec.complete(tag, bytes_in, self.bytes_out, latency);
        self.bytes_out = 0;
    }

    /// Hands the batched rows and COPY data to the recorder.
    pub fn flush(&mut self, rec: &mut SessionRecorder) {
        if self.row_count > 0 {
            let _ = rec.encoded_rows(&self.rows, self.row_count);
            self.row_count = 0;
            // A small buffer is kept for the next result; a large one is not kept idle.
            if self.rows.capacity() > KEEP_BYTES {
                self.rows = Vec::new();
            } else {
                self.rows.clear();
            }
        }
        if !self.copy.is_empty() {
            let _ = rec.copy_data(Bytes(std::mem::take(&mut self.copy)));
        }
    }
}

/// The wire length (tag included) a message header declares.
fn message_len(header: &[u8]) -> usize {
    // The core framed this output already; a length under 4 cannot occur, but never slice on it.
    1 + (u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize).max(4)
}

fn columns(body: &[u8]) -> Option<Vec<Column>> {
    let mut c = Cursor(body);
    let n = c.i16()?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = c.string()?;
        c.take(6)?;
        let type_oid = c.i32()? as u32;
        c.take(6)?;
        let format = c.i16()?;
        cols.push(Column {
            name,
            type_oid,
            format,
        });
    }
    Some(cols)
}

/// An ErrorResponse or NoticeResponse body, as it reached the client.
fn notice(body: &[u8]) -> Notice {
    let mut n = Notice {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    let mut c = Cursor(body);
    while let Some(kind) = c.take(1) {
        let Some(value) = c.string() else { break };
        match kind[0] {
            b'V' => n.severity = value,
            b'S' if n.severity.is_empty() => n.severity = value,
            b'C' => n.code = value,
            b'M' => n.message = value,
            b'D' => n.detail = Some(value),
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::postgres::frame::write_message;
    use crate::record::{Record, Recorder, RecordingConfig};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_message(&mut v, tag, |o| o.extend_from_slice(body));
        v
    }

    /// A result as the client receives it: description, two rows (one NULL), tag, ready.
    fn result() -> Vec<u8> {
        let mut t = 1i16.to_be_bytes().to_vec();
        t.extend_from_slice(b"v\0");
        t.extend_from_slice(&[0; 6]);
        t.extend_from_slice(&25i32.to_be_bytes());
        t.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
        let row = |v: Option<&[u8]>| {
            let mut d = 1i16.to_be_bytes().to_vec();
            match v {
                Some(v) => {
                    d.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    d.extend_from_slice(v);
                }
                None => d.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            d
        };
        [
            msg(b'T', &t),
            msg(b'D', &row(Some(b"a\0b\xff"))),
            msg(b'D', &row(None)),
            msg(b'C', b"SELECT 2\0"),
            msg(b'Z', b"I"),
        ]
        .concat()
    }

    /// Ends the session and reads back every entry the recorder wrote, in order.
    fn read_back(
        recorder: Recorder,
        rec: crate::record::SessionRecorder,
        state: &std::path::Path,
    ) -> Vec<crate::record::Entry> {
        rec.end("done").unwrap();
        recorder.handle().flush().wait().unwrap();
        drop(recorder);
        let mut entries = Vec::new();
        crate::record::read::for_each_entry(&state.join("recordings"), 0, u64::MAX, |e| {
            entries.push(e);
            Ok(true)
        })
        .unwrap();
        entries
    }

    /// [`read_back`]'s records alone.
    fn records_of(
        recorder: Recorder,
        rec: crate::record::SessionRecorder,
        state: &std::path::Path,
    ) -> Vec<Record> {
        let entries = read_back(recorder, rec, state);
        entries.into_iter().map(|e| e.record).collect()
    }

    /// The rows of every `Record::Rows`, in order.
    fn rows_of(records: &[Record]) -> Vec<Vec<Option<Bytes>>> {
        records
            .iter()
            .filter_map(|r| match r {
                Record::Rows(rows) => Some(rows.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn results_split_anywhere_are_recorded_whole_and_oversized_ones_skipped() {
        let state = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(&RecordingConfig::default(), state.path()).unwrap();
        let wire = result();
        let mut rec = recorder.handle().begin(SessionStart::default()).unwrap();
        // Every split point, and one byte at a time.
        for cut in 0..=wire.len() {
            let mut r = Responses::new(1 << 20);
            r.feed(&wire[..cut], &mut rec);
            r.feed(&wire[cut..], &mut rec);
        }
        let mut r = Responses::new(1 << 20);
        for b in &wire {
            r.feed(std::slice::from_ref(b), &mut rec);
        }
        // Past max_message a row is dropped from the recording, and what follows still frames.
        let mut r = Responses::new(16);
        let big = [msg(b'D', &[0u8; 64]), msg(b'C', b"SELECT 1\0")].concat();
        r.feed(&big[..10], &mut rec);
        r.feed(&big[10..], &mut rec);
        let records = records_of(recorder, rec, state.path());
        let tags: Vec<_> = records
            .iter()
            .filter_map(|r| match r {
                Record::Complete(c) => Some((c.tag.clone(), c.rows)),
                _ => None,
            })
            .collect();
        let whole = wire.len() + 2;
        assert_eq!(tags.len(), whole + 1, "{tags:?}");
        assert!(tags[..whole].iter().all(|t| *t == ("SELECT 2".into(), 2)));
        // The row left out still counts, and a record says what is missing.
        assert_eq!(tags[whole], ("SELECT 1".into(), 1));
        let unrecorded: Vec<_> = records
            .iter()
            .filter(|r| matches!(r, Record::Unrecorded { .. }))
            .collect();
        assert_eq!(
            unrecorded,
            [&Record::Unrecorded {
                rows: 1,
                messages: 1,
                bytes: 69
            }]
        );
        let rows = rows_of(&records);
        assert_eq!(rows.len(), 2 * whole);
        assert!(rows.chunks(2).all(
            |pair| pair[0] == vec![Some(Bytes(b"a\0b\xff".to_vec()))] && pair[1] == vec![None]
        ));
        let columns = records
            .iter()
            .filter(|r| matches!(r, Record::Columns(c) if c.len() == 1 && c[0].name == "v" && c[0].type_oid == 25))
            .count();
        assert_eq!(columns, whole);
    }

    #[test]
    fn rows_past_max_response_bytes_are_counted_not_recorded_and_a_bad_row_is_neither() {
        let state = tempfile::tempdir().unwrap();
        let mut cfg = RecordingConfig::default();
        cfg.target.insert(
            "local".into(),
            crate::record::config::TargetRecording {
                max_response_bytes: Some(100),
            },
        );
        let recorder = Recorder::start(&cfg, state.path()).unwrap();
        let mut rec = recorder
            .handle()
            .begin(SessionStart {
                target: "local".into(),
                ..Default::default()
            })
            .unwrap();
        let row = |v: &[u8]| crate::testing::data_row_body(&[Some(v), None]);
        // A value's length past the row's end: a row the recording cannot hold.
        let mut lying = row(b"x");
        lying[2..6].copy_from_slice(&64i32.to_be_bytes());
        let mut wire = msg(b'D', &lying);
        // Ten rows of 40 value bytes, in one write, and the cap cuts after the second.
        for i in 0..10 {
            wire.extend(msg(b'D', &row(format!("{i:040}").as_bytes())));
        }
        wire.extend(msg(b'C', b"SELECT 10\0"));
        let mut r = Responses::new(1 << 20);
        r.feed(&wire, &mut rec);
        let records = records_of(recorder, rec, state.path());
        let rows = rows_of(&records);
        let want: Vec<Vec<Option<Bytes>>> = (0..2)
            .map(|i| vec![Some(Bytes(format!("{i:040}").into_bytes())), None])
            .collect();
        assert_eq!(rows, want);
        let complete = records.iter().find_map(|r| match r {
            Record::Complete(c) => Some(c),
            _ => None,
        });
        let complete = complete.expect("a completion");
        assert_eq!((complete.tag.as_str(), complete.rows), ("SELECT 10", 10));
        assert_eq!(
            complete.truncated,
            Some(crate::record::Truncation {
                rows_recorded: 2,
                bytes_recorded: 80
            })
        );
    }

    /// A RowDescription body of text-format columns.
    fn description(columns: &[(&[u8], i32)]) -> Vec<u8> {
        let mut t = (columns.len() as i16).to_be_bytes().to_vec();
        for (name, oid) in columns {
            t.extend_from_slice(name);
            t.push(0);
            t.extend_from_slice(&[0; 6]);
            t.extend_from_slice(&oid.to_be_bytes());
            t.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
        }
        t
    }

    #[test]
    fn result_shapes_that_repeat_and_alternate_are_each_recorded_as_described() {
        let state = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(&RecordingConfig::default(), state.path()).unwrap();
        let mut rec = recorder.handle().begin(SessionStart::default()).unwrap();
        let a = description(&[(b"id", 20), (b"email", 25)]);
        let b = description(&[(b"id", 23)]);
        // Same length as `a`, one byte apart: the type of its first column.
        let a_int = description(&[(b"id", 23), (b"email", 25)]);
        let lossy = description(&[(b"caf\xe9", 25)]);
        let shapes = [&a, &a, &b, &a, &a_int, &lossy, &a];
        let mut r = Responses::new(1 << 20);
        for body in shapes {
            r.feed(
                &[msg(b'T', body), msg(b'C', b"SELECT 0\0"), msg(b'Z', b"I")].concat(),
                &mut rec,
            );
        }
        let got: Vec<_> = records_of(recorder, rec, state.path())
            .into_iter()
            .filter_map(|r| match r {
                Record::Columns(c) => Some(
                    c.iter()
                        .map(|c| (c.name.clone(), c.type_oid))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .collect();
        let col = |name: &str, oid: u32| (name.to_owned(), oid);
        let a = vec![col("id", 20), col("email", 25)];
        let want = vec![
            a.clone(),
            a.clone(),
            vec![col("id", 23)],
            a.clone(),
            vec![col("id", 23), col("email", 25)],
            vec![col("caf\u{fffd}", 25)],
            a,
        ];
        assert_eq!(got, want);
    }

    fn data_row(v: &[u8]) -> Vec<u8> {
        let mut d = 1i16.to_be_bytes().to_vec();
        d.extend_from_slice(&(v.len() as i32).to_be_bytes());
        d.extend_from_slice(v);
        msg(b'D', &d)
    }

    /// A held statement's records carry the one time read for the first of them, and so do a
    /// write's; each hand-over reads the clock anew, so times still order the statements.
    #[test]
    fn records_handed_over_together_share_a_time_and_each_hand_over_reads_its_own() {
        let state = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(&RecordingConfig::default(), state.path()).unwrap();
        let mut rec = recorder.handle().begin(SessionStart::default()).unwrap();
        let pause = || std::thread::sleep(std::time::Duration::from_millis(2));
        for text in ["a", "b"] {
            let mut r = Responses::new(1 << 20);
            rec.hold();
            rec.request(record::Request {
                kind: RequestKind::Query,
                statement: None,
                text: text.into(),
                params: Vec::new(),
            })
            .unwrap();
            pause();
            rec.verdict(Verdict::allow(None)).unwrap();
            rec.hand_over().unwrap();
            r.request(Answer::Query, rec.stmt(), 10);
            pause();
            let mut batch = rec.batch();
            r.feed(&result(), &mut batch);
            pause();
            r.flush(&mut batch);
            drop(batch);
            pause();
        }
        let entries = read_back(recorder, rec, state.path());
        let times = |stmt: u32| -> Vec<(&'static str, i64)> {
            (entries.iter())
                .filter(|e| e.stmt == stmt && !matches!(e.record, Record::SessionEnd { .. }))
                .map(|e| {
                    let kind = match e.record {
                        Record::Request(_) | Record::Verdict(_) => "asked",
                        _ => "answered",
                    };
                    (kind, e.at_us)
                })
                .collect()
        };
        let (first, second) = (times(1), times(2));
        for stmt in [&first, &second] {
            let at =
                |kind| -> Vec<i64> { (stmt.iter()).filter(|t| t.0 == kind).map(|t| t.1).collect() };
            let (asked, answered) = (at("asked"), at("answered"));
            assert_eq!(asked.len(), 2, "{stmt:?}");
            assert_eq!(answered.len(), 3, "{stmt:?}");
            assert!(asked.iter().all(|&t| t == asked[0]), "{stmt:?}");
            assert!(answered.iter().all(|&t| t == answered[0]), "{stmt:?}");
            assert!(answered[0] > asked[0], "{stmt:?}");
        }
        assert!(second[0].1 > first[first.len() - 1].1);
    }

    #[test]
    fn pipelined_replies_are_recorded_under_the_statements_they_answer() {
        let state = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(&RecordingConfig::default(), state.path()).unwrap();
        let mut rec = recorder.handle().begin(SessionStart::default()).unwrap();
        let mut r = Responses::new(1 << 20);
        let sent = |rec: &mut SessionRecorder, r: &mut Responses, kind, text: &str| {
            rec.request(record::Request {
                kind,
                statement: None,
                text: text.into(),
                params: Vec::new(),
            })
            .unwrap();
            r.request(Answer::of(kind), rec.stmt(), 10);
            rec.stmt()
        };
        // Everything is sent before the first reply: two queries, then an extended batch whose
        // second Execute fails (the server skips the third), then one more query.
        let a = sent(&mut rec, &mut r, RequestKind::Query, "a");
        let b = sent(&mut rec, &mut r, RequestKind::Query, "b");
        let run = |rec: &mut SessionRecorder, r: &mut Responses, text| {
            sent(rec, r, RequestKind::Prepare, text);
            r.owe(Answer::Bind, None);
            sent(rec, r, RequestKind::Execute, text)
        };
        let ran = run(&mut rec, &mut r, "ran");
        let failed = run(&mut rec, &mut r, "failed");
        let skipped = run(&mut rec, &mut r, "skipped");
        r.owe(Answer::Sync, Some(skipped));
        let c = sent(&mut rec, &mut r, RequestKind::Query, "c");
        let (complete, ready) = (msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I"));
        let wire = [
            data_row(b"a"),
            complete.clone(),
            ready.clone(),
            data_row(b"b"),
            complete.clone(),
            ready.clone(),
            msg(b'1', b""),
            msg(b'2', b""),
            data_row(b"ran"),
            complete.clone(),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'E', b"SERROR\0C22012\0Mdivision by zero\0\0"),
            ready.clone(),
            data_row(b"c"),
            complete,
            ready,
        ]
        .concat();
        // Split across writes too.
        for piece in wire.chunks(7) {
            let mut batch = rec.batch();
            r.feed(piece, &mut batch);
            r.flush(&mut batch);
        }
        let entries = read_back(recorder, rec, state.path());
        let of = |stmt: u32| -> Vec<&Record> {
            entries
                .iter()
                .filter(|e| e.stmt == stmt)
                .filter(|e| !matches!(e.record, Record::Request(_) | Record::SessionEnd { .. }))
                .map(|e| &e.record)
                .collect()
        };
        for (stmt, value) in [(a, "a"), (b, "b"), (ran, "ran"), (c, "c")] {
            let recs = of(stmt);
            let [Record::Rows(rows), Record::Complete(done)] = recs[..] else {
                panic!("{value}: {recs:?}");
            };
            assert_eq!(rows, &[vec![Some(Bytes(value.into()))]], "{value}");
            assert_eq!(
                (done.tag.as_str(), done.rows, done.bytes_in),
                ("SELECT 1", 1, 10)
            );
        }
        let recs = of(failed);
        assert!(
            matches!(recs[..], [Record::Error(e), Record::Complete(done)]
                if e.code == "22012" && done.tag.is_empty()),
            "{recs:?}"
        );
        assert_eq!(of(skipped), Vec::<&Record>::new());
    }
}
