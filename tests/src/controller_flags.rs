//! The flags every test runs the real controller with: loopback ports the kernel picks,
//! and ticks, leases and timeouts short enough for a test. Owns that list only; the
//! tests add their own token files and store.

/// `(flag, value)` pairs; a test that passes one of these flags itself replaces it.
pub const TEST_DEFAULTS: &[(&str, &str)] = &[
    ("--listen", "127.0.0.1:0"),
    ("--admin-listen", "127.0.0.1:0"),
    ("--ui-listen", "127.0.0.1:0"),
    ("--agent-listen", "127.0.0.1:0"),
    ("--lease-namespace", "default"),
    ("--lease-duration", "3s"),
    ("--renew-deadline", "2s"),
    ("--retry-period", "250ms"),
    ("--tick-interval", "200ms"),
    ("--agent-lease", "2s"),
    ("--sample-interval", "500ms"),
    ("--status-interval", "500ms"),
    ("--sleep-ack-timeout", "5s"),
];

/// `nemesis-controller` followed by the defaults `extra` does not override.
pub fn argv_with_defaults(extra: &[impl AsRef<str>]) -> Vec<String> {
    let mut args: Vec<String> = vec!["nemesis-controller".into()];
    for (flag, value) in TEST_DEFAULTS {
        if !extra.iter().any(|e| e.as_ref() == *flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args
}
