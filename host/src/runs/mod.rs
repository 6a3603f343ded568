//! The MMDetection workload: detection and training runs, each carried by a job on the
//! `detection` queue (a device queue: one run per GPU, or per CPU slot).

pub mod cleanup;
pub mod deletion;
pub mod detection;
pub mod files;
pub mod observer;
pub mod training;

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use sqlx::PgPool;
use uuid::Uuid;

use crate::client::{Client, ClientError};
use crate::config::Config;
use crate::executor::command::run_to_success;
use crate::executor::devices::Device;
use crate::executor::subprocess::SubprocessSpec;
use crate::executor::{HandlerRegistry, JobContext};
use crate::state::{JobError, NewJob};
use crate::storage::{jobs, StorageError};

pub const DETECTION_KIND: &str = "detection-run";
pub const TRAINING_KIND: &str = "training-run";
pub const RUNS_QUEUE: &str = "detection";
pub const DETECTION_RUN_PARAMETER: &str = "detectionRunId";
pub const TRAINING_RUN_PARAMETER: &str = "trainingRunId";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: Uuid },
    /// The run is not in a state that allows the request.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<ClientError> for RunError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Storage(e) => RunError::Storage(e),
            other => RunError::Storage(StorageError::Database(sqlx::Error::Protocol(
                other.to_string(),
            ))),
        }
    }
}

impl From<sqlx::Error> for RunError {
    fn from(error: sqlx::Error) -> Self {
        RunError::Storage(StorageError::Database(error))
    }
}

/// Registers the run handlers.
pub fn register_handlers(handlers: &mut HandlerRegistry, config: &Config) {
    handlers.register(DETECTION_KIND, detection::DetectionRunHandler::new(config));
    handlers.register(TRAINING_KIND, training::TrainingRunHandler::new(config));
}

/// Creates runs: the run row and its job, in one transaction.
#[derive(Clone)]
pub struct RunService {
    pub pool: PgPool,
    pub client: Client,
}

/// Enqueues the job that carries a run, with the run's id as a job parameter.
async fn enqueue_run_job(
    client: &Client,
    tx: &mut sqlx::PgConnection,
    kind: &str,
    parameter: &str,
    run_id: Uuid,
) -> Result<i64, RunError> {
    let job = NewJob::new(kind, RUNS_QUEUE).with_args(serde_json::json!({ "run_id": run_id }));
    let job_id = client.enqueue_in(tx, &job).await?;
    client
        .set_parameter_in(tx, job_id, parameter, &run_id.to_string())
        .await?;
    client
        .set_parameter_in(tx, job_id, "priority", "high")
        .await?;
    Ok(job_id)
}

/// An existing file, made absolute (the run's subprocess has its own working directory).
pub fn existing_file(field: &'static str, path: &str) -> Result<PathBuf, RunError> {
    if path.trim().is_empty() {
        return Err(RunError::Invalid {
            field,
            problem: "must not be empty".into(),
        });
    }
    let resolved = Path::new(path)
        .canonicalize()
        .map_err(|e| RunError::Invalid {
            field,
            problem: format!("{path}: {e}"),
        })?;
    Ok(resolved)
}

pub fn require_name(name: &str) -> Result<(), RunError> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(RunError::Invalid {
            field: "name",
            problem: "must be 1 to 200 characters".into(),
        });
    }
    Ok(())
}

/// The run's id from the job parameter the run's creation set.
pub async fn run_id_of(ctx: &JobContext, parameter: &str) -> Result<Uuid, JobError> {
    let mut conn = ctx.pool.acquire().await.map_err(storage_failure)?;
    let value = jobs::get_parameter(&mut conn, ctx.job.id, parameter)
        .await
        .map_err(storage_failure)?
        .ok_or_else(|| {
            JobError::new(
                "MissingParameter",
                format!("job has no {parameter} parameter"),
            )
        })?;
    Uuid::parse_str(&value)
        .map_err(|e| JobError::new("InvalidParameter", format!("{parameter}={value:?}: {e}")))
}

pub fn storage_failure(error: impl std::fmt::Display) -> JobError {
    JobError::new("StorageError", error.to_string())
}

pub fn lease_lost() -> JobError {
    JobError::new("LeaseLost", "the job is no longer held by this attempt")
}

/// The device of the attempt: its slot, or the CPU for a job outside a device queue.
pub fn attempt_device(ctx: &JobContext) -> Device {
    ctx.device
        .as_ref()
        .map_or(Device::Cpu(0), |lease| lease.device)
}

/// Runs one of hangar's MMDetection drivers for `ctx` with the run's logs.
pub async fn run_driver(
    ctx: &JobContext,
    files: &files::RunFiles,
    run_id: Uuid,
    script: &str,
    args: Vec<std::ffi::OsString>,
) -> Result<(), JobError> {
    let config = &ctx.config;
    let python = config.mmdet_python();
    if !python.exists() {
        return Err(JobError::new(
            "MMDetectionNotInstalled",
            format!(
                "{} does not exist: install the MMDetection environment with `hangar mmdet install`",
                python.display()
            ),
        ));
    }
    let device = attempt_device(ctx);
    let cache = config.data_dir.join("cache");
    let mut all_args = vec![config.drivers_dir().join(script).into_os_string()];
    all_args.extend(args);
    let spec = SubprocessSpec {
        program: python,
        args: all_args,
        working_dir: None,
        env: vec![
            ("CUDA_VISIBLE_DEVICES".into(), device.cuda_visible_devices()),
            ("HANGAR_DEVICE".into(), device.torch_device().into()),
            ("HANGAR_RUN_ID".into(), run_id.to_string()),
            ("PYTHONUNBUFFERED".into(), "1".into()),
            // mmdet's imports write caches (YAPF, matplotlib); keep them in hangar's folder.
            ("XDG_CACHE_HOME".into(), cache.display().to_string()),
            (
                "MPLCONFIGDIR".into(),
                cache.join("matplotlib").display().to_string(),
            ),
        ],
        stdout_path: files.stdout_log(run_id),
        stderr_path: files.stderr_log(run_id),
    };
    run_to_success(&spec, ctx).await
}

/// Boxed future type of the handlers.
pub type HandlerFuture<'a> = BoxFuture<'a, Result<(), JobError>>;
