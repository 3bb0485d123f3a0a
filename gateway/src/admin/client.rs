//! The CLI side of the admin API: `portcullis status` and `portcullis sessions`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{Request, Response, Status};
use crate::metrics::SessionSnapshot;

/// Sends one request and returns the response's data.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut conn = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no gateway is running at {} ({e}); start one with `portcullis serve` or pass --admin-socket",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {}: run as root or a member of the portcullis group", socket.display())
        }
        _ => anyhow::anyhow!("connecting to {}: {e}", socket.display()),
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(conn)
        .read_line(&mut reply)
        .context("reading the gateway's answer")?;
    if reply.is_empty() {
        bail!(
            "the gateway at {} closed the connection without answering",
            socket.display()
        );
    }
    let resp: Response =
        serde_json::from_str(&reply).context("the gateway's answer is not valid JSON")?;
    match (resp.ok, resp.data, resp.error) {
        (true, Some(data), _) => Ok(data),
        (_, _, Some(e)) => bail!("{e}"),
        _ => bail!("the gateway answered without data"),
    }
}

pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = call(socket, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let s: Status = serde_json::from_value(data)?;
    println!("portcullis {} (pid {})", s.version, s.pid);
    println!(
        "uptime:    {}",
        humantime::format_duration(Duration::from_secs(s.uptime_seconds))
    );
    println!("config:    {}", s.config);
    println!("policy:    {}", s.policy);
    println!(
        "state:     {}",
        if s.draining { "draining" } else { "serving" }
    );
    println!("sessions:  {} active", s.sessions_active);
    if let Some(r) = &s.recording {
        let why = r
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        println!(
            "recording: {}{why} ({} records, {} bytes written, {} refused, {} write failures)",
            r.state, r.records, r.bytes_written, r.refused, r.write_failures
        );
    }
    println!("listeners:");
    for l in &s.listeners {
        println!("  {} -> {}", l.listen, l.target);
    }
    let rows: Vec<Vec<String>> = s
        .targets
        .iter()
        .map(|t| {
            vec![
                t.target.clone(),
                t.sessions_active.to_string(),
                match t.upstream_max {
                    Some(max) => format!("{}/{max}", t.upstream_open),
                    None => t.upstream_open.to_string(),
                } + &match t.upstream_waiting {
                    0 => String::new(),
                    n => format!(
                        " ({n} waiting, longest {:.1}s)",
                        t.upstream_longest_wait_ms as f64 / 1000.0
                    ),
                },
                t.sessions_total.to_string(),
                t.queries.to_string(),
                t.blocked.to_string(),
                t.bytes_in.to_string(),
                t.bytes_out.to_string(),
                t.errors.to_string(),
            ]
        })
        .collect();
    println!();
    print!(
        "{}",
        table(
            &[
                "TARGET",
                "ACTIVE",
                "UPSTREAM",
                "SESSIONS",
                "QUERIES",
                "BLOCKED",
                "BYTES IN",
                "BYTES OUT",
                "ERRORS"
            ],
            &rows
        )
    );
    let pools: Vec<Vec<String>> = s
        .targets
        .iter()
        .filter(|t| t.pool_enabled || t.pool != Default::default())
        .map(|t| {
            let closed: Vec<String> = t
                .pool
                .closed
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(why, n)| format!("{why} {n}"))
                .collect();
            vec![
                t.target.clone(),
                if t.pool_enabled { "on" } else { "off" }.into(),
                t.pool.idle.to_string(),
                t.pool.reused.to_string(),
                t.pool.dialed.to_string(),
                t.pool.dialed_ahead.to_string(),
                if closed.is_empty() {
                    "-".into()
                } else {
                    closed.join(", ")
                },
            ]
        })
        .collect();
    if !pools.is_empty() {
        println!();
        print!(
            "{}",
            table(
                &[
                    "POOL", "STATE", "IDLE", "REUSED", "DIALED", "AHEAD", "CLOSED"
                ],
                &pools
            )
        );
    }
    Ok(())
}

