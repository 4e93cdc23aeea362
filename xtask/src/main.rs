//! Developer commands for the Nemesis workspace (`cargo xtask <command>`).
//!
//! Every command a newcomer or CI runs lives here, so the README stays two lines and a
//! fresh machine is set up by the same code that CI runs.

mod bench;
mod codegen;
mod demo;
mod ebpf;
mod fuzz;
mod image;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Developer commands for K8s Nemesis")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install (idempotently) everything the build and the tests need on a fresh machine.
    Setup,
    /// Build the eBPF programs for bpfel-unknown-none (needs `setup` once).
    BuildEbpf,
    /// Set up, build, lint and run every test: the README's test command and CI's.
    Test {
        /// Extra arguments for `cargo nextest run` (a filter, `--no-fail-fast`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        nextest_args: Vec<String>,
    },
    /// Regenerate files generated from Rust types (the ScalingPolicy CRD YAML).
    Gen {
        /// Only check that the committed files are up to date; fail if not.
        #[arg(long)]
        check: bool,
    },
    /// Run the sandbox cluster with Nemesis installed from its images (`kubectl apply
    /// -k`; `--processes`: as host processes) and a demo app at zero replicas; print how
    /// to reach them; Ctrl-C stops and removes everything.
    Demo(demo::DemoArgs),
    /// Build the agent's and the controller's images as OCI archives under
    /// `target/images/<profile>/`, tagged with the workspace version (podman, no daemon).
    Image(image::ImageArgs),
    /// Build the cargo-fuzz targets (`fuzz/`) and run each for a bounded time from its
    /// committed seeds; fails on a crash, naming the reproducer.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Only the targets whose name contains this text.
        #[arg(long)]
        only: Option<String>,
    },
    /// Run the benchmarks and write `target/nemesis-bench.json`.
    Bench {
        /// Only run the benchmarks whose name contains this text.
        #[arg(long)]
        only: Option<String>,
        /// Simulated agents of the scale bench (default: the acceptance size, 1,000);
        /// figures of another size carry it in their names.
        #[arg(long)]
        scale_agents: Option<usize>,
        /// Managed Services of the scale bench (default: the acceptance size, 10,000).
        #[arg(long)]
        scale_services: Option<usize>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => ebpf::build(),
        Command::Test { nextest_args } => test::run(&nextest_args),
        Command::Fuzz { seconds, only } => fuzz::run(seconds, only.as_deref()),
        Command::Bench {
            only,
            scale_agents,
            scale_services,
        } => bench::run(
            only.as_deref(),
            bench::ScaleSize {
                agents: scale_agents,
                services: scale_services,
            },
        ),
        Command::Gen { check } => codegen::run(check),
        Command::Demo(args) => demo::run(&args),
        Command::Image(args) => image::run(&args),
    }
}
