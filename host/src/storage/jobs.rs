//! Statements over `jobs`, `job_states`, `job_parameters` and `continuations`.
//!
//! Every write that ends a processing attempt is fenced on (id, attempt, owner): a job that was
//! rescued or released cannot be finished by an owner that no longer holds it.
//!
//! Statements that take many held jobs at once (the completer's, the rescuer's, the lease
//! renewal) find them by primary key (`j.id = ANY($ids)`), match the rest of the fence as join
//! conditions, and run with nested loops off ([`forbid_nested_loops`]). Statistics taken
//! while few jobs run put "processing" (and a set lease) at about one row; the generic plan of
//! a prepared statement then rescans the whole input array for every job it finds, measured at
//! 3.2 s to end 2000 attempts, against 15 ms by hash join. "Processing" is said as
//! `lease_owner = …`: an owner is set exactly while a job is processing
//! (`jobs_owner_only_while_processing`, `jobs_processing_has_owner`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::StorageError;
use crate::state::{ContinuationOption, FetchedJob, JobId, JobState, NewJob};

type Result<T> = std::result::Result<T, StorageError>;

/// Inserts one job in `state` with its first history entry.
pub async fn insert(
    conn: &mut PgConnection,
    job: &NewJob,
    state: JobState,
    scheduled_at: Option<DateTime<Utc>>,
    reason: &str,
) -> Result<JobId> {
    let id = sqlx::query_scalar(
        "WITH inserted AS (
             INSERT INTO jobs (kind, args, queue, state, timeout_ms, scheduled_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id, state, scheduled_at
         ), history AS (
             INSERT INTO job_states (job_id, state, attempt, reason, data)
             SELECT id, state, 0, $7,
                    CASE WHEN scheduled_at IS NULL THEN '{}'::jsonb
                         ELSE jsonb_build_object('scheduled_at', scheduled_at) END
             FROM inserted
         )
         SELECT id FROM inserted",
    )
    .bind(&job.kind)
    .bind(&job.args)
    .bind(&job.queue)
    .bind(state.as_str())
    .bind(job.timeout_ms)
    .bind(scheduled_at)
    .bind(reason)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

/// Inserts many enqueued jobs in one statement (ids in input order).
pub async fn insert_enqueued_batch(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<JobId>> {
    let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    let args: Vec<&serde_json::Value> = jobs.iter().map(|j| &j.args).collect();
    let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    let timeouts: Vec<Option<i64>> = jobs.iter().map(|j| j.timeout_ms).collect();
    let ids = sqlx::query_scalar(
        "WITH inserted AS (
             INSERT INTO jobs (kind, args, queue, state, timeout_ms)
             SELECT kind, args, queue, 'enqueued', timeout_ms
             FROM unnest($1::text[], $2::jsonb[], $3::text[], $4::bigint[])
                  WITH ORDINALITY AS input(kind, args, queue, timeout_ms, ordinal)
             ORDER BY ordinal
             RETURNING id
         ), history AS (
             INSERT INTO job_states (job_id, state, attempt, reason)
             SELECT id, 'enqueued', 0, 'created' FROM inserted
         )
         SELECT id FROM inserted ORDER BY id",
    )
    .bind(&kinds)
    .bind(&args)
    .bind(&queues)
    .bind(&timeouts)
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Wakes the producers of `queues` when the surrounding transaction commits. The payload is
/// the queue name only; producers re-read the table.
pub async fn notify_queues(conn: &mut PgConnection, channel: &str, queues: &[&str]) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, queue) FROM (SELECT DISTINCT unnest($2::text[]) AS queue) q")
        .bind(channel)
        .bind(queues)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets a parameter; false when the job does not exist.
pub async fn set_parameter(
    conn: &mut PgConnection,
    id: JobId,
    name: &str,
    value: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO job_parameters (job_id, name, value)
         SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1)
         ON CONFLICT (job_id, name) DO UPDATE SET value = excluded.value",
    )
    .bind(id)
    .bind(name)
    .bind(value)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn get_parameter(
    conn: &mut PgConnection,
    id: JobId,
    name: &str,
) -> Result<Option<String>> {
    let value =
        sqlx::query_scalar("SELECT value FROM job_parameters WHERE job_id = $1 AND name = $2")
            .bind(id)
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(value)
}

