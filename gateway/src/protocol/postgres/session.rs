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
use std::hash::BuildHasher;
use std::ops::Range;

use foldhash::{HashMap, HashMapExt as _};

use super::error::{ProtocolError, Reader};
use super::frame::{self, Frame, FrameError};
use super::messages;

pub use crate::protocol::core::{
    AllowAll, Blocked, Core, Counters, Disposition, Gate, Output, Owed, Progress, Request, Seg,
    Transaction,
};

pub use crate::error::Side;

/// Why the session core ends a session: a peer broke the protocol, or the gateway refused to pass
/// a result it could not inspect (masking fails closed, [`Side::Gateway`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{side:?}: {reason}")]
pub struct SessionError {
    pub side: Side,
    pub reason: String,
}

/// A refused result is a privilege matter (`42501`), a broken protocol on either side `08P01`;
/// the server's own bytes are never described to the client. Retrying the same bytes fails the
/// same way.
impl crate::error::WireError for SessionError {
    fn side(&self) -> Side {
        self.side
    }

    fn retryable(&self) -> bool {
        false
    }

    fn sqlstate(&self) -> &str {
        match self.side {
            Side::Gateway => SQLSTATE_BLOCKED,
            Side::Client | Side::Upstream => "08P01",
        }
    }

    fn client_message(&self) -> String {
        match self.side {
            Side::Client => format!("protocol violation: {}", self.reason),
            Side::Upstream => {
                "the upstream server broke the protocol; the session is closed".to_owned()
            }
            Side::Gateway => self.reason.clone(),
        }
    }
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
            side: Side::Upstream,
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
        sql: Option<Box<str>>,
    },
    Parse {
        statement: NameId,
        probe: Option<Blocked>,
        sql: Option<Box<str>>,
    },
    Bind {
        portal: NameId,
        statement: NameId,
        result_formats: ResultFormats,
    },
    Describe {
        portal: bool,
        name: NameId,
    },
    Execute {
        portal: NameId,
    },
    Close {
        portal: bool,
        name: NameId,
    },
    Sync,
}

/// Named prepared statements, and named portals, a session may keep open at once. Past it the
/// statement that would open one more fails with [`SQLSTATE_LIMIT`] instead of growing the
/// gateway's maps without end; the session goes on.
pub const MAX_NAMED: usize = 10_000;

/// The SQLSTATE for a request past one of the gateway's per-session limits
/// (program_limit_exceeded).
pub const SQLSTATE_LIMIT: &str = "54000";

/// The largest message PostgreSQL itself reads (`PQ_LARGE_MESSAGE_LIMIT`): a declared length past
/// it is not a large statement but a broken stream.
const PG_MAX_MESSAGE: usize = 0x3fff_ffff;

/// Why a result filter would not pass a message on (masking fails closed): the message is dropped
/// and the session ends with 42501. It names what was wrong with the message, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub std::borrow::Cow<'static, str>);

impl From<&'static str> for Refusal {
    fn from(why: &'static str) -> Self {
        Refusal(why.into())
    }
}

/// Inspects (and may rewrite) result rows on their way to the client: the masking hook.
/// `begin*` return whether the result's rows must be inspected; when they return false, rows
/// stream through untouched and unparsed.
pub trait ResultFilter {
    /// A result's columns: a RowDescription body and the formats its rows use.
    fn begin(&mut self, row_description: &[u8], formats: &ResultFormats) -> bool;
    /// Rows whose columns the gateway never saw described.
    fn begin_unknown(&mut self) -> bool;
    /// Ok(true) when a replacement DataRow message was appended to `out`.
    fn data_row(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal>;
    /// A CopyOutResponse body; true when its CopyData must be inspected.
    fn copy_out(&mut self, body: &[u8]) -> bool;
    /// Ok(true) when a replacement CopyData message was appended to `out`.
    fn copy_data(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal>;
    /// The statement what follows belongs to: its text as the client sent it (Query or Parse;
    /// `None` when unknown) and its index among a Query's statements. Called, when the session
    /// [keeps statements](Session::keep_statements), before `begin`, `begin_unknown`, `copy_out`
    /// and `notice`.
    fn statement(&mut self, _sql: Option<&str>, _index: usize) {}
    /// An ErrorResponse, NoticeResponse or NotificationResponse body (`tag` E, N or A). Ok(true)
    /// when a replacement message was appended to `out`.
    fn notice(&mut self, _tag: u8, _body: &[u8], _out: &mut Vec<u8>) -> Result<bool, Refusal> {
        Ok(false)
    }
}

/// The formats rows of a result come in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultFormats {
    /// As the RowDescription says (simple query, or a Describe of the portal).
    Described,
    /// From Bind: one code for every column (Bind sent none, meaning text, or one).
    Uniform(i16),
    /// From Bind: one code per column.
    PerColumn(Vec<i16>),
}

impl ResultFormats {
    /// The format of column `i`, given what its RowDescription field says.
    pub fn of(&self, i: usize, described: i16) -> i16 {
        match self {
            ResultFormats::Described => described,
            ResultFormats::Uniform(f) => *f,
            ResultFormats::PerColumn(v) => v.get(i).copied().unwrap_or(0),
        }
    }
}

/// Statement and portal names, hashed with a per-session key so the hot path neither allocates
/// nor compares strings, and a client cannot aim a collision.
type NameId = u64;

/// Passes every result through.
pub struct NoFilter;

impl ResultFilter for NoFilter {
    fn begin(&mut self, _: &[u8], _: &ResultFormats) -> bool {
        false
    }
    fn begin_unknown(&mut self) -> bool {
        false
    }
    fn data_row(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<bool, Refusal> {
        Ok(false)
    }
    fn copy_out(&mut self, _: &[u8]) -> bool {
        false
    }
    fn copy_data(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<bool, Refusal> {
        Ok(false)
    }
}

/// What the server side knows about the result streaming now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResultState {
    None,
    /// Rows pass through; large ones stream without being buffered.
    Pass,
    /// Rows go through the filter whole.
    Inspect,
}

/// SQL that fails at parse time on every PostgreSQL. The gateway sends it in place of a blocked
/// statement so the server aborts an open transaction exactly as it would for a real error, and
/// reports the resulting transaction state itself.
const PROBE_SQL: &str = "portcullis_blocked_statement";

/// The statement name of the probe that stands in for a refused Execute.
const PROBE_STATEMENT: &str = "portcullis_blocked";

/// The SQLSTATE for a statement policy refused or an operator denied (insufficient_privilege).
pub const SQLSTATE_BLOCKED: &str = "42501";

#[derive(Debug)]
pub struct Session {
    max_message: usize,
    expect: VecDeque<Expect>,
    /// Client side: bytes of a message being streamed through (or dropped) still to come.
    fe_stream: usize,
    fe_stream_drop: bool,
    /// The message streamed through is CopyData: its body goes to the gate too, past the header
    /// bytes counted here.
    fe_stream_copy: Option<usize>,
    /// After a blocked Parse, the rest of the extended-protocol batch is dropped up to Sync, the
    /// way the server drops a batch after an error.
    fe_discard_to_sync: bool,
    /// The gate's final answer for a held message, applied when it is processed again.
    resolved: Option<Disposition>,
    /// Server side: bytes of a message being streamed through still to come.
    be_stream: usize,
    result: ResultState,
    copy_inspect: bool,
    /// Server-side view, updated in the server's order: RowDescriptions of described statements
    /// and portals, and what each portal was bound to.
    /// An empty entry means "not described"; entries keep their capacity for reuse.
    statement_rows: HashMap<NameId, Vec<u8>>,
    portal_rows: HashMap<NameId, Vec<u8>>,
    portals: HashMap<NameId, (NameId, ResultFormats)>,
    names: std::hash::RandomState,
    tx_status: u8,
    server_fatal: bool,
    /// Whether statement texts are kept for the filter (masking pairs each result with its own
    /// statement), and what is kept: the text of each parsed statement name.
    keep_sql: bool,
    /// The client's Terminate stays here: the upstream connection outlives the session.
    keep_upstream: bool,
    statement_sql: HashMap<NameId, Box<str>>,
    /// Statements of the current simple Query that have completed.
    query_index: usize,
    pub from_client: Counters,
    pub from_server: Counters,
    pub blocked: u64,
    /// Statements sent to run: Query, Execute and FunctionCall messages (a Parse only prepares).
    pub queries: u64,
}

impl Session {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            expect: VecDeque::new(),
            fe_stream: 0,
            fe_stream_drop: false,
            fe_stream_copy: None,
            fe_discard_to_sync: false,
            resolved: None,
            be_stream: 0,
            result: ResultState::None,
            copy_inspect: false,
            statement_rows: HashMap::new(),
            portal_rows: HashMap::new(),
            portals: HashMap::new(),
            names: std::hash::RandomState::new(),
            tx_status: b'I',
            server_fatal: false,
            keep_sql: false,
            keep_upstream: false,
            statement_sql: HashMap::new(),
            query_index: 0,
            from_client: Counters::default(),
            from_server: Counters::default(),
            blocked: 0,
            queries: 0,
        }
    }

