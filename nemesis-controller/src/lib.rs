pub mod agents;
pub mod alerts;
pub mod auth;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod prometheus;
pub mod store;
