//! `cargo xtask image`: the agent's and the controller's images as OCI archives under
//! `target/images/<profile>/`, tagged with the workspace version, built with Debian's
//! `podman build` (no daemon) from binaries built on the host and nothing downloaded.
//! Owns staging each image's root filesystem and calling podman; it never pushes, and
//! never runs a container (crun is refused at setrlimit on these machines).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{cargo, describe, output, root, sh};

/// The components with an image: each is a package, its binary and the folder of its
/// `Containerfile`.
pub const COMPONENTS: &[&str] = &["nemesis-agent", "nemesis-controller"];

/// The controller's unprivileged user, as in its StatefulSet's securityContext.
const CONTROLLER_UID: u32 = 65532;

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Use the debug binaries (what the tests build) instead of release ones.
    #[arg(long)]
    pub debug: bool,
    /// Package the binaries already in `target/<profile>/` without running cargo (the
    /// tests' images, from what their own build made).
    #[arg(long)]
    pub no_build: bool,
}

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn profile_dir(debug: bool) -> &'static str {
    if debug { "debug" } else { "release" }
}

/// Where the archives of a profile go.
pub fn out_dir(debug: bool) -> PathBuf {
    root().join("target/images").join(profile_dir(debug))
}

/// The file name of `component`'s archive: `<component>-<version>.oci.tar`.
fn archive_name(component: &str) -> String {
    format!("{component}-{}.oci.tar", version())
}

pub fn run(args: &ImageArgs) -> Result<()> {
    if output(Command::new("podman").arg("--version")).is_none() {
        bail!("podman is missing: run `cargo xtask setup` (it installs Debian's podman)");
    }
    if !args.no_build {
        crate::ebpf::build()?;
        let mut build = cargo();
        build.arg("build");
        if !args.debug {
            build.arg("--release");
        }
        for c in COMPONENTS {
            build.args(["-p", c, "--bin", c]);
        }
        sh(&mut build)?;
    }
    let bins = root().join("target").join(profile_dir(args.debug));
    build_from(&bins, &out_dir(args.debug))?;
    Ok(())
}

/// Builds the image of every component from the binaries in `bins` into archives in
/// `out` (`<component>-<version>.oci.tar`), each unless it is up to date; returns the
/// archives. No cargo: `cargo xtask image` and `cargo xtask demo` build first.
pub fn build_from(bins: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    if output(Command::new("podman").arg("--version")).is_none() {
        bail!("podman is missing: run `cargo xtask setup` (it installs Debian's podman)");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // One image build at a time per directory (tests and demos may ask in parallel).
    let lock = std::fs::File::create(out.join(".lock"))?;
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the image directory")?;
    COMPONENTS
        .iter()
        .map(|c| build_one(&bins.join(c), out, c))
        .collect()
}

/// Builds one image unless its archive is newer than its binary and Containerfile.
fn build_one(bin: &Path, out: &Path, component: &str) -> Result<PathBuf> {
    let containerfile = root().join(component).join("Containerfile");
    let archive = out.join(archive_name(component));
    // This program too: a change in how images are staged rebuilds them.
    let xtask = std::env::current_exe()?;
    if is_newer(&archive, &[bin, &containerfile, &xtask]) {
        eprintln!("image: {} is up to date", archive.display());
        return Ok(archive);
    }
    let work = out.join(format!(".{component}"));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    let rootfs = work.join("context/rootfs");
    stage_binary(bin, &rootfs, component)?;
    stage_nsswitch(&rootfs)?;
    if component == "nemesis-controller" {
        stage_controller_extras(&rootfs)?;
    }
    if component == "nemesis-agent" {
        stage_iptables(&rootfs)?;
    }
    let tag = format!("{component}:{}", version());
    let revision = output(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(root()),
    )
    .unwrap_or_default();
    let created =
        output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])).unwrap_or_default();
    // podman refuses a run root path longer than 50 characters.
    let runroot = PathBuf::from(format!("/tmp/nemesis-image-{}", std::process::id()));
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        // A storage of its own under target/: nothing of the machine's podman state is
        // touched, and vfs needs no overlay mount.
        cmd.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(args)
            // Progress is for people: stdout stays the caller's (the demo prints its
            // contract lines there).
            .stdout(std::io::stderr());
        cmd
    };
    let tmp = archive.with_extension("tar.partial");
    sh(
        podman(&["build", "--pull=never", "--network=none", "--no-cache"])
            .arg("--file")
            .arg(&containerfile)
            .args(["--tag", &tag])
            .args(["--build-arg", &format!("VERSION={}", version())])
            .args(["--build-arg", &format!("REVISION={}", revision.trim())])
            .args(["--build-arg", &format!("CREATED={}", created.trim())])
            .arg(work.join("context")),
    )?;
    let _ = std::fs::remove_file(&tmp);
    sh(podman(&["save", "--format", "oci-archive", "--output"])
        .arg(&tmp)
        .arg(&tag))?;
    std::fs::rename(&tmp, &archive)?;
    let _ = std::fs::remove_dir_all(&runroot);
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    eprintln!("image: {tag} -> {}", archive.display());
    Ok(archive)
}

