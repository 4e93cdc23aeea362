//! Container processes of the simulated kubelet: each container is a local process group
//! started inside its pod's network namespace, with the pod's environment and its output
//! in a log file. It only ever signals process groups it started itself.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

/// Everything needed to start one container, resolved from the pod spec beforehand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Network namespace (under /run/netns) the process runs in.
    pub netns: String,
    /// Program and arguments: the container's `command` followed by its `args`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    /// Time the process spends "loading" before it runs `argv`, to play a slow starter.
    pub start_delay: Duration,
    /// Where stdout and stderr go (appended, so restarts keep earlier output).
    pub log_path: PathBuf,
    /// A cgroup v2 directory the process joins before it runs anything.
    pub cgroup: Option<PathBuf>,
    /// Seen by the process at `/var/run/secrets/kubernetes.io/serviceaccount`.
    pub service_account: Option<PathBuf>,
    /// Run in the node's network namespace (`hostNetwork`) rather than `netns`.
    pub host_network: bool,
    /// Run `argv` chrooted in an image's root rather than on the host.
    pub image: Option<ImageLaunch>,
}

/// A container run from an image's unpacked root: an overlay over it (the container's
/// writable layer, on a tmpfs, gone when the container ends), `/proc`, `/sys`, a minimal
/// `/dev`, the mounts, then `argv` chrooted there as `uid:gid` in `working_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLaunch {
    /// The image's unpacked root (read-only, shared by every container of the image).
    pub rootfs: PathBuf,
    /// An empty directory of the pod's where the container's root is assembled.
    pub scratch: PathBuf,
    pub mounts: Vec<MountSpec>,
    pub uid: u32,
    pub gid: u32,
    pub working_dir: String,
    pub read_only_root: bool,
}

/// A host file or directory seen by the container at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Assembles the container's root in its own mount namespace and becomes the
/// container's program. `$0` scratch, `$1` image root, `$2` `ro`/`rw` root, `$3`
/// working dir, `$4` uid, `$5` gid, then `mode source target` triples up to `--`, then
/// the program and its arguments. Host tools by absolute path: `PATH` is the image's.
const IMAGE_SCRIPT: &str = r#"set -e
S="$0"; IMG="$1"; ROOTMODE="$2"; WD="$3"; U="$4"; G="$5"; shift 5
/bin/mount -t tmpfs -o mode=0755 container "$S"
/bin/mkdir "$S/upper" "$S/work" "$S/root"
/bin/mount -t overlay overlay -o "lowerdir=$IMG,upperdir=$S/upper,workdir=$S/work" "$S/root"
R="$S/root"
/bin/mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/tmp" "$R/etc"
/bin/mount -t proc proc "$R/proc"
/bin/mount --bind /sys "$R/sys"
/bin/mount -o remount,bind,ro "$R/sys"
/bin/mount -t tmpfs -o mode=0755 dev "$R/dev"
for d in null zero full random urandom tty; do
  /bin/touch "$R/dev/$d"; /bin/mount --bind "/dev/$d" "$R/dev/$d"
done
while [ "$1" != "--" ]; do
  if [ -d "$2" ]; then /bin/mkdir -p "$R$3"; else /bin/mkdir -p "$(/usr/bin/dirname "$R$3")"; [ -e "$R$3" ] || /bin/touch "$R$3"; fi
  /bin/mount --bind "$2" "$R$3"
  if [ "$1" = ro ]; then /bin/mount -o remount,bind,ro "$R$3"; fi
  shift 3
done
shift
if [ "$ROOTMODE" = ro ]; then /bin/mount -o remount,ro "$R"; fi
exec /usr/bin/unshare --root="$R" --wd="$WD" --setgid "$G" --setuid "$U" -- "$@"
"#;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("container has no command: the sandbox runs no images, so `command` must be set")]
    EmptyCommand,
    #[error("opening container log {path}: {source}")]
    OpenLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting `{program}` in netns {netns}: {source}")]
    Spawn {
        program: String,
        netns: String,
        source: std::io::Error,
    },
}

/// How a stop ended: the exit status, and whether the grace period ran out (SIGKILL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub status: ExitStatus,
    pub killed: bool,
}

/// A running (or exited) container process group. Dropping it SIGKILLs the group.
#[derive(Debug)]
pub struct ContainerProcess {
    pgid: Pid,
    exit: watch::Receiver<Option<ExitStatus>>,
    group_reaped: bool,
}

