//! A byte stream to a peer: plain TCP, or TLS driven by rustls's own sans-IO connection.
//!
//! Both pumps of a session share one `Rc<Stream>`: one only reads, the other only writes. TCP is
//! full duplex; for TLS the rustls state sits in a `RefCell` that is never borrowed across an
//! await, and raw writes are serialized so records never interleave.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};

use compio::BufResult;
use compio::buf::IoBuf;
use compio::io::{AsyncReadExt, AsyncWriteExt};
use compio::net::TcpStream;
use futures_util::lock::Mutex;

/// The smallest read: what a quiet connection's posted read holds while it waits. Startup
/// packets, simple queries and their small results fit in one.
pub const MIN_READ: usize = 1024;

/// The largest read: a result streaming through is read in chunks of this size.
pub const MAX_READ: usize = 64 * 1024;

/// Full-size read buffers parked per I/O thread between bursts, so a session that streams
/// again reuses one instead of allocating it.
const PARKED_BUFFERS: usize = 64;

thread_local! {
    static PARKED: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Sizes each read to the traffic, so that a connection holds a large buffer only while data
/// streams. A read posted to io_uring pins its whole buffer until bytes arrive, so after a read
/// that drained the socket (the peer may go quiet), the next read into an empty buffer is a
/// small one: if it comes back full, data is flowing and reads go back to the size they had
/// reached. Sizes grow fourfold per full read up to [`MAX_READ`] and halve after reads that
/// use less than a quarter of their room.
pub struct ReadSize {
    size: Cell<usize>,
    /// The last read did not fill its room: the socket had no more bytes.
    drained: Cell<bool>,
}

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize {
            size: Cell::new(MIN_READ),
            drained: Cell::new(true),
        }
    }
}

impl ReadSize {
    /// Gives `buf` room for the next read; returns it and the room.
    fn prepare(&self, mut buf: Vec<u8>) -> (Vec<u8>, usize) {
        let size = self.size.get();
        if buf.is_empty() && self.drained.get() {
            if buf.capacity() > MIN_READ {
                park(std::mem::replace(&mut buf, Vec::with_capacity(MIN_READ)));
            }
            buf.reserve(MIN_READ);
        } else if buf.capacity() - buf.len() < size {
            if buf.is_empty() && size == MAX_READ {
                buf = unpark();
            } else {
                buf.reserve(size);
            }
        }
        let room = buf.capacity() - buf.len();
        (buf, room)
    }

    /// Adapts to a read of `n` bytes into `room`.
    fn observe(&self, n: usize, room: usize) {
        let size = self.size.get();
        self.drained.set(n < room);
        if n == room {
            if room >= size {
                self.size.set((size * 4).min(MAX_READ));
            }
        } else if n < size / 4 {
            self.size.set((size / 2).max(MIN_READ));
        }
    }

    /// The size reads have reached (for tests).
    pub fn current(&self) -> usize {
        self.size.get()
    }
}

/// Keeps a full-size buffer for the next burst on this thread, or frees it.
fn park(mut buf: Vec<u8>) {
    if !(MAX_READ..=2 * MAX_READ).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    PARKED.with_borrow_mut(|p| {
        if p.len() < PARKED_BUFFERS {
            p.push(buf);
        }
    });
}

fn unpark() -> Vec<u8> {
    PARKED
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(MAX_READ))
}

/// Reads from `tcp` into what `buf` has room for after `sizes` prepared it.
async fn sized_read(tcp: &TcpStream, sizes: &ReadSize, buf: Vec<u8>) -> BufResult<usize, Vec<u8>> {
    let (buf, room) = sizes.prepare(buf);
    let mut r = tcp;
    let BufResult(n, buf) = r.append(buf).await;
    if let Ok(n) = n {
        sizes.observe(n, room);
    }
    BufResult(n, buf)
}

pub enum Stream {
    Tcp(TcpStream, TcpSide),
    Tls(Box<TlsStream>),
}

/// A plain TCP leg's own state: how its reads are sized, and the lock that serializes
/// whole-message writes: both pumps may write to the client (results, and a notice about a held
/// statement), and a message must never be cut into by another.
#[derive(Default)]
pub struct TcpSide {
    reads: ReadSize,
    write: Mutex<()>,
}

impl Stream {
    pub fn tcp_stream(tcp: TcpStream) -> Stream {
        Stream::Tcp(tcp, TcpSide::default())
    }
}

pub struct TlsStream {
    tcp: TcpStream,
    tls: RefCell<rustls::Connection>,
    /// Ciphertext read from the socket and how much of it rustls has taken.
    raw: RefCell<(Vec<u8>, usize)>,
    /// Sizes the socket reads of ciphertext.
    reads: ReadSize,
    write_lock: Mutex<()>,
}

