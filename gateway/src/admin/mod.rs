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
    /// `--token-file` of `portcullis run` and `agents attach`: the agent's token file, as
    /// `[[agent]] token_file` would set it; `None` clears it.
    SetTokenFile {
        agent: String,
        token_file: Option<std::path::PathBuf>,
    },
    /// Every agent's token file in force (`[[agent]]` and `--token-file`), for `portcullis agents`.
    TokenFiles,
    /// `portcullis sessions kill`: exactly one of `subject` and `session`.
    KillSessions {
        subject: Option<String>,
        session: Option<u64>,
    },
}

/// An agent's token file as `portcullis agents` shows it: the path, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTokenFile {
    pub agent: String,
    pub token_file: std::path::PathBuf,
    pub source: TokenFileSource,
}

/// Where an agent's token file was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFileSource {
    /// `[[agent]] token_file` in the configuration.
    Configured,
    /// `portcullis run --token-file` or `agents attach --token-file`, until the gateway stops.
    Runtime,
}

impl TokenFileSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFileSource::Configured => "configured",
            TokenFileSource::Runtime => "runtime",
        }
    }
}

/// One session ended by `portcullis sessions kill`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Killed {
    pub id: u64,
    pub subject: Option<String>,
    pub agent: Option<String>,
    pub target: String,
}

/// How an operator ends a live session: the admin API pulls it, the session's pump waits on it.
#[derive(Debug)]
pub struct KillSwitch {
    tx: std::sync::Mutex<Option<futures_channel::oneshot::Sender<String>>>,
    rx: std::sync::Mutex<Option<futures_channel::oneshot::Receiver<String>>>,
}

impl Default for KillSwitch {
    fn default() -> Self {
        let (tx, rx) = futures_channel::oneshot::channel();
        KillSwitch {
            tx: std::sync::Mutex::new(Some(tx)),
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

impl KillSwitch {
    /// Ends the session, naming the operator; false when it was already killed.
    pub fn pull(&self, by: &str) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        tx.is_some_and(|tx| tx.send(by.to_owned()).is_ok())
    }

    /// Resolves to the operator who killed the session; never, if nobody does. Only the session's
    /// pump waits on it.
    pub async fn pulled(&self) -> String {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        match rx {
            Some(rx) => match rx.await {
                Ok(by) => by,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
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