    /// Keep each statement's text so the filter learns which statement a result belongs to.
    pub fn keep_statements(&mut self) {
        self.keep_sql = true;
    }

    /// Keeps the client's Terminate from the server, so that the upstream connection can serve
    /// another session after its reset.
    pub fn keep_upstream(&mut self) {
        self.keep_upstream = true;
    }

    /// The transaction status of the last ReadyForQuery: `I`, `T` or `E`.
    pub fn transaction_status(&self) -> u8 {
        self.tx_status
    }

    /// Statements and portals the session remembers: bounded by what the server holds.
    pub fn remembered(&self) -> usize {
        self.statement_rows.len() + self.portal_rows.len() + self.portals.len()
    }

    /// The refusal of a new name once [`MAX_NAMED`] of its kind are open.
    fn over_cap<V>(&self, map: &HashMap<NameId, V>, name: &str, what: &str) -> Option<Blocked> {
        (!name.is_empty()
            && map.len() >= MAX_NAMED
            && !map.contains_key(&self.names.hash_one(name)))
        .then(|| {
            limit(format!(
                "{MAX_NAMED} named {what} are open; close some (Close message) before making \
                     more"
            ))
        })
    }

    /// Answers the request at this point of the stream with `blocked`'s error, sent by the server
    /// in reply to a failing probe so that it sets the transaction state itself. A simple query
    /// (or FunctionCall) stands alone; an extended-protocol message fails its batch up to Sync.
    fn refuse(&mut self, blocked: Blocked, simple: bool, out: &mut Output) {
        if simple {
            out.emit(|o| messages::encode_query(PROBE_SQL, o));
            self.expect.push_back(Expect::Query {
                probe: Some(blocked),
                sql: None,
            });
        } else {
            out.emit(|o| messages::encode_parse(PROBE_STATEMENT, PROBE_SQL, o));
            self.fe_discard_to_sync = true;
            self.expect.push_back(Expect::Parse {
                statement: self.names.hash_one(PROBE_STATEMENT),
                probe: Some(blocked),
                sql: None,
            });
        }
    }

