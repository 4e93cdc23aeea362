//! Start-up prerequisites of the datapath: privileges, cgroup2, bpffs, BTF, kernel
//! version. Parsing is pure (text in, findings out) so every message is unit-tested;
//! `check` only reads the files. Never mounts or changes anything itself.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Oldest kernel with everything the programs use: cgroup bpf links and
/// BPF_LINK_UPDATE (5.7), the BPF ring buffer behind aya-log (5.8).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// One thing the machine lacks, with how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Neither root nor the capabilities.
    Privileges {
        euid: u32,
        lacking: Vec<&'static str>,
    },
    /// No cgroup2 mount in /proc/mounts.
    Cgroup2,
    /// No bpf filesystem mount.
    Bpffs,
    /// The bpffs directory given is not a bpf filesystem mount.
    BpffsPath { path: PathBuf },
    /// /sys/kernel/btf/vmlinux is absent.
    Btf,
    /// The kernel is older than [`MIN_KERNEL`] (or its version cannot be read).
    Kernel { release: String },
    /// The cgroup given to attach to does not exist or is not on the cgroup2 mount.
    CgroupPath {
        path: PathBuf,
        cgroup2: Option<PathBuf>,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Privileges { euid, lacking } => write!(
                f,
                "insufficient privileges (euid {euid}, missing {}): run the agent as root, \
                 or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN \
                 (e.g. securityContext.capabilities.add in the DaemonSet)",
                lacking.join(", ")
            ),
            Missing::Cgroup2 => write!(
                f,
                "no cgroup2 filesystem in /proc/mounts: mount one with \
                 `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`, \
                 or pass --cgroup <path of a cgroup2 directory>"
            ),
            Missing::Bpffs => write!(
                f,
                "no bpf filesystem (bpffs) in /proc/mounts: mount it with \
                 `mount -t bpf bpf /sys/fs/bpf` (in a pod: a hostPath volume of /sys/fs/bpf)"
            ),
            Missing::BpffsPath { path } => write!(
                f,
                "{} is not a bpf filesystem mount: mount one there with \
                 `mount -t bpf bpf {}`, or leave the bpffs setting unset to use the \
                 system's",
                path.display(),
                path.display()
            ),
            Missing::Btf => write!(
                f,
                "no kernel BTF at /sys/kernel/btf/vmlinux: use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.x)"
            ),
            Missing::Kernel { release } => write!(
                f,
                "kernel {release:?} is too old or unreadable: Nemesis needs Linux {}.{} or newer \
                 (cgroup bpf links, BPF_LINK_UPDATE, BPF ring buffer)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            Missing::CgroupPath { path, cgroup2 } => match cgroup2 {
                Some(m) => write!(
                    f,
                    "cgroup {} is not a directory under the cgroup2 mount {}: \
                     pass an existing cgroup2 directory to --cgroup",
                    path.display(),
                    m.display()
                ),
                None => write!(
                    f,
                    "cgroup {} cannot be checked: no cgroup2 mount",
                    path.display()
                ),
            },
        }
    }
}

/// Every missing prerequisite at once, so one start tells the whole story.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingPrerequisites(pub Vec<Missing>);

impl fmt::Display for MissingPrerequisites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the eBPF datapath cannot start:")?;
        for m in &self.0 {
            write!(f, "\n  - {m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MissingPrerequisites {}

/// What the checks found that the loader uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    /// The cgroup to attach to (the override, or the cgroup2 mount's root).
    pub cgroup: PathBuf,
    /// The bpffs mount point.
    pub bpffs: PathBuf,
}

/// Mount points of the given filesystem type in /proc/mounts text, in order.
pub fn mounts_of_type<'a>(mounts: &'a str, fstype: &str) -> Vec<&'a str> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then_some(dir)
        })
        .collect()
}

/// The cgroup2 mount point, if any.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts_of_type(mounts, "cgroup2")
        .first()
        .map(|d| PathBuf::from(unescape_mount_path(d)))
}

/// The bpffs mount point, preferring the conventional /sys/fs/bpf when several exist.
pub fn bpffs_mount(mounts: &str) -> Option<PathBuf> {
    let all = mounts_of_type(mounts, "bpf");
    all.iter()
        .find(|d| **d == "/sys/fs/bpf")
        .or(all.first())
        .map(|d| PathBuf::from(unescape_mount_path(d)))
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (major, minor) of a kernel release string like `6.18.44-fc-v657`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The effective capability set from /proc/self/status text.
pub fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Names of the capabilities the datapath needs that `caps` lacks. CAP_SYS_ADMIN
/// stands in for both (older kernels have no CAP_BPF).
pub fn lacking_caps(caps: u64) -> Vec<&'static str> {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) {
        return vec![];
    }
    let mut lacking = vec![];
    if !has(CAP_BPF) {
        lacking.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        lacking.push("CAP_NET_ADMIN");
    }
    lacking
}