pub async fn parameters(conn: &mut PgConnection, id: JobId) -> Result<Vec<(String, String)>> {
    let rows =
        sqlx::query_as("SELECT name, value FROM job_parameters WHERE job_id = $1 ORDER BY name")
            .bind(id)
            .fetch_all(conn)
            .await?;
    Ok(rows)
}

/// The job's state, locked until the transaction ends (serialises with its completion).
pub async fn lock_state(conn: &mut PgConnection, id: JobId) -> Result<Option<JobState>> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(state.as_deref().and_then(JobState::parse))
}

pub async fn insert_continuation(
    conn: &mut PgConnection,
    parent: JobId,
    child: JobId,
    option: ContinuationOption,
) -> Result<()> {
    sqlx::query("INSERT INTO continuations (child_id, parent_id, option) VALUES ($1, $2, $3)")
        .bind(child)
        .bind(parent)
        .bind(option.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// Moves a job that is not processing to Deleted. Returns the state it was in (None: no such
/// job); a processing or already deleted job is left as it is.
pub async fn delete(conn: &mut PgConnection, id: JobId, reason: &str) -> Result<Option<JobState>> {
    let Some(state) = lock_state(conn, id).await? else {
        return Ok(None);
    };
    if state != JobState::Processing && state != JobState::Deleted {
        sqlx::query(
            "WITH deleted AS (
                 UPDATE jobs SET state = 'deleted', scheduled_at = NULL, updated_at = now(),
                                 finished_at = now()
                 WHERE id = $1 RETURNING id, attempt
             )
             INSERT INTO job_states (job_id, state, attempt, reason)
             SELECT id, 'deleted', attempt, $2 FROM deleted",
        )
        .bind(id)
        .bind(reason)
        .execute(conn)
        .await?;
    }
    Ok(Some(state))
}

/// Takes up to `limit` enqueued jobs for `owner`, queue by queue in priority order, at most
/// `quotas[i]` from `queues[i]`, and starts their next attempt under a lease.
/// `FOR UPDATE SKIP LOCKED` lets any number of producers fetch at once without waiting.
pub async fn fetch(
    pool: &PgPool,
    owner: &str,
    queues: &[String],
    quotas: &[i32],
    limit: i32,
    lease_ms: i64,
) -> Result<Vec<FetchedJob>> {
    let jobs = sqlx::query_as(
        "WITH picked AS (
             SELECT candidate.id
             FROM unnest($2::text[], $3::int[]) WITH ORDINALITY AS q(name, quota, ordinal)
             CROSS JOIN LATERAL (
                 -- The partial index jobs_ready, in the order jobs became ready.
                 SELECT id, updated_at FROM jobs
                 WHERE state = 'enqueued' AND queue = q.name
                 ORDER BY updated_at, id
                 LIMIT q.quota
                 FOR UPDATE SKIP LOCKED
             ) candidate
             ORDER BY q.ordinal, candidate.updated_at, candidate.id
             LIMIT $4
         ), started AS (
             -- `= ANY(ARRAY(...))` is looked up by primary key; a join with the CTE may be
             -- planned as a hash of the whole table.
             UPDATE jobs SET state = 'processing', attempt = jobs.attempt + 1, lease_owner = $1,
                             lease_expires_at = now() + $5 * interval '1 millisecond',
                             scheduled_at = NULL, updated_at = now()
             WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
             RETURNING jobs.id, jobs.kind, jobs.args, jobs.queue, jobs.attempt, jobs.failures,
                       jobs.timeout_ms, jobs.created_at
         ), history AS (
             INSERT INTO job_states (job_id, state, attempt, reason, data)
             SELECT id, 'processing', attempt, 'fetched', $6::jsonb FROM started
         )
         SELECT * FROM started ORDER BY id",
    )
    .bind(owner)
    .bind(queues)
    .bind(quotas)
    .bind(limit)
    .bind(lease_ms)
    // The history entry's data, built once per fetch rather than once per row.
    .bind(serde_json::json!({ "server": owner }))
    .fetch_all(pool)
    .await?;
    Ok(jobs)
}

