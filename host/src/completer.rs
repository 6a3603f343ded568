//! The completer turns attempt outcomes into applied states: it elects the next state (the
//! retry policy for failures), writes it fenced on (job, attempt, owner), resolves the
//! continuations of jobs that ended, and lets observers (the runs) follow — all in one
//! transaction per batch. Outcomes arriving together are written together: under load one
//! statement ends hundreds of attempts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::resolve_continuations_transitively;
use crate::election::{elect_after_failure, FailedJob, RetryPolicy};
use crate::executor::Outcome;
use crate::running::RunningJobs;
use crate::state::{FetchedJob, JobId, JobState};
use crate::storage::jobs::{self, AttemptEnd};
use crate::storage::StorageError;

/// The most outcomes written in one statement.
const MAX_BATCH: usize = 4096;

/// A state that was applied to a job, for observers.
#[derive(Debug, Clone)]
pub struct AppliedState {
    pub job_id: JobId,
    pub kind: String,
    pub state: JobState,
    /// The failure message when the state ends a failed attempt.
    pub message: Option<String>,
}

/// Follows applied states inside the transaction that applied them (the runs use it so a
/// run's status never disagrees with its job's).
pub trait StateObserver: Send + Sync + 'static {
    fn on_applied<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        applied: &'a [AppliedState],
    ) -> BoxFuture<'a, Result<(), StorageError>>;
}

/// What applying a batch needs besides the batch.
#[derive(Clone)]
pub struct ApplyContext {
    pub pool: PgPool,
    pub channel: String,
    pub observers: Arc<Vec<Arc<dyn StateObserver>>>,
}

/// Builds the write that ends `job`'s attempt with `outcome`; None when nothing is to be
/// written (the lease was lost: the job is someone else's now).
pub fn attempt_end(
    policy: &dyn RetryPolicy,
    owner: &str,
    job: &FetchedJob,
    outcome: &Outcome,
) -> Option<AttemptEnd> {
    let end = |state, reason: String, data, scheduled_at, failed| AttemptEnd {
        id: job.id,
        attempt: job.attempt,
        owner: owner.to_owned(),
        state,
        reason,
        data,
        scheduled_at,
        failed,
    };
    match outcome {
        Outcome::Succeeded => Some(end(
            JobState::Succeeded,
            "completed".into(),
            serde_json::json!({}),
            None,
            false,
        )),
        Outcome::Failed(error) => {
            let elected = elect_after_failure(
                policy,
                &FailedJob {
                    id: job.id,
                    kind: &job.kind,
                    queue: &job.queue,
                    attempt: job.attempt,
                    failures: job.failures + 1,
                    error,
                },
                Utc::now(),
            );
            Some(end(
                elected.state,
                elected.reason,
                elected.data,
                elected.scheduled_at,
                true,
            ))
        }
        Outcome::Released => Some(end(
            JobState::Enqueued,
            "released at shutdown".into(),
            serde_json::json!({ "server": owner }),
            None,
            false,
        )),
        Outcome::Abandoned => None,
    }
}

