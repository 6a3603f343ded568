//! Supervised subprocesses: each in its own process group, stdout and stderr written straight
//! to files (the host never buffers what a child prints, so its memory stays flat), stopped as
//! a whole tree — SIGTERM, a grace period, SIGKILL — on timeout or cancellation, and never
//! left behind: when the leader exits, whatever is left of its group is killed too.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// What to run.
#[derive(Debug, Clone)]
pub struct SubprocessSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub working_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

/// How the child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when hangar stopped it: the last signal it had to send.
    pub stopped_with: Option<Signal>,
    pub pid: u32,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.stopped_with.is_none()
    }

    pub fn describe(&self) -> String {
        let ended = match (self.exit_code, self.signal) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!(
                "was killed by {}",
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string())
            ),
            (None, None) => "ended".into(),
        };
        match self.stopped_with {
            Some(Signal::SIGKILL) => {
                format!("{ended} (stopped by hangar: SIGTERM was ignored, then SIGKILL)")
            }
            Some(signal) => format!("{ended} (stopped by hangar with {signal})"),
            None => ended,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubprocessError {
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the subprocess: {0}")]
    Wait(#[source] std::io::Error),
}

fn open_log(path: &Path) -> Result<std::fs::File, SubprocessError> {
    let log_error = |source| SubprocessError::Log {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(log_error)?;
    }
    std::fs::File::create(path).map_err(log_error)
}

/// Runs `spec` to its end, or until `cancel` fires; then stops its whole process group:
/// SIGTERM, up to `kill_grace` to exit, then SIGKILL.
pub async fn run_supervised(
    spec: &SubprocessSpec,
    cancel: &CancellationToken,
    kill_grace: Duration,
) -> Result<Finished, SubprocessError> {
    let stdout = open_log(&spec.stdout_path)?;
    let stderr = open_log(&spec.stderr_path)?;
    let mut command = tokio::process::Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // If the hangar server dies (even SIGKILL), the kernel kills the child: an orphaned
            // run must not keep a GPU busy while a rescued attempt starts elsewhere.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| SubprocessError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let group = Pid::from_raw(pid as i32);
    tracing::debug!(pid, program = %spec.program.display(), "subprocess started");

    let mut stopped_with = None;
    let status = tokio::select! {
        status = child.wait() => status.map_err(SubprocessError::Wait)?,
        () = cancel.cancelled() => {
            let _ = killpg(group, Signal::SIGTERM);
            stopped_with = Some(Signal::SIGTERM);
            match tokio::time::timeout(kill_grace, child.wait()).await {
                Ok(status) => status.map_err(SubprocessError::Wait)?,
                Err(_) => {
                    tracing::warn!(pid, grace = ?kill_grace, "subprocess ignored SIGTERM; sending SIGKILL");
                    let _ = killpg(group, Signal::SIGKILL);
                    stopped_with = Some(Signal::SIGKILL);
                    child.wait().await.map_err(SubprocessError::Wait)?
                }
            }
        }
    };
    kill_remaining_group(group).await;
    Ok(Finished {
        exit_code: status.code(),
        signal: status.signal(),
        stopped_with,
        pid,
    })
}

/// Kills what is left of the group after its leader exited (children it left running) and
/// waits, bounded, until no live member is left. Zombies do not count: they hold no resources
/// and whoever adopted them reaps them.
async fn kill_remaining_group(group: Pid) {
    if killpg(group, Signal::SIGKILL).is_err() {
        return; // ESRCH: the group is already empty.
    }
    for _ in 0..GROUP_EXIT_POLLS {
        if !group_has_live_members(group.as_raw()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        pgid = group.as_raw(),
        "process group still has live members after SIGKILL"
    );
}

/// How long (×10 ms) to wait for a killed group to be gone.
const GROUP_EXIT_POLLS: u32 = 200;

/// The longest the stop path can take after `kill_grace`: the bounded wait for the group.
pub const GROUP_EXIT_WAIT: Duration = Duration::from_millis(10 * GROUP_EXIT_POLLS as u64);

fn group_has_live_members(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        is_pid
            && std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|stat| {
                // "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ')'.
                let Some((_, rest)) = stat.rsplit_once(") ") else {
                    return false;
                };
                let mut fields = rest.split(' ');
                let state = fields.next().unwrap_or("Z");
                let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
                pgrp == Some(pgid) && state != "Z" && state != "X"
            })
    })
}

/// The last `max` bytes of a file, lossily decoded (for error details from stderr).
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
