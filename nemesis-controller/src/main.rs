//! The controller binary: `nemesis-controller run` runs the controller (see
//! `nemesis_controller::config::RunArgs` for its flags and `NEMESIS_CONTROLLER_*`
//! variables); `nemesis-controller crd` prints the ScalingPolicy CustomResourceDefinition
//! generated from the Rust types (what `cargo xtask gen` writes to `manifests/crd/`).

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nemesis_controller::config::{LogFormat, RunArgs};

#[derive(Parser)]
#[command(
    name = "nemesis-controller",
    version,
    about = "Runs ScalingPolicy automata"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CrdKind {
    Scalingpolicy,
    Alertrule,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (leader election, policies, agents' API, webhook, metrics).
    Run(Box<RunArgs>),
    /// Print a CRD as YAML: the ScalingPolicy's, or with `--kind alertrule` the AlertRule's.
    Crd {
        #[arg(long, value_enum, default_value_t = CrdKind::Scalingpolicy)]
        kind: CrdKind,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_runtime=warn,kube_client=warn".into());
    // Colours only on a terminal: `kubectl logs` and log files showed `^[[2m` escapes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd { kind } => print!(
            "{}",
            match kind {
                CrdKind::Scalingpolicy => nemesis_controller::policy::crd_yaml(),
                CrdKind::Alertrule => nemesis_controller::notify::rule::crd_yaml(),
            }
        ),
        Command::Run(args) => {
            init_tracing(args.log_format);
            // Before any connection: one descriptor per agent, and the container's
            // soft limit is often far below its hard one.
            nemesis_controller::open_files::raise_and_log();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(*args))?;
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    let clients = nemesis_controller::api_client::ApiClients::infer()
        .await
        .context("configuring the Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    let mut running = nemesis_controller::app::start_with(&args, clients)
        .await
        .context("starting the controller")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
        e = running.failed() => {
            running.shutdown().await;
            return Err(e).context("a listener stopped");
        }
    }
    running.shutdown().await;
    Ok(())
}
