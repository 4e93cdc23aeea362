//! What `cargo xtask demo` needs from the sandbox beyond running it: applying manifest
//! files through the API as `kubectl apply --server-side` would ([`apply`]), and
//! ClusterIPs that no other sandbox on this machine hands out ([`cluster_ip`]), since
//! the demo's Service proxy listens on them. Nothing here runs in a real cluster.

pub mod apply;
pub mod cluster_ip;
