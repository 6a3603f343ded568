//! The attempts a server holds — running, or ended and waiting for the completer to write
//! them — with their cancellation and the instant their lease was last known to be renewed
//! (what the lease watchdog counts from). An attempt leaves only once its end is written, so
//! the heartbeat keeps its lease alive until then, and never renews a lease it gave up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::executor::{CancelReason, JobCancellation};
use crate::state::JobId;

#[derive(Debug)]
struct RunningJob {
    attempt: i32,
    cancellation: JobCancellation,
    /// The lease is valid for `lease_duration` from (at least) this instant: the fetch, or the
    /// moment the last successful renewal was sent.
    lease_basis: Instant,
}

#[derive(Debug, Clone, Default)]
pub struct RunningJobs {
    jobs: Arc<Mutex<HashMap<JobId, RunningJob>>>,
}

impl RunningJobs {
    fn lock(&self) -> MutexGuard<'_, HashMap<JobId, RunningJob>> {
        // A poisoned map still holds valid entries; a panic elsewhere must not stop the kills.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn insert(
        &self,
        id: JobId,
        attempt: i32,
        cancellation: JobCancellation,
        fetched_at: Instant,
    ) {
        self.lock().insert(
            id,
            RunningJob {
                attempt,
                cancellation,
                lease_basis: fetched_at,
            },
        );
    }

    pub fn remove(&self, id: JobId) {
        self.lock().remove(&id);
    }

    /// Forgets attempts whose end was written (or refused by the fence).
    pub fn remove_all(&self, ids: impl IntoIterator<Item = JobId>) {
        let mut jobs = self.lock();
        for id in ids {
            jobs.remove(&id);
        }
    }

    /// The attempts whose leases the heartbeat must renew: running, or ended but not yet
    /// written by the completer.
    pub fn held(&self) -> Vec<(JobId, i32)> {
        self.lock()
            .iter()
            .map(|(id, job)| (*id, job.attempt))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a renewal sent at `sent_at` returned `held`: those leases now count from
    /// `sent_at`; jobs started before `sent_at` that are not held any more were rescued or
    /// released behind our back and are stopped.
    pub fn renewed(&self, sent_at: Instant, held: &[(JobId, i32)]) {
        let held: std::collections::HashSet<&(JobId, i32)> = held.iter().collect();
        let mut jobs = self.lock();
        for (id, job) in jobs.iter_mut() {
            if held.contains(&(*id, job.attempt)) {
                job.lease_basis = job.lease_basis.max(sent_at);
            } else if job.lease_basis < sent_at {
                tracing::warn!(
                    job_id = id,
                    attempt = job.attempt,
                    "lease no longer held; stopping the job"
                );
                job.cancellation.cancel(CancelReason::LeaseLost);
            }
        }
    }

    /// Stops every job whose lease basis is older than `deadline_age` before `now`.
    pub fn stop_expiring(&self, now: Instant, deadline_age: std::time::Duration) {
        for (id, job) in self.lock().iter() {
            if now.duration_since(job.lease_basis) >= deadline_age
                && !job.cancellation.token().is_cancelled()
            {
                tracing::error!(
                    job_id = id,
                    attempt = job.attempt,
                    "lease could not be renewed in time; stopping the job before it expires"
                );
                job.cancellation.cancel(CancelReason::LeaseLost);
            }
        }
    }

    pub fn cancel_all(&self, reason: CancelReason) {
        for job in self.lock().values() {
            job.cancellation.cancel(reason);
        }
    }
}
