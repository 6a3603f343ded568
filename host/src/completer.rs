//! The completer turns attempt outcomes into applied states: it elects the next state (the
//! retry policy for failures), writes it fenced on (job, attempt, owner), resolves the
//! continuations of jobs that ended, and lets observers (the runs) follow — all in one
//! transaction per batch. Outcomes arriving together are written together: under load one
//! statement ends hundreds of attempts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::resolve_continuations_transitively;
use crate::executor::Outcome;
use crate::plugins::policies::{AppliedNotice, JobParameters, Policies};
use crate::plugins::registry::ActiveSet;
use crate::running::RunningJobs;
use crate::state::{FetchedJob, JobId, JobState};
use crate::storage::jobs::{self, AttemptEnd, EndedAttempt};
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

/// One attempt to end: who owned it, the job, and how it ended.
pub struct AttemptOutcome {
    pub owner: String,
    pub job: FetchedJob,
    pub outcome: Outcome,
}

/// The states elected for a batch of attempts, ready to apply.
pub struct Election {
    pub ends: Vec<AttemptEnd>,
    /// The plugins that took part and the jobs' parameters, to tell the state filters what
    /// was applied; None when no plugin is active.
    plugins: Option<(Arc<ActiveSet>, Arc<JobParameters>)>,
}

impl Election {
    /// Tells the active state filters which of the elected states were applied (after the
    /// commit, on a blocking thread: their answers cannot change anything).
    pub fn tell_filters(
        &self,
        policies: &Policies,
        attempts: &[AttemptOutcome],
        applied: &[EndedAttempt],
    ) {
        let Some((plugins, parameters)) = &self.plugins else {
            return;
        };
        if plugins.state_filters.is_empty() || applied.is_empty() {
            return;
        }
        let applied: HashSet<JobId> = applied.iter().map(|a| a.id).collect();
        let ends: HashMap<JobId, &AttemptEnd> = self.ends.iter().map(|e| (e.id, e)).collect();
        let notices = attempts
            .iter()
            .filter(|a| applied.contains(&a.job.id))
            .filter_map(|a| {
                let end = ends.get(&a.job.id)?;
                Some(AppliedNotice::new(&a.job, end))
            })
            .collect();
        policies.tell_applied(Arc::clone(plugins), Arc::clone(parameters), notices);
    }
}

/// Elects the end of every attempt through the policies. When a plugin will be called (a
/// state filter is active, or a retry policy and the batch has a failure), the jobs'
/// parameters are loaded in one query and the plugin calls run on a blocking thread (they are
/// synchronous, bounded by their time budget). Otherwise the built-in policy decides inline.
pub async fn elect_ends(
    policies: &Policies,
    pool: &PgPool,
    attempts: Arc<Vec<AttemptOutcome>>,
) -> Result<Election, StorageError> {
    let plugins = policies.active_plugins().filter(|plugins| {
        !plugins.state_filters.is_empty()
            || (plugins.retry_policy.is_some()
                && attempts
                    .iter()
                    .any(|a| matches!(a.outcome, Outcome::Failed(_))))
    });
    let Some(plugins) = plugins else {
        return Ok(Election {
            ends: builtin_ends(policies, &attempts),
            plugins: None,
        });
    };
    let ids: Vec<JobId> = attempts.iter().map(|a| a.job.id).collect();
    let mut parameters = JobParameters::new();
    for (id, name, value) in jobs::parameters_of(pool, &ids).await? {
        parameters.entry(id).or_default().insert(name, value);
    }
    let parameters = Arc::new(parameters);
    let elect = {
        let (policies, plugins, parameters, attempts) = (
            policies.clone(),
            Arc::clone(&plugins),
            Arc::clone(&parameters),
            Arc::clone(&attempts),
        );
        move || {
            let none = BTreeMap::new();
            attempts
                .iter()
                .filter_map(|a| {
                    let job_parameters = parameters.get(&a.job.id).unwrap_or(&none);
                    policies.attempt_end(
                        Some(&plugins),
                        job_parameters,
                        &a.owner,
                        &a.job,
                        &a.outcome,
                    )
                })
                .collect()
        }
    };
    let ends = match tokio::task::spawn_blocking(elect).await {
        Ok(ends) => ends,
        Err(panic) => {
            // A bug in hangar, not in a plugin (their faults are errors, not panics): the jobs
            // still end, as the built-in policy decides.
            tracing::error!(%panic, "the plugin election panicked; the built-in policy decides");
            builtin_ends(policies, &attempts)
        }
    };
    Ok(Election {
        ends,
        plugins: Some((plugins, parameters)),
    })
}

