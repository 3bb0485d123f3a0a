//! A byte stream to a peer: plain TCP, or TLS driven by rustls's own sans-IO connection.
//!
//! Both pumps of a session share one `Rc<Stream>`: one only reads, the other only writes. TCP is
//! full duplex; for TLS the rustls state sits in a `RefCell` that is never borrowed across an
//! await, and raw writes are serialized so records never interleave.

use std::cell::RefCell;
use std::io::{self, Read, Write};

use compio::BufResult;
use compio::buf::IoBuf;
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::TcpStream;
use futures_util::lock::Mutex;

/// How much a single read asks the kernel for.
pub const READ_CHUNK: usize = 64 * 1024;

/// How much a startup-phase read grows a full buffer by: startup packets are small.
const SMALL_READ: usize = 1024;

pub enum Stream {
    Tcp(TcpStream, WriteLock),
    Tls(Box<TlsStream>),
}

/// Serializes whole-message writes: both pumps may write to the client (results, and a notice
/// about a held statement), and a message must never be cut into by another.
#[derive(Default)]
pub struct WriteLock(Mutex<()>);

impl Stream {
    pub fn tcp_stream(tcp: TcpStream) -> Stream {
        Stream::Tcp(tcp, WriteLock::default())
    }
}

pub struct TlsStream {
    tcp: TcpStream,
    tls: RefCell<rustls::Connection>,
    /// Ciphertext read from the socket and how much of it rustls has taken.
    raw: RefCell<(Vec<u8>, usize)>,
    write_lock: Mutex<()>,
}

impl Stream {
    /// Reads at least one byte (0 = end of stream), appended to `buf`.
    pub async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize, Vec<u8>> {
        match self {
            Stream::Tcp(tcp, _) => {
                buf.reserve(READ_CHUNK);
                let mut r = tcp;
                r.append(buf).await
            }
            Stream::Tls(t) => t.read(buf).await,
        }
    }

    /// As [`Stream::read`], into the room `buf` already has, growing it by a little only when it
    /// is full: for the startup phase, where thousands of waiting connections would otherwise
    /// each pin a full read chunk.
    pub async fn read_small(&self, mut buf: Vec<u8>) -> BufResult<usize, Vec<u8>> {
        match self {
            Stream::Tcp(tcp, _) => {
                if buf.len() == buf.capacity() {
                    buf.reserve(SMALL_READ);
                }
                let mut r = tcp;
                r.append(buf).await
            }
            Stream::Tls(t) => t.read(buf).await,
        }
    }

    pub async fn write_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        match self {
            Stream::Tcp(tcp, lock) => {
                let _guard = lock.0.lock().await;
                let mut w = tcp;
                w.write_all(buf).await
            }
            Stream::Tls(t) => t.write_all(buf).await,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(t, _) => t,
            Stream::Tls(t) => &t.tcp,
        }
    }

    /// The DER certificate the TLS peer presented, for SCRAM channel binding.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Stream::Tcp(..) => None,
            Stream::Tls(t) => {
                let tls = t.tls.borrow();
                tls.peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec())
            }
        }
    }

    /// True when this leg is TLS: for the client leg, the agent negotiated TLS with the gateway
    /// (SSLRequest or direct TLS), so what it sends cannot be read on the way.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The ALPN protocol the TLS peer and the gateway agreed on, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        match self {
            Stream::Tcp(..) => None,
            Stream::Tls(t) => t.tls.borrow().alpn_protocol().map(<[u8]>::to_vec),
        }
    }
}

impl TlsStream {
    /// Runs the handshake over `tcp`. Bytes the peer sent after its last handshake message stay
    /// buffered in rustls and come out of the first `read`.
    pub async fn handshake(
        tcp: TcpStream,
        conn: impl Into<rustls::Connection>,
    ) -> io::Result<TlsStream> {
        Self::handshake_after(tcp, conn, Vec::with_capacity(READ_CHUNK)).await
    }

