//! Rescues jobs whose owner stopped renewing its lease (it died, or lost the database): each
//! such attempt counts as a failed attempt and goes through the retry policy, exactly once —
//! the write is fenced on (job, attempt, owner, lease expired), so the old owner's late
//! completion is refused and a second rescuer finds nothing to do.

use chrono::Utc;

use super::MaintenanceContext;
use crate::completer::{apply_ends, attempt_end};
use crate::executor::Outcome;
use crate::state::{FetchedJob, JobError};
use crate::storage::{jobs, servers, StorageError};

const BATCH: i64 = 1000;

pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    let expired = jobs::expired_leases(&context.pool, BATCH).await?;
    let ends: Vec<_> = expired
        .iter()
        .filter_map(|job| {
            let error = JobError::new(
                "LeaseExpired",
                format!(
                    "server {} stopped renewing its lease (it died or lost the database); attempt {} counts as failed",
                    job.lease_owner, job.attempt
                ),
            );
            let fetched = FetchedJob {
                id: job.id,
                kind: job.kind.clone(),
                args: serde_json::Value::Null,
                queue: job.queue.clone(),
                attempt: job.attempt,
                failures: job.failures,
                timeout_ms: None,
                created_at: Utc::now(),
            };
            attempt_end(context.policy.as_ref(), &job.lease_owner, &fetched, &Outcome::Failed(error))
        })
        .collect();
    let rescued = apply_ends(&context.apply, &ends, true).await?;
    for job in &expired {
        tracing::warn!(job_id = job.id, attempt = job.attempt, owner = %job.lease_owner, "rescued a job whose lease expired");
    }
    // Servers silent for several leases are gone; forget them (their jobs were rescued above).
    let dead_after = context.config.lease_duration * 3;
    servers::remove_dead(
        &context.pool,
        i64::try_from(dead_after.as_millis()).unwrap_or(i64::MAX),
    )
    .await?;
    Ok(rescued)
}
