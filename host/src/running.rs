//! The attempts a server holds — running, or ended and waiting for the completer to write
//! them — with their cancellation and the instant their lease was last known to be renewed
//! (what the lease watchdog counts from). An attempt leaves only once its end is written, so
//! the heartbeat keeps its lease alive until then, and never renews a lease it gave up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::executor::{CancelReason, JobCancellation};
use crate::state::JobId;
use crate::storage::jobs::LeaseRenewal;

#[derive(Debug)]
struct RunningJob {
    attempt: i32,
    cancellation: JobCancellation,
    /// The lease is valid for `lease_duration` from (at least) this instant: the fetch, or the
    /// moment the last successful renewal was sent.
    lease_basis: Instant,
    /// Its outcome went to the completer: nothing runs any more, so a lease found lost is
    /// only the completer (or a rescuer) having written it first.
    ended: bool,
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
                ended: false,
            },
        );
    }

    /// The attempt's outcome was handed to the completer; its lease is still renewed until
    /// the end is written.
    pub fn ended(&self, id: JobId) {
        if let Some(job) = self.lock().get_mut(&id) {
            job.ended = true;
        }
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

    /// After a renewal sent at `sent_at`: renewed leases now count from `sent_at`; jobs
    /// started before `sent_at` that are `lost` were rescued or released behind our back and
    /// are stopped. The rest keep their lease basis (the watchdog stops them in time if no
    /// renewal reaches them).
    pub fn renewed(&self, sent_at: Instant, renewal: &LeaseRenewal) {
        let renewed: std::collections::HashSet<&(JobId, i32)> = renewal.renewed.iter().collect();
        let lost: std::collections::HashSet<&(JobId, i32)> = renewal.lost.iter().collect();
        let mut jobs = self.lock();
        for (id, job) in jobs.iter_mut() {
            let key = (*id, job.attempt);
            if renewed.contains(&key) {
                job.lease_basis = job.lease_basis.max(sent_at);
            } else if lost.contains(&key) && job.lease_basis < sent_at && !job.ended {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[test]
    fn a_renewal_extends_what_it_renewed_stops_what_was_lost_and_leaves_the_rest() {
        let running = RunningJobs::default();
        let server_stop = CancellationToken::new();
        let fetched_at = Instant::now();
        let cancellations: Vec<JobCancellation> = (1..=3)
            .map(|id| {
                let cancellation = JobCancellation::child_of(&server_stop);
                running.insert(id, 1, cancellation.clone(), fetched_at);
                cancellation
            })
            .collect();
        let sent_at = fetched_at + Duration::from_secs(10);
        // Job 3 was locked by another writer: neither renewed nor lost.
        running.renewed(
            sent_at,
            &LeaseRenewal {
                renewed: vec![(1, 1)],
                lost: vec![(2, 1)],
            },
        );
        let reasons: Vec<Option<CancelReason>> =
            cancellations.iter().map(JobCancellation::reason).collect();
        assert_eq!(reasons, [None, Some(CancelReason::LeaseLost), None]);
        // Counting from the fetch, 15 s on: job 3's lease basis is too old, job 1's is not.
        running.stop_expiring(
            fetched_at + Duration::from_secs(15),
            Duration::from_secs(12),
        );
        let reasons: Vec<Option<CancelReason>> =
            cancellations.iter().map(JobCancellation::reason).collect();
        assert_eq!(
            reasons,
            [
                None,
                Some(CancelReason::LeaseLost),
                Some(CancelReason::LeaseLost)
            ]
        );
    }
}