    /// Replies the server still owes (for tests and the admin view).
    pub fn pending_replies(&self) -> usize {
        self.expect.len()
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
                if let Some(header) = &mut self.fe_stream_copy {
                    let skip = (*header).min(n);
                    *header -= skip;
                    // Part of this message is already on its way: data that cannot be recorded
                    // ends the session, and the server rolls the COPY back.
                    if let Err(b) = gate.copy_data(&input[pos + skip..pos + n]) {
                        return Err(SessionError {
                            side: Side::Gateway,
                            reason: b.reason,
                        });
                    }
                }
                self.from_client.bytes += n as u64;
                self.fe_stream -= n;
                pos += n;
                if self.fe_stream == 0 {
                    self.fe_stream_copy = None;
                }
            }
            let rest = &input[pos..];
            let Some((tag, wire_len)) = frame::header(rest).map_err(client_frame_error)? else {
                return Ok(Progress::Continue { consumed: pos });
            };
            if wire_len > rest.len() || wire_len - 1 > self.max_message {
                // COPY data needs no inspection, and a dropped message needs none either:
                // stream them instead of buffering a whole large message.
                let drop = self.fe_discard_to_sync && tag != b'S';
                if tag == b'd' || drop {
                    self.from_client.messages += 1;
                    self.fe_stream = wire_len;
                    self.fe_stream_drop = drop;
                    if !drop {
                        // Nothing of it has gone yet: data the gate cannot record fails the COPY.
                        match gate.copy_data(&[]) {
                            Ok(()) => self.fe_stream_copy = Some(frame::HEADER_LEN),
                            Err(b) => {
                                to_server.emit(|o| messages::encode_copy_fail(&b.reason, o));
                                self.fe_stream_drop = true;
                            }
                        }
                    }
                    continue;
                }
                if wire_len - 1 > self.max_message {
                    // A statement (or its parameters) too large to inspect is refused and its
                    // bytes dropped as they come; the session goes on.
                    let simple = matches!(tag, b'Q' | b'F');
                    if !(simple || matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C'))
                        || wire_len - 1 > PG_MAX_MESSAGE
                    {
                        return Err(client_frame_error(FrameError::LengthOutOfRange {
                            tag: tag as char,
                            declared: (wire_len - 1) as i64,
                            max: self.max_message,
                        }));
                    }
                    let reason = format!(
                        "message {:?} of {} bytes exceeds the gateway's max_message_bytes ({})",
                        tag as char,
                        wire_len - 1,
                        self.max_message
                    );
                    let blocked = limit(reason);
                    gate.owed(Owed::Refused {
                        simple,
                        blocked: &blocked,
                    });
                    self.refuse(blocked, simple, to_server);
                    self.from_client.messages += 1;
                    self.fe_stream = wire_len;
                    self.fe_stream_drop = true;
                    continue;
                }
                return Ok(Progress::Continue { consumed: pos });
            }
            let frame = Frame {
                tag,
                body: &rest[frame::HEADER_LEN..wire_len],
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
                let sql = Reader::new(frame.body, "Query").cstr().map_err(client)?;
                return Ok(self.gated(gate, Request::Query(sql), range, out));
            }
            b'P' => {
                let mut r = Reader::new(frame.body, "Parse");
                let statement = r.cstr().map_err(client)?;
                let sql = r.cstr().map_err(client)?;
                if let Some(b) =
                    self.over_cap(&self.statement_rows, statement, "prepared statements")
                {
                    gate.owed(Owed::Refused {
                        simple: false,
                        blocked: &b,
                    });
                    self.refuse(b, false, out);
                    return Ok(None);
                }
                return Ok(self.gated(gate, Request::Parse { statement, sql }, range, out));
            }
            b'F' => {
                let oid = Reader::new(frame.body, "FunctionCall")
                    .i32()
                    .map_err(client)?;
                return Ok(self.gated(gate, Request::FunctionCall { oid: oid as u32 }, range, out));
            }
            b'B' => {
                let (portal, statement, result_formats) = parse_bind(frame.body)?;
                if let Some(b) = self.over_cap(&self.portals, portal, "portals") {
                    gate.owed(Owed::Refused {
                        simple: false,
                        blocked: &b,
                    });
                    self.refuse(b, false, out);
                    return Ok(None);
                }
                gate.bind(portal, statement, frame.body);
                out.pass(range);
                let (portal, statement) =
                    (self.names.hash_one(portal), self.names.hash_one(statement));
                self.expect.push_back(Expect::Bind {
                    portal,
                    statement,
                    result_formats,
                });
            }
            b'D' => {
                let mut r = Reader::new(frame.body, "Describe");
                let kind = r.u8().map_err(client)?;
                let name = self.names.hash_one(r.cstr().map_err(client)?);
                out.pass(range);
                gate.owed(Owed::Describe {
                    portal: kind == b'P',
                });
                self.expect.push_back(Expect::Describe {
                    portal: kind == b'P',
                    name,
                });
            }
            b'E' => {
                let name = Reader::new(frame.body, "Execute").cstr().map_err(client)?;
                let d = self.resolved.take().unwrap_or_else(|| gate.execute(name));
                match d {
                    Disposition::Allow => {
                        out.pass(range);
                        self.queries += 1;
                        let portal = self.names.hash_one(name);
                        self.expect.push_back(Expect::Execute { portal });
                    }
                    // A failing named Parse stands in: it has no side effect, and the server
                    // then skips to Sync as for any error in a batch.
                    Disposition::Block(b) => {
                        self.blocked += 1;
                        self.refuse(b, false, out);
                    }
                    Disposition::Hold => {
                        return Ok(Some(Progress::Hold {
                            consumed: range.start,
                        }));
                    }
                }
            }
            b'C' => {
                let mut r = Reader::new(frame.body, "Close");
                let kind = r.u8().map_err(client)?;
                let name = self.names.hash_one(r.cstr().map_err(client)?);
                out.pass(range);
                gate.owed(Owed::Close);
                self.expect.push_back(Expect::Close {
                    portal: kind == b'P',
                    name,
                });
            }
            b'S' => {
                out.pass(range);
                self.fe_discard_to_sync = false;
                gate.owed(Owed::Sync);
                self.expect.push_back(Expect::Sync);
            }
            b'd' => match gate.copy_data(frame.body) {
                Ok(()) => out.pass(range),
                // COPY FROM STDIN data that cannot be recorded never reaches the server: the
                // COPY fails there instead, and the server drops the rest of its data.
                Err(b) => out.emit(|o| messages::encode_copy_fail(&b.reason, o)),
            },
            b'H' | b'c' | b'f' => out.pass(range),
            b'X' => {
                let end = range.end;
                if !self.keep_upstream {
                    out.pass(range);
                }
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

    /// A request the gate decides: forwarded as it came, replaced by a failing probe whose error
    /// the server side rewrites, or held at `range.start`.
    fn gated(
        &mut self,
        gate: &mut dyn Gate,
        request: Request<'_>,
        range: Range<usize>,
        out: &mut Output,
    ) -> Option<Progress> {
        if !matches!(request, Request::Parse { .. }) {
            self.queries += 1;
        }
        let probe = match self.decide(gate, &request) {
            Disposition::Allow => {
                out.pass(range);
                None
            }
            Disposition::Block(b) => Some(b),
            Disposition::Hold => {
                return Some(Progress::Hold {
                    consumed: range.start,
                });
            }
        };
        let blocked = probe.is_some();
        let sql = match request {
            Request::Query(sql) | Request::Parse { sql, .. } if self.keep_sql && !blocked => {
                Some(sql.into())
            }
            _ => None,
        };
        let expect = match request {
            Request::Parse { statement, .. } => {
                if blocked {
                    out.emit(|o| messages::encode_parse(statement, PROBE_SQL, o));
                    self.fe_discard_to_sync = true;
                }
                Expect::Parse {
                    statement: self.names.hash_one(statement),
                    probe,
                    sql,
                }
            }
            // A FunctionCall is answered like a simple query: result, then ReadyForQuery. (This
            // core makes no other request: Http is another protocol's.)
            Request::Query(_) | Request::FunctionCall { .. } | Request::Http { .. } => {
                if blocked {
                    out.emit(|o| messages::encode_query(PROBE_SQL, o));
                }
                Expect::Query { probe, sql }
            }
        };
        self.expect.push_back(expect);
        None
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
        filter: &mut dyn ResultFilter,
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
            let Some((tag, wire_len)) =
                frame::header(rest).map_err(|e| SessionError::server(e.to_string()))?
            else {
                return Ok(Progress::Continue { consumed: pos });
            };
            if wire_len > rest.len() || wire_len - 1 > self.max_message {
                // Rows and COPY data nobody inspects stream through without being buffered
                // whole, so a huge value never makes the gateway hold it all.
                if tag == b'D' && self.result == ResultState::None {
                    self.result = self.begin_execute_rows(filter);
                }
                let streamable = match tag {
                    b'D' => self.result == ResultState::Pass,
                    b'd' => !self.copy_inspect,
                    _ => false,
                };
                if streamable {
                    self.from_server.messages += 1;
                    self.be_stream = wire_len;
                    continue;
                }
                if wire_len - 1 > self.max_message {
                    return Err(SessionError::server(format!(
                        "message {:?} of {} bytes exceeds max_message_bytes ({})",
                        tag as char, wire_len, self.max_message
                    )));
                }
                return Ok(Progress::Continue { consumed: pos });
            }
            let frame = Frame {
                tag,
                body: &rest[frame::HEADER_LEN..wire_len],
            };
            let range = pos..pos + frame.wire_len();
            self.backend_message(frame, range.clone(), filter, to_client)?;
            self.from_server.messages += 1;
            self.from_server.bytes += range.len() as u64;
            pos = range.end;
        }
    }

    fn backend_message(
        &mut self,
        frame: Frame<'_>,
        range: Range<usize>,
        filter: &mut dyn ResultFilter,
        out: &mut Output,
    ) -> Result<(), SessionError> {
        match frame.tag {
            b'D' => {
                if self.result == ResultState::None {
                    self.result = self.begin_execute_rows(filter);
                }
                if self.result == ResultState::Inspect
                    && filtered(out, |o| filter.data_row(frame.body, o))?
                {
                    return Ok(());
                }
            }
            b'd' if self.copy_inspect => {
                let replaced = filtered(out, |o| filter.copy_data(frame.body, o))?;
                if replaced {
                    return Ok(());
                }
            }
            b'H' => {
                self.announce(filter);
                self.copy_inspect = filter.copy_out(frame.body);
            }
            b'N' | b'A' => {
                self.announce(filter);
                if filtered(out, |o| filter.notice(frame.tag, frame.body, o))? {
                    return Ok(());
                }
            }
            b'c' => self.copy_inspect = false,
            b'Z' => {
                let status = Reader::new(frame.body, "ReadyForQuery")
                    .u8()
                    .map_err(|e| SessionError::server(e.to_string()))?;
                self.tx_status = status;
                self.query_index = 0;
                self.result = ResultState::None;
                self.copy_inspect = false;
                // Portals live until their transaction ends, the unnamed one until the next
                // Bind; past here the server has neither, so neither does the gateway.
                if status == b'I' {
                    self.portals.clear();
                    self.portal_rows.clear();
                } else {
                    let unnamed = self.names.hash_one("");
                    self.portals.remove(&unnamed);
                    self.portal_rows.remove(&unnamed);
                }
                if matches!(
                    self.expect.front(),
                    Some(Expect::Query { .. } | Expect::Sync)
                ) {
                    self.expect.pop_front();
                }
            }
            b'E' => {
                self.result = ResultState::None;
                self.copy_inspect = false;
                if messages::parse_error_fields(frame.body).is_ok_and(|e| e.is_fatal()) {
                    self.server_fatal = true;
                }
                self.announce(filter);
                if let Some(blocked) = self.take_probe_on_error() {
                    out.emit(|o| match blocked.sqlstate {
                        Some(code) => {
                            messages::encode_error("ERROR", code, &blocked.reason, None, None, o)
                        }
                        None => messages::encode_error(
                            "ERROR",
                            SQLSTATE_BLOCKED,
                            &format!("statement blocked by rule \"{}\"", blocked.rule),
                            Some(&blocked.reason),
                            None,
                            o,
                        ),
                    });
                    return Ok(());
                }
                if filtered(out, |o| filter.notice(frame.tag, frame.body, o))? {
                    return Ok(());
                }
            }
            b'1' => {
                if let Some(Expect::Parse { statement, sql, .. }) = self.expect.pop_front() {
                    // Known from now on (undescribed), so the cap counts it.
                    self.statement_rows.entry(statement).or_default().clear();
                    match sql {
                        Some(sql) => self.statement_sql.insert(statement, sql),
                        None => self.statement_sql.remove(&statement),
                    };
                }
            }
            b'2' => {
                if let Some(Expect::Bind {
                    portal,
                    statement,
                    result_formats,
                }) = self.expect.pop_front()
                {
                    forget(&mut self.portal_rows, portal);
                    self.portals.insert(portal, (statement, result_formats));
                }
            }
            b'3' => {
                if let Some(Expect::Close { portal, name }) = self.expect.pop_front() {
                    if portal {
                        self.portals.remove(&name);
                        self.portal_rows.remove(&name);
                    } else {
                        self.statement_rows.remove(&name);
                    }
                }
                self.result = ResultState::None;
            }
            b's' => {
                self.expect.pop_front();
                self.result = ResultState::None;
            }
            b'n' => {
                if let Some(Expect::Describe { portal, name }) = self.expect.pop_front() {
                    forget(
                        if portal {
                            &mut self.portal_rows
                        } else {
                            &mut self.statement_rows
                        },
                        name,
                    );
                }
            }
            b'T' => match self.expect.front() {
                Some(Expect::Describe { .. }) => {
                    if let Some(Expect::Describe { portal, name }) = self.expect.pop_front() {
                        let rows = if portal {
                            &mut self.portal_rows
                        } else {
                            &mut self.statement_rows
                        };
                        let entry = rows.entry(name).or_default();
                        entry.clear();
                        entry.extend_from_slice(frame.body);
                    }
                }
                _ => {
                    // A simple query's next result set.
                    self.announce(filter);
                    self.result = if filter.begin(frame.body, &ResultFormats::Described) {
                        ResultState::Inspect
                    } else {
                        ResultState::Pass
                    };
                }
            },
            b'C' | b'I' => {
                self.result = ResultState::None;
                if matches!(self.expect.front(), Some(Expect::Query { .. })) {
                    self.query_index += 1;
                }
                if matches!(self.expect.front(), Some(Expect::Execute { .. })) {
                    self.expect.pop_front();
                }
            }
            _ => {}
        }
        out.pass(range);
        Ok(())
    }

    /// The first row of an Execute: find its columns from the portal's or the statement's
    /// description, in the server's order of events.
    fn begin_execute_rows(&mut self, filter: &mut dyn ResultFilter) -> ResultState {
        self.announce(filter);
        let inspect = match self.expect.front() {
            Some(Expect::Execute { portal }) => {
                if let Some(rows) = described(&self.portal_rows, portal) {
                    filter.begin(rows, &ResultFormats::Described)
                } else if let Some((rows, formats)) =
                    self.portals.get(portal).and_then(|(stmt, formats)| {
                        Some((described(&self.statement_rows, stmt)?, formats))
                    })
                {
                    filter.begin(rows, formats)
                } else {
                    filter.begin_unknown()
                }
            }
            _ => filter.begin_unknown(),
        };
        if inspect {
            ResultState::Inspect
        } else {
            ResultState::Pass
        }
    }

    /// Tells the filter which statement the server is answering now, in the server's order: the
    /// current Query (and how many of its statements completed), or the statement behind the
    /// portal being executed, or the statement being parsed or bound.
    fn announce(&self, filter: &mut dyn ResultFilter) {
        if !self.keep_sql {
            return;
        }
        let named = |name: &NameId| self.statement_sql.get(name).map(|s| &**s);
        let (sql, index) = match self.expect.front() {
            Some(Expect::Query { sql, .. }) => (sql.as_deref(), self.query_index),
            Some(Expect::Parse { sql, .. }) => (sql.as_deref(), 0),
            Some(Expect::Bind { statement, .. }) => (named(statement), 0),
            Some(Expect::Execute { portal }) => (
                self.portals
                    .get(portal)
                    .and_then(|(statement, _)| named(statement)),
                0,
            ),
            Some(Expect::Describe { portal, name }) => (
                if *portal {
                    self.portals.get(name).and_then(|(s, _)| named(s))
                } else {
                    named(name)
                },
                0,
            ),
            _ => (None, 0),
        };
        filter.statement(sql, index);
    }

    /// On an ErrorResponse: settles the queue the way the server does, and returns the blocked
    /// statement when this error is the answer to the gateway's stand-in.
    fn take_probe_on_error(&mut self) -> Option<Blocked> {
        match self.expect.front_mut()? {
            // Simple query: ReadyForQuery follows and pops the entry.
            Expect::Query { probe, .. } => probe.take(),
            Expect::Sync => None,
            _ => {
                // Extended protocol: the server skips everything up to Sync.
                let head = self.expect.pop_front();
                while matches!(self.expect.front(), Some(e) if *e != Expect::Sync) {
                    self.expect.pop_front();
                }
                match head {
                    Some(Expect::Parse { probe, .. }) => probe,
                    _ => None,
                }
            }
        }
    }
}

/// The description stored under `name`, if it was described since it was last (re)defined.
fn described<'a>(rows: &'a HashMap<NameId, Vec<u8>>, name: &NameId) -> Option<&'a Vec<u8>> {
    rows.get(name).filter(|v| !v.is_empty())
}

