//! `cargo xtask gen`: regenerates files whose source of truth is Rust code, so they can
//! never drift by hand. Today: the ScalingPolicy CRD (`manifests/crd/scalingpolicy.yaml`)
//! from the controller's types, printed by `nemesis-controller crd`.

use crate::util::{cargo, describe, root};
use anyhow::{Context, Result, bail};

const CRD_PATH: &str = "manifests/crd/scalingpolicy.yaml";

pub fn run(check: bool) -> Result<()> {
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
    let path = root().join(CRD_PATH);
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != yaml {
            bail!("{CRD_PATH} is stale: run `cargo xtask gen` and commit it");
        }
        eprintln!("{CRD_PATH} is up to date");
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().expect("CRD_PATH has a folder"))?;
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {CRD_PATH}");
    Ok(())
}