impl ContainerProcess {
    /// Starts `launch.argv` in `launch.netns` as the leader of a new process group.
    pub fn spawn(launch: &Launch) -> Result<Self, ProcessError> {
        let program = launch.argv.first().ok_or(ProcessError::EmptyCommand)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&launch.log_path)
            .map_err(|source| ProcessError::OpenLog {
                path: launch.log_path.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| ProcessError::OpenLog {
            path: launch.log_path.clone(),
            source,
        })?;
        let mut cmd = match &launch.cgroup {
            // `sh` moves itself into the cgroup, then becomes the next step: the
            // container's processes are in the cgroup from their first instruction.
            Some(cg) => {
                let mut c = tokio::process::Command::new("/bin/sh");
                c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                    .arg(cg);
                c
            }
            None => tokio::process::Command::new("/usr/bin/env"),
        };
        // A mount namespace of its own (slave to the host's) for the container's mounts;
        // in the pod's network namespace unless it is on the host's network.
        if launch.host_network {
            cmd.args(["/usr/bin/unshare", "--mount", "--propagation", "slave"]);
        } else {
            cmd.args(["/bin/ip", "netns", "exec", &launch.netns]);
        }
        match &launch.image {
            Some(image) => {
                cmd.args(["/bin/sh", "-c", IMAGE_SCRIPT])
                    .arg(&image.scratch)
                    .arg(&image.rootfs)
                    .arg(if image.read_only_root { "ro" } else { "rw" })
                    .arg(&image.working_dir)
                    .arg(image.uid.to_string())
                    .arg(image.gid.to_string());
                for m in &image.mounts {
                    cmd.arg(if m.read_only { "ro" } else { "rw" })
                        .arg(&m.source)
                        .arg(&m.target);
                }
                cmd.arg("--");
            }
            None => {
                if let Some(dir) = &launch.service_account {
                    // A tmpfs on /run in the container's mount namespace, and the token
                    // directory bound into it, change nothing outside.
                    cmd.args([
                        "/bin/sh",
                        "-c",
                        r#"mount -t tmpfs -o mode=0755 pod-run /run && mkdir -p "$1" && mount --bind -o ro "$0" "$1" && shift && exec "$@""#,
                    ])
                    .arg(dir)
                    .arg(super::service_account::MOUNT_PATH.replace("/var/run/", "/run/"));
                }
            }
        }
        if !launch.start_delay.is_zero() {
            // `sh` sleeps (in a child `sleep`), then becomes the program itself.
            cmd.args(["/bin/sh", "-c", r#"sleep "$0" && exec "$@""#])
                .arg(format!("{:.3}", launch.start_delay.as_secs_f64()));
        }
        let path = match &launch.image {
            // The image's own PATH (from its Env) resolves the program in its root.
            Some(_) => launch
                .env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| std::ffi::OsString::from(v))
                .unwrap_or_else(|| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                }),
            // Host processes resolve commands as the test itself does.
            None => std::env::var_os("PATH").unwrap_or_default(),
        };
        cmd.args(&launch.argv)
            // Like a container, the process sees only its own environment.
            .env_clear()
            .env("PATH", path)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.working_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            netns: launch.netns.clone(),
            source,
        })?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            // The status is only unavailable if waitpid itself fails; report it as killed.
            let status = child
                .wait()
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(Signal::SIGKILL as i32));
            let _ = tx.send(Some(status));
        });
        Ok(Self {
            pgid: Pid::from_raw(pid as i32),
            exit: rx,
            group_reaped: false,
        })
    }

    /// Process id of the group leader (the container's main process).
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// The exit status once the main process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A receiver that turns `Some` when the main process exits, for select loops.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Waits for the main process to exit. Cancel-safe.
    pub async fn exited(&mut self) -> ExitStatus {
        match self.exit.wait_for(Option::is_some).await {
            Ok(status) => status.expect("waited for Some"),
            // The waiter task is gone (runtime shutting down): nothing left to wait for.
            Err(_) => ExitStatus::from_raw(Signal::SIGKILL as i32),
        }
    }

    /// SIGTERM to the group, SIGKILL once `grace` has passed; then SIGKILL whatever is
    /// left of the group (children the main process left behind), as a container's end
    /// takes all its processes with it.
    pub async fn stop(&mut self, grace: Duration) -> Stopped {
        let mut killed = false;
        let status = match self.exit_status() {
            Some(status) => status,
            None => {
                self.signal(Signal::SIGTERM);
                match tokio::time::timeout(grace, self.exited()).await {
                    Ok(status) => status,
                    Err(_) => {
                        tracing::info!(pid = self.pid(), ?grace, "grace period over, SIGKILL");
                        killed = true;
                        self.signal(Signal::SIGKILL);
                        self.exited().await
                    }
                }
            }
        };
        self.reap_group();
        Stopped { status, killed }
    }

    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => tracing::warn!(pgid = %self.pgid, ?signal, %err, "signalling container"),
        }
    }

    fn reap_group(&mut self) {
        if !self.group_reaped {
            self.signal(Signal::SIGKILL);
            self.group_reaped = true;
        }
    }
}

impl Drop for ContainerProcess {
    fn drop(&mut self) {
        self.reap_group();
    }
}

/// The exit code Kubernetes reports for a status: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention_for_signals() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(Signal::SIGKILL as i32)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(Signal::SIGTERM as i32)), 143);
    }
}
