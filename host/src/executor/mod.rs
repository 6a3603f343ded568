//! The executor runs one job — a native handler, or a supervised subprocess — under its
//! timeout and cancellation token, and reports an [`Outcome`]. It never writes job state;
//! the completer does.

pub mod command;
pub mod devices;
pub mod subprocess;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::{Fence, FetchedJob, JobError};
use devices::DeviceLease;

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Its execution timeout ran out.
    Timeout,
    /// The server could not renew its lease in time, or it was rescued: someone else may run it.
    LeaseLost,
    /// The server is shutting down and the grace period ran out.
    Shutdown,
}

/// The cancellation token of one job, with the reason it fired for.
#[derive(Debug, Clone, Default)]
pub struct JobCancellation {
    token: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
}

impl JobCancellation {
    /// A job's cancellation that also fires when the server's hard stop does (no reason set:
    /// read as [`CancelReason::Shutdown`]).
    pub fn child_of(server_stop: &CancellationToken) -> Self {
        Self {
            token: server_stop.child_token(),
            reason: Arc::default(),
        }
    }

    /// Cancels with `reason`; the first reason given wins.
    pub fn cancel(&self, reason: CancelReason) {
        if let Ok(mut current) = self.reason.lock() {
            current.get_or_insert(reason);
        }
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<CancelReason> {
        let reason = self.reason.lock().ok().and_then(|reason| *reason);
        match reason {
            None if self.token.is_cancelled() => Some(CancelReason::Shutdown),
            reason => reason,
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// Everything a handler gets for one attempt.
pub struct JobContext {
    pub job: FetchedJob,
    /// What writes on behalf of this attempt must still match.
    pub fence: Fence,
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub cancellation: JobCancellation,
    /// The GPU or CPU slot, for jobs of a device queue.
    pub device: Option<DeviceLease>,
}

/// Code that runs jobs of one kind.
pub trait JobHandler: Send + Sync + 'static {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>>;
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn JobHandler>>,
}

impl HandlerRegistry {
    pub fn register(&mut self, kind: impl Into<String>, handler: impl JobHandler) -> &mut Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn kinds(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }
}

/// How an attempt ended, as far as the executor can tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed(JobError),
    /// Stopped at shutdown: give the job back to the queue; not a failure.
    Released,
    /// The lease was lost: the job is no longer ours to write.
    Abandoned,
}

/// A handler that does nothing (benchmarks and tests of the queue itself).
pub struct NoopHandler;

impl JobHandler for NoopHandler {
    fn run<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async { Ok(()) })
    }
}

/// How long a handler may take to return after its cancellation: a subprocess handler's stop
/// path (SIGTERM, the kill grace, SIGKILL, the wait for the group) with a margin.
pub fn stop_patience(config: &Config) -> Duration {
    config.kill_grace_period + subprocess::GROUP_EXIT_WAIT + Duration::from_secs(1)
}

/// Runs `ctx.job` with `handler` under its timeout and reports the outcome.
pub async fn execute(handler: Option<Arc<dyn JobHandler>>, ctx: &JobContext) -> Outcome {
    let Some(handler) = handler else {
        return Outcome::Failed(JobError::new(
            "UnknownJobKind",
            format!(
                "no handler is registered for job kind {:?} on this server",
                ctx.job.kind
            ),
        ));
    };
    let timeout = ctx
        .job
        .timeout_ms
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
        .or(ctx.config.default_job_timeout);
    let cancellation = ctx.cancellation.clone();
    let timer = timeout.map(|timeout| {
        let cancellation = cancellation.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            cancellation.cancel(CancelReason::Timeout);
        })
    });
    // A handler that ignores its token is abandoned (its future dropped) once the subprocess
    // kill path would have finished.
    let patience = stop_patience(&ctx.config);
    let result = tokio::select! {
        result = handler.run(ctx) => result,
        () = async {
            cancellation.token().cancelled().await;
            tokio::time::sleep(patience).await;
        } => Err(JobError::new("Canceled", "the handler did not stop when asked")),
    };
    if let Some(timer) = timer {
        timer.abort();
    }
    match (cancellation.reason(), result) {
        (Some(CancelReason::LeaseLost), _) => Outcome::Abandoned,
        (Some(CancelReason::Shutdown), _) => Outcome::Released,
        (_, Ok(())) => Outcome::Succeeded,
        (Some(CancelReason::Timeout), Err(error)) => Outcome::Failed(JobError {
            exception_type: "TimeoutError".into(),
            message: format!(
                "the job ran past its timeout of {}",
                humantime::format_duration(timeout.unwrap_or_default())
            ),
            details: format!(
                "{}: {}\n{}",
                error.exception_type, error.message, error.details
            ),
        }),
        (None, Err(error)) => Outcome::Failed(error),
    }
}
