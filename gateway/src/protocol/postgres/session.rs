//! The sans-IO core of one proxied session after startup.
//!
//! It sees both directions. Bytes that go through unchanged are forwarded by reference into the
//! caller's read buffer ([`Seg::Input`]); only replaced or injected messages are written to a
//! scratch buffer. It keeps the queue of replies the server still owes, so that a statement the
//! gate blocks is answered at the right place in a pipeline, with the transaction state the server
//! itself reports.
//!
//! Call contract: feed client bytes to [`Session::on_frontend`] and server bytes to
//! [`Session::on_backend`], each with the whole unconsumed input; write the returned segments in
//! order; drop the consumed prefix; keep the rest for the next call.

use std::collections::VecDeque;
use std::ops::Range;

use super::frame::{self, Frame, FrameError, Next, Reader};
use super::messages;

/// A statement that policy blocked: the rule that fired and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule: String,
    pub reason: String,
}

/// What the gate decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Allow,
    Block(Blocked),
    /// Hold the session at this message until [`Session::resolve_hold`] is called.
    Hold,
}

/// The requests a gate is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// A simple Query: one or more statements.
    Query(&'a str),
    /// An extended-protocol Parse.
    Parse { statement: &'a str, sql: &'a str },
    /// A fast-path FunctionCall by function OID.
    FunctionCall { oid: u32 },
}

/// Decides requests. Called synchronously on the data path, so it must not block.
pub trait Gate {
    fn check(&mut self, request: &Request<'_>) -> Disposition;
}

/// Lets everything through.
pub struct AllowAll;

impl Gate for AllowAll {
    fn check(&mut self, _: &Request<'_>) -> Disposition {
        Disposition::Allow
    }
}

/// One piece of output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// Bytes of the input passed to the call, forwarded as they came.
    Input(Range<usize>),
    /// Bytes the core wrote into [`Output::scratch`].
    Scratch(Range<usize>),
}

/// What one call produced for one peer.
#[derive(Debug, Default)]
pub struct Output {
    segs: Vec<Seg>,
    scratch: Vec<u8>,
}

impl Output {
    pub fn segments(&self) -> &[Seg] {
        &self.segs
    }

    pub fn scratch(&self) -> &[u8] {
        &self.scratch
    }

    /// Swaps the scratch buffer out (for an owned-buffer write) and back.
    pub fn scratch_mut(&mut self) -> &mut Vec<u8> {
        &mut self.scratch
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn clear(&mut self) {
        self.segs.clear();
        self.scratch.clear();
    }

    fn pass(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        if let Some(Seg::Input(last)) = self.segs.last_mut()
            && last.end == r.start
        {
            last.end = r.end;
            return;
        }
        self.segs.push(Seg::Input(r));
    }

    fn emit(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.scratch.len();
        write(&mut self.scratch);
        let end = self.scratch.len();
        if let Some(Seg::Scratch(last)) = self.segs.last_mut()
            && last.end == start
        {
            last.end = end;
            return;
        }
        self.segs.push(Seg::Scratch(start..end));
    }
}

/// How far a call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `consumed` input bytes are handled; keep the rest and read more.
    Continue { consumed: usize },
    /// The gate asked to hold the message that starts at `consumed`.
    Hold { consumed: usize },
    /// The client sent Terminate: write the output, then close both sides.
    Terminate { consumed: usize },
}

/// Which peer broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation by the {side:?}: {reason}")]
pub struct SessionError {
    pub side: Side,
    pub reason: String,
}

impl SessionError {
    fn client(reason: impl Into<String>) -> Self {
        Self {
            side: Side::Client,
            reason: reason.into(),
        }
    }
    fn server(reason: impl Into<String>) -> Self {
        Self {
            side: Side::Server,
            reason: reason.into(),
        }
    }
}

/// A reply the server owes, in the order it will come.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Simple Query or FunctionCall: ends with ReadyForQuery. `probe` is set when the gateway
    /// sent a failing stand-in whose ErrorResponse it rewrites.
    Query {
        probe: Option<Blocked>,
    },
    Parse {
        probe: Option<Blocked>,
    },
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
}

