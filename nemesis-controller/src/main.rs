//! The controller binary. For now it has one command: `nemesis-controller crd` prints
//! the ScalingPolicy CustomResourceDefinition generated from the Rust types (what
//! `cargo xtask gen` writes to `manifests/crd/`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nemesis-controller", about = "Runs ScalingPolicy automata")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ScalingPolicy CRD as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", nemesis_controller::policy::crd_yaml()),
    }
    Ok(())
}
