//! Deleting runs, by the original application's rules: a Waiting run leaves the queue with its
//! job (atomically); a Processing run cannot be deleted; a finished run (Success, Error,
//! Canceled) has its files removed by the cleanup hook of its kind first. A training run goes
//! with the model it produced, unless detection runs still use that model.

use std::sync::Arc;

use uuid::Uuid;

use super::cleanup::clean_run;
use super::files::RunFiles;
use super::{RunError, RunService};
use crate::client::ClientError;
use crate::plugins::adapters::LoadedPlugin;
use crate::plugins::registry::PluginRegistry;
use crate::storage::runs::{self, LockedRun};

/// The two kinds of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Detection,
    Training,
}

impl RunKind {
    /// The name cleanup hooks see, and the name of the kind's cleanup-hook slot.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Detection => "detection",
            RunKind::Training => "training",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            RunKind::Detection => "detection run",
            RunKind::Training => "training run",
        }
    }

    /// The plugin slot whose hook removes this kind's files.
    pub fn cleanup_slot(self) -> String {
        format!("cleanup-hook/{}", self.as_str())
    }
}

/// What deleting a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Deleted {
    pub id: Uuid,
    /// The run's status when it was deleted.
    pub status: String,
    /// Files and folders removed (relative to the data directory).
    pub removed: Vec<String>,
    /// Who removed them: "plugin:<slot>@<version>#<sha>", or "builtin".
    pub removed_by: Option<String>,
}

/// Where deletion finds the files and the cleanup hooks.
#[derive(Clone)]
pub struct RunCleanup {
    pub files: RunFiles,
    pub plugins: Option<Arc<PluginRegistry>>,
}

impl RunCleanup {
    fn hook(&self, kind: RunKind) -> Option<Arc<LoadedPlugin>> {
        let snapshot = self.plugins.as_ref()?.snapshot();
        snapshot.cleanup_hooks.get(&kind.cleanup_slot()).cloned()
    }
}

impl RunService {
    /// Deletes a run as the rules above say. A finished run whose files could not all be
    /// removed is kept (the error lists them), so deleting it again finishes the job.
    pub async fn delete_run(
        &self,
        cleanup: &RunCleanup,
        kind: RunKind,
        id: Uuid,
    ) -> Result<Deleted, RunError> {
        let mut tx = self.pool.begin().await?;
        let locked = match kind {
            RunKind::Detection => runs::lock_detection_run(&mut tx, id).await?,
            RunKind::Training => runs::lock_training_run(&mut tx, id).await?,
        };
        let LockedRun {
            status,
            job_id,
            trained_model_id,
        } = locked.ok_or(RunError::NotFound {
            what: kind.noun(),
            id,
        })?;
        let processing = || {
            RunError::Conflict(format!(
                "{} {id} is processing; it can be deleted once it has ended (or been canceled)",
                kind.noun()
            ))
        };
        if status == "Processing" {
            return Err(processing());
        }
        if let Some(model) = trained_model_id {
            let users = runs::detection_runs_using_model(&mut tx, model).await?;
            if users > 0 {
                return Err(RunError::Conflict(format!(
                    "training run {id} produced model {model}, which {users} detection run(s) \
                     use; delete those first"
                )));
            }
        }
        let mut deleted = Deleted {
            id,
            status: status.clone(),
            removed: Vec::new(),
            removed_by: None,
        };
        if status == "Waiting" {
            if let Some(job_id) = job_id {
                match self.client.delete_in(&mut tx, job_id).await {
                    // Gone already (expired): nothing left to take out of the queue.
                    Ok(()) | Err(ClientError::NotFound(_)) => {}
                    Err(ClientError::Processing(_)) => return Err(processing()),
                    Err(other) => return Err(other.into()),
                }
            }
        } else {
            let hook = cleanup.hook(kind);
            let files = cleanup.files.clone();
            let finished = status.clone();
            let used = hook.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                clean_run(&files, used.as_ref(), kind.as_str(), id, &finished)
            })
            .await
            .map_err(|e| RunError::Conflict(format!("removing the run's files failed: {e}")))?;
            if let (Some(registry), Some(hook)) = (&cleanup.plugins, &hook) {
                registry.record(hook, true, outcome.fault.as_ref());
            }
            deleted.removed_by = Some(match (&hook, &outcome.fault) {
                (None, _) => "builtin".to_owned(),
                (Some(hook), None) => format!("plugin:{}", hook.label),
                (Some(hook), Some(fault)) => format!("builtin (plugin {} {fault})", hook.label),
            });
            let report = outcome.report;
            if !report.failed.is_empty() {
                let failures: Vec<String> = report
                    .failed
                    .iter()
                    .map(|(path, error)| format!("{path}: {error}"))
                    .collect();
                tracing::warn!(run = %id, removed = ?report.removed, failed = ?failures, "cleanup left files behind; the run is kept");
                return Err(RunError::Conflict(format!(
                    "{} {id} was kept: these files could not be removed ({}); fix that and \
                     delete it again",
                    kind.noun(),
                    failures.join("; ")
                )));
            }
            deleted.removed = report.removed;
        }
        match kind {
            RunKind::Detection => runs::delete_detection_run(&mut tx, id).await?,
            RunKind::Training => runs::delete_training_run(&mut tx, id).await?,
        };
        tx.commit().await?;
        tracing::info!(run = %id, kind = kind.as_str(), status = %deleted.status, removed = deleted.removed.len(), "run deleted");
        Ok(deleted)
    }
}
