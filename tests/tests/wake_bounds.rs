//! Issue 4, the bounds of holding end to end (real agent, real eBPF, sandbox): past the
//! policy's hold timeout an HTTP/1 client gets `503` with `Retry-After` and a client of
//! another protocol a clean close; past the policy's held-connection bound the excess
//! is refused the same way at once while the held ones are served.

mod wake_support;

use std::time::Duration;

use serde_json::json;
use wake_support::{Scenario, WakeEnv, slow_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_hold_timeout_http_clients_get_503_with_retry_after_and_raw_clients_a_clean_close()
-> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "timeout",
        pod: slow_server(),
        policy: json!({"holdTimeoutSeconds": 1}),
        // Nobody scales: the Service stays at zero and the hold budget runs out.
        scale_on_wake: false,
    })
    .await?;

    let mut sets = env
        .clients_together(&[
            &["--clients", "3", "--http"],
            &["--clients", "3", "--raw", "PING not-http\n"],
        ])
        .await?;
    let raw = sets.pop().expect("raw clients");
    let http = sets.pop().expect("http clients");
    let http = http.finish(Duration::from_secs(20)).await?;
    let raw = raw.finish(Duration::from_secs(20)).await?;

    for r in &http {
        let resp = r.http()?;
        assert_eq!(resp.status, 503, "client {}: {resp:?}", r.client);
        let retry: u64 = resp
            .headers
            .get("retry-after")
            .unwrap_or_else(|| panic!("client {}: no Retry-After in {resp:?}", r.client))
            .parse()?;
        assert!(retry >= 1, "Retry-After {retry}");
        assert!(
            r.ms >= 900,
            "client {} was refused after {} ms, before the timeout",
            r.client,
            r.ms
        );
    }
    for r in &raw {
        assert_eq!(
            (r.result.as_str(), r.text.as_str()),
            ("response", ""),
            "client {}: a clean close (EOF, nothing written), got {r:?}",
            r.client
        );
        assert!(
            r.ms >= 900,
            "client {} was closed after {} ms",
            r.client,
            r.ms
        );
    }

    let m = env.metrics().await?;
    assert_eq!(m.outcome("timeout"), 6.0, "every held connection timed out");
    assert_eq!(m.held(), 0.0);
    assert_eq!(m.proxy_open(), 0.0);
    assert_eq!(env.controller.wakes(), 1, "one wake-up for the flight");
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_held_connection_bound_the_excess_gets_503_at_once_and_the_held_are_served()
-> anyhow::Result<()> {
    const HELD: usize = 3;
    const CLIENTS: usize = 10;
    let env = WakeEnv::start(Scenario {
        name: "overflow",
        pod: slow_server(),
        policy: json!({"maxHeldConnections": HELD}),
        scale_on_wake: true,
    })
    .await?;

    let results = env
        .run_clients(
            &["--clients", &CLIENTS.to_string(), "--http"],
            Duration::from_secs(30),
        )
        .await?;
    let pods = env.pod_names().await?;
    let mut served = 0;
    let mut refused = 0;
    for r in &results {
        let resp = r.http()?;
        match resp.status {
            200 => {
                assert_eq!(resp.body, format!("{}\n", pods[0]));
                served += 1;
            }
            503 => {
                assert!(
                    resp.headers.contains_key("retry-after"),
                    "client {}: {resp:?}",
                    r.client
                );
                assert!(
                    r.ms < 1500,
                    "an overflow is refused at once, not after the cold start ({} ms)",
                    r.ms
                );
                refused += 1;
            }
            other => panic!("client {}: status {other}: {resp:?}", r.client),
        }
    }
    assert_eq!((served, refused), (HELD, CLIENTS - HELD));
    let m = env.metrics().await?;
    assert_eq!(m.outcome("overflow"), (CLIENTS - HELD) as f64);
    assert_eq!(m.outcome("forwarded"), HELD as f64);
    assert_eq!(env.controller.wakes(), 1);
    env.shutdown().await
}
