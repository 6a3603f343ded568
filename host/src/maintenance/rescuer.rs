//! Rescues jobs whose owner stopped renewing its lease (it died, or lost the database): each
//! such attempt counts as a failed attempt and goes through the retry policy, exactly once —
//! the write is fenced on (job, attempt, owner, lease expired), so the old owner's late
//! completion is refused and a second rescuer finds nothing to do.

use std::sync::Arc;

use chrono::Utc;

use super::MaintenanceContext;
use crate::completer::{apply_ends, elect_ends, AttemptOutcome};
use crate::executor::Outcome;
use crate::state::{FetchedJob, JobError};
use crate::storage::{jobs, servers, StorageError};

const BATCH: i64 = 1000;

pub async fn run_once(context: &MaintenanceContext) -> Result<usize, StorageError> {
    let expired = jobs::expired_leases(&context.pool, BATCH).await?;
    let attempts: Vec<AttemptOutcome> = expired
        .iter()
        .map(|job| {
            let error = JobError::new(
                "LeaseExpired",
                format!(
                    "server {} stopped renewing its lease (it died or lost the database); attempt {} counts as failed",
                    job.lease_owner, job.attempt
                ),
            );
            AttemptOutcome {
                owner: job.lease_owner.clone(),
                job: FetchedJob {
                    id: job.id,
                    kind: job.kind.clone(),
                    args: serde_json::Value::Null,
                    queue: job.queue.clone(),
                    attempt: job.attempt,
                    failures: job.failures,
                    timeout_ms: None,
                    created_at: Utc::now(),
                },
                outcome: Outcome::Failed(error),
            }
        })
        .collect();
    let attempts = Arc::new(attempts);
    let election = elect_ends(&context.policies, &context.pool, Arc::clone(&attempts)).await?;
    let rescued = apply_ends(&context.apply, &election.ends, true).await?;
    election.tell_filters(&context.policies, &attempts, &rescued);
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
    Ok(rescued.len())
}
