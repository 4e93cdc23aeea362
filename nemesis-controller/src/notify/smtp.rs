//! A small SMTP client (RFC 5321): EHLO, optional AUTH PLAIN, MAIL, RCPT, DATA with dot
//! stuffing, QUIT; one plain-text message per call. It speaks to a relay the
//! administrator names (usually a cluster-local one); it never retries (the outbox
//! does) and never puts the password in an error.

use std::fmt;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A reply line longer than this is not SMTP.
const MAX_LINE: usize = 4096;

pub struct Mail<'a> {
    pub from: &'a str,
    pub to: &'a [String],
    pub subject: &'a str,
    pub body: &'a str,
}

#[derive(Debug)]
pub struct SmtpError(String);

impl fmt::Display for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SMTP: {}", self.0)
    }
}

/// A plausible address: one `@`, something either side, no spaces or angle brackets
/// (they would break the envelope commands).
pub fn is_address(a: &str) -> bool {
    let mut parts = a.split('@');
    matches!((parts.next(), parts.next(), parts.next()), (Some(l), Some(d), None) if !l.is_empty() && !d.is_empty())
        && !a.contains(|c: char| c.is_whitespace() || c == '<' || c == '>' || c.is_control())
}

/// Header values must stay on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    /// Reads a (multi-line) reply; its code must be `want`'s class (2 or 3).
    async fn expect(&mut self, step: &str, want: u8) -> Result<String, SmtpError> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = (&mut self.r)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(|e| SmtpError(format!("{step}: reading the reply: {e}")))?;
            if n == 0 {
                return Err(SmtpError(format!(
                    "{step}: the server closed the connection"
                )));
            }
            let line = line.trim_end();
            text.push_str(line);
            text.push('\n');
            let b = line.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(SmtpError(format!("{step}: not an SMTP reply: {line:?}")));
            }
            if b.get(3) != Some(&b'-') {
                if b[0] != b'0' + want {
                    return Err(SmtpError(format!("{step}: the server answered {}", line)));
                }
                return Ok(text);
            }
        }
    }

    async fn cmd(&mut self, step: &str, line: &str, want: u8) -> Result<String, SmtpError> {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(|e| SmtpError(format!("{step}: writing: {e}")))?;
        self.expect(step, want).await
    }
}

use tokio::io::AsyncReadExt as _;

/// Sends `mail` through `host:port`; `auth` is (user, password) for AUTH PLAIN.
pub async fn send(
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
    mail: &Mail<'_>,
    now_ms: u64,
) -> Result<(), SmtpError> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| SmtpError(format!("connecting to {host}:{port}: {e}")))?;
    let (r, w) = stream.into_split();
    let mut c = Conn {
        r: BufReader::new(r),
        w,
    };
    c.expect("greeting", 2).await?;
    let ehlo = c.cmd("EHLO", "EHLO nemesis-controller", 2).await?;
    if let Some((user, password)) = auth {
        if !ehlo.lines().any(|l| {
            l.get(4..)
                .is_some_and(|x| x.to_ascii_uppercase().starts_with("AUTH"))
        }) {
            return Err(SmtpError(
                "the server offers no AUTH, but a username and password are configured".into(),
            ));
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        // The step name only: the line carries the password.
        c.cmd("AUTH PLAIN", &format!("AUTH PLAIN {token}"), 2)
            .await?;
    }
    c.cmd("MAIL FROM", &format!("MAIL FROM:<{}>", mail.from), 2)
        .await?;
    for to in mail.to {
        c.cmd("RCPT TO", &format!("RCPT TO:<{to}>"), 2).await?;
    }
    c.cmd("DATA", "DATA", 3).await?;
    let date =
        chrono::DateTime::<chrono::Utc>::from(crate::store::from_unix_ms(now_ms)).to_rfc2822();
    let mut msg = format!(
        "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {date}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        mail.from,
        mail.to.join(", "),
        one_line(mail.subject),
    );
    for line in mail.body.lines() {
        // Dot stuffing: a line starting with '.' gets another.
        if line.starts_with('.') {
            msg.push('.');
        }
        msg.push_str(line);
        msg.push_str("\r\n");
    }
    msg.push('.');
    c.cmd("end of DATA", &msg, 2).await?;
    let _ = c.cmd("QUIT", "QUIT", 2).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_for_what_breaks_the_envelope() {
        assert!(is_address("oncall@example.org"));
        for bad in ["", "a", "@b", "a@", "a@b@c", "a b@c", "a@b>", "a\r\n@b"] {
            assert!(!is_address(bad), "{bad:?}");
        }
    }
}
