//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built by a nightly toolchain for `bpfel-unknown-none`, which cargo
//! cannot do from here, so this script only checks that it exists and says how to
//! make it when it does not.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
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
