//! Removing a finished run's files through a cleanup hook, capability-scoped: the run's files
//! are first moved (renamed, same file system) into a staging directory of their own, which is
//! the only directory the hook sees. Afterwards hangar looks for itself: what is gone from the
//! staging directory was removed, whatever is left goes back where it was and is reported as
//! not removed — so a faulty or lying hook never loses a file it was not meant to remove, nor
//! makes hangar forget one. With no hook active, hangar removes the same files itself.

use std::path::Path;
use std::sync::Arc;

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

/// Removes the run's files with `hook` (or natively when None).
pub fn clean_run(
    files: &RunFiles,
    hook: Option<&Arc<LoadedPlugin>>,
    kind: &str,
    run: Uuid,
    status: &str,
) -> CleanupOutcome {
    let owned = owned_files(kind, run, status);
    let Some(hook) = hook else {
        return CleanupOutcome {
            report: remove_natively(files.root(), &owned),
            fault: None,
        };
    };
    let root = files.root();
    let staging = root.join("cleanup").join(run.to_string());
    // An earlier cleanup of this run that was interrupted left files staged: back they go.
    unstage(root, &staging, &owned);
    let mut report = CleanupReport::default();
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
    let (hook_failures, fault) = match hook.cleanup(&request, &[preopen]) {
        Ok(answer) => (answer.failed, None),
        Err(fault) => {
            tracing::warn!(plugin = %hook.label, run = %run, %fault, "cleanup hook faulted; hangar removes the files itself");
            let native = remove_natively(&staging, &moved);
            (native.failed, Some(fault))
        }
    };
    for name in &moved {
        if staging.join(name).symlink_metadata().is_err() {
            report.removed.push(name.clone());
            continue;
        }
        let why = hook_failures
            .iter()
            .find(|(path, _)| path == name)
            .map_or_else(
                || "the cleanup hook left it in place".to_owned(),
                |(_, error)| error.clone(),
            );
        report.failed.push((name.clone(), why));
    }
    unstage(root, &staging, &moved);
    remove_empty_dirs(&staging);
    CleanupOutcome { report, fault }
}

/// Moves each existing owned path into `staging` under the same relative name; returns those
/// moved, and reports those that could not be.
fn stage(root: &Path, staging: &Path, owned: &[String], report: &mut CleanupReport) -> Vec<String> {
    let mut moved = Vec::new();
    for name in owned {
        let source = root.join(name);
        if source.symlink_metadata().is_err() {
            continue;
        }
        let target = staging.join(name);
        let staged = target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::rename(&source, &target));
        match staged {
            Ok(()) => moved.push(name.clone()),
            Err(error) => report.failed.push((
                name.clone(),
                format!("could not be staged for the hook: {error}"),
            )),
        }
    }
    moved
}

/// Moves staged paths back to where they were (never over something that is there now).
fn unstage(root: &Path, staging: &Path, names: &[String]) {
    for name in names {
        let staged = staging.join(name);
        let original = root.join(name);
        if staged.symlink_metadata().is_err() || original.symlink_metadata().is_ok() {
            continue;
        }
        let restored = original
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::rename(&staged, &original));
        if let Err(error) = restored {
            tracing::error!(path = %staged.display(), %error, "cannot move a staged file back; it stays in the staging directory");
        }
    }
}

/// Removes `dir` and the directories below it that are empty; files are never removed here.
fn remove_empty_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&entry.path());
        }
    }
    if std::fs::remove_dir(dir).is_err() && dir.exists() {
        tracing::warn!(dir = %dir.display(), "the staging directory is not empty; left for an operator");
    }
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
