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

/// Removes the empty cgroups `<parent>/<prefix><pid>-...` whose `<pid>` is no longer
/// running: what a benchmark killed before its clean-up left behind (its names carry its
/// pid). A cgroup of a live process, or one that still holds processes or children, is
/// kept. Returns the paths removed.
pub fn remove_orphans(parent: &Path, prefix: &str) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(parent)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| owner_pid(n, prefix)) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if entry.file_type()?.is_dir() && std::fs::remove_dir(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// The pid in a cgroup name `<prefix><pid>-<rest>`, if it has that shape.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(prefix)?.split_once('-')?;
    pid.parse().ok()
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
    fn orphans_are_the_empty_cgroups_of_dead_owners_with_the_prefix() {
        assert_eq!(
            owner_pid("nemesis-bench-lb-42-on", "nemesis-bench-lb-"),
            Some(42)
        );
        assert_eq!(
            owner_pid("nemesis-bench-lb-x-on", "nemesis-bench-lb-"),
            None
        );
        assert_eq!(owner_pid("nemesis-bench-42-on", "nemesis-bench-lb-"), None);
        // A plain directory stands in for the cgroup2 tree: rmdir is the same call.
        let dir =
            Scratch(std::env::temp_dir().join(format!("nemesis-orphans-{}", std::process::id())));
        std::fs::create_dir(dir.path()).unwrap();
        let dead = 4_000_000_000u32; // above any pid_max
        let live = std::process::id();
        for name in [
            format!("nemesis-bench-lb-{dead}-on"),
            format!("nemesis-bench-lb-{dead}-busy"),
            format!("nemesis-bench-lb-{live}-on"),
            format!("other-{dead}-on"),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        // Not empty (a cgroup with a child or processes cannot be removed either).
        std::fs::create_dir(
            dir.path()
                .join(format!("nemesis-bench-lb-{dead}-busy/child")),
        )
        .unwrap();
        let removed = remove_orphans(dir.path(), "nemesis-bench-lb-").unwrap();
        assert_eq!(
            removed,
            vec![dir.path().join(format!("nemesis-bench-lb-{dead}-on"))]
        );
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            format!("nemesis-bench-lb-{dead}-busy"),
            format!("nemesis-bench-lb-{live}-on"),
            format!("other-{dead}-on"),
        ];
        want.sort();
        assert_eq!(left, want);
    }

    /// A scratch directory removed with everything in it at the end of a test.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

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
