//! The kernel's table of open TCP connections of one network namespace, read through
//! NETLINK_SOCK_DIAG (what `ss` reads): each connection's local and remote address.
//! Owns the request, the dump and its parsing; decides nothing about what counts.
//!
//! The server side's open counts are reconciled against it: an accepted socket carries
//! no record of its own (see `on_accepted` in nemesis-ebpf), so the truth is "the
//! connections open on a server port", found by their local (address, port) here.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// One open TCP connection: addresses as 16 bytes (IPv4 as v4-mapped, as in the maps),
/// ports in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub local: [u8; 16],
    pub local_port: u16,
    pub remote: [u8; 16],
}

// Netlink and inet_diag constants (linux/netlink.h, linux/sock_diag.h,
// linux/inet_diag.h, net/tcp_states.h): stable kernel ABI.
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;

/// The states of a connection the counters hold as open: from the handshake's end
/// (PASSIVE_ESTABLISHED counts it) until the socket reaches TCP_CLOSE (its close is
/// counted then; a TIME_WAIT socket has already closed). Listeners and request sockets
/// (SYN_RECV) were never counted.
const OPEN_STATES: u32 = (1 << 1) // ESTABLISHED
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING

/// Every open TCP connection (IPv4 and IPv6) of the calling thread's network namespace.
pub fn open_connections() -> io::Result<Vec<Conn>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let mut out = Vec::new();
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        dump(&fd, seq, family, &mut out)?;
    }
    Ok(out)
}

fn dump(fd: &OwnedFd, seq: u32, family: u8, out: &mut Vec<Conn>) -> io::Result<()> {
    sendto(
        fd.as_raw_fd(),
        &request(seq, family),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    // Big enough for any dump batch the kernel sends (it fills up to about 32 KiB).
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
        if parse(&buf[..n], seq, out)? {
            return Ok(());
        }
    }
}

/// A dump request of every TCP socket of `family` in [`OPEN_STATES`].
fn request(seq: u32, family: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]); // family, protocol, ext, pad
    m.extend_from_slice(&OPEN_STATES.to_ne_bytes());
    m.resize(NLMSG_HDR_LEN + REQ_LEN, 0); // inet_diag_sockid: all zero, no filter
    m
}

/// Appends the connections of one received batch; true once the dump is done.
fn parse(mut batch: &[u8], seq: u32, out: &mut Vec<Conn>) -> io::Result<bool> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    while batch.len() >= NLMSG_HDR_LEN {
        let len = u32_at(batch, 0) as usize;
        if len < NLMSG_HDR_LEN || len > batch.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sock_diag: a message of {len} bytes in a batch of {}",
                    batch.len()
                ),
            ));
        }
        let (kind, msg_seq) = (u16_at(batch, 4), u32_at(batch, 8));
        let body = &batch[NLMSG_HDR_LEN..len];
        if msg_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = if body.len() >= 4 {
                        -(u32_at(body, 0) as i32)
                    } else {
                        0
                    };
                    return Err(io::Error::from_raw_os_error(errno));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => out.push(conn(body)),
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        batch = &batch[next.min(batch.len())..];
    }
    Ok(false)
}

/// The addresses of one `inet_diag_msg`.
fn conn(msg: &[u8]) -> Conn {
    let family = msg[0];
    // inet_diag_sockid at 4: sport, dport (big-endian), src[16], dst[16], if, cookie.
    let addr = |at: usize| -> [u8; 16] {
        let mut a = [0u8; 16];
        if family == AF_INET {
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&msg[at..at + 4]);
        } else {
            a.copy_from_slice(&msg[at..at + 16]);
        }
        a
    };
    Conn {
        local: addr(8),
        local_port: u16::from_be_bytes([msg[4], msg[5]]),
        remote: addr(24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + body.len();
        let mut m = vec![];
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize((m.len() + 3) & !3, 0);
        m
    }

    fn diag(family: u8, src: &[u8], sport: u16, dst: &[u8]) -> Vec<u8> {
        let mut b = vec![family, 1, 0, 0];
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&4321u16.to_be_bytes());
        let mut a = [0u8; 16];
        a[..src.len()].copy_from_slice(src);
        b.extend_from_slice(&a);
        let mut a = [0u8; 16];
        a[..dst.len()].copy_from_slice(dst);
        b.extend_from_slice(&a);
        b.resize(MSG_LEN, 0);
        b
    }

    #[test]
    fn a_dump_batch_gives_each_connection_and_ends_at_done() {
        let v6_local: [u8; 16] = [0xfd, 0x6e, 0x6d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let mut batch = msg(
            7,
            SOCK_DIAG_BY_FAMILY,
            &diag(AF_INET, &[198, 18, 0, 5], 80, &[198, 18, 0, 9]),
        );
        batch.extend(msg(
            7,
            SOCK_DIAG_BY_FAMILY,
            &diag(AF_INET6, &v6_local, 443, &v6_local),
        ));
        batch.extend(msg(
            6,
            SOCK_DIAG_BY_FAMILY,
            &diag(AF_INET, &[1, 2, 3, 4], 1, &[1, 2, 3, 4]),
        ));
        let mut out = vec![];
        assert!(!parse(&batch, 7, &mut out).unwrap(), "no NLMSG_DONE yet");
        let mapped = |a: [u8; 4]| {
            let mut m = [0u8; 16];
            m[10] = 0xff;
            m[11] = 0xff;
            m[12..].copy_from_slice(&a);
            m
        };
        assert_eq!(
            out,
            vec![
                Conn {
                    local: mapped([198, 18, 0, 5]),
                    local_port: 80,
                    remote: mapped([198, 18, 0, 9]),
                },
                Conn {
                    local: v6_local,
                    local_port: 443,
                    remote: v6_local,
                },
            ],
            "the message of another request is skipped"
        );
        assert!(parse(&msg(7, NLMSG_DONE, &[0; 4]), 7, &mut out).unwrap());
    }

    #[test]
    fn an_error_or_a_torn_message_is_an_error() {
        let e = parse(
            &msg(1, NLMSG_ERROR, &(-13i32).to_ne_bytes()),
            1,
            &mut vec![],
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(13));
        let mut torn = msg(1, SOCK_DIAG_BY_FAMILY, &diag(AF_INET, &[1; 4], 1, &[1; 4]));
        torn.truncate(40);
        assert!(parse(&torn, 1, &mut vec![]).is_err());
    }

    #[test]
    fn the_request_asks_for_every_open_tcp_socket_of_a_family() {
        let r = request(3, AF_INET6);
        assert_eq!(r.len(), 72);
        assert_eq!(&r[0..4], &72u32.to_ne_bytes());
        assert_eq!(&r[16..18], &[AF_INET6, IPPROTO_TCP]);
        assert_eq!(&r[20..24], &OPEN_STATES.to_ne_bytes());
        assert!(r[24..].iter().all(|b| *b == 0));
    }

    #[test]
    fn this_namespace_shows_an_open_loopback_connection_by_its_addresses() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let (server, from) = (listener.local_addr().unwrap(), client.local_addr().unwrap());
        let mapped = |a: std::net::SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let conns = open_connections().unwrap();
        let accepted = Conn {
            local: mapped(server),
            local_port: server.port(),
            remote: mapped(from),
        };
        assert!(conns.contains(&accepted), "{accepted:?} not in {conns:?}");
        let on_port = conns
            .iter()
            .filter(|c| c.local == accepted.local && c.local_port == server.port())
            .count();
        assert_eq!(
            on_port, 1,
            "the listener is not an open connection: {conns:?}"
        );
    }
}
