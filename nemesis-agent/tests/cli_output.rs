//! The agent binary's output as a script or `kubectl logs` sees it: a subcommand's result
//! alone on stdout, log lines on stderr, and no terminal colour codes when neither is a
//! terminal.

use std::process::Command;

#[test]
fn cleanup_prints_only_its_result_on_stdout_and_uncoloured_logs_on_stderr() {
    let dir = std::env::temp_dir().join(format!(
        "nemesis-agent-cli-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nemesis-agent"))
        .args(["cleanup", "--instance", "cli-output-test", "--bpffs"])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout, "removed 0 links and 0 maps\n", "stderr: {stderr}");
    assert!(
        stderr.contains("eBPF datapath cleaned up"),
        "the log line is on stderr: {stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes when stderr is not a terminal: {stderr:?}"
    );
}
