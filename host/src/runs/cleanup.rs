//! Removing a finished run's files through a cleanup hook, capability-scoped: the run's files
//! are first moved (renamed, same file system) into a staging directory of their own, which is
//! the only directory the hook sees; whatever the hook leaves is moved back afterwards, so a
//! faulty hook never loses a file it was not meant to remove. With no hook active, hangar
//! removes the same files itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::files::RunFiles;
use crate::plugins::adapters::{CleanupReport, CleanupRun, LoadedPlugin};
use crate::plugins::sandbox::Preopen;

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

/// Removes the run's files with `hook` (or natively when None). Returns the report.
pub fn clean_run(
    files: &RunFiles,
    hook: Option<&Arc<LoadedPlugin>>,
    kind: &str,
    run: Uuid,
    status: &str,
) -> CleanupReport {
    let owned = owned_files(kind, run, status);
    let Some(hook) = hook else {
        return remove_natively(files.root(), &owned);
    };
    let staging = files.root().join("cleanup").join(run.to_string());
    let moved = stage(files.root(), &staging, &owned);
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
    let report = match hook.cleanup(&request, &[preopen]) {
        Ok(report) => report,
        Err(fault) => {
            tracing::warn!(plugin = %hook.label, run = %run, %fault, "cleanup hook faulted; hangar removes the files itself");
            remove_natively(&staging, &owned)
        }
    };
    // Whatever is still staged goes back where it was.
    for name in moved {
        let staged = staging.join(&name);
        if staged.symlink_metadata().is_ok() {
            let _ = std::fs::rename(&staged, files.root().join(&name));
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    report
}

/// Moves each existing owned path into `staging` under the same relative name.
fn stage(root: &Path, staging: &Path, owned: &[String]) -> Vec<String> {
    let mut moved = Vec::new();
    for name in owned {
        let source = root.join(name);
        if source.symlink_metadata().is_err() {
            continue;
        }
        let target: PathBuf = staging.join(name);
        if let Some(parent) = target.parent() {
            if std::fs::create_dir_all(parent).is_err() {
                continue;
            }
        }
        if std::fs::rename(&source, &target).is_ok() {
            moved.push(name.clone());
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
