//! The node agent as a library, so tests and benches drive the same code as `main`.

pub mod admin;
pub mod control;
pub mod endpoints;
pub mod metrics;
pub mod proxy;
