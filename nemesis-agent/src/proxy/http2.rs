//! Where a cleartext HTTP/2 connection (prior knowledge, RFC 9113 3.3) passing through
//! the proxy may end: follows the frame headers both ways to know which streams are
//! open, and once asked to step out shuts the connection down the way servers do
//! gracefully (RFC 9113 6.8): a GOAWAY naming the highest possible stream with a PING
//! behind it, so the client opens no new stream here while every stream it already
//! opened is still served; once the PING's answer is back (every stream opened before
//! the notice has arrived) and no stream is open, the final GOAWAY naming the last
//! stream, at a frame boundary. Pure: never reads a socket, never looks inside a payload
//! but its own PING's answer (which the backend never sent, so never gets). Server push,
//! a GOAWAY from either side or a malformed preface make it give up (the rest passes
//! untouched).

use super::drain::Want;
use std::collections::HashMap;

/// What a client sends first on a prior-knowledge HTTP/2 connection.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The GOAWAY that announces a shutdown: every stream the client may have opened
/// meanwhile is still processed (RFC 9113 6.8).
const MAX_STREAM: u32 = 0x7fff_ffff;
/// Open streams followed at once; more than any server's SETTINGS_MAX_CONCURRENT_STREAMS
/// in practice (100-250), and a bound on this follower's memory.
const MAX_STREAMS: usize = 4096;

/// What the backend side of the connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Follow,
    /// No longer followed: everything from here on passes untouched.
    GaveUp(&'static str),
    /// The final GOAWAY went into `out`: the connection may end once it is sent.
    Done,
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(h: &[u8]) -> Self {
        FrameHead {
            len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_STREAM,
        }
    }
}

/// Frame boundaries in one direction's bytes.
#[derive(Debug)]
struct Frames {
    /// Bytes of the connection preface still expected (client side only).
    preface_left: usize,
    /// A frame header being gathered (held back until whole, client side), or a whole
    /// frame being captured.
    held: Vec<u8>,
    /// How many of `held` already went out (those replayed after detection).
    held_sent: usize,
    payload_left: usize,
    capturing: bool,
    /// Frames seen so far.
    seen: u64,
}

impl Frames {
    fn new(preface: bool) -> Self {
        Self {
            preface_left: if preface { PREFACE.len() } else { 0 },
            held: Vec::with_capacity(FRAME_HEAD),
            held_sent: 0,
            payload_left: 0,
            capturing: false,
            seen: 0,
        }
    }

    fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.held.is_empty() && self.payload_left == 0
    }

    /// Moves `held` (less what already went) to `out`.
    fn release(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held[self.held_sent.min(self.held.len())..]);
        self.held.clear();
        self.held_sent = 0;
    }
}

/// Which halves of an open stream are done.
#[derive(Debug, Default, Clone, Copy)]
struct Halves {
    client: bool,
    backend: bool,
}

/// How far the graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Following,
    /// The first GOAWAY and the PING went out; waiting for the PING's answer.
    Announced,
    /// The answer came: the client opens no more streams here.
    Acked,
    /// The final GOAWAY went out: nothing more reaches the backend.
    Closed,
}

/// One HTTP/2 connection, both ways.
#[derive(Debug)]
pub(crate) struct Http2 {
    client: Frames,
    backend: Frames,
    streams: HashMap<u32, Halves>,
    /// The highest stream the client opened: the final GOAWAY's last stream.
    last_stream: u32,
    /// A header block is being continued (CONTINUATION frames must follow at once).
    client_block: bool,
    backend_block: bool,
    phase: Phase,
    /// The payload of this connection's PING (told apart from the backend's own).
    ping: [u8; 8],
    gave_up: Option<&'static str>,
}

impl Default for Http2 {
    fn default() -> Self {
        Self {
            client: Frames::new(true),
            backend: Frames::new(false),
            streams: HashMap::new(),
            last_stream: 0,
            client_block: false,
            backend_block: false,
            phase: Phase::Following,
            ping: rand::random(),
            gave_up: None,
        }
    }
}

