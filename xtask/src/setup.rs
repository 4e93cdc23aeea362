//! `cargo xtask setup`: installs, idempotently, what a fresh machine of this kind lacks.
//!
//! Each step checks first and installs only what is missing, so running it twice costs
//! a few seconds. The facts behind the steps are in `shared/notes/toolchain.md`.

use crate::util::{is_root, output, sh};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// Debian packages the build, the tests, the benchmarks and the demo use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",                // ip netns / veth / bridge for the sandbox's pods
    "iptables",                // baseline NAT rules in benchmarks
    "nftables",                // kube-proxy nftables-mode baseline in benchmarks
    "bpftool",                 // debugging pinned programs and maps
    "prometheus",              // real Prometheus for PromQL policy tests
    "prometheus-alertmanager", // real Alertmanager for alert(...) policy tests
    "chromium",                // real browser for the UI tests
    "wrk",                     // HTTP load in benchmarks
    "nginx-light",             // the Ingress controller of the every-path tests
    "hyperfine",               // timing whole commands in benchmarks
    "curl",                    // health checks in scripts
    "procps",                  // ps / pgrep in tests that look for leaked processes
    "podman",                  // `cargo xtask image`: podman build / save, no daemon
    "python3-venv",            // a venv for kubernetes-validate (PyPI)
];

/// kubernetes-validate from PyPI, in a venv of its own: the manifests tests check every
/// object against the Kubernetes OpenAPI schemas it bundles, offline. Pinned, so a
/// release with new schemas is a deliberate change.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VALIDATE_VENV: &str = "/opt/nemesis/kubernetes-validate";

/// aiosmtpd from PyPI, in a venv of its own: the alert tests deliver e-mail to a real
/// SMTP server (`python -m aiosmtpd`) on loopback. Pinned like kubernetes-validate.
const AIOSMTPD_VERSION: &str = "1.4.6";
pub const AIOSMTPD_VENV: &str = "/opt/nemesis/aiosmtpd";

pub fn run_setup_steps() -> Result<()> {
    apt_packages()?;
    nightly_toolchain()?;
    bpf_linker()?;
    nextest()?;
    cargo_fuzz()?;
    ui_node_modules()?;
    kubernetes_validate()?;
    aiosmtpd()?;
    Ok(())
}

pub fn run() -> Result<()> {
    run_setup_steps()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root: {}\n\
             run `sudo cargo xtask setup` or `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.contains("install ok installed"))
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain for eBPF, and it did not run")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The LLVM major version of `rustc +nightly`, which bpf-linker must link against.
fn nightly_llvm_major() -> Result<String> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("`rustc +nightly -vV` failed: is the nightly toolchain installed?")?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    Ok(version.split('.').next().unwrap_or(version).to_string())
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// bpf-linker built against the nightly toolchain's own libLLVM (Debian has no LLVM of
/// the major the nightly rustc uses). The binary keeps a RUNPATH to the prefix folder,
/// so the folder stays; a stamp file records which LLVM it was built for.
fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let prefix = home()?.join(".local/share/nemesis/llvm");
    let stamp = prefix.join("bpf-linker-llvm-major");
    let works = output(Command::new("bpf-linker").arg("--version")).is_some();
    let stamped = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == major);
    if works && stamped {
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("`rustc +nightly --print sysroot` failed")?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain ships one",
                libdir.display()
            )
        })?;
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in [
        "libLLVM.so".to_string(),
        libllvm.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    sh(crate::util::cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, &major)?;
    Ok(())
}

fn nextest() -> Result<()> {
    if output(Command::new("cargo-nextest").args(["nextest", "--version"])).is_some() {
        return Ok(());
    }
    sh(crate::util::cargo().args(["install", "cargo-nextest", "--locked"]))
}

/// cargo-fuzz for `cargo xtask fuzz` (a few minutes to build, once).
pub fn cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo-fuzz").arg("--version")).is_some() {
        return Ok(());
    }
    sh(crate::util::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

/// The UI's npm packages: uPlot, the charting library the controller's build embeds
/// (`nemesis-controller/build.rs`), and playwright-core for the UI's browser tests
/// (`ui/tests/*.mjs`): `npm ci` in `ui/`
/// when `ui/node_modules` is missing or `ui/package-lock.json` changed since the last
/// install (a copy of the lock file in `node_modules` is the stamp).
fn ui_node_modules() -> Result<()> {
    let ui = crate::util::root().join("ui");
    let lock = std::fs::read(ui.join("package-lock.json"))
        .with_context(|| format!("reading {}", ui.join("package-lock.json").display()))?;
    let stamp = ui.join("node_modules/.nemesis-package-lock.json");
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return Ok(());
    }
    let version = output(Command::new("node").arg("--version")).context(
        "node is missing: the UI's browser test needs node 20 or newer with npm (Debian: apt-get install nodejs npm)",
    )?;
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("`node --version` printed {version:?}"))?;
    if major < 20 {
        bail!(
            "node {} is too old: playwright-core needs node 20 or newer",
            version.trim()
        );
    }
    sh(Command::new("npm")
        .args(["ci", "--prefix"])
        .arg(&ui)
        .args(["--no-audit", "--no-fund"]))?;
    std::fs::write(&stamp, &lock).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn kubernetes_validate() -> Result<()> {
    let venv = PathBuf::from(KUBERNETES_VALIDATE_VENV);
    let bin = venv.join("bin/kubernetes-validate");
    let installed = output(Command::new(&bin).arg("--version"))
        .is_some_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION);
    if installed {
        return Ok(());
    }
    // Debian's own python3 (with python3-venv), whatever else is first on PATH.
    sh(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv))?;
    sh(Command::new(venv.join("bin/pip"))
        .args(["install", "-q"])
        .arg(format!(
            "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
        )))
}

fn aiosmtpd() -> Result<()> {
    let venv = PathBuf::from(AIOSMTPD_VENV);
    let python = venv.join("bin/python");
    let installed = output(Command::new(&python).args(["-m", "aiosmtpd", "--version"]))
        .is_some_and(|v| v.trim() == format!("aiosmtpd {AIOSMTPD_VERSION}"));
    if installed {
        return Ok(());
    }
    sh(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv))?;
    sh(Command::new(venv.join("bin/pip"))
        .args(["install", "-q"])
        .arg(format!("aiosmtpd=={AIOSMTPD_VERSION}")))
}
