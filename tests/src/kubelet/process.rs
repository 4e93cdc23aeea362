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
}

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
            // `sh` moves itself into the cgroup, then becomes `ip netns exec ...`: the
            // container's processes are in the cgroup from their first instruction.
            Some(cg) => {
                let mut c = tokio::process::Command::new("sh");
                c.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
                    .arg(cg)
                    .arg("ip");
                c
            }
            None => tokio::process::Command::new("ip"),
        };
        cmd.args(["netns", "exec", &launch.netns]);
        if let Some(dir) = &launch.service_account {
            // `ip netns exec` gives the process a mount namespace of its own (slave to
            // the host's): a tmpfs on /run there, and the token directory bound into
            // it, change nothing outside.
            cmd.args([
                "sh",
                "-c",
                r#"mount -t tmpfs -o mode=0755 pod-run /run && mkdir -p "$1" && mount --bind -o ro "$0" "$1" && shift && exec "$@""#,
            ])
            .arg(dir)
            .arg(super::service_account::MOUNT_PATH.replace("/var/run/", "/run/"));
        }
        if !launch.start_delay.is_zero() {
            // `sh` sleeps (in a child `sleep`), then becomes the program itself.
            cmd.args(["sh", "-c", r#"sleep "$0" && exec "$@""#])
                .arg(format!("{:.3}", launch.start_delay.as_secs_f64()));
        }
        cmd.args(&launch.argv)
            // Like a container, the process sees only its own environment; PATH is the
            // host's so that commands resolve as they do for the test itself.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
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
