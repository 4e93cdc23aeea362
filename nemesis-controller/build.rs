//! Puts the UI's charting library (uPlot, from npm) into `OUT_DIR` for `ui::assets` to
//! embed: the controller binary serves it itself, so the UI needs no CDN and no folder.
//! `ui/package-lock.json` pins the version; `npm ci` in `ui/` (run by `cargo xtask setup`)
//! installs it. A missing or different installed version fails the build with what to
//! run, rather than embedding whatever happens to be there.

use std::path::{Path, PathBuf};

/// The files of the package the UI loads (`dist/` of the npm tarball).
const FILES: [&str; 2] = ["uPlot.iife.min.js", "uPlot.min.css"];

fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// The `"version"` of the package entry `key` in a package-lock.json or package.json text
/// (a plain scan: the build needs no JSON parser for two fields it controls).
fn version_after(text: &str, key: &str) -> Option<String> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    let v = rest.find("\"version\"")?;
    let rest = &rest[v + "\"version\"".len()..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    Some(rest[start..end].to_string())
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ui = manifest.join("../ui");
    let lock_path = ui.join("package-lock.json");
    let installed_path = ui.join("node_modules/uplot/package.json");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    println!("cargo:rerun-if-changed={}", installed_path.display());
    let read = |p: &Path| std::fs::read_to_string(p);
    let lock =
        read(&lock_path).unwrap_or_else(|e| fail(format!("reading {}: {e}", lock_path.display())));
    let locked = version_after(&lock, "\"node_modules/uplot\"").unwrap_or_else(|| {
        fail(format!(
            "{} pins no uplot (the UI's charting library)",
            lock_path.display()
        ))
    });
    let installed = read(&installed_path)
        .ok()
        .and_then(|t| version_after(&t, "\"name\""));
    if installed.as_deref() != Some(locked.as_str()) {
        fail(format!(
            "the UI embeds uplot {locked} from {} but {}: run `npm ci` in {} (`cargo xtask setup` does)",
            ui.join("node_modules").display(),
            match installed {
                Some(v) => format!("{v} is installed"),
                None => "it is not installed".to_string(),
            },
            ui.display()
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    for f in FILES {
        let from = ui.join("node_modules/uplot/dist").join(f);
        println!("cargo:rerun-if-changed={}", from.display());
        std::fs::copy(&from, out.join(f))
            .unwrap_or_else(|e| fail(format!("copying {}: {e}", from.display())));
    }
}
