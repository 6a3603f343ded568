//! Deletes finished jobs past their retention (parents of waiting continuations stay), walking
//! the jobs from the oldest until it reaches those created within the retention.

use super::MaintenanceContext;
use crate::storage::{jobs, StorageError};

/// Jobs looked at per statement (each its own transaction).
const CHUNK: i64 = 10_000;

pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    run_in_chunks(context, CHUNK).await
}

/// One run, looking at `chunk` jobs per statement; returns how many were deleted.
pub async fn run_in_chunks(
    context: &MaintenanceContext,
    chunk: i64,
) -> Result<usize, StorageError> {
    let retention_ms = i64::try_from(context.config.job_retention.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    let mut after = 0;
    loop {
        let step = jobs::expire_finished(&context.pool, after, retention_ms, chunk).await?;
        total += usize::try_from(step.deleted).unwrap_or(0);
        match step.last_id {
            Some(last_id) if !step.reached_recent => after = last_id,
            _ => return Ok(total),
        }
    }
}
