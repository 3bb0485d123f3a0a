//! The one request type policy decides on. Every protocol's core turns what a client sent into a
//! [`Request`]; policy, approvals and recording see only this. PostgreSQL's variants carry SQL in
//! its dialect; a new protocol adds its own variants here (an HTTP request, a MySQL COM_QUERY)
//! along with the policy that decides them.

/// What the client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// A PostgreSQL simple Query: one or more statements.
    Query(&'a str),
    /// A PostgreSQL Parse; the core remembers the verdict under `statement` for Bind/Execute.
    Parse { statement: &'a str, sql: &'a str },
    /// A PostgreSQL fast-path FunctionCall, by function OID.
    FunctionCall { oid: u32 },
}

impl<'a> Request<'a> {
    /// The SQL text, for the requests that carry one.
    pub fn sql(&self) -> Option<&'a str> {
        match *self {
            Request::Query(sql) | Request::Parse { sql, .. } => Some(sql),
            Request::FunctionCall { .. } => None,
        }
    }
}
