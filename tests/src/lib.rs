//! Test support: the project's own Kubernetes API server, the simulated kubelet, and
//! the harness end-to-end tests run on. Nothing here runs in a real cluster.

pub mod agent_token;
pub mod alertmanager_payload;
pub mod apiserver;
pub mod chaos;
pub mod controller_flags;
pub mod controllers;
pub mod crds;
pub mod demo;
pub mod faultproxy;
pub mod ingress;
pub mod kubelet;
pub mod netns;
pub mod ui_client;
pub mod wait;
pub mod webhook;
