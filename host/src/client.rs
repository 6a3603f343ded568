//! The client: create jobs (now, later, after another), read and set their parameters, delete
//! them. Every call is one transaction. Each has an `_in` form taking a connection: give it
//! your transaction (`&mut tx`) and the call runs in a savepoint of it, committing with it.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};

use crate::state::{ContinuationOption, JobId, JobState, NewJob};
use crate::storage::jobs::{self, HistoryEntry, JobRow};
use crate::storage::{jobs_channel, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("job {0} does not exist")]
    NotFound(JobId),
    #[error("job {0} is processing; cancel it or wait for it to end before deleting it")]
    Processing(JobId),
    #[error("invalid job: {0}")]
    Invalid(String),
}

impl From<sqlx::Error> for ClientError {
    fn from(error: sqlx::Error) -> Self {
        ClientError::Storage(StorageError::Database(error))
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// What a job looks like to someone watching it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobDetails {
    #[serde(flatten)]
    pub job: JobRow,
    pub parameters: std::collections::BTreeMap<String, String>,
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone)]
pub struct Client {
    pool: PgPool,
    channel: String,
}

fn validate(job: &NewJob) -> Result<()> {
    if job.kind.trim().is_empty() {
        return Err(ClientError::Invalid("kind must not be empty".into()));
    }
    if job.queue.trim().is_empty() {
        return Err(ClientError::Invalid("queue must not be empty".into()));
    }
    if job.timeout_ms.is_some_and(|t| t <= 0) {
        return Err(ClientError::Invalid("timeout must be positive".into()));
    }
    Ok(())
}

