//! Ending a connection the proxy will not forward, with a clear outcome: an HTTP/1.x
//! client gets `503` + `Retry-After` + `Connection: close`; anything else a clean close
//! (FIN). Never an RST from unread bytes: the socket is drained before it is closed.

use super::sniff::{MAX_REQUEST_LINE, Sniff, sniff};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Timeout,
    Overflow,
    BackendFailed,
    NotManaged,
}

/// The full `503` response.
pub(crate) fn response_503(reason: Reason, retry_after: Duration) -> Vec<u8> {
    let body = match reason {
        Reason::Timeout => "the service did not become ready in time\n",
        Reason::Overflow => "too many connections are waiting for the service\n",
        Reason::BackendFailed => "the service's backends did not accept the connection\n",
        Reason::NotManaged => "no scaling policy manages this service\n",
    };
    // Retry-After is whole seconds; never 0, which invites an immediate retry storm.
    let secs = retry_after.as_secs().max(1);
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {secs}\r\nConnection: close\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refuse `client`, which already sent `seen`. When `seen` could still be the start of
/// an HTTP/1 request line, read on for up to `sniff_for` to decide.
pub(crate) async fn refuse(
    mut client: TcpStream,
    mut seen: Vec<u8>,
    reason: Reason,
    retry_after: Duration,
    sniff_for: Duration,
    linger: Duration,
) {
    let mut verdict = sniff(&seen);
    let until = Instant::now() + sniff_for;
    while verdict == Sniff::NeedMore && seen.len() < MAX_REQUEST_LINE {
        seen.reserve(1024);
        match tokio::time::timeout_at(until, client.read_buf(&mut seen)).await {
            Ok(Ok(n)) if n > 0 => verdict = sniff(&seen),
            _ => break,
        }
    }
    if verdict == Sniff::Http1 {
        let response = response_503(reason, retry_after);
        if let Err(err) = tokio::time::timeout(linger, client.write_all(&response))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            tracing::debug!(?err, "writing the 503 failed");
        }
    }
    close_cleanly(client, linger).await;
}

/// Send FIN, then read and discard until the peer closes too (at most `linger`): closing
/// a socket with unread bytes in its receive queue would send an RST instead of a FIN.
pub(crate) async fn close_cleanly(mut client: TcpStream, linger: Duration) {
    if client.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 1024];
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(linger, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_503_is_a_complete_http_response_that_closes() {
        let r =
            String::from_utf8(response_503(Reason::Timeout, Duration::from_millis(300))).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains("\r\nRetry-After: 1\r\n"), "never 0: {head}");
        assert!(head.contains("\r\nConnection: close\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
    }
}
