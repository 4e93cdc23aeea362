//! The node's images: OCI archives (as `cargo xtask image` writes them) known by the
//! reference they carry, matched against a pod's `image` as containerd matches them
//! (`nemesis-agent:0.1.0` is `docker.io/library/nemesis-agent:0.1.0`, so a kustomize
//! `images:` override to `localhost/nemesis-agent` is needed, as on kind or k3s), and
//! unpacked once per manifest digest into a root filesystem the containers run from.
//! Never pulls: an image the store lacks is the pod's `ErrImageNeverPull`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {message}")]
    ReadArchive { path: PathBuf, message: String },
    #[error("{path}: no image reference (org.opencontainers.image.ref.name) in its index.json")]
    NoReference { path: PathBuf },
    #[error(
        "image {reference:?} is not on this node and the sandbox pulls nothing (images it has: {known})"
    )]
    NotPresent { reference: String, known: String },
    #[error("unpacking {reference} from {path}: {message}")]
    Unpack {
        reference: String,
        path: PathBuf,
        message: String,
    },
}

/// What a container runs from: the unpacked root and the image's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub reference: String,
    pub rootfs: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` pairs of the image's `Env`, in order.
    pub env: Vec<(String, String)>,
    /// `uid[:gid]` or a user name, as the image's `User` says; empty for root.
    pub user: String,
    pub working_dir: String,
}

#[derive(Debug)]
struct Entry {
    archive: PathBuf,
    /// The manifest's digest (`sha256:...`): the unpacked copy's name.
    digest: String,
}

/// Archives by normalised reference, and where they are unpacked.
#[derive(Debug)]
pub struct ImageStore {
    entries: BTreeMap<String, Entry>,
    cache: PathBuf,
    unpacked: Mutex<BTreeMap<String, Arc<Image>>>,
}

/// containerd's normalisation of an image reference: a first path component without
/// `.` or `:` (and not `localhost`) is a Docker Hub name, a single one is in `library/`,
/// and no tag or digest means `:latest`.
pub fn normalize(reference: &str) -> String {
    let (name, tag) = match reference.rsplit_once('@') {
        Some((n, d)) => (n.to_string(), format!("@{d}")),
        None => match reference.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n.to_string(), format!(":{t}")),
            _ => (reference.to_string(), ":latest".to_string()),
        },
    };
    let name = match name.split_once('/') {
        None => format!("docker.io/library/{name}"),
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            name
        }
        Some(_) => format!("docker.io/{name}"),
    };
    format!("{name}{tag}")
}

/// Whether `reference` is the pause image every kubelet has (its sandbox image): the
/// sandbox runs it as a process that only waits, whatever its tag.
pub fn is_pause(reference: &str) -> bool {
    normalize(reference).starts_with("registry.k8s.io/pause:")
}

/// What the pause image runs: nothing but waiting to be stopped.
pub const PAUSE_ARGV: [&str; 2] = ["sleep", "infinity"];

fn tar_file(archive: &Path, member: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(member)
        .output()
        .map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tar -xOf {member}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

impl ImageStore {
    /// Reads the reference and digest of each archive; unpacked copies go under `cache`.
    pub fn open(archives: &[PathBuf], cache: PathBuf) -> Result<Self, ImageError> {
        let mut entries = BTreeMap::new();
        for path in archives {
            let read = |message| ImageError::ReadArchive {
                path: path.clone(),
                message,
            };
            let index: Value = serde_json::from_slice(&tar_file(path, "index.json").map_err(read)?)
                .map_err(|e| read(e.to_string()))?;
            let manifest = &index["manifests"][0];
            let reference = manifest["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .ok_or_else(|| ImageError::NoReference { path: path.clone() })?;
            let digest = manifest["digest"]
                .as_str()
                .ok_or_else(|| read("index.json names no manifest digest".into()))?;
            entries.insert(
                normalize(reference),
                Entry {
                    archive: path.clone(),
                    digest: digest.to_string(),
                },
            );
        }
        Ok(Self {
            entries,
            cache,
            unpacked: Mutex::new(BTreeMap::new()),
        })
    }

    /// The normalised references this node has.
    pub fn references(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    pub fn has(&self, reference: &str) -> bool {
        self.entries.contains_key(&normalize(reference))
    }

    /// The image for `reference`, unpacked on first use (blocking: call it off the
    /// async threads).
    pub fn resolve(&self, reference: &str) -> Result<Arc<Image>, ImageError> {
        let key = normalize(reference);
        let entry = self
            .entries
            .get(&key)
            .ok_or_else(|| ImageError::NotPresent {
                reference: reference.to_string(),
                known: self.references().join(", "),
            })?;
        // One unpack at a time: two pods of one image must not both write its root.
        let mut unpacked = self.unpacked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(image) = unpacked.get(&entry.digest) {
            return Ok(Arc::clone(image));
        }
        let image = Arc::new(
            self.unpack(&key, entry)
                .map_err(|message| ImageError::Unpack {
                    reference: key.clone(),
                    path: entry.archive.clone(),
                    message,
                })?,
        );
        unpacked.insert(entry.digest.clone(), Arc::clone(&image));
        Ok(image)
    }

    fn unpack(&self, reference: &str, entry: &Entry) -> Result<Image, String> {
        let dir = self.cache.join(entry.digest.replace(':', "-"));
        let rootfs = dir.join("rootfs");
        let manifest: Value =
            serde_json::from_slice(&tar_file(&entry.archive, &blob_path(&entry.digest))?)
                .map_err(|e| format!("the manifest: {e}"))?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or("the manifest names no config")?;
        let config: Value =
            serde_json::from_slice(&tar_file(&entry.archive, &blob_path(config_digest))?)
                .map_err(|e| format!("the image config: {e}"))?;
        if !dir.join("complete").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            let oci = dir.join("oci");
            std::fs::create_dir_all(&oci).map_err(|e| format!("{}: {e}", oci.display()))?;
            std::fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
            run_tar(&entry.archive, &oci)?;
            for layer in manifest["layers"].as_array().into_iter().flatten() {
                let digest = layer["digest"].as_str().ok_or("a layer without digest")?;
                // tar recognises gzip and zstd layers by their content.
                run_tar(&oci.join(blob_path(digest)), &rootfs)?;
            }
            let _ = std::fs::remove_dir_all(&oci);
            std::fs::write(dir.join("complete"), b"").map_err(|e| e.to_string())?;
        }
        let c = &config["config"];
        Ok(Image {
            reference: reference.to_string(),
            rootfs,
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"])
                .into_iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
                .collect(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
        })
    }
}

fn run_tar(archive: &Path, into: &Path) -> Result<(), String> {
    let out = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output()
        .map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tar -xf {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `uid` and `gid` of an image's `User` (`uid`, `uid:gid`, `name`, `name:group`),
/// names looked up in the image's own `/etc/passwd` and `/etc/group`.
pub fn image_user(image: &Image) -> Result<(u32, u32), String> {
    if image.user.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match image.user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image.user.as_str(), None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(image.rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let cols: Vec<&str> = l.split(':').collect();
            (cols.first() == Some(&name)).then(|| {
                let id = cols.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                let gid = cols.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
                (id, gid)
            })
        })
    };
    let (uid, passwd_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, 0),
        Err(_) => lookup("etc/passwd", user, 3)
            .ok_or_else(|| format!("user {user:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => passwd_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g, 2)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_as_containerd_does() {
        assert_eq!(
            normalize("nemesis-agent:0.1.0"),
            "docker.io/library/nemesis-agent:0.1.0"
        );
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("org/app:1"), "docker.io/org/app:1");
        assert_eq!(
            normalize("localhost/nemesis-agent:0.1.0"),
            "localhost/nemesis-agent:0.1.0"
        );
        assert_eq!(
            normalize("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(normalize("localhost:5000/x/y"), "localhost:5000/x/y:latest");
        assert_eq!(normalize("a/b@sha256:00"), "docker.io/a/b@sha256:00");
    }

    #[test]
    fn the_pause_image_is_known_by_any_tag() {
        assert!(is_pause("registry.k8s.io/pause:3.10"));
        assert!(!is_pause("pause:3.10"));
        assert!(!is_pause("registry.k8s.io/pause-not"));
    }

    #[test]
    fn numeric_users_need_no_passwd() {
        let image = Image {
            reference: "r".into(),
            rootfs: "/nonexistent".into(),
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            user: "65532:65532".into(),
            working_dir: String::new(),
        };
        assert_eq!(image_user(&image), Ok((65532, 65532)));
        let root = Image {
            user: String::new(),
            ..image.clone()
        };
        assert_eq!(image_user(&root), Ok((0, 0)));
        let named = Image {
            user: "nobody".into(),
            ..image
        };
        assert!(image_user(&named).unwrap_err().contains("nobody"));
    }
}
