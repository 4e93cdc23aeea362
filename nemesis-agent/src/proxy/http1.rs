//! Where an HTTP/1.x connection passing through the proxy may end: follows its requests
//! (client -> backend) and responses (backend -> client) by their framing (RFC 9112:
//! Content-Length, chunked, HEAD, 1xx, 204 and 304), and once asked to step out puts
//! `Connection: close` on the first response that answers the last request the client
//! sent, so that its next request opens a new connection. Pure: never reads a socket.
//! Anything it does not fully understand (an upgrade, CONNECT, a body delimited by the
//! close, a malformed head) makes it give up, and the rest passes untouched.

use super::drain::Want;
use std::collections::VecDeque;
use std::time::Duration;

/// A request or response head longer than this is not followed (servers cap request
/// heads near 8-16 KiB; 64 KiB is the proxy's per-connection hold buffer).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// A stopping agent closes a keep-alive connection quiet for this long (see `poll`).
/// Longer than the gap between the requests of a client in use (which then gets the
/// close on its next response), short beside a shutdown grace of seconds.
pub(crate) const IDLE_CLOSE_QUIET: Duration = Duration::from_secs(1);
/// Headers per head: httparse needs a fixed array; more than this is not followed.
const MAX_HEADERS: usize = 128;
/// Requests pipelined ahead of their responses; a client this far ahead is not followed.
const MAX_PENDING: usize = 256;
/// A chunk-size line (with extensions) or a trailer line longer than this is not followed.
const MAX_LINE: usize = 8 * 1024;

/// What the backend side of the exchange came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Keep following.
    Follow,
    /// No longer followed: everything from here on passes untouched.
    GaveUp(&'static str),
    /// The connection may end now: the response that carries `Connection: close` went
    /// out whole, or (stopping) the connection is idle between requests.
    Done(Ending),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    ConnectionClose,
    IdleClose,
}

// === message bodies ===

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunked),
}

#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data; how many of its two bytes were seen.
    DataEnd(u8),
    Trailers,
}

impl Chunked {
    /// Consumes the body from `bytes`: how many bytes it used, and whether it ended.
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ChunkState::Size | ChunkState::Trailers => {
                    let Some(nl) = bytes[i..].iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(&bytes[i..]);
                        if self.line.len() > MAX_LINE {
                            return Err("a chunk line too long");
                        }
                        return Ok((bytes.len(), false));
                    };
                    self.line.extend_from_slice(&bytes[i..=i + nl]);
                    i += nl + 1;
                    if self.line.len() > MAX_LINE {
                        return Err("a chunk line too long");
                    }
                    let line = std::mem::take(&mut self.line);
                    if self.state == ChunkState::Trailers {
                        if line == b"\r\n" {
                            *self = Chunked::default();
                            return Ok((i, true));
                        }
                        continue;
                    }
                    match httparse::parse_chunk_size(&line) {
                        Ok(httparse::Status::Complete((_, 0))) => self.state = ChunkState::Trailers,
                        Ok(httparse::Status::Complete((_, n))) => self.state = ChunkState::Data(n),
                        _ => return Err("a malformed chunk size"),
                    }
                }
                ChunkState::Data(n) => {
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = match n - take {
                        0 => ChunkState::DataEnd(0),
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if bytes[i] != want {
                        return Err("a chunk not ended by CRLF");
                    }
                    i += 1;
                    self.state = if seen == 0 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
            }
        }
        Ok((i, false))
    }
}

impl Body {
    /// Consumes the body from `bytes`: how many bytes it used, and whether it ended.
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
        match self {
            Body::Length(n) => {
                let take = (*n).min(bytes.len() as u64);
                *n -= take;
                Ok((take as usize, *n == 0))
            }
            Body::Chunked(c) => c.feed(bytes),
        }
    }
}

// === heads ===

