//! Child cgroups for tests, benchmarks and the demo: create one under a cgroup2
//! directory, move processes into it, remove it. Never touches a cgroup it did not
//! create, and never moves a process it was not asked to move.

use std::{
    io,
    path::{Path, PathBuf},
};

/// A cgroup this process created; removed (if empty) on drop.
#[derive(Debug)]
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    /// Creates `<parent>/<name>`; fails if it exists, so two users cannot share one.
    pub fn create(parent: &Path, name: &str) -> io::Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cgroup name {name:?}"),
            ));
        }
        let path = parent.join(name);
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the whole process `pid` (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> io::Result<()> {
        move_process(&self.path, pid)
    }

    /// Pids of the processes in this cgroup.
    pub fn processes(&self) -> io::Result<Vec<u32>> {
        Ok(std::fs::read_to_string(self.path.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Removes the cgroup; it must have no processes left.
    pub fn remove(mut self) -> io::Result<()> {
        let path = std::mem::take(&mut self.path);
        std::fs::remove_dir(&path)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// Writes `pid` into `<cgroup>/cgroup.procs`.
pub fn move_process(cgroup: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
}

/// The cgroup2 path of `pid` relative to the cgroup2 mount, from `/proc/<pid>/cgroup`
/// text (the `0::/path` line).
pub fn cgroup2_relative_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/'))
}

/// The cgroup2 directory this process is in, given the cgroup2 mount.
pub fn current_cgroup(cgroup2_mount: &Path) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = cgroup2_relative_path(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 entry in /proc/self/cgroup",
        )
    })?;
    Ok(cgroup2_mount.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_line_is_found_in_a_hybrid_proc_cgroup() {
        let text = "12:cpu,cpuacct:/user.slice\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            cgroup2_relative_path(text),
            Some("user.slice/session-1.scope")
        );
        assert_eq!(cgroup2_relative_path("0::/\n"), Some(""));
        assert_eq!(cgroup2_relative_path("1:name=systemd:/\n"), None);
    }
}