/// The state a processing attempt ends in, as the completer or the rescuer decided it.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub id: JobId,
    pub attempt: i32,
    /// The owner that must still hold the job for the write to apply.
    pub owner: String,
    pub state: JobState,
    pub reason: String,
    pub data: serde_json::Value,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Whether this attempt counts as a failure (for the retry policy).
    pub failed: bool,
}

/// A row that [`end_attempts`] applied.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndedAttempt {
    pub id: JobId,
    pub kind: String,
    pub state: String,
    pub queue: String,
}

/// Ends attempts in one statement. Rows whose fence no longer matches (rescued, released or
/// already ended) are skipped; with `only_expired`, only jobs whose lease has run out are
/// touched (the rescuer's fence).
pub async fn end_attempts(
    conn: &mut PgConnection,
    ends: &[AttemptEnd],
    only_expired: bool,
) -> Result<Vec<EndedAttempt>> {
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    // In id order: the rows are then updated (and locked) near each other in the heap when
    // the plan walks the array, which is most of the bench's gain from this statement.
    let mut ends: Vec<&AttemptEnd> = ends.iter().collect();
    ends.sort_by_key(|e| e.id);
    let ids: Vec<JobId> = ends.iter().map(|e| e.id).collect();
    let attempts: Vec<i32> = ends.iter().map(|e| e.attempt).collect();
    let owners: Vec<&str> = ends.iter().map(|e| e.owner.as_str()).collect();
    let states: Vec<&str> = ends.iter().map(|e| e.state.as_str()).collect();
    let reasons: Vec<&str> = ends.iter().map(|e| e.reason.as_str()).collect();
    let data: Vec<&serde_json::Value> = ends.iter().map(|e| &e.data).collect();
    let scheduled: Vec<Option<DateTime<Utc>>> = ends.iter().map(|e| e.scheduled_at).collect();
    let failures: Vec<i32> = ends.iter().map(|e| i32::from(e.failed)).collect();
    let statement = if only_expired {
        END_EXPIRED_ATTEMPTS
    } else {
        END_OWN_ATTEMPTS
    };
    forbid_nested_loops(&mut *conn).await?;
    let ended = sqlx::query_as(statement)
        .bind(&ids)
        .bind(&attempts)
        .bind(&owners)
        .bind(&states)
        .bind(&reasons)
        .bind(&data)
        .bind(&scheduled)
        .bind(&failures)
        .fetch_all(&mut *conn)
        .await?;
    allow_nested_loops(conn).await?;
    Ok(ended)
}

/// Turns nested-loop joins off for the statements that take many held jobs at once (see the
/// module documentation), until [`allow_nested_loops`] in the same transaction.
async fn forbid_nested_loops(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(NESTED_LOOPS_OFF).execute(conn).await?;
    Ok(())
}

/// Restores the planner's choice for the rest of the caller's transaction.
async fn allow_nested_loops(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("RESET enable_nestloop").execute(conn).await?;
    Ok(())
}

#[doc(hidden)]
pub const NESTED_LOOPS_OFF: &str = "SET LOCAL enable_nestloop = off";

/// The statements over many held jobs, named, with their parameter types: the plan test
/// (`tests/ownership.rs`) prepares each and checks its generic plan.
#[doc(hidden)]
pub const HELD_JOB_STATEMENTS: [(&str, &str, &str); 4] = [
    ("end_own_attempts", END_OWN_ATTEMPTS, ATTEMPT_END_TYPES),
    (
        "end_expired_attempts",
        END_EXPIRED_ATTEMPTS,
        ATTEMPT_END_TYPES,
    ),
    (
        "renew_leases_skipping_locked",
        RENEW_LEASES_SKIPPING_LOCKED,
        RENEWAL_TYPES,
    ),
    ("renew_leases_waiting", RENEW_LEASES_WAITING, RENEWAL_TYPES),
];
const ATTEMPT_END_TYPES: &str =
    "bigint[], int[], text[], text[], text[], jsonb[], timestamptz[], int[]";
