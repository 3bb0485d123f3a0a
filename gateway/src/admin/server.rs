//! The admin socket: mode 0660, owned by root and the `portcullis` group, and every connection's
//! peer credentials checked. Requests are rare, so a thread per connection is plenty.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use tracing::{debug, warn};

use super::{ListenerStatus, Request, Response, Status};
use crate::config::Config;
use crate::daemon::Shared;

/// Admin connections served at once; more are told to retry.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// How long an admin connection may take to send its request, or to read the answer.
pub const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Removes the socket file when the gateway stops.
pub struct AdminServer {
    path: PathBuf,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn start(cfg: &Config, shared: Arc<Shared>) -> anyhow::Result<AdminServer> {
    let path = cfg.admin_socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if UnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "another gateway is already serving the admin socket {}",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    let group = group_id(&cfg.admin_group);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&path, None, Some(gid))
            .with_context(|| format!("giving {} to group {}", path.display(), cfg.admin_group))?;
    }
    std::thread::Builder::new()
        .name("portcullis-admin".into())
        .spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                // A peer that connects and says nothing, or never reads, must not pin a thread.
                let _ = conn.set_read_timeout(Some(ADMIN_IO_TIMEOUT));
                let _ = conn.set_write_timeout(Some(ADMIN_IO_TIMEOUT));
                if active.fetch_add(1, Relaxed) >= MAX_ADMIN_CONNECTIONS {
                    active.fetch_sub(1, Relaxed);
                    warn!("admin connection refused: {MAX_ADMIN_CONNECTIONS} already open");
                    let _ = respond(
                        &mut conn,
                        Err(format!(
                            "busy: {MAX_ADMIN_CONNECTIONS} admin connections are open; retry"
                        )),
                    );
                    continue;
                }
                let shared = shared.clone();
                let mine = active.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("admin-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_one(conn, &shared, group) {
                                debug!("admin connection: {e:#}");
                            }
                            mine.fetch_sub(1, Relaxed);
                        });
                if spawned.is_err() {
                    active.fetch_sub(1, Relaxed);
                    warn!("admin connection dropped: cannot start a thread");
                }
            }
        })?;
    Ok(AdminServer { path })
}

fn serve_one(conn: UnixStream, shared: &Shared, group: Option<u32>) -> anyhow::Result<()> {
    let (uid, gid) = peer_credentials(&conn)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let allowed = uid == 0 || uid == me || group.is_some_and(|g| g == gid || in_group(uid, g));
    let mut writer = conn.try_clone()?;
    if !allowed {
        warn!(
            uid,
            gid, "admin request refused: not root, not the gateway's user, not in the admin group"
        );
        return respond(
            &mut writer,
            Err("permission denied: the admin API is for root and the portcullis group".into()),
        );
    }
    let mut line = String::new();
    BufReader::new(conn).take(1 << 20).read_line(&mut line)?;
    // Who decided or killed, as approvals and sessions record it: the peer's user and uid.
    let operator = match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(req, shared, &operator, (uid, gid)),
        Err(e) => Err(format!("bad request: {e}")),
    };
    respond(&mut writer, reply)
}

fn to_json(v: impl serde::Serialize) -> Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

fn handle(
    req: Request,
    shared: &Shared,
    operator: &str,
    peer: (u32, u32),
) -> Result<serde_json::Value, String> {
    match req {
        Request::SetTokenFile { agent, token_file } => {
            set_token_file(shared, &agent, token_file, peer, operator)
        }
        Request::Status => {
            let cfg = shared.config();
            to_json(Status {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_seconds: shared.started.elapsed().as_secs(),
                draining: shared.draining.load(Relaxed),
                config: cfg.origin.clone(),
                policy: cfg.policy.clone(),
                listeners: cfg
                    .listeners
                    .iter()
                    .map(|l| ListenerStatus {
                        listen: l.listen.to_string(),
                        target: l.target.clone(),
                    })
                    .collect(),
                sessions_active: shared.registry.live(),
                targets: shared.registry.target_snapshots(&shared.routes()),
                recording: Some(shared.recorder.status()),
            })
        }
        Request::Sessions => to_json(shared.registry.sessions()),
        Request::TokenFiles => to_json(shared.token_files.listing(&shared.config().agents)),
        Request::Approvals { recent } => to_json(
            shared
                .approvals
                .list(recent)
                .map_err(|e| format!("{e:#}"))?,
        ),
        Request::Approve {
            id,
            for_seconds,
            scope,
        } => {
            let for_ = for_seconds.map(std::time::Duration::from_secs);
            shared
                .approvals
                .approve(id, for_, scope, operator)
                .map_err(|e| format!("{e:#}"))?;
            tracing::info!(approval = id, by = operator, ?scope, "approved");
            to_json(serde_json::json!({ "id": id, "status": "approved" }))
        }
        Request::Deny { id, reason } => {
            shared
                .approvals
                .deny(id, reason.as_deref(), operator)
                .map_err(|e| format!("{e:#}"))?;
            tracing::info!(approval = id, by = operator, "denied");
            to_json(serde_json::json!({ "id": id, "status": "denied" }))
        }
        Request::KillSessions { subject, session } => {
            to_json(kill_sessions(shared, subject, session, operator)?)
        }
    }
}

