//! State election: from the candidate state an attempt produced to the state that is applied.
//!
//! This is the seam the WASM policies plug into (retry policy, then state filters). For now
//! the built-in policy decides: the seed's exponential retry.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::state::{JobError, JobState};

/// What the retry policy sees of a failed job.
#[derive(Debug, Clone)]
pub struct FailedJob<'a> {
    pub id: i64,
    pub kind: &'a str,
    pub queue: &'a str,
    pub attempt: i32,
    /// Failed attempts so far, including this one.
    pub failures: i32,
    pub error: &'a JobError,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    Fail,
    Delete,
}

/// Decides what happens to a failed job.
pub trait RetryPolicy: Send + Sync + 'static {
    /// A name for history entries and logs ("builtin:exponential").
    fn name(&self) -> String;
    fn decide(&self, job: &FailedJob<'_>) -> RetryDecision;
}

/// The seed's policy: up to `max_retries` retries, the n-th after 2^(n-1) units (1, 2, 4 min).
#[derive(Debug, Clone)]
pub struct ExponentialRetry {
    pub max_retries: u32,
    pub unit: Duration,
}

impl RetryPolicy for ExponentialRetry {
    fn name(&self) -> String {
        "builtin:exponential".into()
    }

    fn decide(&self, job: &FailedJob<'_>) -> RetryDecision {
        let retries_so_far = u32::try_from(job.failures.saturating_sub(1)).unwrap_or(0);
        if retries_so_far >= self.max_retries {
            return RetryDecision::Fail;
        }
        let factor = 2u32.saturating_pow(retries_so_far);
        RetryDecision::RetryAfter(self.unit.saturating_mul(factor))
    }
}

/// The state elected for an attempt, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Elected {
    pub state: JobState,
    pub reason: String,
    pub data: serde_json::Value,
    pub scheduled_at: Option<DateTime<Utc>>,
}

/// Elects the state after a failed attempt, as the built-in `policy` decides.
pub fn elect_after_failure(
    policy: &dyn RetryPolicy,
    job: &FailedJob<'_>,
    now: DateTime<Utc>,
) -> Elected {
    elected_from_decision(policy.decide(job), &policy.name(), job, now)
}

/// The state a retry decision leads to; `decided_by` names who decided, for the history.
pub fn elected_from_decision(
    decision: RetryDecision,
    decided_by: &str,
    job: &FailedJob<'_>,
    now: DateTime<Utc>,
) -> Elected {
    let error = job.error;
    let failure = serde_json::json!({
        "exception_type": error.exception_type,
        "message": error.message,
        "details": error.details,
        "decided_by": decided_by,
    });
    match decision {
        RetryDecision::RetryAfter(delay) => {
            let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            let mut data = failure;
            data["scheduled_at"] = serde_json::json!(at);
            data["delay_ms"] =
                serde_json::json!(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            data["retry"] = serde_json::json!(job.failures);
            Elected {
                state: JobState::Scheduled,
                reason: format!(
                    "retry {} of a failed attempt in {}",
                    job.failures,
                    humantime::format_duration(delay)
                ),
                data,
                scheduled_at: Some(at),
            }
        }
        RetryDecision::Fail => Elected {
            state: JobState::Failed,
            reason: error.message.clone(),
            data: failure,
            scheduled_at: None,
        },
        RetryDecision::Delete => Elected {
            state: JobState::Deleted,
            reason: format!("deleted after failure: {}", error.message),
            data: failure,
            scheduled_at: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(failures: i32) -> RetryDecision {
        let policy = ExponentialRetry {
            max_retries: 3,
            unit: Duration::from_secs(60),
        };
        let error = JobError::new("E", "boom");
        policy.decide(&FailedJob {
            id: 1,
            kind: "k",
            queue: "q",
            attempt: failures,
            failures,
            error: &error,
        })
    }

    #[test]
    fn seed_schedule_is_1_2_4_minutes_then_fail() {
        assert_eq!(
            decide(1),
            RetryDecision::RetryAfter(Duration::from_secs(60))
        );
        assert_eq!(
            decide(2),
            RetryDecision::RetryAfter(Duration::from_secs(120))
        );
        assert_eq!(
            decide(3),
            RetryDecision::RetryAfter(Duration::from_secs(240))
        );
        assert_eq!(decide(4), RetryDecision::Fail);
    }
}
