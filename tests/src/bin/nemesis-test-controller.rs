//! The controller's `run` as a process of its own, for tests that SIGKILL it: the same
//! `nemesis_controller::app::start` as `nemesis-controller run`, with its flags, against
//! the API server of `KUBECONFIG`. Once started it prints one line,
//! `NEMESIS_CONTROLLER api=<addr> admin=<addr>`, so a test using port 0 learns its
//! addresses; SIGTERM or Ctrl-C shut it down in order. (Integration tests of this crate
//! can only run this crate's binaries, hence this one.)

use anyhow::Context as _;
use clap::Parser;
use nemesis_controller::config::RunArgs;

#[derive(Parser)]
#[command(about = "nemesis-controller run, as a separate process for chaos tests")]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_controller=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Cli::parse().run;
    let client = kube::Client::try_default()
        .await
        .context("configuring the Kubernetes client from KUBECONFIG")?;
    let mut running = nemesis_controller::app::start(&args, client)
        .await
        .context("starting the controller")?;
    println!(
        "NEMESIS_CONTROLLER api={} admin={}",
        running.api_addr, running.admin_addr
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        e = running.failed() => {
            running.shutdown().await;
            return Err(e).context("a listener stopped");
        }
    }
    running.shutdown().await;
    Ok(())
}