/// Sets an agent's token file at runtime. The gateway reads it as itself at every connect, so
/// the peer must be able to read it too: an admin group member cannot have the gateway send a
/// file only root may read to the IdP as some agent's token.
fn set_token_file(
    shared: &Shared,
    agent: &str,
    file: Option<PathBuf>,
    (uid, gid): (u32, u32),
    operator: &str,
) -> Result<serde_json::Value, String> {
    if let Some(f) = &file
        && uid != 0
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(f).map_err(|e| format!("token file {}: {e}", f.display()))?;
        let readable = (m.uid() == uid && m.mode() & 0o400 != 0)
            || (m.gid() == gid && m.mode() & 0o040 != 0)
            || m.mode() & 0o004 != 0;
        if !readable {
            return Err(format!(
                "token file {}: uid {uid} may not read it, so it may not give it to an agent",
                f.display()
            ));
        }
    }
    shared
        .token_files
        .set(&shared.config().agents, agent, file.clone())?;
    tracing::info!(agent, token_file = ?file, by = operator, "agent token file set");
    to_json(serde_json::json!({ "agent": agent, "token_file": file }))
}

/// Ends the live sessions of one subject, or one session by id; each client gets FATAL 57P01
/// naming `operator`. Matching nothing is an error, so a mistyped subject is not taken for done.
fn kill_sessions(
    shared: &Shared,
    subject: Option<String>,
    session: Option<u64>,
    operator: &str,
) -> Result<Vec<super::Killed>, String> {
    let matches = |s: &crate::metrics::SessionInfo| match (&subject, session) {
        (Some(sub), None) => s.identity().is_some_and(|who| &who.subject == sub),
        (None, Some(id)) => s.id == id,
        _ => false,
    };
    let what = match (&subject, session) {
        (Some(sub), None) => format!("subject {sub:?}"),
        (None, Some(id)) => format!("session {id}"),
        _ => return Err("name exactly one of --subject and --session".into()),
    };
    let mut killed = Vec::new();
    for s in shared.registry.live_sessions() {
        if matches(&s) && s.kill.pull(operator) {
            let subject = s.identity().map(|who| who.subject.clone());
            tracing::warn!(
                session = s.id,
                subject = subject.as_deref().unwrap_or("-"),
                by = operator,
                "session killed"
            );
            killed.push(super::Killed {
                id: s.id,
                subject,
                agent: s.peer.agent.clone(),
                target: s.target.clone(),
            });
        }
    }
    if killed.is_empty() {
        return Err(format!("no live session of {what}"));
    }
    killed.sort_by_key(|k| k.id);
    Ok(killed)
}

fn respond(w: &mut UnixStream, reply: Result<serde_json::Value, String>) -> anyhow::Result<()> {
    let resp = match reply {
        Ok(data) => Response {
            ok: true,
            data: Some(data),
            error: None,
        },
        Err(e) => Response {
            ok: false,
            data: None,
            error: Some(e),
        },
    };
    let mut line = serde_json::to_vec(&resp)?;
    line.push(b'\n');
    w.write_all(&line)?;
    Ok(())
}

fn peer_credentials(conn: &UnixStream) -> anyhow::Result<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a live ucred on our stack.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the admin peer's credentials");
    }
    Ok((cred.uid, cred.gid))
}

fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

/// Whether `uid`'s user lists `gid` among its supplementary groups.
fn in_group(uid: u32, gid: u32) -> bool {
    let Some(user) = user_name(uid) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string("/etc/group") else {
        return false;
    };
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(':').collect();
        f.len() == 4 && f[2].parse() == Ok(gid) && f[3].split(',').any(|m| m == user)
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(uid)).then(|| f[0].to_owned())
    })
}
