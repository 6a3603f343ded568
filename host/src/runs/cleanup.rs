//! Removing a finished run's files through a cleanup hook, capability-scoped: the run's files
//! are first moved (renamed, same file system) into a fresh staging directory of their own,
//! which is the only directory the hook sees. Afterwards hangar looks for itself, through a
//! capability handle that cannot leave the staging directory whatever links the hook planted:
//! what is gone was removed; whatever is left goes back where it was and is reported as not
//! removed — so a faulty, lying or hostile hook never makes hangar touch a file outside the
//! run's, lose one it was not meant to remove, or forget one. With no hook active, hangar
//! removes the same files itself.

use std::path::Path;
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use uuid::Uuid;

use super::files::RunFiles;
use crate::plugins::adapters::{CleanupReport, CleanupRun, LoadedPlugin};
use crate::plugins::sandbox::Preopen;
use crate::plugins::PluginFault;

/// The files a run owns, relative to the data directory (the original application's list).
pub fn owned_files(kind: &str, run: Uuid, status: &str) -> Vec<String> {
    let mut files = Vec::new();
    if status == "Error" {
        files.push(format!("errors/{run}_errMsg.txt"));
    }
    files.push(format!("logs/succ_{run}.txt"));
    files.push(format!("logs/error_{run}.txt"));
    if kind == "training" {
        files.extend([
            format!("trainings/{run}"),
            format!("configs/{run}"),
            format!("data/{run}"),
        ]);
    } else {
        files.push(format!("detections/{run}"));
    }
    files
}

/// How a cleanup went: what was removed and what was not (as hangar found it afterwards), and
/// the hook's fault if it had one (hangar then removed the files itself).
#[derive(Debug, Clone, Default)]
pub struct CleanupOutcome {
    pub report: CleanupReport,
    pub fault: Option<PluginFault>,
}

/// A path moved into the staging directory, and whether it was a symbolic link there.
struct Staged {
    name: String,
    was_link: bool,
}

/// Removes the run's files with `hook` (or natively when None).
///
/// Everything in the staging directory is untrusted once the hook has run (it may have
/// planted symbolic links anywhere in it), so hangar looks at it only through a capability
/// handle on it (cap-std), which never resolves a path outside it.
pub fn clean_run(
    files: &RunFiles,
    hook: Option<&Arc<LoadedPlugin>>,
    kind: &str,
    run: Uuid,
    status: &str,
) -> CleanupOutcome {
    let owned = owned_files(kind, run, status);
    let root = files.root();
    let Some(hook) = hook else {
        return CleanupOutcome {
            report: remove_natively(root, &owned),
            fault: None,
        };
    };
    let staging = root.join("cleanup").join(run.to_string());
    let mut report = CleanupReport::default();
    let prepared = fresh_dir(&staging).and_then(|()| {
        let root = Dir::open_ambient_dir(root, ambient_authority())?;
        let staged = Dir::open_ambient_dir(&staging, ambient_authority())?;
        Ok((root, staged))
    });
    let (root_dir, staged_dir) = match prepared {
        Ok(dirs) => dirs,
        Err(error) => {
            for name in &owned {
                report
                    .failed
                    .push((name.clone(), format!("cannot prepare the cleanup: {error}")));
            }
            return CleanupOutcome {
                report,
                fault: None,
            };
        }
    };
    let moved = stage(root, &staging, &owned, &mut report);
    let request = CleanupRun {
        id: run.to_string(),
        kind: kind.to_owned(),
        status: status.to_owned(),
        files: owned.clone(),
    };
    let preopen = Preopen {
        host: staging.clone(),
        guest: ".".into(),
    };
    let answer = hook.cleanup(&request, &[preopen]);
    let mut intact = true;
    match &answer {
        Err(fault) => {
            tracing::warn!(plugin = %hook.label, run = %run, %fault, "cleanup hook faulted; hangar removes the files itself");
            for staged in &moved {
                match remove_in(&staged_dir, &staged.name) {
                    Ok(()) => report.removed.push(staged.name.clone()),
                    Err(error) => report.failed.push((staged.name.clone(), error.to_string())),
                }
            }
        }
        Ok(hook_report) => {
            for staged in &moved {
                let verdict = settle(&root_dir, &staged_dir, staged, &hook_report.failed);
                match verdict {
                    Settled::Removed => report.removed.push(staged.name.clone()),
                    Settled::Restored(why) => report.failed.push((staged.name.clone(), why)),
                    Settled::Stuck(why) => {
                        intact = false;
                        report.failed.push((staged.name.clone(), why));
                    }
                }
            }
        }
    }
    // What remains staged is the hook's own litter (std's remove_dir_all never follows a
    // symbolic link); unless something of the run could not be moved back.
    if intact {
        if let Err(error) = std::fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), %error, "cannot remove the staging directory");
        }
    } else {
        tracing::error!(dir = %staging.display(), run = %run, "files of the run are left in the staging directory for an operator");
    }
    CleanupOutcome {
        report,
        fault: answer.err(),
    }
}

