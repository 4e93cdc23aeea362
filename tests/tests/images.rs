//! The images `cargo xtask image` builds, inspected as a registry or a kubelet would see
//! them: each OCI archive names `<component>:<workspace version>`, its config has the
//! entrypoint, user, PATH and `org.opencontainers.image.*` labels, and its unpacked
//! layers hold a binary that runs (`--version`, chrooted into the unpacked root, so
//! only what the image carries is used) and no shell. Built from the debug binaries
//! the test build already made (`xtask image --debug --no-build`), once per run: a
//! second call finds the archives up to date. Root required (chroot).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `target/debug`, from this test binary's place (`target/debug/deps/images-<hash>`).
fn target_debug() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary lives in target/<profile>/deps")?
        .to_path_buf())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds (or finds up to date) the debug images; returns the archives' folder.
fn images() -> Result<PathBuf> {
    let debug = target_debug()?;
    let xtask = debug.join("xtask");
    for bin in ["xtask", "nemesis-agent", "nemesis-controller"] {
        ensure!(
            debug.join(bin).exists(),
            "{} is missing: build the workspace's tests (`cargo nextest run --workspace`) \
             or `cargo build -p xtask -p nemesis-agent -p nemesis-controller`",
            debug.join(bin).display()
        );
    }
    run(Command::new(&xtask).args(["image", "--debug", "--no-build"]))?;
    Ok(debug.parent().context("target/")?.join("images/debug"))
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("digest {digest}"))?;
    Ok(dir.join("blobs/sha256").join(hex))
}

fn json(path: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

struct Unpacked {
    _dir: tempfile::TempDir,
    reference: String,
    config: Value,
    rootfs: PathBuf,
}

/// Unpacks an OCI archive: its reference, its image config and its layers applied in
/// order to one root filesystem.
fn unpack(archive: &Path) -> Result<Unpacked> {
    let dir = tempfile::tempdir()?;
    let oci = dir.path().join("oci");
    std::fs::create_dir_all(&oci)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&oci))?;
    let index = json(&oci.join("index.json"))?;
    let entry = &index["manifests"][0];
    let reference = entry["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let manifest = json(&blob(&oci, entry["digest"].as_str().unwrap_or_default())?)?;
    let config = json(&blob(
        &oci,
        manifest["config"]["digest"].as_str().unwrap_or_default(),
    )?)?;
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    for layer in manifest["layers"].as_array().context("layers")? {
        let path = blob(&oci, layer["digest"].as_str().unwrap_or_default())?;
        // tar recognises gzip and zstd layers by their content.
        run(Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&rootfs))?;
    }
    Ok(Unpacked {
        _dir: dir,
        reference,
        config,
        rootfs,
    })
}

fn check(component: &str, user: &str) -> Result<()> {
    let archive = images()?.join(format!("{component}-{VERSION}.oci.tar"));
    let image = unpack(&archive)?;
    assert_eq!(image.reference, format!("localhost/{component}:{VERSION}"));
    let c = &image.config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!([format!("/usr/local/bin/{component}")])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert_eq!(c["User"], user);
    assert!(
        c["Env"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "PATH=/usr/local/bin")),
        "the manifests' `command: [{component}]` needs it on PATH: {c}"
    );
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], component);
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default();
    assert!(
        revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()),
        "a git commit as the revision: {revision:?}"
    );
    // Only what the binary needs: no shell, no package manager.
    for absent in ["bin/sh", "usr/bin/sh", "usr/bin/apt", "bin/busybox"] {
        assert!(
            !image.rootfs.join(absent).exists(),
            "{absent} in {component}"
        );
    }
    // The binary runs with nothing but the image's files.
    let version = run(Command::new("chroot")
        .arg(&image.rootfs)
        .arg(format!("/usr/local/bin/{component}"))
        .arg("--version"))?;
    assert_eq!(version, format!("{component} {VERSION}\n"));
    Ok(())
}

#[test]
fn the_agent_image_runs_its_binary_as_root_with_labels() -> Result<()> {
    // Loading eBPF and attaching to the node's cgroup2 root needs root's capabilities.
    check("nemesis-agent", "0:0")
}

#[test]
fn the_controller_image_runs_its_binary_unprivileged_with_labels() -> Result<()> {
    check("nemesis-controller", "65532:65532")?;
    let image = unpack(&images()?.join(format!("nemesis-controller-{VERSION}.oci.tar")))?;
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd"))?;
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    Ok(())
}
