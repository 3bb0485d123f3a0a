//! A minimal blocking PostgreSQL client for latency probes.
//!
//! One socket, blocking reads and writes, no async runtime in between: the time between the write
//! of a query and the read of its ReadyForQuery is the latency the target added, plus the kernel.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::IsNull;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;

/// Where and as whom to connect. The password is only sent when the server asks for one.
#[derive(Clone, Debug)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    /// Read, write and connect timeout: a hung target becomes an error, not a hung harness.
    pub timeout: Duration,
}

pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    chunk: Box<[u8]>,
}

impl Conn {
    /// TCP connect, startup, authentication, up to the first ReadyForQuery.
    pub fn connect(p: &ConnectParams) -> Result<Conn> {
        let addr = (p.host.as_str(), p.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow!("{}:{} resolves to nothing", p.host, p.port))?;
        let stream = TcpStream::connect_timeout(&addr, p.timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(p.timeout))?;
        stream.set_write_timeout(Some(p.timeout))?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            chunk: vec![0; 64 * 1024].into_boxed_slice(),
        };
        frontend::startup_message(
            [("user", p.user.as_str()), ("database", p.database.as_str())],
            &mut conn.wbuf,
        )?;
        conn.flush()?;
        conn.authenticate(p)?;
        conn.wait_ready()?;
        Ok(conn)
    }

    fn authenticate(&mut self, p: &ConnectParams) -> Result<()> {
        let password = || {
            p.password
                .as_deref()
                .ok_or_else(|| anyhow!("the server asked for a password and none was given"))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv()? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.wbuf)?;
                    self.flush()?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(p.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush()?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(m) = mechanisms.next()? {
                        offered |= m == SCRAM_SHA_256;
                    }
                    if !offered {
                        bail!("the server offers no SASL mechanism this client speaks");
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                    self.flush()?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("SASL continue before SASL start"))?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush()?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    scram
                        .take()
                        .ok_or_else(|| anyhow!("SASL final before SASL start"))?
                        .finish(body.data())?;
                }
                Message::ErrorResponse(body) => bail!("authentication: {}", error_text(&body)),
                _ => bail!("unexpected message during authentication"),
            }
        }
    }

    /// Reads up to ReadyForQuery, failing on the first ErrorResponse (after draining to it).
    /// Returns the number of DataRow messages seen.
    fn wait_ready(&mut self) -> Result<u64> {
        let mut rows = 0;
        let mut error = None;
        loop {
            match self.recv()? {
                Message::ReadyForQuery(_) => break,
                Message::DataRow(_) => rows += 1,
                Message::ErrorResponse(body) => error = Some(error_text(&body)),
                _ => {}
            }
        }
        match error {
            Some(e) => bail!("{e}"),
            None => Ok(rows),
        }
    }

    /// Simple-query protocol: one Query message. Returns the row count.
    pub fn simple_query(&mut self, sql: &str) -> Result<u64> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush()?;
        self.wait_ready()
    }

    /// Parses a named statement once (Parse + Sync).
    pub fn prepare(&mut self, name: &str, sql: &str) -> Result<()> {
        frontend::parse(name, sql, std::iter::empty(), &mut self.wbuf)?;
        frontend::sync(&mut self.wbuf);
        self.flush()?;
        self.wait_ready().map(|_| ())
    }

    /// Bind (text parameters) + Execute + Sync on a prepared statement, as pgbench -M prepared
    /// does per transaction. Returns the row count.
    pub fn execute_prepared(&mut self, name: &str, params: &[&str]) -> Result<u64> {
        frontend::bind(
            "",
            name,
            std::iter::empty(),
            params.iter(),
            |v, buf| {
                buf.extend_from_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            Some(0),
            &mut self.wbuf,
        )
        .map_err(|e| match e {
            frontend::BindError::Conversion(e) => anyhow!("bind: {e}"),
            frontend::BindError::Serialization(e) => anyhow!("bind: {e}"),
        })?;
        frontend::execute("", 0, &mut self.wbuf)?;
        frontend::sync(&mut self.wbuf);
        self.flush()?;
        self.wait_ready()
    }

    /// Sends Terminate and closes the socket.
    pub fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush();
    }

    fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.wbuf)?;
        self.wbuf.clear();
        Ok(())
    }

    fn recv(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = Message::parse(&mut self.rbuf)? {
                return Ok(m);
            }
            let n = self.stream.read(&mut self.chunk)?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.rbuf.extend_from_slice(&self.chunk[..n]);
        }
    }
}

fn error_text(body: &ErrorResponseBody) -> String {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    format!("{message} (SQLSTATE {code})")
}