/// SQL that fails at parse time on every PostgreSQL. The gateway sends it in place of a blocked
/// statement so the server aborts an open transaction exactly as it would for a real error, and
/// reports the resulting transaction state itself.
const PROBE_SQL: &str = "portcullis_blocked_statement";

/// The SQLSTATE for a statement policy refused.
pub const SQLSTATE_BLOCKED: &str = "42501";

/// Per-direction traffic counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct Session {
    max_message: usize,
    expect: VecDeque<Expect>,
    /// Client side: bytes of a message being streamed through (or dropped) still to come.
    fe_stream: usize,
    fe_stream_drop: bool,
    /// After a blocked Parse, the rest of the extended-protocol batch is dropped up to Sync, the
    /// way the server drops a batch after an error.
    fe_discard_to_sync: bool,
    /// The gate's final answer for a held message, applied when it is processed again.
    resolved: Option<Disposition>,
    /// Server side: bytes of a message being streamed through still to come.
    be_stream: usize,
    tx_status: u8,
    server_fatal: bool,
    pub from_client: Counters,
    pub from_server: Counters,
    pub blocked: u64,
    pub queries: u64,
}

impl Session {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            expect: VecDeque::new(),
            fe_stream: 0,
            fe_stream_drop: false,
            fe_discard_to_sync: false,
            resolved: None,
            be_stream: 0,
            tx_status: b'I',
            server_fatal: false,
            from_client: Counters::default(),
            from_server: Counters::default(),
            blocked: 0,
            queries: 0,
        }
    }

    /// The transaction status of the last ReadyForQuery: `I`, `T` or `E`.
    pub fn transaction_status(&self) -> u8 {
        self.tx_status
    }

    /// Whether the server sent a FATAL error, after which it closes the connection itself.
    pub fn server_sent_fatal(&self) -> bool {
        self.server_fatal
    }

    /// Replies the server still owes (for tests and the admin view).
    pub fn pending_replies(&self) -> usize {
        self.expect.len()
    }

    /// The final answer for the message a [`Progress::Hold`] stopped at.
    pub fn resolve_hold(&mut self, disposition: Disposition) {
        debug_assert!(disposition != Disposition::Hold);
        self.resolved = Some(disposition);
    }

    /// Processes client bytes. `to_server` gets what goes upstream.
    pub fn on_frontend(
        &mut self,
        input: &[u8],
        gate: &mut dyn Gate,
        to_server: &mut Output,
    ) -> Result<Progress, SessionError> {
        let mut pos = 0;
        loop {
            if self.fe_stream > 0 {
                let n = self.fe_stream.min(input.len() - pos);
                if !self.fe_stream_drop {
                    to_server.pass(pos..pos + n);
                }
                self.from_client.bytes += n as u64;
                self.fe_stream -= n;
                pos += n;
            }
            let rest = &input[pos..];
            let frame =
                match frame::next_frame(rest, self.max_message).map_err(client_frame_error)? {
                    Next::Frame(f) => f,
                    Next::NeedHeader => return Ok(Progress::Continue { consumed: pos }),
                    Next::Partial { tag, wire_len } => {
                        // COPY data needs no inspection, and a dropped message needs none either:
                        // stream them instead of buffering a whole large message.
                        let drop = self.fe_discard_to_sync && tag != b'S';
                        if tag == b'd' || drop {
                            self.from_client.messages += 1;
                            self.fe_stream = wire_len;
                            self.fe_stream_drop = drop;
                            continue;
                        }
                        return Ok(Progress::Continue { consumed: pos });
                    }
                };
            let range = pos..pos + frame.wire_len();
            match self.frontend_message(frame, range.clone(), gate, to_server)? {
                Some(Progress::Hold { .. }) => return Ok(Progress::Hold { consumed: pos }),
                Some(Progress::Terminate { .. }) => {
                    return Ok(Progress::Terminate {
                        consumed: range.end,
                    });
                }
                _ => {}
            }
            self.from_client.messages += 1;
            self.from_client.bytes += range.len() as u64;
            pos = range.end;
        }
    }

    fn frontend_message(
        &mut self,
        frame: Frame<'_>,
        range: Range<usize>,
        gate: &mut dyn Gate,
        out: &mut Output,
    ) -> Result<Option<Progress>, SessionError> {
        if self.fe_discard_to_sync && !matches!(frame.tag, b'S' | b'X') {
            return Ok(None);
        }
        match frame.tag {
            b'Q' => {
                let sql = body_str(Reader::new(frame.body).cstr(), "Query")?;
                self.queries += 1;
                match self.decide(gate, &Request::Query(sql)) {
                    Disposition::Allow => {
                        out.pass(range);
                        self.expect.push_back(Expect::Query { probe: None });
                    }
                    Disposition::Block(b) => {
                        out.emit(|o| messages::encode_query(PROBE_SQL, o));
                        self.expect.push_back(Expect::Query { probe: Some(b) });
                    }
                    Disposition::Hold => {
                        return Ok(Some(Progress::Hold {
                            consumed: range.start,
                        }));
                    }
                }
            }
            b'P' => {
                let mut r = Reader::new(frame.body);
                let statement = body_str(r.cstr(), "Parse statement name")?;
                let sql = body_str(r.cstr(), "Parse query")?;
                self.queries += 1;
                match self.decide(gate, &Request::Parse { statement, sql }) {
                    Disposition::Allow => {
                        out.pass(range);
                        self.expect.push_back(Expect::Parse { probe: None });
                    }
                    Disposition::Block(b) => {
                        out.emit(|o| messages::encode_parse(statement, PROBE_SQL, o));
                        self.expect.push_back(Expect::Parse { probe: Some(b) });
                        self.fe_discard_to_sync = true;
                    }
                    Disposition::Hold => {
                        return Ok(Some(Progress::Hold {
                            consumed: range.start,
                        }));
                    }
                }
            }
            b'F' => {
                let oid = Reader::new(frame.body)
                    .i32()
                    .map_err(|e| SessionError::client(format!("FunctionCall: {e}")))?;
                self.queries += 1;
                match self.decide(gate, &Request::FunctionCall { oid: oid as u32 }) {
                    Disposition::Allow => {
                        out.pass(range);
                        self.expect.push_back(Expect::Query { probe: None });
                    }
                    Disposition::Block(b) => {
                        // A FunctionCall is answered like a simple query: result, then ReadyForQuery.
                        out.emit(|o| messages::encode_query(PROBE_SQL, o));
                        self.expect.push_back(Expect::Query { probe: Some(b) });
                    }
                    Disposition::Hold => {
                        return Ok(Some(Progress::Hold {
                            consumed: range.start,
                        }));
                    }
                }
            }
            b'B' | b'D' | b'E' | b'C' | b'S' => {
                out.pass(range);
                self.expect.push_back(match frame.tag {
                    b'B' => Expect::Bind,
                    b'D' => Expect::Describe,
                    b'E' => Expect::Execute,
                    b'C' => Expect::Close,
                    _ => {
                        self.fe_discard_to_sync = false;
                        Expect::Sync
                    }
                });
            }
            b'H' | b'd' | b'c' | b'f' => out.pass(range),
            b'X' => {
                let end = range.end;
                out.pass(range);
                return Ok(Some(Progress::Terminate { consumed: end }));
            }
            other => {
                return Err(SessionError::client(format!(
                    "unexpected message type {:?} after startup",
                    other as char
                )));
            }
        }
        Ok(None)
    }

    fn decide(&mut self, gate: &mut dyn Gate, request: &Request<'_>) -> Disposition {
        let d = self.resolved.take().unwrap_or_else(|| gate.check(request));
        if matches!(d, Disposition::Block(_)) {
            self.blocked += 1;
        }
        d
    }

    /// Processes server bytes. `to_client` gets what goes to the client.
    pub fn on_backend(
        &mut self,
        input: &[u8],
        to_client: &mut Output,
    ) -> Result<Progress, SessionError> {
        let mut pos = 0;
        loop {
            if self.be_stream > 0 {
                let n = self.be_stream.min(input.len() - pos);
                to_client.pass(pos..pos + n);
                self.from_server.bytes += n as u64;
                self.be_stream -= n;
                pos += n;
            }
            let rest = &input[pos..];
            let frame = match frame::next_frame(rest, self.max_message)
                .map_err(|e| SessionError::server(e.to_string()))?
            {
                Next::Frame(f) => f,
                Next::NeedHeader => return Ok(Progress::Continue { consumed: pos }),
                Next::Partial { tag, wire_len } => {
                    // Rows and COPY data stream through without being buffered whole.
                    if matches!(tag, b'D' | b'd') {
                        self.from_server.messages += 1;
                        self.be_stream = wire_len;
                        continue;
                    }
                    return Ok(Progress::Continue { consumed: pos });
                }
            };
            let range = pos..pos + frame.wire_len();
            self.backend_message(frame, range.clone(), to_client)?;
            self.from_server.messages += 1;
            self.from_server.bytes += range.len() as u64;
            pos = range.end;
        }
    }

    fn backend_message(
        &mut self,
        frame: Frame<'_>,
        range: Range<usize>,
        out: &mut Output,
    ) -> Result<(), SessionError> {
        match frame.tag {
            b'Z' => {
                let status = Reader::new(frame.body)
                    .u8()
                    .map_err(|e| SessionError::server(format!("ReadyForQuery: {e}")))?;
                self.tx_status = status;
                if matches!(
                    self.expect.front(),
                    Some(Expect::Query { .. } | Expect::Sync)
                ) {
                    self.expect.pop_front();
                }
            }
            b'E' => {
                if messages::parse_error_fields(frame.body).is_ok_and(|e| e.is_fatal()) {
                    self.server_fatal = true;
                }
                if let Some(blocked) = self.take_probe_on_error() {
                    out.emit(|o| {
                        messages::encode_error(
                            "ERROR",
                            SQLSTATE_BLOCKED,
                            &format!("statement blocked by rule \"{}\"", blocked.rule),
                            Some(&blocked.reason),
                            None,
                            o,
                        )
                    });
                    return Ok(());
                }
            }
            b'1' | b'2' | b'3' | b'n' | b's' => {
                self.expect.pop_front();
            }
            b'T' => {
                if matches!(self.expect.front(), Some(Expect::Describe)) {
                    self.expect.pop_front();
                }
            }
            b'C' | b'I' => {
                if matches!(self.expect.front(), Some(Expect::Execute)) {
                    self.expect.pop_front();
                }
            }
            _ => {}
        }
        out.pass(range);
        Ok(())
    }

    /// On an ErrorResponse: settles the queue the way the server does, and returns the blocked
    /// statement when this error is the answer to the gateway's stand-in.
    fn take_probe_on_error(&mut self) -> Option<Blocked> {
        match self.expect.front_mut()? {
            // Simple query: ReadyForQuery follows and pops the entry.
            Expect::Query { probe } => probe.take(),
            Expect::Sync => None,
            _ => {
                // Extended protocol: the server skips everything up to Sync.
                let head = self.expect.pop_front();
                while matches!(self.expect.front(), Some(e) if *e != Expect::Sync) {
                    self.expect.pop_front();
                }
                match head {
                    Some(Expect::Parse { probe }) => probe,
                    _ => None,
                }
            }
        }
    }
}

fn client_frame_error(e: FrameError) -> SessionError {
    SessionError::client(e.to_string())
}

fn body_str<'a>(
    r: Result<&'a [u8], frame::Truncated>,
    what: &str,
) -> Result<&'a str, SessionError> {
    let bytes = r.map_err(|e| SessionError::client(format!("{what}: {e}")))?;
    std::str::from_utf8(bytes)
        .map_err(|_| SessionError::client(format!("{what} is not valid UTF-8")))
}
