//! What a recording holds. Everything here has already been masked by the caller: the recorder
//! writes exactly what it is handed.

use serde::{Deserialize, Serialize};

/// Bytes as they went to the client. Stored raw; in JSON a UTF-8 value is a string and anything
/// else is `{"base64": "..."}`, so exports reproduce values byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&str> for Bytes {
    fn from(v: &str) -> Self {
        Bytes(v.as_bytes().to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return s.serialize_bytes(&self.0);
        }
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use base64::Engine as _;
                use serde::ser::SerializeMap as _;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(&self.0),
                )?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// One result row: a value per column, `None` for SQL NULL.
pub type Row = Vec<Option<Bytes>>;

/// Who opened the session and where it goes. Tokens appear only as claims and a hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    pub agent: Option<String>,
    pub pid: Option<u32>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    /// The identity provider's subject, once identity is bound.
    pub subject: Option<String>,
    pub groups: Vec<String>,
    /// RFC 8693 `act` claim: who acts on the subject's behalf.
    pub actor: Option<String>,
    /// SHA-256 of the agent's token, hex: enough to match, useless to replay.
    pub token_sha256: Option<String>,
    pub client_addr: Option<String>,
    pub target: String,
    pub database: String,
    pub upstream_user: String,
}

/// Which client message carried a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// A simple-protocol Query.
    Query,
    /// Extended protocol: Parse (text) or Bind/Execute of a prepared statement.
    Prepare,
    Execute,
    FunctionCall,
    /// Data the client sent with COPY FROM STDIN.
    CopyIn,
    /// An HTTP request (`METHOD authority/path`).
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub kind: RequestKind,
    /// The prepared statement's name, for `Prepare`/`Execute`.
    pub statement: Option<String>,
    pub text: String,
    /// Bind parameters after the detectors ran over them.
    pub params: Vec<Option<Bytes>>,
}

impl Request {
    pub(crate) fn borrowed(&self) -> RequestRef<'_> {
        RequestRef {
            kind: self.kind,
            statement: self.statement.as_deref(),
            text: &self.text,
            params: &self.params,
        }
    }
}

/// A [`Request`]'s fields borrowed, serialized as the request is.
#[derive(Serialize)]
pub(crate) struct RequestRef<'a> {
    pub kind: RequestKind,
    pub statement: Option<&'a str>,
    pub text: &'a str,
    pub params: &'a [Option<Bytes>],
}

impl RequestRef<'_> {
    /// What the request takes in the recorder's queue, as [`Record::approx_bytes`] counts it.
    pub(crate) fn approx_bytes(&self) -> usize {
        APPROX_RECORD_BYTES + self.payload_bytes()
    }

    fn payload_bytes(&self) -> usize {
        self.text.len() + self.params.len() * 8
    }
}

/// [`Record::approx_bytes`] of a record without a payload.
const APPROX_RECORD_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Block,
    /// Waiting for a human; a second verdict follows with the outcome.
    Hold,
    Approved,
    Denied,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Hold => "hold",
            Action::Approved => "approved",
            Action::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub action: Action,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub approval_id: Option<u64>,
    pub approver: Option<String>,
    /// When the approver decided, unix microseconds.
    pub decided_at_us: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// An ErrorResponse or NoticeResponse, after masking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

/// Set on a `Complete` when `max_response_bytes` cut the recorded rows short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    pub rows_recorded: u64,
    pub bytes_recorded: u64,
}

/// The end of one statement's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// The command tag (`SELECT 3`), empty when the statement failed.
    pub tag: String,
    /// Rows and value bytes the client received, whether recorded or not.
    pub rows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us: u64,
    pub truncated: Option<Truncation>,
}

/// One entry of a recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    SessionStart(SessionStart),
    Request(Request),
    Verdict(Verdict),
    Columns(Vec<Column>),
    Rows(Vec<Row>),
    CopyData(Bytes),
    Notice(Notice),
    Error(Notice),
    Notification {
        pid: u32,
        channel: String,
        payload: String,
    },
    Complete(Complete),
    SessionEnd {
        reason: String,
    },
    /// Written by the recorder itself at start: a torn tail it cut off.
    Recovery {
        segment: String,
        offset: u64,
        bytes_dropped: u64,
    },
    // New variants go last: a record's variant is its index on disk.
    /// Data the client sent with COPY FROM STDIN, after the detectors.
    CopyIn(Bytes),
    /// Results the client received that the recording leaves out: messages larger than the
    /// gateway's `max_message_bytes`, of which `rows` DataRows, `bytes` on the wire in all. The
    /// statement's `Complete` counts those rows too.
    Unrecorded {
        rows: u64,
        messages: u64,
        bytes: u64,
    },
    /// Records of one statement that reached the recorder together (a request with its verdict,
    /// a short result), stored as one record: one Merkle leaf and one frame for all of them.
    /// Readers see its records one by one ([`Entry::unbundle`]), each with its own time.
    Bundle(Vec<Bundled>),
}

/// A record inside a [`Record::Bundle`], which gives the session and statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundled {
    pub at_us: i64,
    pub record: Record,
}

impl Record {
    /// Rough heap size, for the queue's byte bound.
    pub(crate) fn approx_bytes(&self) -> usize {
        let cells = |r: &Row| {
            r.iter()
                .map(|c| c.as_ref().map_or(1, |b| b.0.len() + 8))
                .sum::<usize>()
        };
        APPROX_RECORD_BYTES
            + match self {
                Record::Request(r) => r.borrowed().payload_bytes(),
                Record::Rows(rows) => rows.iter().map(cells).sum(),
                Record::CopyData(b) | Record::CopyIn(b) => b.0.len(),
                Record::Columns(c) => c.len() * 32,
                Record::Bundle(b) => b.iter().map(|b| b.record.approx_bytes()).sum(),
                _ => 0,
            }
    }
}

/// A record with its place in the log: what the Merkle tree's leaves hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Unix microseconds when the gateway saw it.
    pub at_us: i64,
    pub session: u64,
    /// The statement's number within its session (0 before the first).
    pub stmt: u32,
    pub record: Record,
}

impl Entry {
    /// The entry as readers take it: a [`Record::Bundle`] as the records it holds, each an
    /// entry of the same seq with its own time; any other entry as itself.
    pub fn unbundle(self) -> impl Iterator<Item = Entry> {
        let Entry {
            seq,
            at_us,
            session,
            stmt,
            record,
        } = self;
        let records = match record {
            Record::Bundle(records) => records,
            record => vec![Bundled { at_us, record }],
        };
        records.into_iter().map(move |b| Entry {
            seq,
            at_us: b.at_us,
            session,
            stmt,
            record: b.record,
        })
    }
}
