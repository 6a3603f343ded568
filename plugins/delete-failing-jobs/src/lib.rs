//! `delete-failing-jobs`: an operator's state filter.
//!
//! A job that keeps failing is deleted instead of being kept as `failed`: when the candidate
//! state is `failed` (the retry policy gave up) and the job has failed at least
//! `filter.max-failures` times (default 3), the filter answers `deleted`, with a reason that
//! says why. Failed jobs pile up in the Failed list for operators to look at; for kinds whose
//! failures nobody acts on, this keeps the list to what matters.
//!
//! - `filter.max-failures` is a job parameter (so a client can opt a job in or out when it
//!   creates it); `0` turns the filter off for that job; a value that does not parse is
//!   logged (warn) and the default used.
//! - Any other candidate passes unchanged.
//! - `applied` logs the state at debug (hangar tags the line with the plugin and the job).

wit_bindgen::generate!({
    world: "state-filter-plugin",
    path: "../../wit",
});

use exports::hangar::policy::state_filter::Guest;
use hangar::policy::host::{self, Level};
use hangar::policy::types::{Job, State, StateName};

/// Failures from which a failed job is deleted, when `filter.max-failures` is absent.
const DEFAULT_MAX_FAILURES: u32 = 3;

struct DeleteFailingJobs;

impl Guest for DeleteFailingJobs {
    fn elect(job: Job, candidate: State) -> State {
        let max_failures = max_failures(host::get_parameter("filter.max-failures"));
        elect(&job, candidate, max_failures)
    }

    fn applied(job: Job, applied_state: State) {
        host::log(
            Level::Debug,
            &format!(
                "job {} ({}, queue {}) is now {:?}: {}",
                job.id, job.kind, job.queue, applied_state.name, applied_state.reason
            ),
        );
    }
}

/// The filter itself: `candidate`, or `deleted` for a failed job that failed `max_failures`
/// times or more (0: never).
fn elect(job: &Job, candidate: State, max_failures: u32) -> State {
    let failures = u32::try_from(job.failures).unwrap_or(0);
    if candidate.name == StateName::Failed && max_failures > 0 && failures >= max_failures {
        return State {
            name: StateName::Deleted,
            reason: format!(
                "deleted by delete-failing-jobs: {} failed {failures} times ({})",
                job.kind, candidate.reason
            ),
            delay_ms: None,
        };
    }
    candidate
}

/// The value of `filter.max-failures`, or the default when it is absent or does not parse.
fn max_failures(raw: Option<String>) -> u32 {
    let Some(raw) = raw else {
        return DEFAULT_MAX_FAILURES;
    };
    raw.trim().parse().unwrap_or_else(|_| {
        host::log(
            Level::Warn,
            &format!("ignoring filter.max-failures={raw:?}: not a non-negative integer"),
        );
        DEFAULT_MAX_FAILURES
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(failures: i32) -> Job {
        Job {
            id: 7,
            kind: "detection-run".into(),
            queue: "detection".into(),
            attempt: failures,
            failures,
            parameters: Vec::new(),
        }
    }

    fn state(name: StateName) -> State {
        State {
            name,
            reason: "exit status 1".into(),
            delay_ms: None,
        }
    }

    #[test]
    fn a_job_failed_often_enough_is_deleted_with_a_reason() {
        let elected = elect(&job(3), state(StateName::Failed), 3);
        assert_eq!(elected.name, StateName::Deleted);
        assert!(
            elected.reason.contains("failed 3 times"),
            "{}",
            elected.reason
        );
        assert!(
            elected.reason.contains("exit status 1"),
            "{}",
            elected.reason
        );
    }

    #[test]
    fn everything_else_passes_unchanged() {
        assert_eq!(
            elect(&job(2), state(StateName::Failed), 3).name,
            StateName::Failed
        );
        assert_eq!(
            elect(&job(9), state(StateName::Failed), 0).name,
            StateName::Failed
        );
        for name in [
            StateName::Succeeded,
            StateName::Scheduled,
            StateName::Enqueued,
        ] {
            assert_eq!(elect(&job(9), state(name), 3).name, name);
        }
    }
}

export!(DeleteFailingJobs);