fn is_newer(target: &Path, sources: &[&Path]) -> bool {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match mtime(target) {
        Some(t) => sources.iter().all(|s| mtime(s).is_some_and(|m| m <= t)),
        None => false,
    }
}

/// Copies `bin` to `/usr/local/bin/<name>` and every shared object it loads (as `ldd`
/// lists them, the ELF interpreter included) to the same path in `rootfs`.
fn stage_binary(bin: &Path, rootfs: &Path, name: &str) -> Result<()> {
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    copy_into(
        bin,
        rootfs,
        Path::new("/usr/local/bin").join(name).as_path(),
    )?;
    let mut ldd = Command::new("ldd");
    ldd.arg(bin);
    let listed = output(&mut ldd).with_context(|| format!("`{}` failed", describe(&ldd)))?;
    for lib in shared_objects(&listed) {
        copy_into(Path::new(&lib), rootfs, Path::new(&lib))?;
    }
    Ok(())
}

/// The paths of `ldd`'s output (`libc.so.6 => /lib/.../libc.so.6 (0x...)` and the
/// interpreter's `/lib64/ld-linux-x86-64.so.2 (0x...)`); the vDSO has no file.
pub fn shared_objects(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=>").map_or(l, |(_, p)| p.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// Copies `from` (following symlinks) to `at` inside `rootfs`, keeping its mode.
fn copy_into(from: &Path, rootfs: &Path, at: &Path) -> Result<()> {
    let dest = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, &dest)
        .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
    Ok(())
}

/// The iptables commands of the agent's opt-in kube-proxy skip rule, both backends
/// (kube-proxy uses either; a rule written through the other would not stop its walk):
/// Debian's multi-call binaries with their libraries and extensions, and on the PATH
/// (`/usr/local/bin`) the names the agent runs.
fn stage_iptables(rootfs: &Path) -> Result<()> {
    let sbin = Path::new("/usr/sbin");
    let ext = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    let mut objects = vec![];
    for multi in ["xtables-nft-multi", "xtables-legacy-multi"] {
        let bin = sbin.join(multi);
        if !bin.exists() {
            bail!(
                "{} is missing: the agent image carries iptables (run `cargo xtask setup`, it installs Debian's iptables)",
                bin.display()
            );
        }
        copy_into(&bin, rootfs, &bin)?;
        objects.push(bin);
    }
    if ext.is_dir() {
        for e in std::fs::read_dir(ext)? {
            let path = e?.path();
            copy_into(&path, rootfs, &path)?;
            objects.push(path);
        }
    }
    for obj in &objects {
        let mut ldd = Command::new("ldd");
        ldd.arg(obj);
        let listed = output(&mut ldd).with_context(|| format!("`{}` failed", describe(&ldd)))?;
        for lib in shared_objects(&listed) {
            copy_into(Path::new(&lib), rootfs, Path::new(&lib))?;
        }
    }
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    for (name, multi) in [
        ("iptables", "xtables-nft-multi"),
        ("ip6tables", "xtables-nft-multi"),
        ("iptables-nft", "xtables-nft-multi"),
        ("ip6tables-nft", "xtables-nft-multi"),
        ("iptables-legacy", "xtables-legacy-multi"),
        ("ip6tables-legacy", "xtables-legacy-multi"),
    ] {
        std::os::unix::fs::symlink(sbin.join(multi), bin.join(name))
            .with_context(|| format!("linking {name}"))?;
    }
    Ok(())
}

/// Names are looked up in `/etc/hosts` first, then DNS, as distroless images have it:
/// without the file glibc asks DNS first and gives up on a NOTFOUND before reading the
/// hosts file the kubelet manages.
fn stage_nsswitch(rootfs: &Path) -> Result<()> {
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("nsswitch.conf"),
        "hosts: files dns
",
    )?;
    Ok(())
}

/// The controller's user and CA certificates (for a Prometheus or Alertmanager behind
/// https; the API server's CA comes with the service account).
fn stage_controller_extras(rootfs: &Path) -> Result<()> {
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    let uid = CONTROLLER_UID;
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\nnemesis:x:{uid}:{uid}:nemesis:/:/sbin/nologin\n"
        ),
    )?;
    std::fs::write(etc.join("group"), format!("root:x:0:\nnemesis:x:{uid}:\n"))?;
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certs.exists() {
        copy_into(certs, rootfs, certs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_every_file_including_the_interpreter() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f00)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f01)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        assert_eq!(
            shared_objects(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
