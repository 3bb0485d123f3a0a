//! The upstream leg: connect to the target, negotiate TLS per sslmode, start up and authenticate
//! with the gateway's own credential. The agent's user and password are never used here.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use compio::BufResult;
use compio::net::TcpStream;

use super::conn::{Stream, TlsStream};
use super::tls;
use crate::config::SslMode;
use crate::protocol::postgres::auth::{
    AuthError, AuthStep, ChannelBinding, PasswordChannel, UpstreamAuth, tls_server_end_point,
};
use crate::protocol::postgres::frame::{self, Frame, Next};
use crate::protocol::postgres::hello::{HelloStep, UpstreamHello};
use crate::protocol::postgres::side_query::{SideQuery, SideStep};
use crate::protocol::postgres::{messages, startup};
use crate::route::Target;

/// An authenticated upstream session, right after its first ReadyForQuery.
pub struct Upstream {
    pub stream: Stream,
    pub backend_pid: u32,
    pub backend_key: Vec<u8>,
    /// Messages to relay to the client verbatim, in order: NegotiateProtocolVersion, notices,
    /// ParameterStatus, and the closing ReadyForQuery.
    pub relay: Vec<u8>,
    /// The protocol minor version the server agreed to.
    pub minor: u16,
}

/// Why the upstream leg could not be opened. Display is safe to show the client: it never holds
/// the credential.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("upstream {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("upstream {addr} TLS: {reason}")]
    Tls { addr: String, reason: String },
    #[error("upstream authentication: {0}")]
    Auth(#[from] AuthError),
    /// The server refused the session (e.g. the database does not exist); relayed as it came.
    #[error("upstream refused the session: {message}")]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
    },
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Whether trying again may succeed: the upstream was unreachable or slow, rather than
    /// refusing the gateway or breaking the protocol.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Timeout { .. }
        )
    }

    /// SQLSTATE for the FATAL ErrorResponse the client receives.
    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Tls { .. } => "08001",
            UpstreamError::Auth(e) => e.sqlstate(),
            UpstreamError::Server { code, .. } => code,
            UpstreamError::Protocol(_) => "08P01",
        }
    }
}

/// The upstream leg failed on the server's side, except where the gateway has no credential for
/// it or will not send one over the channel it has (its setup). Only an unreachable or slow
/// server is worth another try.
impl crate::error::WireError for UpstreamError {
    fn side(&self) -> crate::error::Side {
        use crate::error::Side;
        match self {
            UpstreamError::Auth(
                AuthError::NoPassword { .. } | AuthError::UnverifiedChannel { .. },
            ) => Side::Gateway,
            _ => Side::Upstream,
        }
    }

    fn retryable(&self) -> bool {
        self.is_retryable()
    }

    fn sqlstate(&self) -> &str {
        UpstreamError::sqlstate(self)
    }
}