/// Marks a name as not described, keeping the buffer for reuse.
fn forget(rows: &mut HashMap<NameId, Vec<u8>>, name: NameId) {
    if let Some(v) = rows.get_mut(&name) {
        v.clear();
    }
}

/// Bind: portal, statement, and the result-format codes at its end.
fn parse_bind(body: &[u8]) -> Result<(&str, &str, ResultFormats), SessionError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr().map_err(client)?;
    let statement = r.cstr().map_err(client)?;
    let nformats = r.i16().map_err(client)?;
    r.bytes(
        2 * usize::try_from(nformats)
            .map_err(|_| SessionError::client("Bind: negative format count"))?,
    )
    .map_err(client)?;
    let nparams = r.i16().map_err(client)?;
    for _ in 0..nparams {
        let len = r.i32().map_err(client)?;
        if len > 0 {
            r.bytes(len as usize).map_err(client)?;
        }
    }
    let formats = match r.i16().map_err(client)? {
        0 => ResultFormats::Uniform(0),
        1 => ResultFormats::Uniform(r.i16().map_err(client)?),
        n if n < 0 => return Err(SessionError::client("Bind: negative result format count")),
        n => (0..n)
            .map(|_| r.i16().map_err(client))
            .collect::<Result<_, _>>()
            .map(ResultFormats::PerColumn)?,
    };
    Ok((portal, statement, formats))
}

