//! The `command` job kind: runs a program given in the job's arguments as a supervised
//! subprocess. For operators' own scripts (and the executor's tests); HTTP does not expose it.
//!
//! Arguments: `{"program": "...", "args": [...], "env": {"K": "V"}, "working_dir": "..."}`.
//! The child also gets `HANGAR_JOB_ID` and `HANGAR_JOB_ATTEMPT`. Its output goes to
//! `logs/job_<id>.out` and `logs/job_<id>.err`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::subprocess::{read_tail, run_supervised, SubprocessSpec};
use super::{JobContext, JobHandler};
use crate::state::JobError;

/// How much of stderr goes into a failure's details.
pub const STDERR_TAIL_BYTES: u64 = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArgs {
    program: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

pub struct CommandHandler;

impl JobHandler for CommandHandler {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let args: CommandArgs = serde_json::from_value(ctx.job.args.clone())
                .map_err(|e| JobError::new("InvalidArguments", e.to_string()))?;
            let logs = ctx.config.logs_dir();
            let mut env: Vec<(String, String)> = args.env.into_iter().collect();
            env.push(("HANGAR_JOB_ID".into(), ctx.job.id.to_string()));
            env.push(("HANGAR_JOB_ATTEMPT".into(), ctx.job.attempt.to_string()));
            let spec = SubprocessSpec {
                program: args.program,
                args: args.args.into_iter().map(Into::into).collect(),
                working_dir: args.working_dir,
                env,
                stdout_path: logs.join(format!("job_{}.out", ctx.job.id)),
                stderr_path: logs.join(format!("job_{}.err", ctx.job.id)),
            };
            run_to_success(&spec, ctx).await
        })
    }
}

/// Runs a subprocess for `ctx`'s attempt; exit 0 is success, anything else a failure carrying
/// the exit status and the tail of stderr.
pub async fn run_to_success(spec: &SubprocessSpec, ctx: &JobContext) -> Result<(), JobError> {
    let finished = run_supervised(spec, ctx.cancellation.token(), ctx.config.kill_grace_period)
        .await
        .map_err(|e| JobError::new("SubprocessError", e.to_string()))?;
    if finished.success() {
        return Ok(());
    }
    let details = read_tail(&spec.stderr_path, STDERR_TAIL_BYTES).unwrap_or_default();
    Err(JobError::new(
        "SubprocessFailed",
        format!("{} {}", spec.program.display(), finished.describe()),
    )
    .with_details(details))
}