/// Opens a TCP connection, then TLS as the target's sslmode says.
async fn open(target: &Target) -> Result<Stream, UpstreamError> {
    let up = &target.config.upstream;
    let addr = format!("{}:{}", up.host, up.port);
    let tcp = TcpStream::connect((up.host.as_str(), up.port))
        .await
        .map_err(|source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = target.tls.clone() else {
        return Ok(Stream::tcp_stream(tcp));
    };
    let mut req = Vec::with_capacity(8);
    startup::encode_ssl_request(&mut req);
    let stream = Stream::tcp_stream(tcp);
    stream
        .write_all(req)
        .await
        .0
        .map_err(|source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let BufResult(n, answer) = stream.read(Vec::with_capacity(1)).await;
    let n = n.map_err(|source| UpstreamError::Connect {
        addr: addr.clone(),
        source,
    })?;
    let Stream::Tcp(tcp, _) = stream else {
        unreachable!("plain until the handshake")
    };
    match (n, answer.first()) {
        (1, Some(b'S')) => {
            let name = tls::server_name(&up.host).map_err(|e| UpstreamError::Tls {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
            let conn =
                rustls::ClientConnection::new(config, name).map_err(|e| UpstreamError::Tls {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            let tls = TlsStream::handshake(tcp, conn)
                .await
                .map_err(|e| UpstreamError::Tls {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        (1, Some(b'N')) if up.sslmode == SslMode::Prefer => Ok(Stream::tcp_stream(tcp)),
        (1, Some(b'N')) => Err(UpstreamError::Tls {
            addr,
            reason: "the server does not support TLS".into(),
        }),
        _ => Err(UpstreamError::Protocol(format!(
            "unexpected answer to SSLRequest from {addr}"
        ))),
    }
}

/// Whether a cleartext or md5 password may cross `stream`: only to a server whose certificate was
/// verified, or over loopback (the gateway dials TCP only, so no Unix socket arises), unless the
/// operator set the `danger_` override. The address checked is the one actually connected to, not
/// the configured name.
fn password_channel(target: &Target, stream: &Stream) -> PasswordChannel {
    let up = &target.config.upstream;
    let verified = stream.is_tls() && tls::verifies_server(up.sslmode, up.sslrootcert.as_deref());
    let loopback = stream
        .tcp()
        .peer_addr()
        .is_ok_and(|a| a.ip().to_canonical().is_loopback());
    if verified || loopback || target.config.danger_password_over_unverified_channel {
        PasswordChannel::Protected
    } else {
        PasswordChannel::Unverified
    }
}

/// Who the gateway logs in as upstream: the target's own user and credential, or what the
/// session's identity maps to (`[[target.role]]`), and the role it then sets.
#[derive(Clone, Copy)]
pub struct Login<'a> {
    pub user: &'a str,
    pub password: Option<&'a [u8]>,
    /// `SET ROLE` to this after authenticating, before the client sees the session.
    pub set_role: Option<&'a str>,
}

impl<'a> Login<'a> {
    /// The target's configured user and credential.
    pub fn of(target: &'a Target) -> Login<'a> {
        Login {
            user: &target.config.upstream.user,
            password: target.password.as_ref().map(|s| s.expose()),
            set_role: None,
        }
    }
}

/// Connects and authenticates as `login`. `params` are the client's session parameters worth passing on
/// (application_name, client_encoding, ...); `minor` is the protocol minor version to ask for.
pub async fn connect(
    target: &Target,
    login: Login<'_>,
    params: &[(&str, &str)],
    minor: u16,
    max_message: usize,
) -> Result<Upstream, UpstreamError> {
    let timeout = target.config.connect_timeout;
    let up = &target.config.upstream;
    let addr = format!("{}:{}", up.host, up.port);
    let connecting = connect_inner(target, login, params, minor, max_message);
    match compio::time::timeout(timeout, connecting).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout { addr, timeout }),
    }
}

async fn connect_inner(
    target: &Target,
    login: Login<'_>,
    params: &[(&str, &str)],
    minor: u16,
    max_message: usize,
) -> Result<Upstream, UpstreamError> {
    let up = &target.config.upstream;
    let addr = format!("{}:{}", up.host, up.port);
    let io_err = |source| UpstreamError::Connect {
        addr: addr.clone(),
        source,
    };
    let stream = open(target).await?;

    let mut all: Vec<(&str, &str)> = vec![("user", login.user), ("database", &up.database)];
    // The policy classifier reads SQL as UTF-8 with standard-conforming strings; the session must
    // too, whatever the agent asked for.
    all.push(("client_encoding", "UTF8"));
    all.extend(params.iter().copied());
    let mut out = Vec::with_capacity(256);
    startup::encode_startup(3, minor, &all, &mut out);
    stream.write_all(out).await.0.map_err(io_err)?;

    let binding = match stream.peer_certificate() {
        Some(der) => tls_server_end_point(&der)
            .map_or(ChannelBinding::None, ChannelBinding::TlsServerEndPoint),
        None => ChannelBinding::None,
    };
    let mut auth = UpstreamAuth::new(login.user, login.password, binding)
        .on_channel(password_channel(target, &stream));
    let mut buf = Vec::with_capacity(8192);
    let mut hello = UpstreamHello::default();
    let mut authenticated = false;
    let mut negotiated_minor = minor;
    loop {
        let len = read_message(&stream, &mut buf, max_message, "startup").await?;
        let f = Frame {
            tag: buf[0],
            body: &buf[frame::HEADER_LEN..len],
        };
        let (tag, len) = (f.tag, f.wire_len());
        if !authenticated {
            let mut reply = Vec::new();
            match auth.on_message(tag, f.body, &mut reply)? {
                AuthStep::Continue => {}
                AuthStep::Authenticated => authenticated = true,
                AuthStep::Negotiated { minor } => {
                    negotiated_minor = minor;
                    hello.negotiated(&buf[..len]);
                }
            }
            if !reply.is_empty() {
                // It may hold the password or its hash: wiped once sent.
                let BufResult(sent, mut reply) = stream.write_all(reply).await;
                zeroize::Zeroize::zeroize(&mut reply);
                sent.map_err(io_err)?;
            }
        } else {
            let step = hello
                .on_message(&f, &buf[..len])
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            match step {
                HelloStep::More => {}
                HelloStep::Refused {
                    code,
                    message,
                    detail,
                } => {
                    return Err(UpstreamError::Server {
                        code,
                        message,
                        detail,
                    });
                }
                HelloStep::Ready => {
                    buf.drain(..len);
                    if !buf.is_empty() {
                        return Err(UpstreamError::Protocol(
                            "data after the first ReadyForQuery".into(),
                        ));
                    }
                    if let Some(role) = login.set_role {
                        let sql = crate::idp::set_role_sql(role);
                        side_query(&stream, &sql, max_message).await?;
                    }
                    let (relay, backend_pid, backend_key) = hello.finish();
                    return Ok(Upstream {
                        stream,
                        backend_pid,
                        backend_key,
                        relay,
                        minor: negotiated_minor,
                    });
                }
            }
        }
        buf.drain(..len);
    }
}

/// Forwards a client's cancel to the real backend, over the same kind of connection the target
/// uses. Best effort, like PostgreSQL's own: the client hears nothing either way.
pub async fn cancel(
    target: &Target,
    backend_pid: u32,
    backend_key: &[u8],
) -> Result<(), UpstreamError> {
    let stream = open(target).await?;
    let mut out = Vec::with_capacity(16 + backend_key.len());
    startup::encode_cancel(backend_pid, backend_key, &mut out);
    let addr: SocketAddr = stream
        .tcp()
        .peer_addr()
        .map_err(|source| UpstreamError::Connect {
            addr: "?".into(),
            source,
        })?;
    stream
        .write_all(out)
        .await
        .0
        .map_err(|source| UpstreamError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    // The server closes after reading the request; wait for that so the cancel is delivered.
    let _ =
        compio::time::timeout(Duration::from_secs(5), stream.read(Vec::with_capacity(64))).await;
    Ok(())
}

/// Reads until `buf` starts with one whole message and returns its wire length; `during` names
/// the step in the error when the server closes instead.
pub(crate) async fn read_message(
    stream: &Stream,
    buf: &mut Vec<u8>,
    max_message: usize,
    during: &str,
) -> Result<usize, UpstreamError> {
    loop {
        match frame::next_frame(buf, max_message)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?
        {
            Next::Frame(f) => return Ok(f.wire_len()),
            Next::NeedHeader | Next::Partial { .. } => {
                let BufResult(n, b) = stream.read(std::mem::take(buf)).await;
                *buf = b;
                let n = n.map_err(|source| UpstreamError::Connect {
                    addr: "upstream".into(),
                    source,
                })?;
                if n == 0 {
                    return Err(UpstreamError::Protocol(format!(
                        "the upstream server closed the connection during {during}"
                    )));
                }
            }
        }
    }
}

/// Runs one simple query on an authenticated upstream and returns its rows as text (NULL as
/// `None`). For the gateway's own side queries, never for agents' traffic.
pub async fn side_query(
    stream: &Stream,
    sql: &str,
    max_message: usize,
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    let io = |source| UpstreamError::Connect {
        addr: "upstream".into(),
        source,
    };
    let mut out = Vec::new();
    messages::encode_query(sql, &mut out);
    stream.write_all(out).await.0.map_err(io)?;
    let mut answer = SideQuery::default();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let len = read_message(stream, &mut buf, max_message, "a side query").await?;
        let step = answer
            .on_message(buf[0], &buf[frame::HEADER_LEN..len])
            .map_err(|e| UpstreamError::Protocol(format!("side query: {e}")))?;
        match step {
            SideStep::More => {}
            SideStep::Done(rows) => return Ok(rows),
            SideStep::Failed { code, message } => {
                return Err(UpstreamError::Server {
                    code,
                    message,
                    detail: None,
                });
            }
        }
        buf.drain(..len);
    }
}
