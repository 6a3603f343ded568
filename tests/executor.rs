//! The native executor on real subprocesses: logs, exit codes, stopping whole process trees,
//! and flat memory while a child prints a gigabyte.

mod support;

use std::path::Path;
use std::time::Duration;

use hangar::executor::subprocess::{run_supervised, SubprocessError, SubprocessSpec};
use nix::sys::signal::Signal;
use support::{alive, wait_for};
use tokio_util::sync::CancellationToken;

fn shell(dir: &Path, script: &str) -> SubprocessSpec {
    SubprocessSpec {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        working_dir: Some(dir.to_owned()),
        env: vec![("GREETING".into(), "hello".into())],
        stdout_path: dir.join("logs/succ_run.txt"),
        stderr_path: dir.join("logs/error_run.txt"),
    }
}

async fn read_pid(path: &Path) -> i32 {
    wait_for("a pid file", Duration::from_secs(10), || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    })
    .await
}

#[tokio::test]
async fn output_goes_to_the_log_files_and_the_exit_status_is_reported() {
    let dir = tempfile::tempdir().expect("dir");
    let spec = shell(
        dir.path(),
        "echo \"$GREETING from $(pwd)\"; echo 'it broke' >&2; exit 3",
    );
    let finished = run_supervised(&spec, &CancellationToken::new(), Duration::from_secs(1))
        .await
        .expect("ran");
    assert_eq!(finished.exit_code, Some(3));
    assert!(!finished.success());
    assert_eq!(finished.stopped_with, None);
    let out = std::fs::read_to_string(&spec.stdout_path).expect("stdout");
    assert_eq!(out.trim(), format!("hello from {}", dir.path().display()));
    assert_eq!(
        std::fs::read_to_string(&spec.stderr_path).expect("stderr"),
        "it broke\n"
    );

    let ok = run_supervised(
        &shell(dir.path(), "exit 0"),
        &CancellationToken::new(),
        Duration::from_secs(1),
    )
    .await
    .expect("ran");
    assert!(ok.success());
}

#[tokio::test]
async fn a_missing_program_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let mut spec = shell(dir.path(), "");
    spec.program = dir.path().join("no-such-program");
    let error = run_supervised(&spec, &CancellationToken::new(), Duration::from_secs(1))
        .await
        .expect_err("cannot start");
    assert!(matches!(error, SubprocessError::Spawn { .. }), "{error}");
    assert!(error.to_string().contains("no-such-program"), "{error}");
}

#[tokio::test]
async fn cancellation_stops_the_whole_process_tree() {
    let dir = tempfile::tempdir().expect("dir");
    let spec = shell(
        dir.path(),
        "sleep 600 & echo $! > grandchild; echo $$ > leader; wait",
    );
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { run_supervised(&spec, &cancel, Duration::from_secs(2)).await }
    });
    let leader = read_pid(&dir.path().join("leader")).await;
    let grandchild = read_pid(&dir.path().join("grandchild")).await;
    assert!(alive(leader) && alive(grandchild));
    cancel.cancel();
    let finished = run.await.expect("task").expect("ran");
    assert_eq!(finished.stopped_with, Some(Signal::SIGTERM));
    assert_eq!(finished.signal, Some(libc::SIGTERM));
    assert!(!alive(leader), "the leader is gone");
    assert!(!alive(grandchild), "the grandchild is gone with it");
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("dir");
    let spec = shell(
        dir.path(),
        "trap '' TERM; echo $$ > leader; while :; do sleep 0.05; done",
    );
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { run_supervised(&spec, &cancel, Duration::from_millis(300)).await }
    });
    let leader = read_pid(&dir.path().join("leader")).await;
    cancel.cancel();
    let finished = run.await.expect("task").expect("ran");
    assert_eq!(finished.stopped_with, Some(Signal::SIGKILL));
    assert_eq!(finished.signal, Some(libc::SIGKILL));
    assert!(
        finished.describe().contains("SIGKILL"),
        "{}",
        finished.describe()
    );
    assert!(!alive(leader));
}

#[tokio::test]
async fn processes_left_behind_by_a_finished_leader_are_killed() {
    let dir = tempfile::tempdir().expect("dir");
    // The leader exits at once, leaving a background process in its group.
    let spec = shell(dir.path(), "(sleep 600 & echo $! > orphan); exit 0");
    let finished = run_supervised(&spec, &CancellationToken::new(), Duration::from_secs(1))
        .await
        .expect("ran");
    assert!(finished.success());
    let orphan = read_pid(&dir.path().join("orphan")).await;
    assert!(!alive(orphan), "no process of the tree outlives the job");
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn memory_stays_flat_while_a_child_prints_a_gigabyte() {
    const GIGABYTE: u64 = 1_000_000_000;
    let dir = tempfile::tempdir().expect("dir");
    let spec = shell(
        dir.path(),
        &format!("head -c {GIGABYTE} /dev/zero; head -c 1000000 /dev/zero >&2"),
    );
    let before = resident_kib();
    let finished = run_supervised(&spec, &CancellationToken::new(), Duration::from_secs(1))
        .await
        .expect("ran");
    let after = resident_kib();
    assert!(finished.success());
    assert_eq!(
        std::fs::metadata(&spec.stdout_path).expect("log").len(),
        GIGABYTE
    );
    // The child writes straight into the log file; the host never holds its output.
    assert!(
        after.saturating_sub(before) < 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    let tail = hangar::executor::subprocess::read_tail(&spec.stderr_path, 4096).expect("tail");
    assert_eq!(tail.len(), 4096, "only the tail of stderr is read");
}