/// A GOAWAY frame: no error, `last_stream` the highest stream that was processed.
pub(crate) fn goaway(last_stream: u32) -> [u8; FRAME_HEAD + 8] {
    let mut f = [0u8; FRAME_HEAD + 8];
    f[2] = 8;
    f[3] = GOAWAY;
    f[FRAME_HEAD..FRAME_HEAD + 4].copy_from_slice(&(last_stream & MAX_STREAM).to_be_bytes());
    f
}

/// A PING frame with `payload`, asking for an answer (or answering, with `ack`).
pub(crate) fn ping(payload: [u8; 8], ack: bool) -> [u8; FRAME_HEAD + 8] {
    let mut f = [0u8; FRAME_HEAD + 8];
    f[2] = 8;
    f[3] = PING;
    f[4] = if ack { ACK } else { 0 };
    f[FRAME_HEAD..].copy_from_slice(&payload);
    f
}

impl Http2 {
    pub(crate) fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
    }

    /// The shutdown was announced: the client leaves by itself once its streams are
    /// done (a client with none may close at once, before answering the PING).
    pub(crate) fn announced(&self) -> bool {
        self.phase != Phase::Following
    }

    fn give_up(&mut self, why: &'static str) {
        if self.gave_up.is_none() {
            self.gave_up = Some(why);
        }
    }

    fn end_half(&mut self, stream: u32, client: bool) {
        if let Some(h) = self.streams.get_mut(&stream) {
            if client {
                h.client = true;
            } else {
                h.backend = true;
            }
            if h.client && h.backend {
                self.streams.remove(&stream);
            }
        }
    }

    /// Client bytes on their way to the backend: appends to `out` what goes on (all but
    /// the answer to this connection's own PING; nothing once the final GOAWAY went out).
    /// A frame header is held back until whole.
    pub(crate) fn client_sent(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.phase == Phase::Closed {
            return;
        }
        let mut i = 0;
        while i < bytes.len() {
            if self.gave_up.is_some() {
                self.client.release(out);
                out.extend_from_slice(&bytes[i..]);
                return;
            }
            let rest = &bytes[i..];
            let c = &mut self.client;
            if c.preface_left > 0 {
                let at = PREFACE.len() - c.preface_left;
                let n = c.preface_left.min(rest.len());
                if rest[..n] != PREFACE[at..at + n] {
                    self.give_up("not an HTTP/2 connection preface");
                    continue;
                }
                c.preface_left -= n;
                out.extend_from_slice(&rest[..n]);
                i += n;
            } else if c.payload_left > 0 {
                let n = c.payload_left.min(rest.len());
                if c.capturing {
                    c.held.extend_from_slice(&rest[..n]);
                } else {
                    out.extend_from_slice(&rest[..n]);
                }
                c.payload_left -= n;
                i += n;
                if c.capturing && c.payload_left == 0 {
                    c.capturing = false;
                    if c.held[FRAME_HEAD..] == self.ping {
                        // The answer to our PING: the backend never sent one.
                        c.held.clear();
                        c.held_sent = 0;
                        self.phase = Phase::Acked;
                    } else {
                        c.release(out);
                    }
                }
            } else {
                let n = (FRAME_HEAD - c.held.len()).min(rest.len());
                c.held.extend_from_slice(&rest[..n]);
                i += n;
                if c.held.len() < FRAME_HEAD {
                    continue;
                }
                let head = FrameHead::parse(&c.held);
                c.payload_left = head.len;
                c.seen += 1;
                c.capturing = self.phase == Phase::Announced
                    && head.kind == PING
                    && head.flags & ACK != 0
                    && head.len == 8
                    && c.held_sent == 0;
                if !c.capturing {
                    c.release(out);
                }
                if let Err(why) = self.client_frame(head) {
                    self.give_up(why);
                }
            }
        }
    }

    /// Client bytes that already went to the backend (while the protocol was being
    /// recognised): followed, never sent again.
    pub(crate) fn client_replayed(&mut self, bytes: &[u8]) {
        self.client_sent(bytes, &mut Vec::new());
        self.client.held_sent = self.client.held.len();
    }

    fn client_frame(&mut self, f: FrameHead) -> Result<(), &'static str> {
        match f.kind {
            HEADERS => {
                if !self.streams.contains_key(&f.stream)
                    && f.stream % 2 == 1
                    && f.stream > self.last_stream
                {
                    self.last_stream = f.stream;
                    self.streams.insert(f.stream, Halves::default());
                    if self.streams.len() > MAX_STREAMS {
                        return Err("too many open streams");
                    }
                }
                self.client_block = f.flags & END_HEADERS == 0;
                if f.flags & END_STREAM != 0 {
                    self.end_half(f.stream, true);
                }
            }
            CONTINUATION => self.client_block = f.flags & END_HEADERS == 0,
            DATA if f.flags & END_STREAM != 0 => self.end_half(f.stream, true),
            RST_STREAM => {
                self.streams.remove(&f.stream);
            }
            PUSH_PROMISE => return Err("a PUSH_PROMISE from the client"),
            GOAWAY => return Err("the client is closing the connection"),
            _ => {}
        }
        Ok(())
    }

    fn backend_frame(&mut self, f: FrameHead) -> Result<(), &'static str> {
        match f.kind {
            HEADERS => {
                self.backend_block = f.flags & END_HEADERS == 0;
                if f.flags & END_STREAM != 0 {
                    self.end_half(f.stream, false);
                }
            }
            CONTINUATION => self.backend_block = f.flags & END_HEADERS == 0,
            DATA if f.flags & END_STREAM != 0 => self.end_half(f.stream, false),
            RST_STREAM => {
                self.streams.remove(&f.stream);
            }
            PUSH_PROMISE => return Err("server push"),
            GOAWAY => return Err("the backend is closing the connection itself"),
            _ => {}
        }
        Ok(())
    }

    /// Backend bytes on their way to the client, appended to `out` unchanged; the
    /// shutdown's frames follow them when it may go on.
    pub(crate) fn backend_sent(&mut self, bytes: &[u8], want: Want, out: &mut Vec<u8>) -> Step {
        out.extend_from_slice(bytes);
        if let Some(why) = self.gave_up {
            return Step::GaveUp(why);
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let b = &mut self.backend;
            if b.payload_left > 0 {
                let n = b.payload_left.min(rest.len());
                b.payload_left -= n;
                rest = &rest[n..];
                continue;
            }
            let n = (FRAME_HEAD - b.held.len()).min(rest.len());
            b.held.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if b.held.len() == FRAME_HEAD {
                let head = FrameHead::parse(&b.held);
                b.held.clear();
                b.payload_left = head.len;
                b.seen += 1;
                if let Err(why) = self.backend_frame(head) {
                    self.give_up(why);
                    return Step::GaveUp(why);
                }
            }
        }
        self.poll(want, out)
    }

    /// Nothing new from the backend, but the signal or the client side changed.
    pub(crate) fn poll(&mut self, want: Want, out: &mut Vec<u8>) -> Step {
        if let Some(why) = self.gave_up {
            return Step::GaveUp(why);
        }
        // A frame of ours goes only between the backend's frames, outside a header
        // block, and after the client's preface and the backend's SETTINGS.
        let can_insert = self.client.preface_left == 0
            && self.backend.seen > 0
            && self.backend.at_boundary()
            && !self.backend_block;
        match self.phase {
            Phase::Following if want != Want::Stay && can_insert => {
                out.extend_from_slice(&goaway(MAX_STREAM));
                out.extend_from_slice(&ping(self.ping, false));
                self.phase = Phase::Announced;
                Step::Follow
            }
            Phase::Acked if can_insert && self.streams.is_empty() && !self.client_block => {
                out.extend_from_slice(&goaway(self.last_stream));
                self.phase = Phase::Closed;
                Step::Done
            }
            _ => Step::Follow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const SETTINGS: u8 = 0x4;

    fn client_start() -> Vec<u8> {
        [PREFACE, &frame(SETTINGS, 0, 0, &[0; 6])].concat()
    }

    fn backend_settings() -> Vec<u8> {
        frame(SETTINGS, 0, 0, &[0; 12])
    }

    /// What the client's bytes become on their way to the backend.
    fn client(h: &mut Http2, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        h.client_sent(bytes, &mut out);
        out
    }

    /// A connection where the client opened stream 1 and the backend answered it whole.
    fn answered_once(h: &mut Http2) {
        let start = [
            client_start(),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hpack"),
        ]
        .concat();
        assert_eq!(client(h, &start), start);
        let mut out = Vec::new();
        assert_eq!(
            h.backend_sent(&backend_settings(), Want::Stay, &mut out),
            Step::Follow
        );
        let answer = [
            frame(HEADERS, END_HEADERS, 1, b"hp"),
            frame(DATA, END_STREAM, 1, b"body"),
        ]
        .concat();
        assert_eq!(h.backend_sent(&answer, Want::Stay, &mut out), Step::Follow);
    }

    /// Asks `h` to step out: the announcing GOAWAY and PING come out; returns the PING's
    /// answer as the client would send it.
    fn announce(h: &mut Http2) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Follow);
        assert_eq!(out.len(), 34, "{out:?}");
        assert_eq!(&out[..17], &goaway(MAX_STREAM));
        assert_eq!(&out[17..26], &[0, 0, 8, PING, 0, 0, 0, 0, 0]);
        let payload: [u8; 8] = out[26..].try_into().unwrap();
        ping(payload, true).to_vec()
    }

    #[test]
    fn the_shutdown_announces_then_closes_once_the_ping_is_answered() {
        let mut h = Http2::default();
        answered_once(&mut h);
        let ack = announce(&mut h);
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::StepOut, &mut out),
            Step::Follow,
            "not before the answer"
        );
        assert!(out.is_empty());
        // The answer never reaches the backend, whatever pieces it comes in.
        assert_eq!(client(&mut h, &ack[..4]), b"");
        assert_eq!(client(&mut h, &ack[4..]), b"");
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(1), "the final GOAWAY names the last stream");
        assert_eq!(
            &out[9..],
            &[0, 0, 0, 1, 0, 0, 0, 0],
            "last stream 1, NO_ERROR"
        );
        // Whatever the client sends after it never reaches the backend.
        assert_eq!(client(&mut h, &frame(HEADERS, END_HEADERS, 3, b"x")), b"");
    }

    #[test]
    fn streams_opened_before_the_answer_are_served_and_delay_the_final_goaway() {
        let mut h = Http2::default();
        answered_once(&mut h);
        let ack = announce(&mut h);
        // Stream 3 was on its way before the client read the announcement.
        let open = frame(HEADERS, END_HEADERS, 3, b"h");
        assert_eq!(
            client(&mut h, &open),
            open,
            "forwarded: it will be processed"
        );
        assert_eq!(client(&mut h, &ack), b"");
        let mut out = Vec::new();
        let resp = [
            frame(HEADERS, END_HEADERS, 3, b"h"),
            frame(DATA, END_STREAM, 3, b"done"),
        ]
        .concat();
        assert_eq!(h.backend_sent(&resp, Want::StepOut, &mut out), Step::Follow);
        assert_eq!(out, resp, "the client's half of stream 3 is still open");
        let last = frame(DATA, END_STREAM, 3, b"last");
        assert_eq!(client(&mut h, &last), last);
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(3));
    }

    #[test]
    fn the_backends_own_pings_and_their_answers_pass() {
        let mut h = Http2::default();
        answered_once(&mut h);
        let ack = announce(&mut h);
        let theirs = ping(*b"backend!", true);
        assert_eq!(client(&mut h, &theirs), theirs, "not our answer: forwarded");
        assert_eq!(client(&mut h, &ack), b"");
    }

    #[test]
    fn the_final_goaway_follows_the_frame_that_ends_the_last_stream() {
        let mut h = Http2::default();
        let start = [
            client_start(),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, b"h"),
        ]
        .concat();
        client(&mut h, &start);
        let mut out = Vec::new();
        h.backend_sent(&backend_settings(), Want::Stay, &mut out);
        let ack = announce(&mut h);
        client(&mut h, &ack);
        let body = frame(DATA, END_STREAM, 1, b"0123456789");
        let mut out = Vec::new();
        // The last frame in pieces: its header ends the stream, but nothing may go
        // before the rest of its payload.
        assert_eq!(
            h.backend_sent(&body[..12], Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(
            h.backend_sent(&body[12..], Want::StepOut, &mut out),
            Step::Done
        );
        assert_eq!(out, [body, goaway(1).to_vec()].concat());
    }

    #[test]
    fn nothing_is_sent_mid_frame_or_mid_header_block() {
        let mut h = Http2::default();
        answered_once(&mut h);
        let mut out = Vec::new();
        // A PING from the backend, half here.
        let theirs = frame(PING, 0, 0, &[1; 8]);
        assert_eq!(
            h.backend_sent(&theirs[..5], Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Follow);
        assert_eq!(out, &theirs[..5], "no announcement inside a frame");
        assert_eq!(
            h.backend_sent(&theirs[5..], Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(
            out.len(),
            theirs.len() + 34,
            "the announcement right after it"
        );

        // A client header block continued: the stream is open anyway, and the block
        // must not be split.
        let mut h = Http2::default();
        answered_once(&mut h);
        let ack = announce(&mut h);
        client(&mut h, &frame(HEADERS, 0, 3, b"h"));
        client(&mut h, &ack);
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Follow);
        client(&mut h, &frame(CONTINUATION, END_HEADERS, 3, b"h"));
        client(&mut h, &frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(3));
    }

    #[test]
    fn no_announcement_before_the_backend_spoke_or_while_asked_to_stay() {
        let mut h = Http2::default();
        client(&mut h, &client_start());
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::Shutdown, &mut out),
            Step::Follow,
            "no SETTINGS from the backend yet"
        );
        assert!(out.is_empty());
        assert_eq!(
            h.backend_sent(&backend_settings(), Want::Stay, &mut out),
            Step::Follow
        );
        assert_eq!(h.poll(Want::Stay, &mut out), Step::Follow);
        assert_eq!(out, backend_settings());
        let ack = announce(&mut h);
        client(&mut h, &ack);
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::Shutdown, &mut out),
            Step::Done,
            "an idle connection"
        );
        assert_eq!(out, goaway(0));
    }

    #[test]
    fn a_frame_header_replayed_after_detection_is_not_sent_twice() {
        let mut h = Http2::default();
        let start = client_start();
        let headers = frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hp");
        // Detection forwarded the preface, SETTINGS and four bytes of a header.
        h.client_replayed(&[start.as_slice(), &headers[..4]].concat());
        assert_eq!(client(&mut h, &headers[4..]), &headers[4..]);
        assert_eq!(h.last_stream, 1);
    }

    #[test]
    fn what_cannot_be_followed_is_given_up() {
        let mut h = Http2::default();
        let bad = b"PRI * HTTP/2.0\r\n\r\nXX";
        assert_eq!(client(&mut h, bad), bad);
        assert_eq!(h.gave_up(), Some("not an HTTP/2 connection preface"));

        let mut h = Http2::default();
        answered_once(&mut h);
        let mut out = Vec::new();
        let push = frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]);
        assert_eq!(
            h.backend_sent(&push, Want::StepOut, &mut out),
            Step::GaveUp("server push")
        );
        assert_eq!(out, push);

        let mut h = Http2::default();
        answered_once(&mut h);
        let mut out = Vec::new();
        let away = goaway(1);
        let why = "the backend is closing the connection itself";
        assert_eq!(
            h.backend_sent(&away, Want::Stay, &mut out),
            Step::GaveUp(why)
        );
        let mut more = Vec::new();
        assert_eq!(
            h.backend_sent(b"anything", Want::StepOut, &mut more),
            Step::GaveUp(why)
        );
        assert_eq!(more, b"anything");
        assert_eq!(client(&mut h, b"anything"), b"anything");
    }
}
