//! A retry policy for GPU work: out-of-memory errors are retried quickly (another run may have
//! freed the GPU), a broken input is never retried, everything else backs off linearly.

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::host::{self, Level};
use hangar::policy::types::{Job, JobError};

struct GpuAwareRetry;

impl Guest for GpuAwareRetry {
    fn decide(job: Job, error: JobError) -> Decision {
        // Operators can change the limit per job with the parameter "retry.max".
        let max_retries = host::get_parameter("retry.max")
            .and_then(|value| value.parse::<i32>().ok())
            .unwrap_or(5);
        let retries_so_far = job.failures - 1;
        let decision =
            if error.details.contains("CUDA out of memory") && retries_so_far < max_retries {
                Decision::RetryAfter(10_000)
            } else if error.exception_type == "InvalidArguments"
                || error.message.contains("cannot identify image")
            {
                Decision::Fail
            } else if retries_so_far < max_retries {
                Decision::RetryAfter(30_000 * (retries_so_far as u64 + 1))
            } else {
                Decision::Fail
            };
        host::log(
            Level::Info,
            &format!("job {} ({}): {:?}", job.id, job.kind, decision),
        );
        decision
    }
}

export!(GpuAwareRetry);
