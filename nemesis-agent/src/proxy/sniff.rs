//! Recognises an HTTP/1.x request from a connection's first bytes, so that a refused
//! client gets a `503` it understands instead of a bare close. Pure: never reads a socket.

/// Request lines longer than this are not taken for HTTP (servers cap them near 8 KiB).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest method token we accept (`PROPPATCH`, `MKCALENDAR`, ... are all short).
const MAX_METHOD: usize = 32;
const VERSION: &[u8] = b"HTTP/1.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// `METHOD SP request-target SP HTTP/1.`
    Http1,
    /// Anything else (HTTP/2 preface, TLS, a binary protocol, nothing at all).
    Other,
    /// A prefix of a possible HTTP/1 request line: read more to decide.
    NeedMore,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classify the bytes a client sent first.
pub fn sniff(prefix: &[u8]) -> Sniff {
    let verdict = classify(prefix);
    if verdict == Sniff::NeedMore && prefix.len() >= MAX_REQUEST_LINE {
        Sniff::Other
    } else {
        verdict
    }
}

fn classify(prefix: &[u8]) -> Sniff {
    // method
    let method_len = prefix.iter().take_while(|b| is_tchar(**b)).count();
    if method_len > MAX_METHOD {
        return Sniff::Other;
    }
    let Some(&after_method) = prefix.get(method_len) else {
        return Sniff::NeedMore;
    };
    if method_len == 0 || after_method != b' ' {
        return Sniff::Other;
    }
    // request-target: visible ASCII up to the next space
    let rest = &prefix[method_len + 1..];
    let target_len = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    let Some(&after_target) = rest.get(target_len) else {
        return Sniff::NeedMore;
    };
    if target_len == 0 || after_target != b' ' {
        return Sniff::Other;
    }
    // version
    let version = &rest[target_len + 1..];
    let n = version.len().min(VERSION.len());
    if version[..n] != VERSION[..n] {
        Sniff::Other
    } else if n < VERSION.len() {
        Sniff::NeedMore
    } else {
        Sniff::Http1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines_are_recognised() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"POST /api/v1?x=1 HTTP/1.0\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1"), Sniff::Http1);
    }

    #[test]
    fn prefixes_of_a_request_line_need_more() {
        for p in [
            &b""[..],
            b"GE",
            b"GET",
            b"GET ",
            b"GET /x",
            b"GET /x ",
            b"GET /x HTTP/",
        ] {
            assert_eq!(
                sniff(p),
                Sniff::NeedMore,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn other_protocols_are_not_http1() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniff::Other);
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x00, 0xa5]), Sniff::Other); // TLS hello
        assert_eq!(sniff(b"PING\r\n"), Sniff::Other);
        assert_eq!(sniff(b"GET  / HTTP/1.1"), Sniff::Other);
        assert_eq!(sniff(b"GET / SPDY/3"), Sniff::Other);
        assert_eq!(sniff(b"\0\0\0\x08hello"), Sniff::Other);
    }

    #[test]
    fn an_endless_request_target_is_not_http() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(sniff(&line), Sniff::Other);
    }
}
