//! Chaos: the controller's history volume fills up. Its redb file lives on a small
//! tmpfs the test mounts (as root, under a unique temporary directory, unmounted at the
//! end); once a filler file takes every free byte, history writes fail with a clear
//! error and `nemesis_controller_history_write_errors_total`, scaling goes on, and when
//! the filler is removed the writes resume: the records that waited are committed and
//! nothing committed before is lost.

mod controller_support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use controller_support::*;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use nemesis_common::wire::ServiceRef;
use nemesis_controller::policy::ScalingPolicy;
use nemesis_controller::store::PolicyId;
use nemesis_tests::apiserver::{ApiServerOptions, TestApiServer};

/// A tmpfs mounted for the test; unmounted (lazily, if something still holds it) on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("nemesis-full-").tempdir()?;
        let path = dir.path().to_path_buf();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .context("running mount (the test runs as root)")?;
        anyhow::ensure!(
            status.success(),
            "mounting a tmpfs on {}: {status}",
            path.display()
        );
        Ok(Self { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Writes zeros into `path` until the volume says it is full; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
            Err(e) => return Err(e).context("filling the volume"),
        }
    }
    // Whatever a partial page left.
    let _ = f.flush();
    Ok(written)
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

fn scale_records(c: &nemesis_controller::app::Running, ns: &str, name: &str) -> usize {
    c.store
        .scale_events(&PolicyId::new(ns, name), 0..u64::MAX)
        .map(|r| r.len())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_history_volume_fails_writes_clearly_scaling_goes_on_and_writing_resumes()
-> anyhow::Result<()> {
    init_tracing();
    let volume = Tmpfs::mount("4m")?;
    let server = TestApiServer::start(ApiServerOptions::default()).await?;
    let client = server.client().await?;
    install_crd(&client).await?;
    let ns = "default";
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment("disk", 1))
        .await?;
    let c = start_controller(&server, &volume.path, &[]).await?;
    wait_leading(&c, Duration::from_secs(10)).await?;
    let svc = ServiceRef {
        namespace: ns.into(),
        name: "disk".into(),
    };
    let agent = TestAgent::start("node-d", vec![svc], vec![c.api_addr]);
    policies
        .create(&PostParams::default(), &busy_policy("disk"))
        .await?;
    wait_state(&policies, "disk", "low", Duration::from_secs(30)).await?;

    // A scale committed while there is room.
    agent.set(|s| s.open = 10);
    wait_replicas(&deployments, "disk", 3, Duration::from_secs(30)).await?;
    eventually(
        "the first scale record",
        Duration::from_secs(10),
        || async { Ok((scale_records(&c, ns, "disk") == 1).then_some(())) },
    )
    .await?;
    let errors = || async {
        Ok::<_, anyhow::Error>(
            scrape(&c, "nemesis_controller_history_write_errors_total")
                .await
                .unwrap_or(0.0),
        )
    };
    anyhow::ensure!(errors().await? == 0.0, "no write error while there is room");

    // The volume full: writes fail (the samples every 500 ms need new pages soon), and
    // scaling goes on.
    let filler = volume.path.join("filler");
    let filled = fill(&filler)?;
    println!("filled the volume with {filled} bytes");
    let mut cycles = 0;
    while errors().await? == 0.0 && cycles < 10 {
        agent.set(|s| s.open = 0);
        wait_replicas(&deployments, "disk", 1, Duration::from_secs(30)).await?;
        agent.set(|s| s.open = 10);
        wait_replicas(&deployments, "disk", 3, Duration::from_secs(30)).await?;
        cycles += 1;
    }
    eventually("a history write error", Duration::from_secs(30), || async {
        Ok((errors().await? > 0.0).then_some(()))
    })
    .await?;
    // Scaling still goes on while the disk is full.
    agent.set(|s| s.open = 0);
    wait_replicas(&deployments, "disk", 1, Duration::from_secs(30)).await?;
    let scales_made = 2 + 2 * cycles;
    println!(
        "history write errors while full: {}; scales made {scales_made}, recorded {}",
        errors().await?,
        scale_records(&c, ns, "disk")
    );

    // Room again: the writes resume, every scale recorded (the waiting ones too), the
    // first one still there.
    std::fs::remove_file(&filler)?;
    eventually(
        "every scale in the history once the disk has room",
        Duration::from_secs(30),
        || async { Ok((scale_records(&c, ns, "disk") == scales_made).then_some(())) },
    )
    .await?;
    let errors_after = errors().await?;
    agent.set(|s| s.open = 10);
    wait_replicas(&deployments, "disk", 3, Duration::from_secs(30)).await?;
    eventually("a new scale recorded", Duration::from_secs(10), || async {
        Ok((scale_records(&c, ns, "disk") == scales_made + 1).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        errors().await? == errors_after,
        "no write error once the disk has room"
    );
    c.shutdown().await;
    drop(volume);
    Ok(())
}
