//! The one request type policy decides on. Every protocol's core turns what a client sent into a
//! [`Request`]; policy, approvals and recording see only this. PostgreSQL's variants carry SQL in
//! its dialect or a function call; [`Request::Http`] is an HTTP request. A new protocol adds its
//! own variants here (a MySQL COM_QUERY) along with the policy that decides them.

use std::fmt;

/// What the client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// A PostgreSQL simple Query: one or more statements.
    Query(&'a str),
    /// A PostgreSQL Parse; the core remembers the verdict under `statement` for Bind/Execute.
    Parse { statement: &'a str, sql: &'a str },
    /// A PostgreSQL fast-path FunctionCall, by function OID.
    FunctionCall { oid: u32 },
    /// An HTTP request: its method, authority (`host[:port]`) and path (with its query, if any).
    /// No HTTP data path exists yet, and policy has no HTTP rules: it refuses every one
    /// (rule `http-not-supported`).
    Http {
        method: &'a str,
        authority: &'a str,
        path: &'a str,
    },
}

impl<'a> Request<'a> {
    /// The SQL text, for the requests that carry one.
    pub fn sql(&self) -> Option<&'a str> {
        match *self {
            Request::Query(sql) | Request::Parse { sql, .. } => Some(sql),
            Request::FunctionCall { .. } | Request::Http { .. } => None,
        }
    }
}

/// The request as logs, recordings and approvals show it: SQL as the client sent it; a function
/// call or an HTTP request as one line that says what it is (`GET api.example.com/v1/users`).
impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Request::Query(sql) | Request::Parse { sql, .. } => f.write_str(sql),
            Request::FunctionCall { oid } => {
                write!(f, "-- fast-path FunctionCall of function OID {oid}")
            }
            Request::Http {
                method,
                authority,
                path,
            } => write!(f, "{method} {authority}{path}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sql_requests_carry_sql() {
        assert_eq!(Request::Query("SELECT 1").sql(), Some("SELECT 1"));
        let http = Request::Http {
            method: "GET",
            authority: "api.example.com",
            path: "/v1/users?limit=5",
        };
        assert_eq!(http.sql(), None);
        assert_eq!(http.to_string(), "GET api.example.com/v1/users?limit=5");
        assert_eq!(
            Request::FunctionCall { oid: 1598 }.to_string(),
            "-- fast-path FunctionCall of function OID 1598"
        );
    }
}