const RENEWAL_TYPES: &str = "text, bigint, bigint[], int[]";

/// The owner's completer ends the attempts it ran: one pass over the rows, each updated where
/// its fence still holds (under READ COMMITTED a row changed meanwhile is re-checked against
/// the fence, so a rescued attempt is skipped). It may wait for a row's lock. Lease renewals
/// and rescues never make it wait in a cycle: they skip locked rows, or wait for one row while
/// holding no other. A caller's own transaction that locks several processing jobs (a
/// continuation on two running parents, say) can deadlock with it; PostgreSQL then aborts one
/// side, and the completer tries again.
const END_OWN_ATTEMPTS: &str = end_attempts_sql!("", attempt_ends!());

/// The rescuer ends attempts whose lease ran out. It skips rows another transaction holds
/// (their owner's completer is ending them, or another rescuer): those are either ended
/// meanwhile or still expired at the next round.
const END_EXPIRED_ATTEMPTS: &str = end_attempts_sql!(
    concat!(
        "decided AS (SELECT * FROM ",
        attempt_ends!(),
        "), locked AS (
            SELECT j.id FROM jobs j JOIN decided d ON j.id = d.id
            WHERE j.id = ANY($1) AND j.attempt = d.attempt AND j.lease_owner = d.owner
              AND j.lease_expires_at < now()
            FOR NO KEY UPDATE OF j SKIP LOCKED
        ), "
    ),
    "decided d JOIN locked l ON l.id = d.id"
);

/// The attempt ends `end_attempts` binds, as the rows `d`.
macro_rules! attempt_ends {
    () => {
        "unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                $7::timestamptz[], $8::int[])
            AS d(id, attempt, owner, state, reason, data, scheduled_at, failures)"
    };
}
use attempt_ends;

/// Ends the attempts in `d` (drawn `FROM $from`, after the CTEs `$before`) whose fence still
/// holds, and records each applied state in the history. The fence is checked in the
/// update itself, on the row version it writes.
macro_rules! end_attempts_sql {
    ($before:expr, $from:expr) => {
        concat!(
            "WITH ",
            $before,
            "applied AS (
                UPDATE jobs j
                SET state = d.state, lease_owner = NULL, lease_expires_at = NULL,
                    scheduled_at = d.scheduled_at, failures = j.failures + d.failures,
                    updated_at = now(),
                    finished_at = CASE WHEN d.state IN ('succeeded', 'failed', 'deleted')
                                       THEN now() END
                FROM ",
            $from,
            "
                WHERE j.id = ANY($1) AND j.id = d.id AND j.attempt = d.attempt
                  AND j.lease_owner = d.owner
                RETURNING j.id, j.kind, j.attempt, j.state, j.queue, d.reason, d.data
            ), history AS (
                INSERT INTO job_states (job_id, state, attempt, reason, data)
                SELECT id, state, attempt, reason, data FROM applied
            )
            SELECT id, kind, state, queue FROM applied"
        )
    };
}
use end_attempts_sql;

/// A continuation moved out of Awaiting.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResolvedChild {
    pub id: JobId,
    pub state: String,
    pub queue: String,
}

