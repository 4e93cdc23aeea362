//! Types shared by the eBPF programs (`nemesis-ebpf`), the agent and the controller.
//!
//! Map keys and values are `#[repr(C)]`, `Copy`, with fixed-width fields and explicit
//! padding, so the kernel side and the loader read the same bytes. This crate is
//! `no_std` unless a std-only feature (`wire`) is enabled.
#![cfg_attr(not(feature = "wire"), no_std)]

pub mod maps;

#[cfg(feature = "wire")]
pub mod wire;
