//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built by a nightly toolchain for `bpfel-unknown-none`, which cargo
//! cannot do from here, so this script only checks that it exists and says how to
//! make it when it does not.
use std::path::PathBuf;

fn main() {
    // Read at run time, not with env!(): cargo reuses a compiled build script across
    // checkouts that share a target directory, and a path baked in at compile time
    // would point into whichever checkout built it first.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = PathBuf::from(manifest_dir).join("..");
    let object = root.join("target/bpfel-unknown-none/release/nemesis-ebpf");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nthe eBPF object {} does not exist.\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (on a fresh machine run `cargo xtask setup` once before that)\n",
            object.display()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::copy(&object, out.join("nemesis-ebpf")).expect("copy the eBPF object into OUT_DIR");
}