/// Moves the awaiting children of `parents`, which reached the given final states: to
/// Enqueued when the parent's state matches the option, else to Deleted. Run in its own
/// statement after the parents' update so it sees continuations committed while the parents
/// were locked. The states come from the caller, who just wrote them: the parents (a whole
/// batch of completions) are not read again, only the continuations table is.
pub async fn resolve_continuations(
    conn: &mut PgConnection,
    parents: &[(JobId, JobState)],
) -> Result<Vec<ResolvedChild>> {
    let ids: Vec<JobId> = parents.iter().map(|(id, _)| *id).collect();
    let states: Vec<&str> = parents.iter().map(|(_, state)| state.as_str()).collect();
    let children = sqlx::query_as(
        "WITH parents AS (
             SELECT * FROM unnest($1::bigint[], $2::text[]) AS p(id, state)
             WHERE p.state IN ('succeeded', 'failed', 'deleted')
         ), resolved AS (
             UPDATE jobs c
             SET state = CASE WHEN p.state = 'succeeded'
                                   OR (p.state = 'failed' AND k.option = 'on_any_final')
                              THEN 'enqueued' ELSE 'deleted' END,
                 updated_at = now(),
                 finished_at = CASE WHEN p.state = 'succeeded'
                                         OR (p.state = 'failed' AND k.option = 'on_any_final')
                                    THEN NULL ELSE now() END
             FROM continuations k JOIN parents p ON p.id = k.parent_id
             WHERE c.id = k.child_id AND c.state = 'awaiting'
             RETURNING c.id, c.state, c.queue, p.id AS parent_id, p.state AS parent_state
         ), history AS (
             INSERT INTO job_states (job_id, state, attempt, reason, data)
             SELECT id, state, 0, 'parent ' || parent_state, jsonb_build_object('parent', parent_id)
             FROM resolved
         )
         SELECT id, state, queue FROM resolved",
    )
    .bind(&ids)
    .bind(&states)
    .fetch_all(conn)
    .await?;
    Ok(children)
}

/// What a lease renewal found for the attempts a server holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseRenewal {
    /// Renewed: their leases now run from the renewal.
    pub renewed: Vec<(JobId, i32)>,
    /// No longer held by the server (rescued, released or ended behind its back).
    pub lost: Vec<(JobId, i32)>,
    // The rest are still held but were locked by another writer (the completer ending them,
    // say): not renewed this time, and not lost.
}

impl LeaseRenewal {
    /// Adds what a later renewal of other attempts found.
    pub fn absorb(&mut self, other: LeaseRenewal) {
        self.renewed.extend(other.renewed);
        self.lost.extend(other.lost);
    }
}

/// Renews the leases of the given attempts, as long as `owner` still holds them.
///
/// With `wait_for_locks` false, a row another transaction has locked is skipped, not waited
/// for: the renewal then never waits on the completer (which locks the rows it ends in the
/// order its plan visits them), so the two cannot deadlock, and one slow writer cannot hold
/// up every lease. The heartbeat retries each skipped row alone, in a transaction that waits
/// for that row only, under a short `lock_timeout`.
pub async fn renew_leases(
    conn: &mut PgConnection,
    owner: &str,
    held: &[(JobId, i32)],
    lease_ms: i64,
    wait_for_locks: bool,
) -> Result<LeaseRenewal> {
    let ids: Vec<JobId> = held.iter().map(|(id, _)| *id).collect();
    let attempts: Vec<i32> = held.iter().map(|(_, attempt)| *attempt).collect();
    let statement = if wait_for_locks {
        RENEW_LEASES_WAITING
    } else {
        RENEW_LEASES_SKIPPING_LOCKED
    };
    forbid_nested_loops(&mut *conn).await?;
    let rows: Vec<(JobId, i32, bool)> = sqlx::query_as(statement)
        .bind(owner)
        .bind(lease_ms)
        .bind(&ids)
        .bind(&attempts)
        .fetch_all(&mut *conn)
        .await?;
    allow_nested_loops(conn).await?;
    let mut renewal = LeaseRenewal::default();
    for (id, attempt, renewed) in rows {
        if renewed {
            renewal.renewed.push((id, attempt));
        } else {
            renewal.lost.push((id, attempt));
        }
    }
    Ok(renewal)
}

