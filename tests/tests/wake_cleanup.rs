//! Issue 4, a client that gives up while held, end to end: the proxy notices, counts it,
//! releases its hold (gauge back to 0), closes its socket and ends its task; the
//! wake-up flight ends with the last held connection, so a later client asks again.

mod wake_support;

use std::time::Duration;

use serde_json::json;
use wake_support::{Scenario, WakeEnv, eventually, slow_server, sockets_on_port};

const CLIENTS: usize = 5;
/// `/proc/net/tcp` states of a socket the proxy would have leaked.
const LEAKED_STATES: [&str; 2] = ["01", "08"]; // established, close-wait

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_while_held_is_cleaned_up() -> anyhow::Result<()> {
    let env = WakeEnv::start(Scenario {
        name: "giveup",
        pod: slow_server(),
        policy: json!({"holdTimeoutSeconds": 120}),
        // Nobody scales: only the clients end their hold.
        scale_on_wake: false,
    })
    .await?;
    let proxy_port = env.agent().proxy_v4().port();

    let clients = env
        .clients(&["--clients", &CLIENTS.to_string(), "--give-up-after", "700"])
        .await?;
    // They are held first ...
    eventually("the clients to be held", Duration::from_secs(5), || async {
        Ok((env.metrics().await?.held() == CLIENTS as f64).then_some(()))
    })
    .await?;
    let open = sockets_on_port(proxy_port)?;
    assert_eq!(
        LEAKED_STATES
            .iter()
            .map(|s| open.get(*s).copied().unwrap_or(0))
            .sum::<usize>(),
        CLIENTS,
        "one proxy socket per held client: {open:?}"
    );
    // ... then give up.
    let results = clients.finish(Duration::from_secs(10)).await?;
    assert!(results.iter().all(|r| r.result == "gave_up"), "{results:?}");

    let m = eventually(
        "the holds to be released",
        Duration::from_secs(5),
        || async {
            let m = env.metrics().await?;
            Ok((m.held() == 0.0 && m.proxy_open() == 0.0).then_some(m))
        },
    )
    .await?;
    assert_eq!(m.outcome("client_gone"), CLIENTS as f64);
    assert_eq!(m.outcome("forwarded") + m.outcome("timeout"), 0.0);
    eventually(
        "no proxy socket left but the listener",
        Duration::from_secs(5),
        || async {
            let open = sockets_on_port(proxy_port)?;
            let leaked: usize = LEAKED_STATES
                .iter()
                .map(|s| open.get(*s).copied().unwrap_or(0))
                .sum();
            Ok((leaked == 0 && open.get("0A") == Some(&1)).then_some(()))
        },
    )
    .await?;
    assert_eq!(env.controller.wakes(), 1);

    // The flight ended with its last held connection: the next client wakes again.
    let again = env
        .clients(&["--clients", "1", "--give-up-after", "300"])
        .await?;
    eventually("a second wake-up", Duration::from_secs(5), || async {
        Ok((env.controller.wakes() == 2).then_some(()))
    })
    .await?;
    again.finish(Duration::from_secs(10)).await?;
    env.shutdown().await
}
