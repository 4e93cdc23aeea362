//! `cargo xtask gen`: regenerates files whose source of truth is Rust code, so they can
//! never drift by hand. Today: the ScalingPolicy and AlertRule CRDs (`manifests/crd/`)
//! from the controller's types, printed by `nemesis-controller crd [--kind alertrule]`.

use crate::util::{cargo, describe, root};
use anyhow::{Context, Result, bail};

/// (`--kind` of `nemesis-controller crd`, the file it is committed as)
const CRDS: [(&str, &str); 2] = [
    ("scalingpolicy", "manifests/crd/scalingpolicy.yaml"),
    ("alertrule", "manifests/crd/alertrule.yaml"),
];

pub fn run(check: bool) -> Result<()> {
    for (kind, path) in CRDS {
        one(kind, path, check)?;
    }
    Ok(())
}

fn one(kind: &str, crd_path: &str, check: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "-p",
        "nemesis-controller",
        "--bin",
        "nemesis-controller",
        "--",
        "crd",
        "--kind",
        kind,
    ]);
    let line = describe(&cmd);
    eprintln!("+ {line}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let yaml = String::from_utf8(out.stdout).context("the CRD YAML is not UTF-8")?;
    let path = root().join(crd_path);
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != yaml {
            bail!("{crd_path} is stale: run `cargo xtask gen` and commit it");
        }
        eprintln!("{crd_path} is up to date");
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().expect("a CRD path has a folder"))?;
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {crd_path}");
    Ok(())
}
