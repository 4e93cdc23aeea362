//! The node agent as a library, so tests and benches drive the same code as `main`.
//! `unsafe` is denied everywhere except `ebpf::sys` (the loader's raw syscalls).
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod endpoints;
pub mod handover;
pub mod holdports;
pub mod kube_proxy_skip;
pub mod loads;
pub mod metrics;
pub mod node;
pub mod permissions;
pub mod proxy;
pub mod services;
pub mod udphold;
pub mod zone;