/// Runs a result filter on one message. True: the filter wrote its replacement into `out`.
/// False: it wrote nothing and the original bytes go on. A message the filter cannot process is an
/// error and is never passed through.
fn filtered(
    out: &mut Output,
    filter: impl FnOnce(&mut Vec<u8>) -> Result<bool, Refusal>,
) -> Result<bool, SessionError> {
    let mut replaced = Ok(false);
    out.emit(|o| replaced = filter(o));
    let replaced = replaced.map_err(|refusal| SessionError {
        side: Side::Gateway,
        reason: format!("result refused by masking: {refusal}"),
    })?;
    if !replaced {
        out.drop_empty_scratch();
    }
    Ok(replaced)
}

/// A refusal for a request past one of the gateway's limits.
fn limit(reason: String) -> Blocked {
    Blocked {
        rule: "limits".into(),
        reason,
        sqlstate: Some(SQLSTATE_LIMIT),
    }
}

fn client_frame_error(e: FrameError) -> SessionError {
    SessionError::client(e.to_string())
}

/// A malformed client message: the error names the message and what was wrong.
fn client(e: ProtocolError) -> SessionError {
    SessionError::client(e.to_string())
}

impl Core for Session {
    type Filter = dyn ResultFilter;
    type Error = SessionError;

    fn on_client(
        &mut self,
        input: &[u8],
        gate: &mut dyn Gate,
        to_server: &mut Output,
    ) -> Result<Progress, SessionError> {
        self.on_frontend(input, gate, to_server)
    }

    fn on_server(
        &mut self,
        input: &[u8],
        filter: &mut Self::Filter,
        to_client: &mut Output,
    ) -> Result<Progress, SessionError> {
        self.on_backend(input, filter, to_client)
    }

    fn resolve_hold(&mut self, disposition: Disposition) {
        debug_assert!(disposition != Disposition::Hold);
        self.resolved = Some(disposition);
    }

    fn client_traffic(&self) -> Counters {
        self.from_client
    }

    fn server_traffic(&self) -> Counters {
        self.from_server
    }

    /// From the status byte of the last ReadyForQuery.
    fn transaction(&self) -> Transaction {
        match self.tx_status {
            b'T' => Transaction::Open,
            b'E' => Transaction::Failed,
            _ => Transaction::Idle,
        }
    }

    fn idle(&self) -> bool {
        self.expect.is_empty() && self.tx_status == b'I'
    }

    /// The upstream sits at a ReadyForQuery, where a reset can begin.
    fn at_rest(&self) -> bool {
        self.expect.is_empty() && self.fe_stream == 0 && self.be_stream == 0
    }

