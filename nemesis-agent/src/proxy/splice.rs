//! Both directions of a forwarded connection until each side closes, with half-close
//! propagated (EOF on one side -> `shutdown(Write)` on the other). Copies the first
//! bytes of each direction (requests, responses, handshakes), then moves bulk with
//! splice(2) through a pipe so it never enters user space. Never buffers more than one
//! chunk or one pipe's worth per direction.

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice(2) call; the kernel caps it at the pipe's size.
const SPLICE_CHUNK: usize = 1 << 20;
/// Pipe capacity asked for (the kernel's default pipe-max-size).
const PIPE_SIZE: i32 = 1 << 20;
/// A direction that moved this much is bulk and switches from copying to splice(2).
const SPLICE_AFTER: u64 = 256 * 1024;
/// The copy's buffer (allocated per chunk).
const COPY_CHUNK: usize = 16 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe moves a bulk transfer in fewer, larger splices. The kernel may
        // refuse (pipe-max-size, per-user pipe quota): the default 64 KiB still works.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self { read, write })
    }
}

/// Splice `client` and `backend` both ways until both directions reached EOF, or either
/// failed. With `client_done`, the client already half-closed (its bytes were delivered
/// and the backend's write side shut), so only the backend -> client direction runs.
pub(crate) async fn splice_bidirectional(
    client: &TcpStream,
    backend: &TcpStream,
    client_done: bool,
    upstream_bytes: &Counter,
    downstream_bytes: &Counter,
) -> io::Result<()> {
    let upstream = async {
        if client_done {
            Ok(())
        } else {
            pump(client, backend, upstream_bytes).await
        }
    };
    let downstream = pump(backend, client, downstream_bytes);
    tokio::try_join!(upstream, downstream).map(|_| ())
}

/// One direction: bytes from `src` to `dst` until EOF, then `shutdown(Write)` of `dst`.
pub(crate) async fn pump(src: &TcpStream, dst: &TcpStream, bytes: &Counter) -> io::Result<()> {
    // A request or a response is copied: cheaper than setting up a pipe, which matters
    // when a burst of held connections is released at once. A direction that moves more
    // than SPLICE_AFTER is bulk, and splice(2) moves it without copying.
    let reached_eof = pump_copy(src, dst, bytes, Some(SPLICE_AFTER)).await?;
    if !reached_eof {
        match Pipe::new() {
            Ok(pipe) => pump_splice(src, dst, &pipe, bytes).await?,
            Err(err) => {
                tracing::debug!(?err, "no pipe for splice(2); copying instead");
                pump_copy(src, dst, bytes, None).await?;
            }
        }
    }
    shutdown_write(dst)
}

/// All of `buf` to `dst` (through a shared reference, as both directions use both
/// sockets at once).
pub(crate) async fn write_all(dst: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        dst.writable().await?;
        match dst.try_write(&buf[off..]) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// As [`write_all`], with the last segment held back (`MSG_MORE`) for what comes next
/// at once: the caller knows the source has closed, so its EOF follows, and
/// `shutdown(Write)` puts the FIN on this segment instead of sending one of its own.
/// One segment instead of two, and one wake-up of the peer instead of two: when a burst
/// of held connections is released, every exchange that ends in a close costs less of
/// the cores the other first bytes wait for. The caller must write again, shut down or
/// close next (each sends what is held back), and never await anything else between.
pub(crate) async fn write_all_then_eof(dst: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(dst)
                .send_with_flags(&buf[off..], libc::MSG_MORE | libc::MSG_NOSIGNAL)
        }) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(Shutdown::Write) {
        // The peer is already gone: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    bytes: &Counter,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // Fill only an empty pipe, so that EAGAIN always means "src has nothing now"
        // (never "pipe full") and clearing src's readiness is right.
        let filled = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(
                    src.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    SPLICE_CHUNK,
                    flags,
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            return Ok(());
        }
        let mut pending = filled;
        while pending > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, dst.as_fd(), None, pending, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    pending -= n;
                    bytes.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Copy until EOF (returns true) or until `limit` bytes were moved (returns false). The
/// buffer lives only while a chunk is in flight, so an idle forwarded connection (a quiet
/// WebSocket) holds none.
async fn pump_copy(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &Counter,
    limit: Option<u64>,
) -> io::Result<bool> {
    let mut moved = 0u64;
    loop {
        if limit.is_some_and(|l| moved >= l) {
            return Ok(false);
        }
        src.readable().await?;
        let mut buf = Vec::with_capacity(COPY_CHUNK);
        let n = match src.try_read_buf(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        bytes.inc_by(n as u64);
        moved += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_half_close_propagates() {
        // client <-> (proxy_c | proxy_b) <-> backend
        let (mut client, proxy_c) = pair().await;
        let (proxy_b, mut backend) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let (u2, d2) = (up.clone(), down.clone());
        let task =
            tokio::spawn(
                async move { splice_bidirectional(&proxy_c, &proxy_b, false, &u2, &d2).await },
            );
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: still reading
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap(); // EOF arrives: half-close crossed
        assert!(got == payload, "payload corrupted");
        backend.write_all(b"done").await.unwrap();
        drop(backend);
        assert_eq!(writer.await.unwrap(), b"done");
        task.await.unwrap().unwrap();
        assert_eq!((up.get(), down.get()), (payload.len() as u64, 4));
    }
}
