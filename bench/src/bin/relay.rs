//! A bare TCP relay on the gateway's io_uring runtime (compio, set up as the gateway's workers
//! are: `portcullis::daemon::io_runtime`): no protocol, no policy, no masking, one thread, a 64
//! KiB read per direction. Run beside the gateway and HAProxy, it shows what the runtime itself
//! costs per query, so that the gateway's extra cost can be told apart from io_uring's
//! (`docs/benchmarks.md`, "Where wide rows at c=8 go").
//!
//! `cargo run --release -p portcullis-bench --bin relay -- [--multishot] LISTEN UPSTREAM`, for
//! example `relay 127.0.0.1:58432 127.0.0.1:5432`; clients then connect to LISTEN as they would
//! to the server. `--multishot` receives with one multishot receive per direction into the
//! ring's provided buffers (256 of 64 KiB), instead of a receive posted per read: what keeping
//! the receive armed would save (`docs/benchmarks.md`, "Five tries at the runtime's share").

use std::rc::Rc;

use compio::BufResult;
use compio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};

/// Copies `from` to `to` until `from` ends or either fails, then shuts `to`'s sending side.
async fn pipe(from: Rc<TcpStream>, to: Rc<TcpStream>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let mut reader = &*from;
        let BufResult(n, b) = reader.append(buf).await;
        buf = b;
        if !matches!(n, Ok(n) if n > 0) {
            break;
        }
        let mut writer = &*to;
        let BufResult(written, b) = writer.write_all(buf).await;
        buf = b;
        if written.is_err() {
            break;
        }
    }
    let mut writer = &*to;
    let _ = writer.shutdown().await;
}

/// `pipe` with a multishot receive from the runtime's buffer ring: the receive stays armed.
async fn pipe_multi(from: Rc<TcpStream>, to: Rc<TcpStream>) {
    use compio::io::AsyncReadMulti;
    use futures_util::StreamExt;
    let mut reader = &*from;
    let mut reads = std::pin::pin!(reader.read_multi(0));
    while let Some(Ok(buf)) = reads.next().await {
        if compio::buf::IoBuf::as_init(&buf).is_empty() {
            break;
        }
        let mut writer = &*to;
        if writer.write_all(buf).await.0.is_err() {
            break;
        }
    }
    let mut writer = &*to;
    let _ = writer.shutdown().await;
}

async fn pipe_with(from: Rc<TcpStream>, to: Rc<TcpStream>, multishot: bool) {
    if multishot {
        pipe_multi(from, to).await
    } else {
        pipe(from, to).await
    }
}

async fn relay(client: TcpStream, upstream: String, multishot: bool) -> std::io::Result<()> {
    let server = TcpStream::connect(&upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client, server) = (Rc::new(client), Rc::new(server));
    let up = compio::runtime::spawn(pipe_with(client.clone(), server.clone(), multishot));
    pipe_with(server, client, multishot).await;
    let _ = up.await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let multishot = args.first().is_some_and(|a| a == "--multishot");
    if multishot {
        args.remove(0);
    }
    let [listen, upstream] = args.as_slice() else {
        anyhow::bail!("usage: relay [--multishot] LISTEN UPSTREAM");
    };
    let (listen, upstream) = (listen.clone(), upstream.clone());
    let runtime = if multishot {
        let mut ring = portcullis::daemon::io_ring();
        ring.buffer_pool_size(std::num::NonZero::new(256).expect("256 is not zero"))
            .buffer_pool_buffer_len(64 * 1024);
        compio::runtime::RuntimeBuilder::new()
            .with_proactor(ring)
            .build()?
    } else {
        portcullis::daemon::io_runtime()?
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            let upstream = upstream.clone();
            compio::runtime::spawn(async move {
                if let Err(e) = relay(client, upstream, multishot).await {
                    eprintln!("relay: {e}");
                }
            })
            .detach();
        }
    })
}
