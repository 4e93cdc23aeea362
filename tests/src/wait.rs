//! Bounded waits for tests: poll a condition until it holds or a deadline passes, and
//! fail saying what was awaited and the last error seen. Never sleeps blindly.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every `poll` until it yields `Some`, or fails after `within`.
pub async fn eventually_every<T, F, Fut>(
    poll: Duration,
    what: &str,
    within: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > within {
            anyhow::bail!(
                "timed out after {within:?} waiting for {what} (last error: {last_err:?})"
            );
        }
        tokio::time::sleep(poll).await;
    }
}