/// Inputs of [`evaluate`], read from the machine by [`check`].
#[derive(Clone, Debug)]
pub struct Facts {
    pub mounts: String,
    pub status: String,
    pub euid: u32,
    pub btf_present: bool,
    pub kernel_release: String,
    /// The --cgroup override, and whether it is an existing directory.
    pub cgroup_override: Option<(PathBuf, bool)>,
    /// The bpffs override (canonical path).
    pub bpffs_override: Option<PathBuf>,
}

/// Decides from the facts alone: the environment, or everything that is missing.
pub fn evaluate(facts: &Facts) -> Result<Environment, MissingPrerequisites> {
    let mut missing = vec![];
    let lacking = effective_caps(&facts.status)
        .map(lacking_caps)
        .unwrap_or_else(|| vec!["CAP_BPF", "CAP_NET_ADMIN"]);
    if !lacking.is_empty() {
        missing.push(Missing::Privileges {
            euid: facts.euid,
            lacking,
        });
    }
    let cgroup2 = cgroup2_mount(&facts.mounts);
    if cgroup2.is_none() {
        missing.push(Missing::Cgroup2);
    }
    let bpffs = match &facts.bpffs_override {
        Some(path) => {
            let mounted = mounts_of_type(&facts.mounts, "bpf")
                .iter()
                .any(|d| Path::new(&unescape_mount_path(d)) == path);
            if !mounted {
                missing.push(Missing::BpffsPath { path: path.clone() });
            }
            mounted.then(|| path.clone())
        }
        None => {
            let found = bpffs_mount(&facts.mounts);
            if found.is_none() {
                missing.push(Missing::Bpffs);
            }
            found
        }
    };
    if !facts.btf_present {
        missing.push(Missing::Btf);
    }
    if kernel_version(&facts.kernel_release).is_none_or(|v| v < MIN_KERNEL) {
        missing.push(Missing::Kernel {
            release: facts.kernel_release.trim().to_string(),
        });
    }
    let cgroup = match (&facts.cgroup_override, &cgroup2) {
        (Some((path, is_dir)), Some(mount)) => {
            // Any cgroup2 mount will do, not only the first: in a container the first
            // is the container's own cgroup namespace, and the node's hierarchy is a
            // host mount further down (the DaemonSet's /run/nemesis/cgroupv2).
            let under_cgroup2 = mounts_of_type(&facts.mounts, "cgroup2")
                .iter()
                .any(|m| path.starts_with(unescape_mount_path(m)));
            if *is_dir && under_cgroup2 {
                Some(path.clone())
            } else {
                missing.push(Missing::CgroupPath {
                    path: path.clone(),
                    cgroup2: Some(mount.clone()),
                });
                None
            }
        }
        (None, Some(mount)) => Some(mount.clone()),
        (_, None) => None,
    };
    match (missing.is_empty(), cgroup, bpffs) {
        (true, Some(cgroup), Some(bpffs)) => Ok(Environment { cgroup, bpffs }),
        _ => Err(MissingPrerequisites(missing)),
    }
}

/// Reads the facts from this machine and evaluates them.
pub fn check(
    cgroup_override: Option<&Path>,
    bpffs_override: Option<&Path>,
) -> Result<Environment, MissingPrerequisites> {
    evaluate(&read_facts(cgroup_override, bpffs_override))
}

