//! Deletes finished jobs past their retention (parents of waiting continuations stay).

use super::MaintenanceContext;
use crate::storage::{jobs, StorageError};

const BATCH: i64 = 10_000;

pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    let retention_ms = i64::try_from(context.config.job_retention.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let deleted = jobs::expire_finished(&context.pool, retention_ms, BATCH).await?;
        total += deleted as usize;
        if deleted < BATCH as u64 {
            return Ok(total);
        }
    }
}