/// What became of a staged path after the hook ran.
enum Settled {
    /// It is gone.
    Removed,
    /// The hook left it; it is back where it was. Why it was not removed.
    Restored(String),
    /// The hook left it, and it could not be moved back: it stays staged.
    Stuck(String),
}

fn settle(
    root: &Dir,
    staging: &Dir,
    staged: &Staged,
    hook_failures: &[(String, String)],
) -> Settled {
    let name = staged.name.as_str();
    let Ok(meta) = staging.symlink_metadata(name) else {
        return Settled::Removed;
    };
    if meta.file_type().is_symlink() && !staged.was_link {
        // The hook put a link where the run's file was: the file is gone, the link is litter.
        return Settled::Removed;
    }
    let why = hook_failures
        .iter()
        .find(|(path, _)| path == name)
        .map_or_else(
            || "the cleanup hook left it in place".to_owned(),
            |(_, error)| error.clone(),
        );
    if root.symlink_metadata(name).is_ok() {
        return Settled::Stuck(format!(
            "{why}; a new {name} exists meanwhile, so it stays staged"
        ));
    }
    let parent = Path::new(name)
        .parent()
        .filter(|p| !p.as_os_str().is_empty());
    let moved_back = parent
        .map_or(Ok(()), |p| root.create_dir_all(p))
        .and_then(|()| staging.rename(name, root, name));
    match moved_back {
        Ok(()) => Settled::Restored(why),
        Err(error) => Settled::Stuck(format!("{why}; moving it back failed: {error}")),
    }
}

/// Removes a path inside `dir` (a directory with all it holds), never following a link out.
fn remove_in(dir: &Dir, name: &str) -> std::io::Result<()> {
    match dir.symlink_metadata(name) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
        Ok(meta) if meta.is_dir() => dir.remove_dir_all(name),
        Ok(_) => dir.remove_file(name),
    }
}

/// An empty directory at `dir`: one left by an interrupted cleanup of the same run is
/// untrusted (a hook ran on it) and removed first.
fn fresh_dir(dir: &Path) -> std::io::Result<()> {
    if dir.symlink_metadata().is_ok() {
        tracing::warn!(dir = %dir.display(), "removing the staging directory of an interrupted cleanup");
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// Moves each existing owned path into the (fresh, trusted) `staging` directory under the
/// same relative name; returns those moved, and reports those that could not be.
fn stage(root: &Path, staging: &Path, owned: &[String], report: &mut CleanupReport) -> Vec<Staged> {
    let mut moved = Vec::new();
    for name in owned {
        let source = root.join(name);
        let Ok(meta) = source.symlink_metadata() else {
            continue;
        };
        let target = staging.join(name);
        let staged = target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::rename(&source, &target));
        match staged {
            Ok(()) => moved.push(Staged {
                name: name.clone(),
                was_link: meta.file_type().is_symlink(),
            }),
            Err(error) => report.failed.push((
                name.clone(),
                format!("could not be staged for the hook: {error}"),
            )),
        }
    }
    moved
}

fn remove_natively(root: &Path, owned: &[String]) -> CleanupReport {
    let mut report = CleanupReport::default();
    for name in owned {
        let path = root.join(name);
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => report.removed.push(name.clone()),
            Err(error) => report.failed.push((name.clone(), error.to_string())),
        }
    }
    report
}
