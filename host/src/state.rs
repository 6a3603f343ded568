//! Job states (Hangfire's names) and the values that move between the parts of a server.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub type JobId = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Enqueued,
    Scheduled,
    /// A continuation waiting for its parent's final state.
    Awaiting,
    Processing,
    Succeeded,
    Failed,
    Deleted,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Enqueued,
        JobState::Scheduled,
        JobState::Awaiting,
        JobState::Processing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Enqueued => "enqueued",
            JobState::Scheduled => "scheduled",
            JobState::Awaiting => "awaiting",
            JobState::Processing => "processing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Deleted => "deleted",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == name)
    }

    /// States a job never leaves on its own.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Deleted
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a continuation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContinuationOption {
    /// Only after the parent succeeded; a parent that failed deletes the child.
    OnSuccess,
    /// After the parent succeeded or failed.
    OnAnyFinal,
}

impl ContinuationOption {
    pub fn as_str(self) -> &'static str {
        match self {
            ContinuationOption::OnSuccess => "on_success",
            ContinuationOption::OnAnyFinal => "on_any_final",
        }
    }
}

/// A job to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewJob {
    pub kind: String,
    pub args: serde_json::Value,
    pub queue: String,
    /// Execution timeout in milliseconds; None uses the server's default.
    pub timeout_ms: Option<i64>,
}

impl NewJob {
    pub fn new(kind: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            args: serde_json::Value::Object(Default::default()),
            queue: queue.into(),
            timeout_ms: None,
        }
    }

    pub fn with_args(mut self, args: serde_json::Value) -> Self {
        self.args = args;
        self
    }

    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
        self
    }
}

/// A job fetched by a producer: what the executor needs to run it, and the fence
/// (id, attempt, owner) every later write must match.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FetchedJob {
    pub id: JobId,
    pub kind: String,
    pub args: serde_json::Value,
    pub queue: String,
    pub attempt: i32,
    pub failures: i32,
    pub timeout_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// Why a job failed, as recorded in its Failed history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub exception_type: String,
    pub message: String,
    pub details: String,
}

impl JobError {
    pub fn new(exception_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            exception_type: exception_type.into(),
            message: message.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.exception_type, self.message)
    }
}

/// The (job, attempt, owner) a write on behalf of a running attempt must still match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub job_id: JobId,
    pub attempt: i32,
    pub owner: String,
}
