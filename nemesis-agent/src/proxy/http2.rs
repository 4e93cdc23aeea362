//! Where a cleartext HTTP/2 connection (prior knowledge, RFC 9113 3.3) passing through
//! the proxy may end: follows the frame headers both ways to know which streams are
//! open, and once asked to step out sends the client a GOAWAY (NO_ERROR, naming the last
//! stream the backend got) as soon as no stream is open, at a frame boundary; after it,
//! no client frame reaches the backend, so a stream the client opened in the meantime
//! is one the GOAWAY says was never processed, and the client retries it elsewhere.
//! Pure: never reads a socket, never looks inside a payload. Server push, a GOAWAY from
//! either side, or a malformed preface make it give up (the rest passes untouched).

use super::drain::Want;
use std::collections::HashMap;

/// What a client sends first on a prior-knowledge HTTP/2 connection.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// Open streams followed at once; more than any server's SETTINGS_MAX_CONCURRENT_STREAMS
/// in practice (100-250), and a bound on this follower's memory.
const MAX_STREAMS: usize = 4096;

/// What the backend side of the connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Follow,
    /// No longer followed: everything from here on passes untouched.
    GaveUp(&'static str),
    /// A GOAWAY went into `out`: the connection may end once it is sent.
    Done,
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Frame boundaries in one direction's bytes.
#[derive(Debug)]
struct Frames {
    /// Bytes of the connection preface still expected (client side only).
    preface_left: usize,
    head: [u8; FRAME_HEAD],
    have: usize,
    payload_left: usize,
    /// Frames seen so far.
    seen: u64,
}

impl Frames {
    fn new(preface: bool) -> Self {
        Self {
            preface_left: if preface { PREFACE.len() } else { 0 },
            head: [0; FRAME_HEAD],
            have: 0,
            payload_left: 0,
            seen: 0,
        }
    }

    fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.have == 0 && self.payload_left == 0
    }

    /// Reads `bytes`, handing each complete frame header to `frame`.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut frame: impl FnMut(FrameHead) -> Result<(), &'static str>,
    ) -> Result<(), &'static str> {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let at = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(bytes.len());
                if bytes[..n] != PREFACE[at..at + n] {
                    return Err("not an HTTP/2 connection preface");
                }
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEAD - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEAD {
                    let h = self.head;
                    self.have = 0;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    self.seen += 1;
                    frame(FrameHead {
                        kind: h[3],
                        flags: h[4],
                        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// Which halves of an open stream are done.
#[derive(Debug, Default, Clone, Copy)]
struct Halves {
    client: bool,
    backend: bool,
}

/// One HTTP/2 connection, both ways.
#[derive(Debug)]
pub(crate) struct Http2 {
    client: Frames,
    backend: Frames,
    streams: HashMap<u32, Halves>,
    /// The highest stream the client opened: the GOAWAY's last stream.
    last_stream: u32,
    /// A header block is being continued (CONTINUATION frames must follow at once).
    client_block: bool,
    backend_block: bool,
    goaway_sent: bool,
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
            goaway_sent: false,
            gave_up: None,
        }
    }
}

/// The GOAWAY frame: no error, `last_stream` the highest stream that was processed.
pub(crate) fn goaway(last_stream: u32) -> [u8; FRAME_HEAD + 8] {
    let mut f = [0u8; FRAME_HEAD + 8];
    f[2] = 8;
    f[3] = GOAWAY;
    f[FRAME_HEAD..FRAME_HEAD + 4].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f
}

impl Http2 {
    pub(crate) fn gave_up(&self) -> Option<&'static str> {
        self.gave_up
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

    /// Client bytes on their way to the backend: how many of them to forward (none
    /// once the GOAWAY went out).
    pub(crate) fn client_sent(&mut self, bytes: &[u8]) -> usize {
        if self.goaway_sent {
            return 0;
        }
        if self.gave_up.is_some() {
            return bytes.len();
        }
        let mut client = std::mem::replace(&mut self.client, Frames::new(false));
        let result = client.feed(bytes, |f| self.client_frame(f));
        self.client = client;
        if let Err(why) = result {
            self.give_up(why);
        }
        bytes.len()
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

    /// Backend bytes on their way to the client, appended to `out` unchanged; a GOAWAY
    /// follows them when the connection may step out.
    pub(crate) fn backend_sent(&mut self, bytes: &[u8], want: Want, out: &mut Vec<u8>) -> Step {
        out.extend_from_slice(bytes);
        if let Some(why) = self.gave_up {
            return Step::GaveUp(why);
        }
        let mut backend = std::mem::replace(&mut self.backend, Frames::new(false));
        let result = backend.feed(bytes, |f| self.backend_frame(f));
        self.backend = backend;
        if let Err(why) = result {
            self.give_up(why);
            return Step::GaveUp(why);
        }
        self.poll(want, out)
    }

    /// Nothing new from the backend, but the signal or the client side changed.
    pub(crate) fn poll(&mut self, want: Want, out: &mut Vec<u8>) -> Step {
        if let Some(why) = self.gave_up {
            return Step::GaveUp(why);
        }
        let can_end = want != Want::Stay
            && !self.goaway_sent
            && self.streams.is_empty()
            // The client's preface and the backend's SETTINGS came first, and neither
            // side is in the middle of a frame or a header block.
            && self.client.preface_left == 0
            && self.backend.seen > 0
            && self.backend.at_boundary()
            && !self.backend_block
            && !self.client_block;
        if !can_end {
            return Step::Follow;
        }
        self.goaway_sent = true;
        out.extend_from_slice(&goaway(self.last_stream));
        Step::Done
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

    /// A connection where the client opened stream 1 and the backend answered it whole.
    fn answered_once(h: &mut Http2) {
        let start = [
            client_start(),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, b"hpack"),
        ]
        .concat();
        assert_eq!(h.client_sent(&start), start.len());
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

    #[test]
    fn goaway_goes_out_once_no_stream_is_open_and_names_the_last_stream() {
        let mut h = Http2::default();
        answered_once(&mut h);
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(1));
        assert_eq!(&out[..9], &[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        assert_eq!(
            &out[9..],
            &[0, 0, 0, 1, 0, 0, 0, 0],
            "last stream 1, NO_ERROR"
        );
        // Whatever the client sends after it never reaches the backend.
        assert_eq!(h.client_sent(&frame(HEADERS, END_HEADERS, 3, b"x")), 0);
    }

    #[test]
    fn an_open_stream_delays_the_goaway_until_both_halves_end() {
        let mut h = Http2::default();
        answered_once(&mut h);
        // Stream 3: a request body still streaming up.
        h.client_sent(&frame(HEADERS, END_HEADERS, 3, b"h"));
        let mut out = Vec::new();
        let resp = [
            frame(HEADERS, END_HEADERS, 3, b"h"),
            frame(DATA, END_STREAM, 3, b"done"),
        ]
        .concat();
        assert_eq!(h.backend_sent(&resp, Want::StepOut, &mut out), Step::Follow);
        assert_eq!(out, resp, "the client's half is still open");
        h.client_sent(&frame(DATA, END_STREAM, 3, b"last"));
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(3));
    }

    #[test]
    fn the_goaway_follows_the_frame_that_ends_the_last_stream() {
        let mut h = Http2::default();
        let start = [
            client_start(),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, b"h"),
        ]
        .concat();
        h.client_sent(&start);
        let mut out = Vec::new();
        h.backend_sent(&backend_settings(), Want::StepOut, &mut out);
        assert_eq!(out, backend_settings(), "stream 1 is open");
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
        let ping = frame(0x6, 0, 0, &[1; 8]);
        assert_eq!(
            h.backend_sent(&ping[..5], Want::StepOut, &mut out),
            Step::Follow
        );
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Follow);
        assert_eq!(
            h.backend_sent(&ping[5..], Want::StepOut, &mut out),
            Step::Done
        );
        assert_eq!(out, [ping, goaway(1).to_vec()].concat());

        // A client header block continued: the stream is open anyway, and the block
        // must not be split.
        let mut h = Http2::default();
        answered_once(&mut h);
        h.client_sent(&frame(HEADERS, 0, 3, b"h"));
        let mut out = Vec::new();
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Follow);
        h.client_sent(&frame(CONTINUATION, END_HEADERS, 3, b"h"));
        h.client_sent(&frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        assert_eq!(h.poll(Want::StepOut, &mut out), Step::Done);
        assert_eq!(out, goaway(3));
    }

    #[test]
    fn no_goaway_before_the_backend_spoke_or_while_asked_to_stay() {
        let mut h = Http2::default();
        h.client_sent(&client_start());
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::Shutdown, &mut out),
            Step::Follow,
            "no SETTINGS from the backend yet"
        );
        assert_eq!(
            h.backend_sent(&backend_settings(), Want::Stay, &mut out),
            Step::Follow
        );
        assert_eq!(h.poll(Want::Stay, &mut out), Step::Follow);
        let mut out = Vec::new();
        assert_eq!(
            h.poll(Want::Shutdown, &mut out),
            Step::Done,
            "an idle connection"
        );
        assert_eq!(out, goaway(0));
    }

    #[test]
    fn what_cannot_be_followed_is_given_up() {
        let mut h = Http2::default();
        let bad = b"PRI * HTTP/2.0\r\n\r\nXX";
        assert_eq!(h.client_sent(bad), bad.len());
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
        assert_eq!(
            h.backend_sent(&away, Want::Stay, &mut out),
            Step::GaveUp("the backend is closing the connection itself")
        );
        let mut more = Vec::new();
        assert_eq!(
            h.backend_sent(b"anything", Want::StepOut, &mut more),
            Step::GaveUp("the backend is closing the connection itself")
        );
        assert_eq!(more, b"anything");
    }
}