/// Applies `ends` in one transaction. Returns how many were applied (the rest no longer
/// matched their fence).
pub async fn apply_ends(
    context: &ApplyContext,
    ends: &[AttemptEnd],
    only_expired: bool,
) -> Result<usize, StorageError> {
    let mut tx = context.pool.begin().await?;
    let ended = jobs::end_attempts(&mut tx, ends, only_expired).await?;
    let finished: Vec<JobId> = ended
        .iter()
        .filter(|e| JobState::parse(&e.state).is_some_and(JobState::is_final))
        .map(|e| e.id)
        .collect();
    let mut wake: Vec<String> = ended
        .iter()
        .filter(|e| e.state == JobState::Enqueued.as_str())
        .map(|e| e.queue.clone())
        .collect();
    if !finished.is_empty() {
        wake.extend(resolve_continuations_transitively(&mut tx, finished).await?);
    }
    if !context.observers.is_empty() && !ended.is_empty() {
        let by_id: HashMap<JobId, &AttemptEnd> = ends.iter().map(|end| (end.id, end)).collect();
        let applied: Vec<AppliedState> = ended
            .iter()
            .filter_map(|e| {
                let end = by_id.get(&e.id)?;
                Some(AppliedState {
                    job_id: e.id,
                    kind: e.kind.clone(),
                    state: JobState::parse(&e.state)?,
                    message: end
                        .failed
                        .then(|| end.data["message"].as_str().map(str::to_owned))
                        .flatten(),
                })
            })
            .collect();
        for observer in context.observers.iter() {
            observer.on_applied(&mut tx, &applied).await?;
        }
    }
    if !wake.is_empty() {
        wake.sort_unstable();
        wake.dedup();
        let queues: Vec<&str> = wake.iter().map(String::as_str).collect();
        jobs::notify_queues(&mut tx, &context.channel, &queues).await?;
    }
    tx.commit().await?;
    Ok(ended.len())
}

struct Completion {
    job: FetchedJob,
    outcome: Outcome,
}

/// The batching completer of one server.
pub struct Completer {
    sender: mpsc::UnboundedSender<Completion>,
    task: JoinHandle<()>,
}

impl Completer {
    /// `running` is told when an attempt's end is written, so its lease stops being renewed.
    pub fn start(
        context: ApplyContext,
        policy: Arc<dyn RetryPolicy>,
        owner: String,
        running: RunningJobs,
    ) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(context, policy, owner, running, receiver));
        Self { sender, task }
    }

    pub fn handle(&self) -> CompleterHandle {
        CompleterHandle {
            sender: self.sender.clone(),
        }
    }

    /// Writes everything sent so far, then stops (once every handle is dropped).
    pub async fn stop(self) {
        drop(self.sender);
        let _ = self.task.await;
    }
}

#[derive(Clone)]
pub struct CompleterHandle {
    sender: mpsc::UnboundedSender<Completion>,
}

impl CompleterHandle {
    pub fn complete(&self, job: FetchedJob, outcome: Outcome) {
        if self.sender.send(Completion { job, outcome }).is_err() {
            tracing::error!("completer stopped before an outcome was written; the lease will expire and the rescuer will take the job");
        }
    }
}

async fn run(
    context: ApplyContext,
    policy: Arc<dyn RetryPolicy>,
    owner: String,
    running: RunningJobs,
    mut receiver: mpsc::UnboundedReceiver<Completion>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ends: Vec<AttemptEnd> = batch
            .iter()
            .filter_map(|c| {
                if c.outcome == Outcome::Abandoned {
                    tracing::warn!(
                        job_id = c.job.id,
                        attempt = c.job.attempt,
                        "attempt abandoned: lease lost, nothing written"
                    );
                }
                attempt_end(policy.as_ref(), &owner, &c.job, &c.outcome)
            })
            .collect();
        // A failed write is retried: these jobs are still ours (the heartbeat renews their
        // leases) until the write lands or the process ends and the rescuer takes over.
        let mut delay = Duration::from_millis(50);
        loop {
            match apply_ends(&context, &ends, false).await {
                Ok(applied) => {
                    if applied < ends.len() {
                        tracing::warn!(
                            written = applied,
                            refused = ends.len() - applied,
                            "completions refused by their fence (rescued or released meanwhile)"
                        );
                    }
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, batch = ends.len(), retry_in = ?delay, "writing completions failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    if receiver.is_closed() && delay >= Duration::from_secs(5) {
                        tracing::error!(
                            batch = ends.len(),
                            "giving up at shutdown; the rescuer will take these jobs"
                        );
                        break;
                    }
                }
            }
        }
        running.remove_all(batch.iter().map(|c| c.job.id));
        batch.clear();
    }
}