pub fn read_facts(cgroup_override: Option<&Path>, bpffs_override: Option<&Path>) -> Facts {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    Facts {
        mounts: read("/proc/mounts"),
        status: read("/proc/self/status"),
        euid: super::sys::effective_uid(),
        btf_present: Path::new("/sys/kernel/btf/vmlinux").exists(),
        kernel_release: read("/proc/sys/kernel/osrelease"),
        cgroup_override: cgroup_override.map(|p| {
            // Compare canonical paths, so `/sys/fs/cgroup/unified/../unified/x` works.
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let is_dir = canon.is_dir();
            (canon, is_dir)
        }),
        bpffs_override: bpffs_override
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
";

    fn good_facts() -> Facts {
        Facts {
            mounts: HYBRID_MOUNTS.into(),
            status: "Name:\tx\nCapEff:\t000001ffffffffff\n".into(),
            euid: 0,
            btf_present: true,
            kernel_release: "6.18.44-fc-v657\n".into(),
            cgroup_override: None,
            bpffs_override: None,
        }
    }

    #[test]
    fn hybrid_layout_finds_the_unified_cgroup2_mount_and_bpffs() {
        let env = evaluate(&good_facts()).unwrap();
        assert_eq!(env.cgroup, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(env.bpffs, PathBuf::from("/sys/fs/bpf"));
    }

    #[test]
    fn missing_cgroup2_mount_is_named_with_the_mount_command() {
        let mut f = good_facts();
        f.mounts = f
            .mounts
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = evaluate(&f).unwrap_err();
        assert_eq!(err.0, vec![Missing::Cgroup2]);
        let msg = err.to_string();
        assert!(msg.contains("no cgroup2 filesystem"), "{msg}");
        assert!(msg.contains("mount -t cgroup2"), "{msg}");
    }

    #[test]
    fn missing_bpffs_suggests_the_mount_command() {
        let mut f = good_facts();
        f.mounts = f.mounts.replace(" bpf rw", " tmpfs rw");
        let msg = evaluate(&f).unwrap_err().to_string();
        assert!(msg.contains("mount -t bpf bpf /sys/fs/bpf"), "{msg}");
    }

    #[test]
    fn bpffs_override_must_be_a_bpf_mount() {
        let mut f = good_facts();
        f.bpffs_override = Some(PathBuf::from("/tmp/not-bpffs"));
        let err = evaluate(&f).unwrap_err();
        assert_eq!(
            err.0,
            vec![Missing::BpffsPath {
                path: PathBuf::from("/tmp/not-bpffs")
            }]
        );
        assert!(err.to_string().contains("mount -t bpf bpf /tmp/not-bpffs"));
        f.mounts.push_str("bpf /tmp/scratch bpf rw 0 0\n");
        f.bpffs_override = Some(PathBuf::from("/tmp/scratch"));
        assert_eq!(evaluate(&f).unwrap().bpffs, PathBuf::from("/tmp/scratch"));
    }

    #[test]
    fn unprivileged_process_is_told_which_capabilities_it_lacks() {
        let mut f = good_facts();
        f.status = "CapEff:\t0000000000000000\n".into();
        f.euid = 1000;
        let err = evaluate(&f).unwrap_err();
        assert_eq!(
            err.0,
            vec![Missing::Privileges {
                euid: 1000,
                lacking: vec!["CAP_BPF", "CAP_NET_ADMIN"]
            }]
        );
        assert!(err.to_string().contains("run the agent as root"));
    }

    #[test]
    fn cap_bpf_and_net_admin_suffice_without_sys_admin() {
        let caps = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN);
        assert!(lacking_caps(caps).is_empty());
        assert_eq!(lacking_caps(1u64 << CAP_BPF), vec!["CAP_NET_ADMIN"]);
    }

    #[test]
    fn old_kernel_and_missing_btf_are_both_reported() {
        let mut f = good_facts();
        f.kernel_release = "5.4.0-150-generic".into();
        f.btf_present = false;
        let err = evaluate(&f).unwrap_err();
        assert_eq!(
            err.0,
            vec![
                Missing::Btf,
                Missing::Kernel {
                    release: "5.4.0-150-generic".into()
                }
            ]
        );
        assert!(err.to_string().contains("needs Linux 5.8 or newer"));
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.8"), Some((5, 8)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn cgroup_override_outside_the_cgroup2_mount_is_rejected() {
        let mut f = good_facts();
        f.cgroup_override = Some((PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/x"), true));
        let err = evaluate(&f).unwrap_err();
        assert!(matches!(err.0[..], [Missing::CgroupPath { .. }]));
        let mut f = good_facts();
        f.cgroup_override = Some((PathBuf::from("/sys/fs/cgroup/unified/x"), true));
        assert_eq!(
            evaluate(&f).unwrap().cgroup,
            PathBuf::from("/sys/fs/cgroup/unified/x")
        );
    }

    #[test]
    fn cgroup_override_on_a_later_cgroup2_mount_is_accepted() {
        // A DaemonSet container: its own cgroup namespace first, the host's hierarchy
        // mounted further down.
        let mut f = good_facts();
        f.mounts = "\
cgroup /sys/fs/cgroup cgroup2 ro,nosuid,nodev,noexec,relatime 0 0
cgroup2 /run/nemesis/cgroupv2 cgroup2 ro,nosuid,nodev,noexec,relatime 0 0
bpf /run/nemesis/bpffs bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
"
        .into();
        f.cgroup_override = Some((PathBuf::from("/run/nemesis/cgroupv2"), true));
        assert_eq!(
            evaluate(&f).unwrap().cgroup,
            PathBuf::from("/run/nemesis/cgroupv2")
        );
        f.cgroup_override = Some((PathBuf::from("/run/nemesis/other"), true));
        assert!(evaluate(&f).is_err());
    }

    #[test]
    fn escaped_mount_paths_are_unescaped() {
        let m = "cgroup2 /tmp/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(m), Some(PathBuf::from("/tmp/my cg")));
    }
}