fn header_values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The comma-separated tokens of every `name` header, trimmed and lower-cased.
fn tokens(headers: &[httparse::Header<'_>], name: &str) -> Vec<String> {
    header_values(headers, name)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// How a message's body is delimited, from its Transfer-Encoding and Content-Length;
/// `None` for a body delimited by the connection's close (or an invalid framing).
fn framing(headers: &[httparse::Header<'_>]) -> Result<Option<Body>, &'static str> {
    let te = tokens(headers, "transfer-encoding");
    let mut lengths =
        header_values(headers, "content-length").flat_map(|v| v.split(|b| *b == b','));
    if !te.is_empty() {
        if lengths.next().is_some() {
            // Both: what request smuggling looks like. Let the endpoints deal with it.
            return Err("both Transfer-Encoding and Content-Length");
        }
        return Ok((te.last().map(String::as_str) == Some("chunked"))
            .then(|| Body::Chunked(Chunked::default())));
    }
    let mut length: Option<u64> = None;
    for v in lengths {
        let v = std::str::from_utf8(v)
            .map_err(|_| "a malformed Content-Length")?
            .trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err("a malformed Content-Length");
        }
        let n: u64 = v.parse().map_err(|_| "a malformed Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Lengths");
        }
        length = Some(n);
    }
    Ok(length.map(Body::Length))
}

/// `head` (a complete response head) with `Connection: close` in place of its
/// `Connection` and `Keep-Alive` fields; other connection options are kept.
pub(crate) fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 19);
    let mut options = vec!["close".to_string()];
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    if let Some(status) = lines.next() {
        out.extend_from_slice(status);
        out.extend_from_slice(b"\r\n");
    }
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        if name == "connection" {
            let value = &line[line
                .iter()
                .position(|b| *b == b':')
                .map_or(line.len(), |p| p + 1)..];
            options.extend(
                String::from_utf8_lossy(value)
                    .split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| {
                        !t.is_empty()
                            && !t.eq_ignore_ascii_case("close")
                            && !t.eq_ignore_ascii_case("keep-alive")
                    }),
            );
        } else if name != "keep-alive" {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("Connection: {}\r\n\r\n", options.join(", ")).as_bytes());
    out
}

// === the exchange ===

#[derive(Debug)]
enum Side {
    /// Between messages.
    Between,
    /// Gathering a head.
    Head(Vec<u8>),
    Body(Body),
}

/// What the response to a request needs to know of it.
#[derive(Debug, Clone, Copy)]
struct Request {
    head: bool,
}

/// One HTTP/1.x connection, both ways.
#[derive(Debug)]
pub(crate) struct Http1 {
    request: Side,
    response: Side,
    /// Requests whose head went to the backend and whose final response has not begun.
    pending: VecDeque<Request>,
    /// Requests begun (a first byte seen) and final responses begun, since the start.
    started: u64,
    answered: u64,
    /// `Connection: close` went out on the response in flight.
    closing: bool,
    /// The client began a request after the closing response's: it and all that
    /// follows must not reach the backend.
    dropping: bool,
    gave_up: Option<&'static str>,
}

impl Default for Http1 {
    fn default() -> Self {
        Self {
            request: Side::Between,
            response: Side::Between,
            pending: VecDeque::new(),
            started: 0,
            answered: 0,
            closing: false,
            dropping: false,
            gave_up: None,
        }
    }
}