pub fn sessions(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = call(socket, &Request::Sessions)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let sessions: Vec<SessionSnapshot> = serde_json::from_value(data)?;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(",")
        }
    };
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.client_addr.clone(),
                s.original_dst.clone(),
                s.target.clone(),
                s.upstream_user.clone(),
                s.backend_pid.map_or("-".into(), |p| p.to_string()),
                opt(&s.agent),
                opt(&s.subject),
                list(&s.groups),
                list(&s.actors),
                opt(&s.token_expires_at),
                s.pid.map_or("-".into(), |p| p.to_string()),
                s.started_at.clone(),
                format!("{}/{}", s.messages_in, s.messages_out),
                format!("{}/{}", s.bytes_in, s.bytes_out),
                serde_json::to_value(s.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "ID",
                "CLIENT",
                "ORIGINAL DST",
                "TARGET",
                "USER",
                "BACKEND",
                "AGENT",
                "SUBJECT",
                "GROUPS",
                "ACTOR",
                "TOKEN EXPIRES",
                "PID",
                "STARTED",
                "MSGS IN/OUT",
                "BYTES IN/OUT",
                "STATE"
            ],
            &rows
        )
    );
    if sessions.is_empty() {
        println!("(no live sessions)");
    }
    Ok(())
}

/// `portcullis sessions kill --subject S | --session ID`.
pub fn kill_sessions(
    socket: &Path,
    subject: Option<String>,
    session: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let data = call(socket, &Request::KillSessions { subject, session })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let killed: Vec<super::Killed> = serde_json::from_value(data)?;
    for k in killed {
        println!(
            "killed session {} (subject {}, agent {}, target {})",
            k.id,
            k.subject.as_deref().unwrap_or("-"),
            k.agent.as_deref().unwrap_or("-"),
            k.target
        );
    }
    Ok(())
}

/// A plain left-aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

pub fn approvals(socket: &Path, json: bool) -> anyhow::Result<()> {
    let data = call(socket, &Request::Approvals { recent: 50 })?;
    let records: Vec<crate::policy::approval::ApprovalRecord> = serde_json::from_value(data)?;
    print!(
        "{}",
        crate::policy::approval::print_approvals(&records, json)
    );
    Ok(())
}

pub fn approve(
    socket: &Path,
    id: u64,
    for_: Option<Duration>,
    scope: crate::policy::approval::Scope,
) -> anyhow::Result<()> {
    call(
        socket,
        &Request::Approve {
            id,
            for_seconds: for_.map(|d| d.as_secs().max(1)),
            scope,
        },
    )?;
    println!("approved request {id}");
    Ok(())
}

pub fn deny(socket: &Path, id: u64, reason: Option<String>) -> anyhow::Result<()> {
    call(socket, &Request::Deny { id, reason })?;
    println!("denied request {id}");
    Ok(())
}

/// What the running gateway knows of its agents, for `portcullis agents`.
#[derive(Debug, Default)]
pub struct LiveAgents {
    /// Live sessions per agent name.
    pub connections: std::collections::HashMap<String, u64>,
    /// Token files in force, configured and runtime.
    pub token_files: Vec<super::AgentTokenFile>,
}

/// [`LiveAgents`] from the gateway at `socket`; empty when no gateway answers: the agent list
/// itself comes from the cgroups and stays useful.
pub fn live_agents(socket: &Path) -> LiveAgents {
    let mut live = LiveAgents::default();
    if let Ok(data) = call(socket, &Request::Sessions)
        && let Ok(sessions) = serde_json::from_value::<Vec<SessionSnapshot>>(data)
    {
        for agent in sessions.into_iter().filter_map(|s| s.agent) {
            *live.connections.entry(agent).or_default() += 1;
        }
    }
    if let Ok(data) = call(socket, &Request::TokenFiles)
        && let Ok(files) = serde_json::from_value(data)
    {
        live.token_files = files;
    }
    live
}
