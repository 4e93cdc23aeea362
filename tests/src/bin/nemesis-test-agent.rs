//! The agent's `run` as a process of its own, for tests that SIGKILL it: the same
//! `nemesis_agent::agent::run` as `nemesis-agent run`, with its flags, against the API
//! server of `KUBECONFIG`. (Integration tests of this crate can only run this crate's
//! binaries, hence this one.)

use clap::Parser;
use nemesis_agent::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Command::Run(args) = Cli::parse().command else {
        anyhow::bail!("only `run` is supported here");
    };
    nemesis_agent::agent::run(args).await?;
    Ok(())
}