impl Http1 {
    pub(crate) fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
    }

    pub(crate) fn give_up(&mut self, why: &'static str) {
        if self.gave_up.is_none() {
            self.gave_up = Some(why);
        }
    }

    /// Client bytes on their way to the backend: how many of them to forward (fewer
    /// once a request begins after the closing response's; those never reach it).
    pub(crate) fn client_sent(&mut self, bytes: &[u8]) -> usize {
        if self.dropping {
            return 0;
        }
        let mut i = 0;
        while i < bytes.len() && self.gave_up.is_none() {
            match &mut self.request {
                Side::Between => {
                    // A server ignores empty lines before a request line (RFC 9112 2.2).
                    if matches!(bytes[i], b'\r' | b'\n') {
                        i += 1;
                        continue;
                    }
                    if self.closing {
                        self.dropping = true;
                        return i;
                    }
                    self.started += 1;
                    self.request = Side::Head(Vec::new());
                }
                Side::Head(buf) => {
                    let before = buf.len();
                    buf.extend_from_slice(&bytes[i..]);
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(buf) {
                        Ok(httparse::Status::Complete(n)) => {
                            i += n - before;
                            match request_framing(&req) {
                                Ok((request, body)) => {
                                    self.pending.push_back(request);
                                    if self.pending.len() > MAX_PENDING {
                                        self.give_up("too many pipelined requests");
                                    }
                                    self.request = match body {
                                        Some(body) => Side::Body(body),
                                        None => Side::Between,
                                    };
                                }
                                Err(why) => self.give_up(why),
                            }
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
                            i = bytes.len();
                        }
                        Ok(httparse::Status::Partial) => self.give_up("a request head too long"),
                        Err(_) => self.give_up("a malformed request head"),
                    }
                }
                Side::Body(body) => match body.feed(&bytes[i..]) {
                    Ok((used, ended)) => {
                        i += used;
                        if ended {
                            self.request = Side::Between;
                        }
                    }
                    Err(why) => self.give_up(why),
                },
            }
        }
        bytes.len()
    }

    /// Backend bytes on their way to the client: appends what to send to `out` (a
    /// response head is held back until it is whole, so that it can be changed).
    pub(crate) fn backend_sent(&mut self, bytes: &[u8], want: Want, out: &mut Vec<u8>) -> Step {
        let mut i = 0;
        while i < bytes.len() {
            if let Some(why) = self.gave_up {
                self.flush_head(out);
                out.extend_from_slice(&bytes[i..]);
                return Step::GaveUp(why);
            }
            match &mut self.response {
                Side::Between => self.response = Side::Head(Vec::new()),
                Side::Head(buf) => {
                    let before = buf.len();
                    buf.extend_from_slice(&bytes[i..]);
                    match ResponseHead::parse(buf) {
                        Parsed::Complete(n, info) => {
                            // The bytes after the head are still in `bytes`.
                            let mut head = std::mem::take(buf);
                            head.truncate(n);
                            i += n - before;
                            self.response = Side::Between;
                            match self.response_head(info, &head, want, out) {
                                Step::Follow => {}
                                step @ Step::GaveUp(_) => {
                                    out.extend_from_slice(&bytes[i..]);
                                    return step;
                                }
                                // A closing response without a body: nothing follows it.
                                step @ Step::Done(_) => return step,
                            }
                        }
                        Parsed::Partial if buf.len() <= MAX_HEAD => i = bytes.len(),
                        Parsed::Partial => {
                            i = bytes.len();
                            self.give_up("a response head too long");
                        }
                        Parsed::Invalid => {
                            i = bytes.len();
                            self.give_up("a malformed response head");
                        }
                    }
                }
                Side::Body(body) => match body.feed(&bytes[i..]) {
                    Ok((used, ended)) => {
                        out.extend_from_slice(&bytes[i..i + used]);
                        i += used;
                        if ended {
                            self.response = Side::Between;
                            if self.closing {
                                return Step::Done(Ending::ConnectionClose);
                            }
                        }
                    }
                    Err(why) => self.give_up(why),
                },
            }
        }
        match self.gave_up {
            Some(why) => {
                self.flush_head(out);
                Step::GaveUp(why)
            }
            None => Step::Follow,
        }
    }

    /// Nothing new from the backend, but the signal or the client side changed; the
    /// connection has been `quiet` (no byte either way) for that long.
    pub(crate) fn poll(&mut self, want: Want, quiet: Duration, out: &mut Vec<u8>) -> Step {
        if let Some(why) = self.gave_up {
            self.flush_head(out);
            return Step::GaveUp(why);
        }
        // Stopping: close a connection that has waited a while for its next request, as
        // servers do on a graceful shutdown. One in use gets the close on its next
        // response instead: closing it just as its client reuses it would fail that
        // request.
        if want == Want::Shutdown && self.idle() && quiet >= IDLE_CLOSE_QUIET {
            return Step::Done(Ending::IdleClose);
        }
        Step::Follow
    }

    /// Between requests, nothing pending either way.
    pub(crate) fn idle(&self) -> bool {
        self.gave_up.is_none()
            && matches!(self.request, Side::Between)
            && matches!(self.response, Side::Between)
            && self.pending.is_empty()
            && !self.closing
    }

    /// A response head (whole): decides its body and whether it carries the close.
    fn response_head(
        &mut self,
        info: ResponseHead,
        head: &[u8],
        want: Want,
        out: &mut Vec<u8>,
    ) -> Step {
        let give_up = |this: &mut Self, out: &mut Vec<u8>, why| {
            this.give_up(why);
            out.extend_from_slice(head);
            Step::GaveUp(why)
        };
        if info.code == 101 {
            return give_up(self, out, "a protocol switch");
        }
        if (100..200).contains(&info.code) {
            // Interim (100 Continue, 103 Early Hints): the final response follows.
            out.extend_from_slice(head);
            return Step::Follow;
        }
        let Some(request) = self.pending.pop_front() else {
            return give_up(self, out, "a response to no request");
        };
        self.answered += 1;
        let body = if request.head || info.code == 204 || info.code == 304 {
            None
        } else {
            match info.framing {
                Ok(Some(Body::Length(0))) => None,
                Ok(Some(body)) => Some(body),
                Ok(None) => return give_up(self, out, "a body delimited by the close"),
                Err(why) => return give_up(self, out, why),
            }
        };
        let backend_closes = info.connection.iter().any(|t| t == "close")
            || (info.http10 && !info.connection.iter().any(|t| t == "keep-alive"));
        // Only on the answer to the last request begun: a request pipelined behind it
        // would be cut off unanswered.
        if want != Want::Stay && !backend_closes && !self.closing && self.started == self.answered {
            self.closing = true;
            out.extend_from_slice(&with_connection_close(head));
        } else {
            out.extend_from_slice(head);
        }
        match body {
            Some(body) => {
                self.response = Side::Body(body);
                Step::Follow
            }
            None if self.closing => Step::Done(Ending::ConnectionClose),
            None => Step::Follow,
        }
    }

    fn flush_head(&mut self, out: &mut Vec<u8>) {
        if let Side::Head(buf) = &mut self.response {
            out.append(buf);
        }
    }
}

