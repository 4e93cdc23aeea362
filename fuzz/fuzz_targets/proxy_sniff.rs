//! The buffering proxy's protocol sniffing: `sniff` (is this an HTTP/1 request line?,
//! asked of a refused connection's first bytes) and the follower of a forwarded
//! connection (HTTP/1, the HTTP/2 preface and frames, TLS and anything else spliced
//! untouched) fed a sequence of client and backend chunks, drain signals and polls.
//!
//! Input: `sniff` sees all of it; then it is read as operations `[op][len][len bytes]`.
//! While nothing asked the connection to step out, the follower may hold bytes back but
//! never change one: what it passes on is a prefix of what it was given.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nemesis_agent::proxy::sniff::sniff;
use nemesis_agent::proxy::{ProtocolFollower, Want};

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
    let mut follower = ProtocolFollower::default();
    let (mut client_in, mut client_out) = (Vec::new(), Vec::new());
    let (mut backend_in, mut backend_out) = (Vec::new(), Vec::new());
    let mut stayed = true;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        let want = match op >> 4 {
            0..=11 => Want::Stay,
            12..=13 => Want::StepOut,
            _ => Want::Shutdown,
        };
        stayed &= want == Want::Stay;
        match op % 4 {
            0 => {
                client_in.extend_from_slice(bytes);
                client_out.extend(follower.client_sent(bytes));
            }
            1 => {
                backend_in.extend_from_slice(bytes);
                backend_out.extend(follower.backend_sent(bytes, want).0);
            }
            2 => {
                let quiet = Duration::from_millis(u64::from(*len) * 100);
                backend_out.extend(follower.poll(want, quiet).0);
            }
            _ => backend_out.extend(follower.backend_closed()),
        }
        if stayed {
            assert!(client_in.starts_with(&client_out), "client bytes changed");
            assert!(
                backend_in.starts_with(&backend_out),
                "backend bytes changed"
            );
        }
    }
});
