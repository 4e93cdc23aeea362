//! Runs the test Kubernetes API server standalone (for the demo and for manual `kubectl`
//! use) until Ctrl-C. Prints the kubeconfig path and URL once it serves.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};

#[derive(Debug, Parser)]
#[command(about = "The Nemesis test Kubernetes API server (loopback only, for tests and the demo)")]
struct Args {
    /// Inject API faults on a seeded schedule (chaos tests; off by default):
    /// `seed=<u64>,for=<seconds>[,slow=<seconds>][,users=<user>+<user>]`: 500s, answers
    /// held past the client timeout, watches cut, 410 on watch resumes, 409 on updates.
    #[arg(long, env = "NEMESIS_APISERVER_FAULTS", value_parser = nemesis_tests::apiserver::faults::FaultPlan::parse)]
    faults: Option<nemesis_tests::apiserver::faults::FaultPlan>,
    /// Address to listen on; must be a loopback address.
    #[arg(long, env = "NEMESIS_APISERVER_ADDRESS", default_value = "127.0.0.1")]
    address: IpAddr,
    /// Port to listen on; 0 picks a free one.
    #[arg(long, env = "NEMESIS_APISERVER_PORT", default_value_t = 0)]
    port: u16,
    /// Directory to write the kubeconfig into (created if missing); default: a temporary
    /// directory removed on exit.
    #[arg(long, env = "NEMESIS_APISERVER_DIR")]
    dir: Option<PathBuf>,
    /// Watch events kept for resuming watches.
    #[arg(
        long,
        env = "NEMESIS_APISERVER_WATCH_HISTORY",
        default_value_t = 10_000
    )]
    watch_history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nemesis_tests=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.address.is_loopback() {
        bail!(
            "--address {} is not a loopback address: this server is for tests only",
            args.address
        );
    }
    if let Some(d) = &args.dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = ApiServerOptions {
        addr: SocketAddr::new(args.address, args.port),
        dir: args.dir.clone(),
        watch_history: args.watch_history,
        bookmark_interval: Duration::from_secs(5),
        faults: args.faults.clone(),
        ..ApiServerOptions::default()
    };
    let server = TestApiServer::start(opts)
        .await
        .context("starting the test API server")?;
    println!("NEMESIS_APISERVER_URL={}", server.url());
    println!("NEMESIS_KUBECONFIG={}", server.kubeconfig_path().display());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_without_the_environment() {
        let a = Args::try_parse_from(["nemesis-apiserver", "--port", "6443", "--dir", "/tmp/x"])
            .unwrap();
        assert_eq!(a.port, 6443);
        assert_eq!(a.dir, Some(PathBuf::from("/tmp/x")));
    }
}