/// What a response head says, read while httparse borrows the bytes.
#[derive(Debug)]
struct ResponseHead {
    code: u16,
    http10: bool,
    connection: Vec<String>,
    framing: Result<Option<Body>, &'static str>,
}

enum Parsed {
    Complete(usize, ResponseHead),
    Partial,
    Invalid,
}

impl ResponseHead {
    fn parse(buf: &[u8]) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => Parsed::Complete(
                n,
                ResponseHead {
                    code: resp.code.unwrap_or(0),
                    http10: resp.version == Some(0),
                    connection: tokens(resp.headers, "connection"),
                    framing: framing(resp.headers),
                },
            ),
            Ok(httparse::Status::Partial) => Parsed::Partial,
            Err(_) => Parsed::Invalid,
        }
    }
}

/// What a request head says of itself and its body.
fn request_framing(
    req: &httparse::Request<'_, '_>,
) -> Result<(Request, Option<Body>), &'static str> {
    let method = req.method.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err("a CONNECT tunnel");
    }
    if header_values(req.headers, "upgrade").next().is_some() {
        return Err("a protocol upgrade");
    }
    // A request without Content-Length or Transfer-Encoding has no body (RFC 9112 6.3);
    // a transfer coding other than chunked last cannot be delimited.
    let body = match framing(req.headers)? {
        Some(Body::Length(0)) => None,
        Some(body) => Some(body),
        None if !tokens(req.headers, "transfer-encoding").is_empty() => {
            return Err("a request body without chunked framing");
        }
        None => None,
    };
    Ok((
        Request {
            head: method.eq_ignore_ascii_case("HEAD"),
        },
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    /// Runs one exchange: client chunks then backend chunks, each fed whole.
    fn exchange(h: &mut Http1, client: &[&[u8]], backend: &[&[u8]], want: Want) -> (Vec<u8>, Step) {
        for c in client {
            assert_eq!(h.client_sent(c), c.len());
        }
        let mut out = Vec::new();
        let mut step = Step::Follow;
        for b in backend {
            step = h.backend_sent(b, want, &mut out);
        }
        (out, step)
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn responses_pass_unchanged_while_the_connection_stays() {
        let mut h = Http1::default();
        let (out, step) = exchange(&mut h, &[GET], &[OK], Want::Stay);
        assert_eq!((out.as_slice(), step), (OK, Step::Follow));
    }

    #[test]
    fn the_response_in_flight_gets_connection_close_and_ends_the_connection() {
        let mut h = Http1::default();
        let (out, step) = exchange(
            &mut h,
            &[GET],
            &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhel", b"lo"],
            Want::StepOut,
        );
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        assert_eq!(step, Step::Done(Ending::ConnectionClose));
    }

    #[test]
    fn the_close_waits_for_the_end_of_the_body_in_every_framing() {
        // (request, response in pieces, body bytes after the head)
        type Case<'a> = (&'a [u8], &'a [&'a [u8]], &'a str);
        let cases: &[Case] = &[
            (
                GET,
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", b"a", b"bc"],
                "abc",
            ),
            (
                GET,
                &[
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                    b"c\r\n0;x=1\r\nTrailer: t\r\n",
                    b"\r\n",
                ],
                "3\r\nabc\r\n0;x=1\r\nTrailer: t\r\n\r\n",
            ),
            (
                b"HEAD / HTTP/1.1\r\n\r\n",
                &[b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"],
                "",
            ),
            (GET, &[b"HTTP/1.1 204 No Content\r\n\r\n"], ""),
            (
                GET,
                &[b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"],
                "",
            ),
        ];
        for (req, resp, body) in cases {
            let mut h = Http1::default();
            h.client_sent(req);
            let mut out = Vec::new();
            let mut steps = Vec::new();
            for piece in *resp {
                steps.push(h.backend_sent(piece, Want::StepOut, &mut out));
            }
            let last = steps.pop().unwrap();
            assert!(
                steps.iter().all(|s| *s == Step::Follow),
                "{steps:?} for {:?}",
                text(req)
            );
            assert_eq!(
                last,
                Step::Done(Ending::ConnectionClose),
                "{:?}",
                text(resp[0])
            );
            let out = text(&out);
            assert!(out.contains("\r\nConnection: close\r\n\r\n"), "{out}");
            assert!(out.ends_with(&format!("\r\n\r\n{body}")), "{out}");
        }
    }

    #[test]
    fn interim_responses_pass_and_the_final_one_closes() {
        let mut h = Http1::default();
        h.client_sent(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        let mut out = Vec::new();
        assert_eq!(
            h.backend_sent(b"HTTP/1.1 100 Continue\r\n\r\n", Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(text(&out), "HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(h.client_sent(b"hi"), 2);
        let step = h.backend_sent(
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            Want::StepOut,
            &mut out,
        );
        assert_eq!(step, Step::Done(Ending::ConnectionClose));
        assert!(
            text(&out).ends_with("201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        );
    }

    #[test]
    fn keep_alive_responses_are_followed_one_after_another() {
        let mut h = Http1::default();
        for _ in 0..3 {
            let (out, step) = exchange(&mut h, &[GET], &[OK], Want::Stay);
            assert_eq!((out.as_slice(), step), (OK, Step::Follow));
        }
        let (out, step) = exchange(&mut h, &[b"\r\n", GET], &[OK], Want::StepOut);
        assert!(text(&out).contains("Connection: close"));
        assert_eq!(step, Step::Done(Ending::ConnectionClose));
    }

    #[test]
    fn a_pipelined_request_defers_the_close_to_the_last_answer() {
        let mut h = Http1::default();
        assert_eq!(h.client_sent(&[GET, GET].concat()), 2 * GET.len());
        let mut out = Vec::new();
        // Two responses in one read: the first answers a request with another behind it.
        let step = h.backend_sent(&[OK, OK].concat(), Want::StepOut, &mut out);
        assert_eq!(step, Step::Done(Ending::ConnectionClose));
        let out = text(&out);
        assert_eq!(out.matches("Connection: close").count(), 1, "{out}");
        assert!(
            out.starts_with(&text(OK)),
            "the first passes as it was: {out}"
        );
    }

    #[test]
    fn a_request_begun_after_the_closing_response_never_reaches_the_backend() {
        let mut h = Http1::default();
        h.client_sent(GET);
        let mut out = Vec::new();
        // The close goes out with the head; the body is still on its way.
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(h.backend_sent(head, Want::StepOut, &mut out), Step::Follow);
        // A client that sent its next request before reading the close.
        assert_eq!(h.client_sent(b"\r\nGET /next HTTP/1.1\r\n\r\n"), 2);
        assert_eq!(h.client_sent(GET), 0);
        assert_eq!(
            h.backend_sent(b"hello", Want::StepOut, &mut out),
            Step::Done(Ending::ConnectionClose)
        );
    }

    #[test]
    fn a_request_body_is_forwarded_whole_even_after_the_close_went_out() {
        let mut h = Http1::default();
        h.client_sent(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab");
        let mut out = Vec::new();
        // An early answer (say, 413) while the body is still coming.
        h.backend_sent(
            b"HTTP/1.1 413 Too Large\r\nContent-Length: 1\r\n\r\n",
            Want::StepOut,
            &mut out,
        );
        assert_eq!(h.client_sent(b"cd\r\n0\r\n\r\n"), 9);
        assert_eq!(h.client_sent(GET), 0, "the next request is not");
    }

    #[test]
    fn a_response_head_split_anywhere_is_held_back_until_whole() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok";
        for split in 1..resp.len() {
            let mut h = Http1::default();
            h.client_sent(GET);
            let mut out = Vec::new();
            let first = h.backend_sent(&resp[..split], Want::StepOut, &mut out);
            let head_len = resp.len() - 2;
            if split < head_len {
                assert!(out.is_empty(), "split {split}: {:?}", text(&out));
                assert_eq!(first, Step::Follow);
            }
            let second = h.backend_sent(&resp[split..], Want::StepOut, &mut out);
            assert_eq!(
                text(&out),
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                "split {split}"
            );
            assert_eq!(second, Step::Done(Ending::ConnectionClose), "split {split}");
        }
    }

    #[test]
    fn a_backend_that_closes_itself_is_left_to_do_so() {
        let mut h = Http1::default();
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let (out, step) = exchange(&mut h, &[GET], &[resp], Want::StepOut);
        assert_eq!((out.as_slice(), step), (&resp[..], Step::Follow));
        let mut h = Http1::default();
        let resp = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (out, _) = exchange(&mut h, &[b"GET / HTTP/1.0\r\n\r\n"], &[resp], Want::StepOut);
        assert_eq!(
            out, resp,
            "an HTTP/1.0 response without keep-alive closes anyway"
        );
    }

    #[test]
    fn what_cannot_be_followed_is_given_up_and_passes_untouched() {
        let cases: &[(&[u8], &[u8], &str)] = &[
            (
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi",
                "a protocol upgrade",
            ),
            (
                b"CONNECT a:443 HTTP/1.1\r\n\r\n",
                b"HTTP/1.1 200 OK\r\n\r\n\x16\x03",
                "a CONNECT tunnel",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
                "a body delimited by the close",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                "conflicting Content-Lengths",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz",
                "a body delimited by the close",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "a malformed chunk size",
            ),
            (
                GET,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab",
                "a chunk not ended by CRLF",
            ),
            (GET, b"HTTP/9 OK\r\n\r\n", "a malformed response head"),
            (
                b"",
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                "a response to no request",
            ),
        ];
        for (req, resp, why) in cases {
            let mut h = Http1::default();
            h.client_sent(req);
            let mut out = Vec::new();
            // (Asked to step out, a head could carry the close before its body turns
            // out malformed; harmless, the client then reconnects after the response.)
            let step = h.backend_sent(resp, Want::Stay, &mut out);
            assert_eq!(step, Step::GaveUp(why), "{:?}", text(resp));
            assert_eq!(out, *resp, "untouched: {:?}", text(resp));
            // And from then on everything passes.
            assert_eq!(h.client_sent(GET), GET.len());
            let mut more = Vec::new();
            assert_eq!(
                h.backend_sent(OK, Want::StepOut, &mut more),
                Step::GaveUp(why)
            );
            assert_eq!(more, OK);
        }
    }

    #[test]
    fn a_half_received_head_is_flushed_when_the_client_side_gives_up() {
        let mut h = Http1::default();
        h.client_sent(GET);
        let mut out = Vec::new();
        h.backend_sent(b"HTTP/1.1 200 OK\r\nConte", Want::Stay, &mut out);
        assert!(out.is_empty());
        // The client's next request upgrades, while the response head is half here.
        h.client_sent(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n");
        assert_eq!(
            h.poll(Want::Stay, Duration::ZERO, &mut out),
            Step::GaveUp("a protocol upgrade")
        );
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nConte");
    }

    #[test]
    fn a_stopping_agent_closes_only_connections_idle_for_a_while() {
        let quiet = IDLE_CLOSE_QUIET;
        let mut h = Http1::default();
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::Shutdown, quiet, &mut out),
            Step::Done(Ending::IdleClose)
        );
        assert_eq!(
            h.poll(Want::Shutdown, quiet / 2, &mut out),
            Step::Follow,
            "just used: its next request may be on its way"
        );
        assert_eq!(
            h.poll(Want::StepOut, quiet, &mut out),
            Step::Follow,
            "warm: wait for a request"
        );
        h.client_sent(GET);
        assert_eq!(
            h.poll(Want::Shutdown, quiet, &mut out),
            Step::Follow,
            "a request is in flight"
        );
        h.backend_sent(OK, Want::Stay, &mut out);
        assert_eq!(
            h.poll(Want::Shutdown, quiet, &mut out),
            Step::Done(Ending::IdleClose)
        );
        assert!(text(&out) == text(OK));
    }

    #[test]
    fn connection_options_other_than_keep_alive_are_kept() {
        let head =
            b"HTTP/1.1 200 OK\nConnection: keep-alive, x-trace\nKeep-Alive: timeout=5\nX-A: 1\n\n";
        assert_eq!(
            text(&with_connection_close(head)),
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close, x-trace\r\n\r\n"
        );
    }
}