/// The renewal, with its way of locking (`$lock`) left open. It returns the renewed attempts
/// (`renewed`) and those the server no longer holds (`NOT renewed`: not in processing under
/// that owner and attempt as of the statement's snapshot); rows locked and skipped are in
/// neither.
macro_rules! renew_leases_sql {
    ($lock:literal) => {
        concat!(
            "WITH held AS (
                 SELECT * FROM unnest($3::bigint[], $4::int[]) AS h(id, attempt)
             ), locked AS (
                 SELECT j.id FROM jobs j JOIN held h ON j.id = h.id AND j.attempt = h.attempt
                 WHERE j.id = ANY($3) AND j.lease_owner = $1 ",
            $lock,
            "
             ), renewed AS (
                 UPDATE jobs SET lease_expires_at = now() + $2 * interval '1 millisecond'
                 FROM locked
                 WHERE jobs.id = ANY($3) AND jobs.id = locked.id
                 RETURNING jobs.id, jobs.attempt
             )
             SELECT h.id, h.attempt, r.id IS NOT NULL AS renewed
             FROM held h LEFT JOIN renewed r ON r.id = h.id AND r.attempt = h.attempt
             WHERE r.id IS NOT NULL
                OR NOT EXISTS (SELECT 1 FROM jobs j
                               WHERE j.id = ANY($3) AND j.id = h.id AND j.attempt = h.attempt
                                 AND j.lease_owner = $1)"
        )
    };
}

const RENEW_LEASES_SKIPPING_LOCKED: &str = renew_leases_sql!("FOR NO KEY UPDATE OF j SKIP LOCKED");
const RENEW_LEASES_WAITING: &str = renew_leases_sql!("ORDER BY j.id FOR NO KEY UPDATE OF j");

/// Moves due scheduled jobs to their queue; returns their queues.
pub async fn enqueue_due(conn: &mut PgConnection, limit: i64) -> Result<Vec<String>> {
    let queues = sqlx::query_scalar(
        "WITH due AS (
             SELECT id FROM jobs
             WHERE state = 'scheduled' AND scheduled_at <= now()
             ORDER BY scheduled_at LIMIT $1
             FOR UPDATE SKIP LOCKED
         ), enqueued AS (
             UPDATE jobs SET state = 'enqueued', scheduled_at = NULL, updated_at = now()
             FROM due WHERE jobs.id = due.id
             RETURNING jobs.id, jobs.attempt, jobs.queue
         ), history AS (
             INSERT INTO job_states (job_id, state, attempt, reason)
             SELECT id, 'enqueued', attempt, 'scheduled time reached' FROM enqueued
         )
         SELECT queue FROM enqueued",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(queues)
}

/// A processing job whose owner's lease ran out.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiredJob {
    pub id: JobId,
    pub kind: String,
    pub queue: String,
    pub attempt: i32,
    pub failures: i32,
    pub lease_owner: String,
}

/// Up to `limit` processing jobs whose lease has run out. Not locked: the rescue write is
/// itself fenced on the expired lease, so a job is rescued once however many look.
pub async fn expired_leases(pool: &PgPool, limit: i64) -> Result<Vec<ExpiredJob>> {
    let jobs = sqlx::query_as(
        "SELECT id, kind, queue, attempt, failures, lease_owner FROM jobs
         WHERE state = 'processing' AND lease_expires_at < now()
         ORDER BY lease_expires_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(jobs)
}

/// What one step of the expirer's walk over the oldest jobs found.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct ExpiryStep {
    /// The highest id it looked at; the next step starts after it. None: no jobs left.
    pub last_id: Option<JobId>,
    pub deleted: i64,
    /// It reached jobs created within the retention: none after them can be expired yet.
    pub reached_recent: bool,
}