impl Stream {
    /// Reads at least one byte (0 = end of stream), appended to `buf`. The read is sized to
    /// the traffic ([`ReadSize`]): a quiet connection holds only a small buffer.
    pub async fn read(&self, buf: Vec<u8>) -> BufResult<usize, Vec<u8>> {
        match self {
            Stream::Tcp(tcp, side) => sized_read(tcp, &side.reads, buf).await,
            Stream::Tls(t) => t.read(buf).await,
        }
    }

    /// Whether the last read filled all the room it had: the socket may hold more already.
    pub fn last_read_filled(&self) -> bool {
        match self {
            Stream::Tcp(_, side) => !side.reads.drained.get(),
            Stream::Tls(_) => false,
        }
    }

    /// The size this stream's reads have reached (for tests).
    pub fn read_size(&self) -> usize {
        match self {
            Stream::Tcp(_, side) => side.reads.current(),
            Stream::Tls(t) => t.reads.current(),
        }
    }

    pub async fn write_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        match self {
            Stream::Tcp(tcp, side) => {
                let _guard = side.write.lock().await;
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
        Self::handshake_after(tcp, conn, Vec::new()).await
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
        let reads = ReadSize::default();
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
                    reads,
                    write_lock: Mutex::new(()),
                });
            }
            if pos == raw.len() {
                raw.clear();
                pos = 0;
                let BufResult(n, back) = sized_read(&tcp, &reads, raw).await;
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
            // Exactly the plaintext rustls holds gets room: nothing more is zeroed or pinned.
            let state = self.tls.borrow_mut().process_new_packets();
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    return BufResult(Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
                }
            };
            let ready = state.plaintext_bytes_to_read();
            if ready > 0 {
                let start = buf.len();
                buf.resize(start + ready, 0);
                let got = self.tls.borrow_mut().reader().read(&mut buf[start..]);
                buf.truncate(start + *got.as_ref().unwrap_or(&0));
                return BufResult(got, buf);
            }
            if state.peer_has_closed() {
                return BufResult(Ok(0), buf);
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
            // About to wait for the peer: an emptied plaintext buffer is not held meanwhile.
            if buf.is_empty() && buf.capacity() > MIN_READ {
                park(std::mem::take(&mut buf));
            }
            let mut raw = std::mem::take(&mut self.raw.borrow_mut().0);
            raw.clear();
            let BufResult(n, raw) = sized_read(&self.tcp, &self.reads, raw).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One read of `arrived` bytes (at most the room) into `buf`; returns the room it had.
    fn read(sizes: &ReadSize, buf: &mut Vec<u8>, arrived: usize) -> usize {
        let (mut b, room) = sizes.prepare(std::mem::take(buf));
        let n = arrived.min(room);
        b.extend(std::iter::repeat_n(0u8, n));
        sizes.observe(n, room);
        *buf = b;
        room
    }

    #[test]
    fn reads_grow_while_they_fill_and_a_quiet_connection_holds_a_small_buffer() {
        let sizes = ReadSize::default();
        let mut buf = Vec::new();
        // A startup packet and small queries: small reads, small buffer.
        assert_eq!(read(&sizes, &mut buf, 100), MIN_READ);
        buf.clear();
        assert!(buf.capacity() <= MIN_READ);
        // A large result streams: reads fill and grow to the largest size.
        let mut rooms = Vec::new();
        for _ in 0..6 {
            rooms.push(read(&sizes, &mut buf, usize::MAX));
            buf.clear();
        }
        assert_eq!(rooms[0], MIN_READ, "the first read after quiet is small");
        assert_eq!(*rooms.last().unwrap(), MAX_READ);
        assert_eq!(sizes.current(), MAX_READ);
        // The result ends with a short read; the next read, which may wait for a long time,
        // holds a small buffer, and the large one is parked for the next burst.
        read(&sizes, &mut buf, 300);
        buf.clear();
        assert_eq!(read(&sizes, &mut buf, 0), MIN_READ);
        assert!(buf.capacity() <= MIN_READ);
        // Data again: the small read fills and the next read is large at once.
        buf.clear();
        assert_eq!(read(&sizes, &mut buf, usize::MAX), MIN_READ);
        buf.clear();
        assert!(read(&sizes, &mut buf, usize::MAX) >= 8 * MIN_READ);
    }

    #[test]
    fn a_partial_message_keeps_its_buffer_and_gets_room() {
        let sizes = ReadSize::default();
        let mut buf = vec![1u8; 10];
        let room = read(&sizes, &mut buf, 5);
        assert!(room >= MIN_READ);
        assert_eq!(&buf[..10], &[1u8; 10], "what was buffered stays");
    }
}