    /// The handshake, starting with `raw`: bytes of it already read from `tcp` (a client's
    /// direct-TLS ClientHello, read while telling it from a PostgreSQL startup packet).
    pub async fn handshake_after(
        tcp: TcpStream,
        conn: impl Into<rustls::Connection>,
        mut raw: Vec<u8>,
    ) -> io::Result<TlsStream> {
        let mut conn = conn.into();
        conn.set_buffer_limit(None);
        let mut pos = 0;
        loop {
            if conn.wants_write() {
                let mut out = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                let mut w = &tcp;
                w.write_all(out).await.0?;
            }
            if !conn.is_handshaking() {
                // Records after the handshake's last message wait in `raw` for the first read.
                return Ok(TlsStream {
                    tcp,
                    tls: RefCell::new(conn),
                    raw: RefCell::new((raw, pos)),
                    write_lock: Mutex::new(()),
                });
            }
            if pos == raw.len() {
                raw.clear();
                raw.reserve(READ_CHUNK);
                pos = 0;
                let mut r = &tcp;
                let BufResult(n, back) = r.append(raw).await;
                raw = back;
                if n? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
            }
            let mut rest = &raw[pos..];
            let before = rest.len();
            conn.read_tls(&mut rest)?;
            pos += before - rest.len();
            if let Err(e) = conn.process_new_packets() {
                // Send the alert that says why, best effort, before giving up.
                let mut alert = Vec::new();
                while conn.wants_write() && conn.write_tls(&mut alert).is_ok() {}
                let mut w = &tcp;
                let _ = w.write_all(alert).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    async fn read(&self, mut buf: Vec<u8>) -> BufResult<usize, Vec<u8>> {
        loop {
            let start = buf.len();
            buf.resize(start + READ_CHUNK, 0);
            let got = self.tls.borrow_mut().reader().read(&mut buf[start..]);
            match got {
                Ok(n) => {
                    buf.truncate(start + n);
                    return BufResult(Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.truncate(start),
                Err(e) => {
                    buf.truncate(start);
                    return BufResult(Err(e), buf);
                }
            }
            // Ciphertext left from the last socket read goes in one record batch at a time, so
            // rustls's plaintext buffer is drained between batches and never overflows.
            let fed = {
                let mut pending = self.raw.borrow_mut();
                let (raw, pos) = &mut *pending;
                if *pos < raw.len() {
                    let mut rest = &raw[*pos..];
                    let before = rest.len();
                    let mut tls = self.tls.borrow_mut();
                    let r = tls.read_tls(&mut rest).and_then(|_| {
                        tls.process_new_packets()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                    });
                    *pos += before - rest.len();
                    Some(r)
                } else {
                    None
                }
            };
            match fed {
                Some(Err(e)) => return BufResult(Err(e), buf),
                Some(Ok(())) => {
                    // Answer what the peer's records asked for (key updates, alerts).
                    if let Err(e) = self.flush_tls().await {
                        return BufResult(Err(e), buf);
                    }
                    continue;
                }
                None => {}
            }
            let mut raw = std::mem::take(&mut self.raw.borrow_mut().0);
            raw.clear();
            raw.reserve(READ_CHUNK);
            let mut r = &self.tcp;
            let BufResult(n, raw) = r.append(raw).await;
            *self.raw.borrow_mut() = (raw, 0);
            match n {
                Ok(0) => return BufResult(Ok(0), buf),
                Ok(_) => {}
                Err(e) => return BufResult(Err(e), buf),
            }
        }
    }

    async fn write_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        let _guard = self.write_lock.lock().await;
        let encrypted = {
            let mut tls = self.tls.borrow_mut();
            let mut out = Vec::with_capacity(buf.as_init().len() + 64);
            let r = tls.writer().write_all(buf.as_init()).and_then(|()| {
                while tls.wants_write() {
                    tls.write_tls(&mut out)?;
                }
                Ok(())
            });
            if let Err(e) = r {
                return BufResult(Err(e), buf);
            }
            out
        };
        let mut w = &self.tcp;
        let BufResult(r, _) = w.write_all(encrypted).await;
        BufResult(r, buf)
    }

    async fn flush_tls(&self) -> io::Result<()> {
        let _guard = self.write_lock.lock().await;
        let out = {
            let mut tls = self.tls.borrow_mut();
            let mut out = Vec::new();
            while tls.wants_write() {
                tls.write_tls(&mut out)?;
            }
            out
        };
        if out.is_empty() {
            return Ok(());
        }
        let mut w = &self.tcp;
        w.write_all(out).await.0
    }
}