/// Deletes the jobs past the retention among the `chunk` oldest with an id above `after`
/// (finished more than `retention_ms` ago, and not the parent of a waiting continuation),
/// with their history.
///
/// The walk follows the primary key instead of an index on `finished_at`: such an index costs
/// an insertion on every completion (the queue benchmark measured several percent of a job's
/// cost), while ids follow creation, so the walk can stop at the first job created within
/// the retention. Each run reads the jobs created before the cutoff that are still there:
/// those it deletes, and the few old ones that have not finished (or only just did).
pub async fn expire_finished(
    pool: &PgPool,
    after: JobId,
    retention_ms: i64,
    chunk: i64,
) -> Result<ExpiryStep> {
    let step = sqlx::query_as(
        "WITH chunk AS (
             SELECT id, created_at FROM jobs WHERE id > $1 ORDER BY id LIMIT $3
         ), expired AS (
             -- The chunk's id range (the same rows, under the same snapshot): one range scan of
             -- the primary key. The conditions on `j` are checked again on a row changed
             -- meanwhile, as it is then.
             DELETE FROM jobs j
             WHERE j.id > $1 AND j.id <= (SELECT max(id) FROM chunk)
               AND j.finished_at < now() - $2 * interval '1 millisecond'
               AND NOT EXISTS (SELECT 1 FROM continuations k JOIN jobs c ON c.id = k.child_id
                               WHERE k.parent_id = j.id AND c.state = 'awaiting')
             RETURNING j.id
         ), history AS (
             DELETE FROM job_states WHERE job_id IN (SELECT id FROM expired)
         )
         SELECT (SELECT max(id) FROM chunk) AS last_id,
                (SELECT count(*) FROM expired) AS deleted,
                coalesce((SELECT bool_or(created_at >= now() - $2 * interval '1 millisecond')
                          FROM chunk), true) AS reached_recent",
    )
    .bind(after)
    .bind(retention_ms)
    .bind(chunk)
    .fetch_one(pool)
    .await?;
    Ok(step)
}

/// A job as the API and tests see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: JobId,
    pub kind: String,
    pub args: serde_json::Value,
    pub queue: String,
    pub state: String,
    pub attempt: i32,
    pub failures: i32,
    pub timeout_ms: Option<i64>,
    pub scheduled_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub state: String,
    pub attempt: i32,
    pub reason: Option<String>,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

pub async fn get(conn: &mut PgConnection, id: JobId) -> Result<Option<JobRow>> {
    let row = sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(row)
}

pub async fn history(conn: &mut PgConnection, id: JobId) -> Result<Vec<HistoryEntry>> {
    let rows = sqlx::query_as(
        "SELECT state, attempt, reason, data, created_at FROM job_states WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// Vacuums the job tables now, as autovacuum would in a while (the benchmark, between its
/// phases).
pub async fn vacuum(pool: &PgPool) -> Result<()> {
    sqlx::query("VACUUM (ANALYZE) jobs, job_states")
        .execute(pool)
        .await?;
    Ok(())
}

/// Job counts per state (for operators and the benchmark).
pub async fn count_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
        .fetch_all(pool)
        .await?;
    Ok(rows)
}

/// Locks the job against state changes for the transaction if `fence` still holds it.
pub async fn lock_if_held(conn: &mut PgConnection, fence: &crate::state::Fence) -> Result<bool> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE id = $1 AND attempt = $2 AND lease_owner = $3 FOR SHARE",
    )
    .bind(fence.job_id)
    .bind(fence.attempt)
    .bind(&fence.owner)
    .fetch_optional(conn)
    .await?;
    Ok(held.is_some())
}

/// Jobs not yet ended (enqueued or processing); served by the partial indexes.
pub async fn count_unfinished(pool: &PgPool) -> Result<i64> {
    let count = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM jobs WHERE state = 'enqueued')
              + (SELECT count(*) FROM jobs WHERE state = 'processing')",
    )
    .fetch_one(pool)
    .await?;
    Ok(count)
}

/// The parameters of many jobs at once: (job, name, value).
pub async fn parameters_of(pool: &PgPool, ids: &[JobId]) -> Result<Vec<(JobId, String, String)>> {
    let rows =
        sqlx::query_as("SELECT job_id, name, value FROM job_parameters WHERE job_id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?;
    Ok(rows)
}
