//! The controller binary as a shell or an image check sees it: `--version` answers (as
//! the agent's does), and its log lines as `kubectl logs` or a log file sees them: no
//! terminal colour codes when stdout is not a terminal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn version_prints_the_name_and_the_workspace_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_nemesis-controller"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("nemesis-controller {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn logs_carry_no_colour_codes_when_stdout_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    // A client that is configured but never reaches a server: the start-up warnings are
    // logged before any API call.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n\
         users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n\
         current-context: x\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nemesis-controller"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--store-path")
        .arg(dir.path().join("history.redb"))
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let warned = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("no --ui-password-file");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no start-up warning within 30 s: {seen:#?}");
    for line in &seen {
        assert!(
            !line.contains('\x1b'),
            "colour codes in a log line: {line:?}"
        );
    }
}
