//! Types shared by the eBPF programs (`nemesis-ebpf`), the agent and the controller.
//!
//! Map keys and values are `#[repr(C)]`, `Copy`, with fixed-width fields and explicit
//! padding, so the kernel side and the loader read the same bytes. This crate is
//! `no_std` unless a std-only feature (`wire`, `policy`, `serve`, `stats`) is enabled.
#![cfg_attr(
    not(any(
        feature = "wire",
        feature = "policy",
        feature = "serve",
        feature = "stats"
    )),
    no_std
)]

pub mod maps;

#[cfg(feature = "policy")]
pub mod duration;
#[cfg(feature = "policy")]
pub mod policy;
#[cfg(feature = "serve")]
pub mod serve;
#[cfg(feature = "stats")]
pub mod stats;
#[cfg(feature = "wire")]
pub mod wire;
