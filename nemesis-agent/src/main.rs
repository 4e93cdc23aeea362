//! `nemesis-agent`: parses the command line, sets up tracing, and runs a subcommand.
//! Wiring only; every decision lives in the library.
#![deny(unsafe_code)]

use std::io::IsTerminal as _;

use anyhow::{Context, Result};
use clap::Parser;
use nemesis_agent::{
    agent,
    config::{Cli, Command, RunArgs},
    ebpf::Datapath,
    kube_proxy_skip,
};

fn main() -> Result<()> {
    // Logs on stderr, so stdout carries only a subcommand's result (`cleanup`'s line was
    // mixed with log lines); colours only on a terminal (`kubectl logs` and log files
    // showed `^[[2m` escapes).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Cleanup(args) => {
            // The skip rule first: without the programs' marks it matches nothing, but a
            // stale rule would let another component's use of the same bit skip
            // kube-proxy. A node without the commands (or without the rule) is fine.
            for (command, result) in
                kube_proxy_skip::remove_all(&args.kube_proxy_skip.kube_proxy_skip_commands)
            {
                match result {
                    Ok(plan) if !plan.delete.is_empty() => {
                        println!(
                            "removed {} kube-proxy skip rule(s) with {command}",
                            plan.delete.len()
                        )
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(%command, error = %err, "kube-proxy skip rule not checked")
                    }
                }
            }
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
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(agent::run(args))?;
    Ok(())
}