    /// A FATAL ErrorResponse, after which the server closes the connection itself.
    fn server_sent_fatal(&self) -> bool {
        self.server_fatal
    }

    fn server_owes_more(&self, input: &[u8]) -> bool {
        if self.be_stream > input.len() {
            return true;
        }
        let mut pos = self.be_stream;
        while pos < input.len() {
            match frame::header(&input[pos..]) {
                Ok(Some((_, wire_len))) => pos = pos.saturating_add(wire_len),
                // A header cut short is owed its rest.
                Ok(None) => return true,
                // Broken framing: nothing is owed; `on_server` reports it.
                Err(_) => return false,
            }
        }
        pos > input.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_owes_the_rest_of_a_message_cut_by_a_read() {
        let core = Session::new(1 << 20);
        let mut two = Vec::new();
        for body in [&b"first"[..], b"second"] {
            two.push(b'D');
            two.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
            two.extend_from_slice(body);
        }
        assert!(!core.server_owes_more(&[]));
        assert!(!core.server_owes_more(&two), "whole messages");
        for cut in 1..two.len() {
            let at_boundary = cut == 10;
            assert_eq!(
                core.server_owes_more(&two[..cut]),
                !at_boundary,
                "cut at {cut}"
            );
        }
        // A declared length below 4 is broken framing, not a promise of more bytes.
        assert!(!core.server_owes_more(b"D\0\0\0\x01"));
    }
    use crate::protocol::postgres::frame::{Next, write_message};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_message(&mut v, tag, |o| o.extend_from_slice(body));
        v
    }
    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', format!("{sql}\0").as_bytes())
    }
    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }
    fn bind(portal: &str, stmt: &str, result_formats: &[i16]) -> Vec<u8> {
        let mut b = format!("{portal}\0{stmt}\0").into_bytes();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
        for f in result_formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        msg(b'B', &b)
    }
    fn execute(portal: &str) -> Vec<u8> {
        msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }
    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }
    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }
    fn server_error(code: &str) -> Vec<u8> {
        let mut out = Vec::new();
        messages::encode_error("ERROR", code, "boom", None, None, &mut out);
        out
    }
    fn data_row(value: &[u8]) -> Vec<u8> {
        let mut b = 1i16.to_be_bytes().to_vec();
        b.extend_from_slice(&(value.len() as i32).to_be_bytes());
        b.extend_from_slice(value);
        msg(b'D', &b)
    }

    /// Concatenates what an Output says to write.
    fn rendered(input: &[u8], out: &Output) -> Vec<u8> {
        let mut v = Vec::new();
        for s in out.segments() {
            match s {
                Seg::Input(r) => v.extend_from_slice(&input[r.clone()]),
                Seg::Scratch(r) => v.extend_from_slice(&out.scratch()[r.clone()]),
            }
        }
        v
    }

    /// Blocks statements containing DROP.
    struct NoDrop;
    impl Gate for NoDrop {
        fn check(&mut self, r: &Request<'_>) -> Disposition {
            let sql = match r {
                Request::Query(s) => *s,
                Request::Parse { sql, .. } => *sql,
                Request::FunctionCall { .. } | Request::Http { .. } => return Disposition::Allow,
            };
            if sql.to_ascii_uppercase().contains("DROP") {
                Disposition::Block(Blocked {
                    rule: "no-ddl".into(),
                    reason: "DROP is DDL".into(),
                    sqlstate: None,
                })
            } else {
                Disposition::Allow
            }
        }
    }

    fn close(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        b.extend_from_slice(format!("{name}\0").as_bytes());
        msg(b'C', &b)
    }

    /// Feeds client bytes, then the server's answers, through a fresh core's two sides.
    fn exchange(s: &mut Session, client: &[u8], server: &[u8]) -> Result<(), SessionError> {
        s.on_frontend(client, &mut AllowAll, &mut Output::default())?;
        s.on_backend(server, &mut NoFilter, &mut Output::default())?;
        Ok(())
    }

    #[test]
    fn closed_statements_and_finished_portals_are_forgotten() {
        let mut s = Session::new(1 << 20);
        let row_description = msg(b'T', &0i16.to_be_bytes());
        exchange(
            &mut s,
            &[
                parse("s1", "SELECT 1"),
                msg(b'D', b"Ss1\0"),
                bind("p1", "s1", &[]),
                sync(),
            ]
            .concat(),
            &[
                msg(b'1', b""),
                msg(b't', &0i16.to_be_bytes()),
                row_description.clone(),
                msg(b'2', b""),
                ready(b'T'),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(s.remembered(), 2, "s1 and p1, in a transaction");
        // The transaction ends: its portals are gone on the server, and here.
        exchange(
            &mut s,
            &query("COMMIT"),
            &[msg(b'C', b"COMMIT\0"), ready(b'I')].concat(),
        )
        .unwrap();
        assert_eq!(s.remembered(), 1);
        exchange(
            &mut s,
            &[close(b'S', "s1"), sync()].concat(),
            &[msg(b'3', b""), ready(b'I')].concat(),
        )
        .unwrap();
        assert_eq!(s.remembered(), 0, "Close forgets the statement");
    }

    /// The SQLSTATE of the first ErrorResponse in `wire`.
    fn first_error_code(wire: &[u8]) -> String {
        let at = wire
            .iter()
            .position(|&b| b == b'E')
            .expect("an ErrorResponse");
        let len = u32::from_be_bytes(wire[at + 1..at + 5].try_into().unwrap()) as usize;
        let fields = messages::parse_error_fields(&wire[at + 5..at + 1 + len]).expect("a body");
        fields.code.to_string()
    }

    #[test]
    fn named_statements_past_the_cap_fail_with_54000_and_the_session_goes_on() {
        let mut s = Session::new(1 << 20);
        let mut client = Vec::new();
        let mut server = Vec::new();
        for i in 0..MAX_NAMED {
            client.extend_from_slice(&parse(&format!("s{i}"), "SELECT 1"));
            server.extend_from_slice(&msg(b'1', b""));
        }
        client.extend_from_slice(&sync());
        server.extend_from_slice(&ready(b'I'));
        exchange(&mut s, &client, &server).unwrap();
        assert_eq!(s.remembered(), MAX_NAMED);
        // Reusing a name is fine; a new one is not.
        exchange(
            &mut s,
            &[parse("s7", "SELECT 2"), sync()].concat(),
            &[msg(b'1', b""), ready(b'I')].concat(),
        )
        .unwrap();
        let input = [
            parse("one-too-many", "SELECT 1"),
            bind("", "one-too-many", &[]),
            execute(""),
            sync(),
        ]
        .concat();
        let mut out = Output::default();
        s.on_frontend(&input, &mut AllowAll, &mut out).unwrap();
        // A failing probe stands in, and the rest of the batch is dropped up to Sync.
        assert_eq!(
            rendered(&input, &out),
            [parse(PROBE_STATEMENT, PROBE_SQL), sync()].concat()
        );
        let reply = [server_error("42601"), ready(b'I')].concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut NoFilter, &mut out).unwrap();
        let to_client = rendered(&reply, &out);
        assert_eq!(first_error_code(&to_client), SQLSTATE_LIMIT);
        assert!(to_client.ends_with(&ready(b'I')), "the session goes on");
        assert_eq!(s.remembered(), MAX_NAMED);
        assert_eq!(s.pending_replies(), 0);
    }

    #[test]
    fn an_oversized_query_fails_with_54000_and_the_next_one_runs() {
        let mut s = Session::new(1 << 10);
        let big = query(&"x".repeat(4 << 10));
        let input = [big.clone(), query("SELECT 1")].concat();
        let mut out = Output::default();
        // The oversized Query arrives in pieces, as from a socket: none of it is buffered.
        let p = s
            .on_frontend(&input[..100], &mut AllowAll, &mut out)
            .unwrap();
        assert_eq!(p, Progress::Continue { consumed: 100 });
        let mut rest = Output::default();
        s.on_frontend(&input[100..], &mut AllowAll, &mut rest)
            .unwrap();
        let upstream = [
            rendered(&input[..100], &out),
            rendered(&input[100..], &rest),
        ]
        .concat();
        assert_eq!(upstream, [query(PROBE_SQL), query("SELECT 1")].concat());
        let reply = [server_error("42601"), ready(b'I')].concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut NoFilter, &mut out).unwrap();
        assert_eq!(first_error_code(&rendered(&reply, &out)), SQLSTATE_LIMIT);
    }

    #[test]
    fn a_pipeline_passes_as_one_input_range() {
        let mut s = Session::new(1 << 20);
        let input = [
            parse("", "SELECT 1"),
            bind("", "", &[]),
            execute(""),
            sync(),
        ]
        .concat();
        let mut out = Output::default();
        let p = s.on_frontend(&input, &mut AllowAll, &mut out).unwrap();
        assert_eq!(
            p,
            Progress::Continue {
                consumed: input.len()
            }
        );
        assert_eq!(
            out.segments(),
            &[Seg::Input(0..input.len())],
            "forwarded by reference, coalesced"
        );
        assert_eq!(s.pending_replies(), 4);
        assert_eq!(s.from_client.messages, 4);
    }

    #[test]
    fn queries_count_what_runs_not_what_is_prepared() {
        let mut s = Session::new(1 << 20);
        let input = [
            parse("s", "SELECT 1"),
            bind("", "s", &[]),
            execute(""),
            bind("", "s", &[]),
            execute(""),
            sync(),
            query("SELECT 2; SELECT 3"),
        ]
        .concat();
        s.on_frontend(&input, &mut AllowAll, &mut Output::default())
            .unwrap();
        assert_eq!(s.queries, 3);
    }

    #[test]
    fn incomplete_message_is_kept_for_the_next_read() {
        let mut s = Session::new(1 << 20);
        let q = query("SELECT 1");
        let mut out = Output::default();
        assert_eq!(
            s.on_frontend(&q[..7], &mut AllowAll, &mut out).unwrap(),
            Progress::Continue { consumed: 0 }
        );
        assert!(out.is_empty());
        assert_eq!(
            s.on_frontend(&q, &mut AllowAll, &mut out).unwrap(),
            Progress::Continue { consumed: q.len() }
        );
    }

    #[test]
    fn blocked_simple_query_becomes_a_failing_probe_and_a_42501() {
        let mut s = Session::new(1 << 20);
        let input = query("select 1; DROP TABLE t");
        let mut out = Output::default();
        s.on_frontend(&input, &mut NoDrop, &mut out).unwrap();
        let upstream = rendered(&input, &out);
        assert_eq!(
            upstream,
            query(PROBE_SQL),
            "the blocked text never reaches the server"
        );
        // The server rejects the probe inside the client's transaction: state E.
        let reply = [server_error("42601"), ready(b'E')].concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut NoFilter, &mut out).unwrap();
        let to_client = rendered(&reply, &out);
        let Next::Frame(err) = frame::next_frame(&to_client, 1 << 20).unwrap() else {
            panic!()
        };
        let fields = messages::parse_error_fields(err.body).unwrap();
        assert_eq!(fields.code, "42501");
        assert!(fields.message.contains("no-ddl"), "{}", fields.message);
        assert_eq!(fields.detail, Some("DROP is DDL"));
        assert_eq!(
            &to_client[err.wire_len()..],
            &ready(b'E')[..],
            "ReadyForQuery passes with the server's status"
        );
        assert_eq!(s.pending_replies(), 0);
        assert_eq!(s.blocked, 1);
    }

    #[test]
    fn blocked_parse_drops_the_batch_to_sync_and_keeps_earlier_replies() {
        let mut s = Session::new(1 << 20);
        let ok = [parse("a", "SELECT 1"), bind("", "a", &[]), execute("")].concat();
        let bad = [parse("b", "DROP TABLE t"), bind("", "b", &[]), execute("")].concat();
        let input = [ok.clone(), bad, sync()].concat();
        let mut out = Output::default();
        s.on_frontend(&input, &mut NoDrop, &mut out).unwrap();
        let upstream = rendered(&input, &out);
        assert_eq!(upstream, [ok, parse("b", PROBE_SQL), sync()].concat());
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            data_row(b"1"),
            msg(b'C', b"SELECT 1\0"),
            server_error("42601"),
            ready(b'I'),
        ]
        .concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut NoFilter, &mut out).unwrap();
        let to_client = rendered(&reply, &out);
        let tail_len = server_error("42601").len() + 6;
        assert_eq!(
            &to_client[..reply.len() - tail_len],
            &reply[..reply.len() - tail_len]
        );
        let rest = &to_client[reply.len() - tail_len..];
        let Next::Frame(err) = frame::next_frame(rest, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(
            messages::parse_error_fields(err.body).unwrap().code,
            "42501"
        );
        assert_eq!(s.pending_replies(), 0);
    }

    #[test]
    fn an_earlier_error_in_the_batch_is_relayed_as_the_server_sent_it() {
        let mut s = Session::new(1 << 20);
        let input = [parse("a", "SELEC oops"), parse("b", "DROP TABLE t"), sync()].concat();
        let mut out = Output::default();
        s.on_frontend(&input, &mut NoDrop, &mut out).unwrap();
        // The server fails the first Parse and skips the probe.
        let reply = [server_error("42601"), ready(b'I')].concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut NoFilter, &mut out).unwrap();
        assert_eq!(rendered(&reply, &out), reply);
        assert_eq!(s.pending_replies(), 0);
    }

    #[test]
    fn large_rows_stream_through_without_being_buffered_whole() {
        let mut s = Session::new(1 << 20);
        let row = data_row(&vec![b'x'; 4 << 20]);
        let mut out = Output::default();
        // First chunk: header plus part of the body, bigger than max_message would allow whole.
        let p = s.on_backend(&row[..1000], &mut NoFilter, &mut out).unwrap();
        assert_eq!(p, Progress::Continue { consumed: 1000 });
        assert_eq!(out.segments(), &[Seg::Input(0..1000)]);
        let mut out = Output::default();
        let p = s.on_backend(&row[1000..], &mut NoFilter, &mut out).unwrap();
        assert_eq!(
            p,
            Progress::Continue {
                consumed: row.len() - 1000
            }
        );
        assert_eq!(s.from_server.bytes, row.len() as u64);
    }

    #[test]
    fn absurd_client_length_is_a_client_protocol_error() {
        let mut s = Session::new(1 << 20);
        let mut input = vec![b'Q'];
        input.extend_from_slice(&i32::MAX.to_be_bytes());
        let e = s
            .on_frontend(&input, &mut AllowAll, &mut Output::default())
            .unwrap_err();
        assert_eq!(e.side, Side::Client);
        let e = s
            .on_frontend(b"\x01\0\0\0\x04", &mut AllowAll, &mut Output::default())
            .unwrap_err();
        assert!(e.reason.contains("unexpected message type"), "{e}");
    }

    /// Records what the filter saw and masks every value to "***".
    #[derive(Default)]
    struct Spy {
        begun: Vec<Option<ResultFormats>>,
    }
    impl ResultFilter for Spy {
        fn begin(&mut self, _: &[u8], f: &ResultFormats) -> bool {
            self.begun.push(Some(f.clone()));
            true
        }
        fn begin_unknown(&mut self) -> bool {
            self.begun.push(None);
            true
        }
        fn data_row(&mut self, _: &[u8], out: &mut Vec<u8>) -> Result<bool, Refusal> {
            out.extend_from_slice(&data_row(b"***"));
            Ok(true)
        }
        fn copy_out(&mut self, _: &[u8]) -> bool {
            false
        }
        fn copy_data(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<bool, Refusal> {
            Ok(false)
        }
    }

    #[test]
    fn prepared_execute_without_describe_uses_the_statement_rows_and_bind_formats() {
        let mut s = Session::new(1 << 20);
        let describe_s = msg(b'D', b"Sq\0");
        let prep = [parse("q", "SELECT email FROM users"), describe_s, sync()].concat();
        s.on_frontend(&prep, &mut AllowAll, &mut Output::default())
            .unwrap();
        let rowdesc = msg(b'T', b"\0\0");
        let reply = [msg(b'1', b""), msg(b't', b"\0\0"), rowdesc, ready(b'I')].concat();
        let mut spy = Spy::default();
        s.on_backend(&reply, &mut spy, &mut Output::default())
            .unwrap();
        assert!(spy.begun.is_empty(), "a Describe is not a result");

        let run = [bind("", "q", &[1]), execute(""), sync()].concat();
        s.on_frontend(&run, &mut AllowAll, &mut Output::default())
            .unwrap();
        let reply = [
            msg(b'2', b""),
            data_row(b"a@b.c"),
            msg(b'C', b"SELECT 1\0"),
            ready(b'I'),
        ]
        .concat();
        let mut out = Output::default();
        s.on_backend(&reply, &mut spy, &mut out).unwrap();
        assert_eq!(spy.begun, vec![Some(ResultFormats::Uniform(1))]);
        let to_client = rendered(&reply, &out);
        assert!(
            !to_client.windows(5).any(|w| w == b"a@b.c"),
            "the row was replaced"
        );
        assert!(to_client.windows(3).any(|w| w == b"***"));
    }

    /// Records COPY FROM STDIN data, or refuses it all (recording failing).
    #[derive(Default)]
    struct CopyGate {
        seen: Vec<u8>,
        refuse: bool,
    }
    impl Gate for CopyGate {
        fn check(&mut self, _: &Request<'_>) -> Disposition {
            Disposition::Allow
        }
        fn copy_data(&mut self, data: &[u8]) -> Result<(), Blocked> {
            if self.refuse {
                return Err(Blocked {
                    rule: "recording".into(),
                    reason: "recording failed: disk full".into(),
                    sqlstate: Some("53100"),
                });
            }
            self.seen.extend_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn copy_in_data_goes_to_the_gate_whole_or_streamed_and_never_past_a_refusal() {
        // Two rows in whole messages, then one larger than max_message, streamed in pieces.
        let big = vec![b'x'; 300];
        let wire = [
            query("COPY t FROM STDIN"),
            msg(b'd', b"1\tone\n"),
            msg(b'd', b"2\ttwo\n"),
            msg(b'd', &big),
            msg(b'c', b""),
        ]
        .concat();
        for cut in [wire.len(), 40, 60, 200] {
            let mut s = Session::new(100);
            let mut gate = CopyGate::default();
            let mut sent = Vec::new();
            let mut pos = 0;
            for end in [cut, wire.len()] {
                let mut out = Output::default();
                let input = &wire[pos..end];
                let Progress::Continue { consumed } =
                    s.on_frontend(input, &mut gate, &mut out).unwrap()
                else {
                    panic!("continues");
                };
                sent.extend(rendered(input, &out));
                pos += consumed;
            }
            assert_eq!(sent, wire, "forwarded as it came (cut at {cut})");
            assert_eq!(gate.seen, [&b"1\tone\n2\ttwo\n"[..], &big].concat());
        }

        // Refused: the server gets CopyFail instead of each message, never the data.
        let mut s = Session::new(100);
        let mut gate = CopyGate {
            refuse: true,
            ..Default::default()
        };
        let mut out = Output::default();
        s.on_frontend(&wire, &mut gate, &mut out).unwrap();
        let sent = rendered(&wire, &out);
        assert!(
            !sent.windows(5).any(|w| w == b"1\tone"),
            "no data forwarded"
        );
        assert!(
            !sent.windows(8).any(|w| w == b"xxxxxxxx"),
            "no data forwarded"
        );
        let fail = msg(b'f', b"recording failed: disk full\0");
        assert!(sent.windows(fail.len()).any(|w| w == fail), "CopyFail sent");
        assert!(sent.starts_with(&query("COPY t FROM STDIN")));
    }
}