fn builtin_ends(policies: &Policies, attempts: &[AttemptOutcome]) -> Vec<AttemptEnd> {
    let none = BTreeMap::new();
    attempts
        .iter()
        .filter_map(|a| policies.attempt_end(None, &none, &a.owner, &a.job, &a.outcome))
        .collect()
}

/// Applies `ends` in one transaction. Returns those that were applied (the rest no longer
/// matched their fence).
pub async fn apply_ends(
    context: &ApplyContext,
    ends: &[AttemptEnd],
    only_expired: bool,
) -> Result<Vec<EndedAttempt>, StorageError> {
    let mut tx = context.pool.begin().await?;
    let ended = jobs::end_attempts(&mut tx, ends, only_expired).await?;
    let finished: Vec<(JobId, JobState)> = ended
        .iter()
        .filter_map(|e| Some((e.id, JobState::parse(&e.state)?)))
        .filter(|(_, state)| state.is_final())
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
    Ok(ended)
}

/// The batching completer of one server.
pub struct Completer {
    sender: mpsc::UnboundedSender<(FetchedJob, Outcome)>,
    task: JoinHandle<()>,
}

impl Completer {
    /// `running` is told when an attempt's end is written, so its lease stops being renewed.
    pub fn start(
        context: ApplyContext,
        policies: Policies,
        owner: String,
        running: RunningJobs,
    ) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(context, policies, owner, running, receiver));
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
    sender: mpsc::UnboundedSender<(FetchedJob, Outcome)>,
}

impl CompleterHandle {
    pub fn complete(&self, job: FetchedJob, outcome: Outcome) {
        if self.sender.send((job, outcome)).is_err() {
            tracing::error!("completer stopped before an outcome was written; the lease will expire and the rescuer will take the job");
        }
    }
}

async fn run(
    context: ApplyContext,
    policies: Policies,
    owner: String,
    running: RunningJobs,
    mut receiver: mpsc::UnboundedReceiver<(FetchedJob, Outcome)>,
) {
    let mut received = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut received, MAX_BATCH).await > 0 {
        let attempts: Vec<AttemptOutcome> = received
            .drain(..)
            .map(|(job, outcome)| {
                if outcome == Outcome::Abandoned {
                    tracing::warn!(
                        job_id = job.id,
                        attempt = job.attempt,
                        "attempt abandoned: lease lost, nothing written"
                    );
                }
                AttemptOutcome {
                    owner: owner.clone(),
                    job,
                    outcome,
                }
            })
            .collect();
        let attempts = Arc::new(attempts);
        complete_batch(&context, &policies, &attempts, &receiver).await;
        running.remove_all(attempts.iter().map(|a| a.job.id));
    }
}

/// Elects and writes one batch. A failed read or write is retried: these jobs are still ours
/// (the heartbeat renews their leases) until the write lands, or until the process ends and
/// the rescuer takes over.
async fn complete_batch(
    context: &ApplyContext,
    policies: &Policies,
    attempts: &Arc<Vec<AttemptOutcome>>,
    receiver: &mpsc::UnboundedReceiver<(FetchedJob, Outcome)>,
) {
    let mut delay = Duration::from_millis(50);
    let election = loop {
        match elect_ends(policies, &context.pool, Arc::clone(attempts)).await {
            Ok(election) => break election,
            Err(error) => {
                if !back_off(&mut delay, &error, attempts.len(), receiver).await {
                    return;
                }
            }
        }
    };
    loop {
        match apply_ends(context, &election.ends, false).await {
            Ok(applied) => {
                if applied.len() < election.ends.len() {
                    tracing::warn!(
                        written = applied.len(),
                        refused = election.ends.len() - applied.len(),
                        "completions refused by their fence (rescued or released meanwhile)"
                    );
                }
                election.tell_filters(policies, attempts, &applied);
                return;
            }
            Err(error) => {
                if !back_off(&mut delay, &error, attempts.len(), receiver).await {
                    return;
                }
            }
        }
    }
}

/// Waits before the next try (doubling up to 5 s); false when it is time to give up (at
/// shutdown, with the database still unreachable).
async fn back_off(
    delay: &mut Duration,
    error: &StorageError,
    batch: usize,
    receiver: &mpsc::UnboundedReceiver<(FetchedJob, Outcome)>,
) -> bool {
    tracing::error!(%error, batch, retry_in = ?*delay, "completing attempts failed");
    tokio::time::sleep(*delay).await;
    *delay = (*delay * 2).min(Duration::from_secs(5));
    if receiver.is_closed() && *delay >= Duration::from_secs(5) {
        tracing::error!(
            batch,
            "giving up at shutdown; the rescuer will take these jobs"
        );
        return false;
    }
    true
}
