//! Moves due scheduled jobs (delayed jobs and pending retries) to their queue.

use super::MaintenanceContext;
use crate::storage::{jobs, StorageError};

const BATCH: i64 = 1000;

/// Enqueues every due job; returns how many.
pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    let mut total = 0;
    loop {
        let mut tx = context.pool.begin().await?;
        let queues = jobs::enqueue_due(&mut tx, BATCH).await?;
        let mut wake: Vec<&str> = queues.iter().map(String::as_str).collect();
        wake.sort_unstable();
        wake.dedup();
        jobs::notify_queues(&mut tx, &context.apply.channel, &wake).await?;
        tx.commit().await?;
        total += queues.len();
        if (queues.len() as i64) < BATCH {
            return Ok(total);
        }
    }
}
