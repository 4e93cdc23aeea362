//! `nemesis-agent`: parses the command line, sets up tracing, and runs a subcommand.
//! Wiring only; every decision lives in the library.
#![deny(unsafe_code)]

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use nemesis_agent::{
    config::{Cli, Command, RunArgs},
    ebpf::Datapath,
};
use tracing::{info, warn};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Cleanup(args) => {
            let report = Datapath::cleanup(&args.instance.to_config())?;
            println!(
                "removed {} links and {} maps{}",
                report.links_removed.len(),
                report.maps_removed.len(),
                if report.dir_removed {
                    ""
                } else {
                    " (the pin directory holds foreign entries and was kept)"
                }
            );
            Ok(())
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let cfg = args.datapath.to_config();
    let datapath = Arc::new(Datapath::load_or_adopt(&cfg)?);
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut beat = tokio::time::interval(args.heartbeat_interval);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if let Err(error) = datapath.heartbeat() {
                        warn!(error = %error, "heartbeat failed; held traffic is released once it is stale");
                    }
                }
                _ = shutdown_signal() => break,
            }
        }
    });
    info!("shutting down");
    if args.detach_on_exit {
        let dp = Arc::try_unwrap(datapath)
            .map_err(|_| anyhow::anyhow!("datapath still shared at exit"))?;
        dp.detach()?;
        info!("datapath detached and unpinned");
    } else {
        info!("datapath left attached and pinned for the next agent");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
