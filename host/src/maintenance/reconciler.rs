//! Reconciles runs whose status says Processing (or Waiting) while their job has ended —
//! as the seed did when its run list was opened — and writes their error files.

use super::MaintenanceContext;
use crate::runs::files::RunFiles;
use crate::storage::{runs, StorageError};

pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    let changes = runs::reconcile(&context.pool).await?;
    RunFiles::new(&context.config).record_errors(&changes);
    Ok(changes.len())
}
