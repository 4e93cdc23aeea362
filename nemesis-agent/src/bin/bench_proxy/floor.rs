//! The floor of the release figure: a minimal relay that holds clients and releases them
//! with the fewest steps any userspace proxy needs, timed exactly like the real proxy
//! (same child-process protocol, same clients, same backend, same runtime kind). What it
//! leaves out is all the real proxy adds: Service lookup, bounds, wake-up flights,
//! backend choice, protocol following, metrics, drain, and half-closes (it closes both
//! sockets once the answer is written; the proxy shuts the client's write side and
//! waits for the client's end: two system calls more per connection, after its first
//! byte).
//!
//! Per held client: accepted and its request read before the backend is ready; at
//! `READY`, the held clients are split into one share per runtime worker, each dialled
//! in one loop (no wake-up per connection; the task that learns of it takes the first
//! share, one task per other share, so that every core dials): open the backend socket,
//! connect (on loopback the handshake completes inside connect(2)) and send the
//! request; then one task per connection awaits the response, reads it,
//! writes it to the client with the FIN on the last segment when the backend's FIN came
//! with it, and closes both.

use anyhow::{Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Floor {
    /// Clients whose request was read, waiting for a backend.
    held: Vec<(TcpStream, Vec<u8>)>,
    ready: Option<SocketAddr>,
}

type Shared = Arc<Mutex<Floor>>;

/// Serve the minimal relay on 127.0.0.1:0 and obey the same stdin commands as the proxy
/// child (`READY <addr>`, `ZERO`, `HELD`, `CPU`); prints `PORT <n> <n>`.
pub async fn serve(cpu_micros: fn() -> Result<u64>) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let floor = Shared::default();
    let f = floor.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(admit(f.clone(), client));
        }
    });
    // On a worker, as the proxy child obeys its commands.
    tokio::spawn(obey(floor, port, cpu_micros)).await?
}

async fn obey(floor: Shared, port: u16, cpu_micros: fn() -> Result<u64>) -> Result<()> {
    let (mut out, mut lines) = super::command_pipe(port, port).await?;
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("READY"), Some(addr)) => release(&floor, addr.parse()?),
            (Some("ZERO"), None) => floor.lock().expect("floor lock").ready = None,
            (Some("HELD"), None) => {
                let held = floor.lock().expect("floor lock").held.len();
                out.write_all(format!("HELD {held}\n").as_bytes()).await?;
            }
            (Some("CPU"), None) => {
                out.write_all(format!("CPU {}\n", cpu_micros()?).as_bytes())
                    .await?;
            }
            _ => bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}

/// Read the client's request (up to the end of its head), then hold it or relay it.
async fn admit(floor: Shared, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut request = Vec::with_capacity(256);
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if !matches!(client.read_buf(&mut request).await, Ok(n) if n > 0) {
            return;
        }
    }
    let ready = {
        let mut f = floor.lock().expect("floor lock");
        if f.ready.is_none() {
            f.held.push((client, request));
            return;
        }
        f.ready
    };
    if let Some(backend) = ready
        && let Ok(dialled) = dial(backend, &request)
    {
        relay(client, dialled).await;
    }
}

/// Every held client to `backend`: dialled in one loop per worker, then relayed each on a
/// task of its own.
fn release(floor: &Shared, backend: SocketAddr) {
    let mut held = {
        let mut f = floor.lock().expect("floor lock");
        f.ready = Some(backend);
        std::mem::take(&mut f.held)
    };
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let share = held.len().div_ceil(workers.max(1)).max(1);
    while held.len() > share {
        let last = held.split_off(held.len() - share);
        tokio::spawn(async move { dial_all(backend, last) });
    }
    dial_all(backend, held);
}

fn dial_all(backend: SocketAddr, held: Vec<(TcpStream, Vec<u8>)>) {
    for (client, request) in held {
        match dial(backend, &request) {
            Ok(dialled) => {
                tokio::spawn(relay(client, dialled));
            }
            Err(err) => eprintln!("floor: dialling {backend}: {err}"),
        }
    }
}

/// A backend socket, connected, with the request sent (or still to send, when the
/// handshake had not completed inside connect(2)).
struct Dialled {
    backend: TcpStream,
    unsent: Vec<u8>,
}

fn dial(backend: SocketAddr, request: &[u8]) -> io::Result<Dialled> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&backend.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let sent = match socket.send(request) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    Ok(Dialled {
        backend: TcpStream::from_std(std::net::TcpStream::from(socket))?,
        unsent: request[sent..].to_vec(),
    })
}

/// The response back to the client, then both closed.
async fn relay(client: TcpStream, dialled: Dialled) {
    let Dialled {
        mut backend,
        unsent,
    } = dialled;
    if !unsent.is_empty() && backend.write_all(&unsent).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        let Ok(ready) = backend.ready(Interest::READABLE).await else {
            return;
        };
        let n = match backend.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        // The backend's FIN came with these bytes: hold the last segment back so that
        // the close below puts the client's FIN on it.
        let last = ready.is_read_closed();
        let flags = libc::MSG_NOSIGNAL | if last { libc::MSG_MORE } else { 0 };
        let mut off = 0;
        while off < n {
            if client.writable().await.is_err() {
                return;
            }
            match client.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(&client).send_with_flags(&buf[off..n], flags)
            }) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
        if last {
            return;
        }
    }
}
