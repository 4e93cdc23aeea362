//! Every kustomization under `manifests/` builds with the real `kubectl kustomize`, and
//! every object of every manifest validates against the OpenAPI schemas of a current
//! Kubernetes release with `kubernetes-validate` (PyPI, installed by `cargo xtask
//! setup`), strictly (an unknown field fails) and offline: the validator runs in a
//! network namespace of its own with no interface up. Kinds it has no schema for are
//! only the custom resources (monitoring.coreos.com, nemesis.dev), checked elsewhere.
//! Root required (unshare).

mod manifests_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use manifests_support::{TOOL_TIMEOUT, manifests, run_ok};

/// Where `cargo xtask setup` installs it.
const KUBERNETES_VALIDATE: &str = "/opt/nemesis/kubernetes-validate/bin/kubernetes-validate";
/// The release a real cluster ran Nemesis on.
const KUBERNETES_VERSION: &str = "1.36.0";
/// API groups of custom resources, which no Kubernetes release has schemas for.
const CUSTOM_GROUPS: &[&str] = &["monitoring.coreos.com/", "nemesis.dev/"];

fn kustomizations() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.file_name().is_some_and(|n| n == "kustomization.yaml") {
                out.push(p.parent().context("a folder")?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(&manifests(), &mut out)?;
    out.sort();
    Ok(out)
}

/// Every YAML file of `manifests/` that holds Kubernetes objects (kustomizations are
/// rendered instead of read).
fn object_files() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() && name != "tests" {
                walk(&p, out)?;
            } else if name.ends_with(".yaml") && name != "kustomization.yaml" {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = vec![];
    walk(&manifests(), &mut out)?;
    out.sort();
    Ok(out)
}

/// Runs kubernetes-validate on `files` with no network; returns (success, output).
fn validate_offline(files: &[PathBuf]) -> Result<(bool, String)> {
    ensure!(
        Path::new(KUBERNETES_VALIDATE).exists(),
        "{KUBERNETES_VALIDATE} is missing: run `cargo xtask setup`"
    );
    let out = Command::new("unshare")
        .arg("--net")
        .arg(KUBERNETES_VALIDATE)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(files)
        .output()
        .context("running kubernetes-validate in a network namespace (root needed)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn every_kustomization_builds_with_kubectl_kustomize() -> Result<()> {
    let dirs = kustomizations()?;
    ensure!(
        dirs.len() >= 2,
        "the install and monitoring at least: {dirs:?}"
    );
    for dir in dirs {
        let mut cmd = Command::new("kubectl");
        cmd.arg("kustomize").arg(&dir);
        let out = run_ok(cmd, TOOL_TIMEOUT)
            .with_context(|| format!("kubectl kustomize {}", dir.display()))?;
        ensure!(out.contains("kind:"), "{} built nothing", dir.display());
    }
    Ok(())
}

#[test]
fn every_object_validates_against_the_kubernetes_schemas_offline() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut files = object_files()?;
    // What `kubectl apply -k` sends: the kustomizations as rendered.
    for (i, k) in kustomizations()?.iter().enumerate() {
        let mut cmd = Command::new("kubectl");
        cmd.arg("kustomize").arg(k);
        let path = dir.path().join(format!("kustomization-{i}.yaml"));
        std::fs::write(&path, run_ok(cmd, TOOL_TIMEOUT)?)?;
        files.push(path);
    }
    let (ok, text) = validate_offline(&files)?;
    assert!(ok, "kubernetes-validate failed:\n{text}");
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(passed >= 20, "{passed} objects passed:\n{text}");
    for line in text.lines().filter(|l| !l.starts_with("INFO ")) {
        assert!(
            line.starts_with("WARN ")
                && line.contains("Couldn't find schema for kind")
                && CUSTOM_GROUPS.iter().any(|g| line.contains(g)),
            "not a custom resource's missing schema: {line}\n{text}"
        );
    }
    Ok(())
}

#[test]
fn a_misspelled_field_fails_the_offline_validation() -> Result<()> {
    // The validator really checks, and needs no network to do so.
    let dir = tempfile::tempdir()?;
    let src = manifests().join("base/controller-statefulset.yaml");
    let text = std::fs::read_to_string(&src)?;
    let bad = text.replacen("serviceName:", "serviceNmae:", 1);
    ensure!(bad != text, "the StatefulSet has a serviceName");
    let path = dir.path().join("statefulset.yaml");
    std::fs::write(&path, bad)?;
    let (ok, out) = validate_offline(&[path])?;
    assert!(!ok, "{out}");
    assert!(out.contains("'serviceNmae' was unexpected"), "{out}");
    Ok(())
}