impl Client {
    pub fn new(pool: PgPool, schema: &str) -> Self {
        Self {
            pool,
            channel: jobs_channel(schema),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enqueues a job; producers of its queue are woken when the transaction commits.
    pub async fn enqueue_in(&self, conn: &mut PgConnection, job: &NewJob) -> Result<JobId> {
        validate(job)?;
        let mut tx = conn.begin().await?;
        let id = jobs::insert(&mut tx, job, JobState::Enqueued, None, "created").await?;
        jobs::notify_queues(&mut tx, &self.channel, &[job.queue.as_str()]).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Enqueues many jobs in one statement (ids in input order).
    pub async fn enqueue_many_in(
        &self,
        conn: &mut PgConnection,
        new_jobs: &[NewJob],
    ) -> Result<Vec<JobId>> {
        new_jobs.iter().try_for_each(validate)?;
        let mut tx = conn.begin().await?;
        let ids = jobs::insert_enqueued_batch(&mut tx, new_jobs).await?;
        let mut queues: Vec<&str> = new_jobs.iter().map(|j| j.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        jobs::notify_queues(&mut tx, &self.channel, &queues).await?;
        tx.commit().await?;
        Ok(ids)
    }

    /// Schedules a job for `at`; the leader's scheduler enqueues it when due.
    pub async fn schedule_in(
        &self,
        conn: &mut PgConnection,
        job: &NewJob,
        at: DateTime<Utc>,
    ) -> Result<JobId> {
        validate(job)?;
        let mut tx = conn.begin().await?;
        let id = jobs::insert(&mut tx, job, JobState::Scheduled, Some(at), "scheduled").await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Schedules a job to run after `delay`.
    pub async fn schedule_after_in(
        &self,
        conn: &mut PgConnection,
        job: &NewJob,
        delay: std::time::Duration,
    ) -> Result<JobId> {
        let delay = chrono::Duration::from_std(delay)
            .map_err(|_| ClientError::Invalid("delay is too large".into()))?;
        self.schedule_in(conn, job, Utc::now() + delay).await
    }

    /// Creates `job` as a continuation of `parent`: it waits (Awaiting) until the parent
    /// reaches a final state, then runs if the state matches `option`, else is deleted.
    pub async fn continue_with_in(
        &self,
        conn: &mut PgConnection,
        parent: JobId,
        job: &NewJob,
        option: ContinuationOption,
    ) -> Result<JobId> {
        validate(job)?;
        let mut tx = conn.begin().await?;
        // Locking the parent serialises with its completion: either it ended before (and we
        // see its final state here) or it ends after our commit (and its completion sees the
        // continuation we insert).
        let parent_state = jobs::lock_state(&mut tx, parent)
            .await?
            .ok_or(ClientError::NotFound(parent))?;
        let id = jobs::insert(&mut tx, job, JobState::Awaiting, None, "awaiting parent").await?;
        jobs::insert_continuation(&mut tx, parent, id, option).await?;
        if parent_state.is_final() {
            let queues =
                resolve_continuations_transitively(&mut tx, vec![(parent, parent_state)]).await?;
            let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
            jobs::notify_queues(&mut tx, &self.channel, &queues).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    pub async fn set_parameter_in(
        &self,
        conn: &mut PgConnection,
        id: JobId,
        name: &str,
        value: &str,
    ) -> Result<()> {
        if !jobs::set_parameter(conn, id, name, value).await? {
            return Err(ClientError::NotFound(id));
        }
        Ok(())
    }

    pub async fn get_parameter_in(
        &self,
        conn: &mut PgConnection,
        id: JobId,
        name: &str,
    ) -> Result<Option<String>> {
        Ok(jobs::get_parameter(conn, id, name).await?)
    }

    /// Deletes a job that is not processing (it moves to Deleted, with history); its waiting
    /// continuations are deleted too. Deleting a deleted job is a no-op.
    pub async fn delete_in(&self, conn: &mut PgConnection, id: JobId) -> Result<()> {
        let mut tx = conn.begin().await?;
        match jobs::delete(&mut tx, id, "deleted by client").await? {
            None => return Err(ClientError::NotFound(id)),
            Some(JobState::Processing) => return Err(ClientError::Processing(id)),
            Some(_) => {}
        }
        resolve_continuations_transitively(&mut tx, vec![(id, JobState::Deleted)]).await?;
        tx.commit().await?;
        Ok(())
    }

    // Pool forms: each call in a transaction of its own.

    pub async fn enqueue(&self, job: &NewJob) -> Result<JobId> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_in(&mut conn, job).await
    }

    pub async fn enqueue_many(&self, new_jobs: &[NewJob]) -> Result<Vec<JobId>> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_many_in(&mut conn, new_jobs).await
    }

    pub async fn schedule(&self, job: &NewJob, at: DateTime<Utc>) -> Result<JobId> {
        let mut conn = self.pool.acquire().await?;
        self.schedule_in(&mut conn, job, at).await
    }

    pub async fn schedule_after(&self, job: &NewJob, delay: std::time::Duration) -> Result<JobId> {
        let mut conn = self.pool.acquire().await?;
        self.schedule_after_in(&mut conn, job, delay).await
    }

    pub async fn continue_with(
        &self,
        parent: JobId,
        job: &NewJob,
        option: ContinuationOption,
    ) -> Result<JobId> {
        let mut conn = self.pool.acquire().await?;
        self.continue_with_in(&mut conn, parent, job, option).await
    }

    pub async fn set_parameter(&self, id: JobId, name: &str, value: &str) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        self.set_parameter_in(&mut conn, id, name, value).await
    }

    pub async fn get_parameter(&self, id: JobId, name: &str) -> Result<Option<String>> {
        let mut conn = self.pool.acquire().await?;
        self.get_parameter_in(&mut conn, id, name).await
    }

    pub async fn delete(&self, id: JobId) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        self.delete_in(&mut conn, id).await
    }

    pub async fn details(&self, id: JobId) -> Result<Option<JobDetails>> {
        let mut conn = self.pool.acquire().await?;
        let Some(job) = jobs::get(&mut conn, id).await? else {
            return Ok(None);
        };
        let parameters = jobs::parameters(&mut conn, id).await?.into_iter().collect();
        let history = jobs::history(&mut conn, id).await?;
        Ok(Some(JobDetails {
            job,
            parameters,
            history,
        }))
    }
}

/// Resolves the continuations of `parents`, and of every child deleted on the way (a deleted
/// child's own children are deleted too). Returns the queues of the children enqueued.
pub async fn resolve_continuations_transitively(
    conn: &mut sqlx::PgConnection,
    mut parents: Vec<(JobId, JobState)>,
) -> std::result::Result<Vec<String>, StorageError> {
    let mut enqueued = Vec::new();
    while !parents.is_empty() {
        let resolved = jobs::resolve_continuations(conn, &parents).await?;
        parents.clear();
        for child in resolved {
            if child.state == JobState::Deleted.as_str() {
                parents.push((child.id, JobState::Deleted));
            } else {
                enqueued.push(child.queue);
            }
        }
    }
    Ok(enqueued)
}
