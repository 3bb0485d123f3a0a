//! Admin API on a Unix socket, and the CLI side that talks to it. It reads the daemon's shared
//! state; the daemon knows it only as the hook `serve` is given.
//!
//! The wire format is one JSON request line and one JSON response line per connection:
//! `{"command":"status"}` → `{"ok":true,"data":{...}}` or `{"ok":false,"error":"..."}`.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Sessions,
    /// Pending approval requests and the `recent` latest decided ones.
    Approvals {
        recent: usize,
    },
    Approve {
        id: u64,
        for_seconds: Option<u64>,
        scope: crate::policy::approval::Scope,
    },
    Deny {
        id: u64,
        reason: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub draining: bool,
    pub config: String,
    pub policy: String,
    pub listeners: Vec<ListenerStatus>,
    pub sessions_active: usize,
    pub targets: Vec<crate::metrics::TargetSnapshot>,
    /// The recorder: "ok" or "failing" (and why), with its counters.
    #[serde(default)]
    pub recording: Option<crate::record::RecorderStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub listen: String,
    pub target: String,
}
