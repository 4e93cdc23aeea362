//! Where one agent instance pins its maps and links under bpffs, and how they are
//! removed. Owns path layout and file removal only; never creates or loads objects.
//!
//! Layout: `<bpffs>/nemesis/<instance>/maps/<MAP>` and `.../links/<program>`.

use std::{
    io,
    path::{Path, PathBuf},
};

use nemesis_common::maps::{
    PINNED_MAPS, PROG_CONNECT4, PROG_CONNECT4_UDP, PROG_CONNECT6, PROG_CONNECT6_UDP,
    PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4,
    PROG_SENDMSG6, PROG_SOCK_OPS, RETIRED_MAPS, UDP_PINNED_MAPS,
};

/// The programs, each pinned as one link.
pub const PROGRAMS: [&str; 5] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SOCK_OPS,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];

/// The UDP programs (sendmsg and recvmsg), each pinned as one link too. A UDP socket's
/// connect is connect4's and connect6's.
pub const UDP_PROGRAMS: [&str; 4] = [PROG_SENDMSG4, PROG_SENDMSG6, PROG_RECVMSG4, PROG_RECVMSG6];

/// Links an older agent pinned that this one no longer makes: removed (detaching their
/// programs) once this agent's own are in place, and by a cleanup. connect4_udp and
/// connect6_udp ran beside connect4 and connect6, which now handle UDP sockets too.
pub const RETIRED_PROGRAMS: [&str; 2] = [PROG_CONNECT4_UDP, PROG_CONNECT6_UDP];

/// Directory under bpffs that holds every instance.
pub const ROOT_DIR: &str = "nemesis";

/// An instance name: becomes a directory name, so no separators or dots.
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    dir: PathBuf,
}

/// What a cleanup removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub links_removed: Vec<PathBuf>,
    pub maps_removed: Vec<PathBuf>,
    pub dir_removed: bool,
}

impl PinLayout {
    /// `instance` must pass [`valid_instance`].
    pub fn new(bpffs: &Path, instance: &str) -> Self {
        Self {
            dir: bpffs.join(ROOT_DIR).join(instance),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    pub fn create_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.maps_dir())?;
        std::fs::create_dir_all(self.links_dir())
    }

    /// Removes every pin of this instance and its directories. Removing a link's last
    /// pin (with no fd open on it) detaches its program. Idempotent; entries it does not
    /// know (not created by Nemesis) are left and make the directory stay.
    pub fn remove_all(&self) -> io::Result<CleanupReport> {
        let mut report = CleanupReport::default();
        for p in PROGRAMS
            .iter()
            .chain(UDP_PROGRAMS.iter())
            .chain(RETIRED_PROGRAMS.iter())
        {
            if remove_if_exists(&self.link(p))? {
                report.links_removed.push(self.link(p));
            }
        }
        for m in PINNED_MAPS
            .iter()
            .chain(UDP_PINNED_MAPS.iter())
            .chain(RETIRED_MAPS.iter())
        {
            if remove_if_exists(&self.map(m))? {
                report.maps_removed.push(self.map(m));
            }
        }
        let mut dir_removed = true;
        for d in [self.links_dir(), self.maps_dir(), self.dir.clone()] {
            dir_removed &= remove_dir_if_empty(&d)?;
        }
        // The shared parent goes when the last instance has gone.
        if let Some(parent) = self.dir.parent() {
            remove_dir_if_empty(parent)?;
        }
        report.dir_removed = dir_removed;
        Ok(report)
    }
}

fn remove_if_exists(p: &Path) -> io::Result<bool> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// True when the directory is gone afterwards.
fn remove_dir_if_empty(p: &Path) -> io::Result<bool> {
    match std::fs::remove_dir(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(e),
    }
}

/// A private bpffs mounted on a fresh directory, for tests and benchmarks that must not
/// depend on (or litter) the system's /sys/fs/bpf. Unmounted and removed on drop.
#[derive(Debug)]
pub struct ScratchBpffs {
    dir: PathBuf,
}

impl ScratchBpffs {
    /// Mounts a new bpffs instance at `<tmp>/nemesis-bpffs-<name>`.
    pub fn mount(name: &str) -> io::Result<Self> {
        use nix::mount::{MsFlags, mount};
        let dir = std::env::temp_dir().join(format!("nemesis-bpffs-{name}"));
        std::fs::create_dir(&dir)?;
        if let Err(e) = mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::other(format!(
                "mounting a bpffs at {}: {e}",
                dir.display()
            )));
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ScratchBpffs {
    fn drop(&mut self) {
        use nix::mount::{MntFlags, umount2};
        // Detach: pins still open elsewhere must not keep the mount busy.
        let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_cannot_escape_the_pin_directory() {
        assert!(valid_instance("node-a_1"));
        assert!(!valid_instance(""));
        assert!(!valid_instance("../x"));
        assert!(!valid_instance("a/b"));
        assert!(!valid_instance(&"x".repeat(65)));
    }

    #[test]
    fn layout_puts_maps_and_links_under_the_instance() {
        let l = PinLayout::new(Path::new("/sys/fs/bpf"), "t1");
        assert_eq!(
            l.map("SERVICES_V1"),
            PathBuf::from("/sys/fs/bpf/nemesis/t1/maps/SERVICES_V1")
        );
        assert_eq!(
            l.link("connect4"),
            PathBuf::from("/sys/fs/bpf/nemesis/t1/links/connect4")
        );
    }

    #[test]
    fn remove_all_on_plain_directories_is_idempotent() {
        // bpffs pins are files; plain files in a temp dir exercise the same removal.
        let tmp = std::env::temp_dir().join(format!("nemesis-pins-{}", std::process::id()));
        let l = PinLayout::new(&tmp, "inst");
        l.create_dirs().unwrap();
        std::fs::write(l.link(PROG_CONNECT4), b"").unwrap();
        std::fs::write(l.map(PINNED_MAPS[0]), b"").unwrap();
        let r = l.remove_all().unwrap();
        assert_eq!(r.links_removed, vec![l.link(PROG_CONNECT4)]);
        assert_eq!(r.maps_removed, vec![l.map(PINNED_MAPS[0])]);
        assert!(r.dir_removed);
        assert!(!l.dir().exists());
        assert_eq!(
            l.remove_all().unwrap(),
            CleanupReport {
                dir_removed: true,
                ..Default::default()
            }
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
