//! The producer fetches jobs for this server's free slots and hands each to a worker task.
//!
//! It fetches only as many jobs as it has free workers (and, for device queues, free device
//! slots), in one statement across its queues in priority order. It sleeps until NOTIFY says
//! a queue it serves got work, a slot frees up after a full fetch, or `queue_poll_interval`
//! passes (the fallback for a missed notification).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::completer::CompleterHandle;
use crate::config::Config;
use crate::executor::devices::DevicePool;
use crate::executor::{self, HandlerRegistry, JobCancellation, JobContext};
use crate::running::RunningJobs;
use crate::state::{Fence, FetchedJob};
use crate::storage::jobs;

/// What the producer and its workers share.
#[derive(Clone)]
pub struct ProducerContext {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub server_id: String,
    pub channel: String,
    pub handlers: HandlerRegistry,
    pub devices: DevicePool,
    pub running: RunningJobs,
    pub completer: CompleterHandle,
    pub workers: Arc<Semaphore>,
    /// Signalled when a worker finishes (a slot is free again).
    pub slot_freed: Arc<Notify>,
    /// Cancelled on hard stop: running jobs are told to stop (for release).
    pub jobs_stop: CancellationToken,
}

/// Listens for NOTIFY on the jobs channel and wakes the producer for its queues.
pub async fn run_listener(
    pool: PgPool,
    channel: String,
    queues: Vec<String>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            // Anything enqueued while we were not listening is picked up by this wake-up.
            wake.notify_one();
            loop {
                let notification = listener.recv().await?;
                if queues.iter().any(|q| q == notification.payload()) {
                    wake.notify_one();
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = listener => {
                if let Err(error) = result {
                    tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

pub async fn run_producer(context: ProducerContext, wake: Arc<Notify>, stop: CancellationToken) {
    // Shared by every worker task it starts: one reference count per job, not a copy of the
    // handler table and the server's names.
    let context = Arc::new(context);
    let config = &context.config;
    let lease_ms = i64::try_from(config.lease_duration.as_millis()).unwrap_or(i64::MAX);
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let free = context.workers.available_permits();
        let mut fetched_full = false;
        if free > 0 {
            let free_devices = context.devices.free_count().min(free);
            let quotas: Vec<i32> = config
                .queues
                .iter()
                .map(|queue| {
                    let quota = if config.device_queues.contains(queue) {
                        free_devices
                    } else {
                        free
                    };
                    i32::try_from(quota).unwrap_or(i32::MAX)
                })
                .collect();
            let limit = i32::try_from(free).unwrap_or(i32::MAX);
            // A fetch in flight is not interrupted by the stop signal: its jobs must be
            // started (or they would sit in Processing until their lease expires).
            match jobs::fetch(
                &context.pool,
                &context.server_id,
                &config.queues,
                &quotas,
                limit,
                lease_ms,
            )
            .await
            {
                Ok(fetched) => {
                    backoff = Duration::from_millis(100);
                    fetched_full = !fetched.is_empty() && fetched.len() == free;
                    let fetched_at = Instant::now();
                    for job in fetched {
                        start_worker(&context, job, fetched_at);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, retry_in = ?backoff, "fetching jobs failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        // Sleep until there may be work we can take.
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
            () = context.slot_freed.notified(), if fetched_full || free == 0 => {}
            () = tokio::time::sleep(config.queue_poll_interval) => {}
        }
    }
}

fn start_worker(context: &Arc<ProducerContext>, job: FetchedJob, fetched_at: Instant) {
    // The producer fetched at most the free permits, and only it takes permits.
    let Ok(permit) = Arc::clone(&context.workers).try_acquire_owned() else {
        tracing::error!(
            job_id = job.id,
            "no free worker for a fetched job; it will be rescued when its lease expires"
        );
        return;
    };
    let device = if context.config.device_queues.contains(&job.queue) {
        context.devices.try_take()
    } else {
        None
    };
    let cancellation = JobCancellation::child_of(&context.jobs_stop);
    context
        .running
        .insert(job.id, job.attempt, cancellation.clone(), fetched_at);
    let span = tracing::info_span!("job", job_id = job.id, kind = %job.kind, attempt = job.attempt, queue = %job.queue);
    let context = Arc::clone(context);
    tokio::spawn(
        async move {
            let job_context = JobContext {
                fence: Fence {
                    job_id: job.id,
                    attempt: job.attempt,
                    owner: context.server_id.clone(),
                },
                job,
                pool: context.pool.clone(),
                config: Arc::clone(&context.config),
                cancellation,
                device,
            };
            let handler = context.handlers.get(&job_context.job.kind);
            let outcome = executor::execute(handler, &job_context).await;
            tracing::debug!(?outcome, "attempt ended");
            let JobContext { job, device, .. } = job_context;
            if outcome == executor::Outcome::Abandoned {
                // Nothing will be written; stop renewing a lease we no longer hold.
                context.running.remove(job.id);
            }
            drop(device);
            drop(permit);
            context.running.ended(job.id);
            context.completer.complete(job, outcome);
            context.slot_freed.notify_one();
        }
        .instrument(span),
    );
}

/// Waits until no worker is running, or `deadline` passes; true when all finished.
pub async fn wait_idle(
    workers: &Arc<Semaphore>,
    total: usize,
    deadline: tokio::time::Instant,
) -> bool {
    let all = u32::try_from(total).unwrap_or(u32::MAX);
    let acquired: Option<OwnedSemaphorePermit> =
        tokio::time::timeout_at(deadline, Arc::clone(workers).acquire_many_owned(all))
            .await
            .ok()
            .and_then(Result::ok);
    acquired.is_some()
}
