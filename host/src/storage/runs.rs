//! Statements over `models`, `training_runs`, `detection_runs` and `detections`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::StorageError;
use crate::state::JobId;

type Result<T> = std::result::Result<T, StorageError>;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: Uuid,
    pub name: String,
    pub config_path: String,
    pub checkpoint_path: String,
    pub classes: serde_json::Value,
    pub training_run_id: Option<Uuid>,
    pub published: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DetectionRunRow {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub status: String,
    pub image_path: String,
    pub model_id: Uuid,
    pub score_threshold: f32,
    pub device: Option<String>,
    pub job_id: Option<JobId>,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TrainingRunRow {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub status: String,
    pub dataset_path: String,
    pub base_config: String,
    pub base_checkpoint: Option<String>,
    pub epochs: i32,
    pub batch_size: i32,
    pub frozen_stages: i32,
    pub device: Option<String>,
    pub job_id: Option<JobId>,
    pub trained_model_id: Option<Uuid>,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Detection {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub label: i32,
    pub class_name: Option<String>,
}

pub struct NewModel<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub config_path: &'a str,
    pub checkpoint_path: &'a str,
    pub classes: &'a serde_json::Value,
    pub training_run_id: Option<Uuid>,
}

pub async fn insert_model(conn: &mut PgConnection, model: &NewModel<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO models (id, name, config_path, checkpoint_path, classes, training_run_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(model.id)
    .bind(model.name)
    .bind(model.config_path)
    .bind(model.checkpoint_path)
    .bind(model.classes)
    .bind(model.training_run_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_model(pool: &PgPool, id: Uuid) -> Result<Option<ModelRow>> {
    Ok(sqlx::query_as("SELECT * FROM models WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

pub async fn list_models(pool: &PgPool) -> Result<Vec<ModelRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM models ORDER BY created_at DESC")
            .fetch_all(pool)
            .await?,
    )
}

pub struct NewDetectionRun<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub image_path: &'a str,
    pub model_id: Uuid,
    pub score_threshold: f32,
    pub device: Option<&'a str>,
    pub job_id: JobId,
}

pub async fn insert_detection_run(
    conn: &mut PgConnection,
    run: &NewDetectionRun<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO detection_runs
             (id, name, description, status, image_path, model_id, score_threshold, device, job_id)
         VALUES ($1, $2, $3, 'Waiting', $4, $5, $6, $7, $8)",
    )
    .bind(run.id)
    .bind(run.name)
    .bind(run.description)
    .bind(run.image_path)
    .bind(run.model_id)
    .bind(run.score_threshold)
    .bind(run.device)
    .bind(run.job_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_detection_run(pool: &PgPool, id: Uuid) -> Result<Option<DetectionRunRow>> {
    Ok(sqlx::query_as("SELECT * FROM detection_runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

pub async fn list_detection_runs(
    pool: &PgPool,
    limit: i64,
    offset: i64,
) -> Result<Vec<DetectionRunRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM detection_runs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2",
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?)
}

pub async fn detections(pool: &PgPool, run_id: Uuid) -> Result<Vec<Detection>> {
    Ok(sqlx::query_as(
        "SELECT x1, y1, x2, y2, score, label, class_name FROM detections
         WHERE run_id = $1 ORDER BY ordinal",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?)
}

/// Marks the run Processing on the device it got (caller holds the job's fence).
pub async fn start_detection_run(conn: &mut PgConnection, id: Uuid, device: &str) -> Result<()> {
    sqlx::query(
        "UPDATE detection_runs SET status = 'Processing', device = $2, started_at = now(),
                                   error_message = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(device)
    .execute(conn)
    .await?;
    Ok(())
}

/// Replaces the run's detections (caller holds the job's fence).
pub async fn replace_detections(
    conn: &mut PgConnection,
    run_id: Uuid,
    found: &[Detection],
) -> Result<()> {
    sqlx::query("DELETE FROM detections WHERE run_id = $1")
        .bind(run_id)
        .execute(&mut *conn)
        .await?;
    let column = |f: fn(&Detection) -> f32| found.iter().map(f).collect::<Vec<f32>>();
    let labels: Vec<i32> = found.iter().map(|d| d.label).collect();
    let names: Vec<Option<&str>> = found.iter().map(|d| d.class_name.as_deref()).collect();
    sqlx::query(
        "INSERT INTO detections (run_id, ordinal, x1, y1, x2, y2, score, label, class_name)
         SELECT $1, ordinal - 1, x1, y1, x2, y2, score, label, class_name
         FROM unnest($2::real[], $3::real[], $4::real[], $5::real[], $6::real[], $7::int[],
                     $8::text[]) WITH ORDINALITY AS d(x1, y1, x2, y2, score, label, class_name, ordinal)",
    )
    .bind(run_id)
    .bind(column(|d| d.x1))
    .bind(column(|d| d.y1))
    .bind(column(|d| d.x2))
    .bind(column(|d| d.y2))
    .bind(column(|d| d.score))
    .bind(&labels)
    .bind(&names)
    .execute(conn)
    .await?;
    Ok(())
}

pub struct NewTrainingRun<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub dataset_path: &'a str,
    pub base_config: &'a str,
    pub base_checkpoint: Option<&'a str>,
    pub epochs: i32,
    pub batch_size: i32,
    pub frozen_stages: i32,
    pub device: Option<&'a str>,
    pub job_id: JobId,
}

pub async fn insert_training_run(conn: &mut PgConnection, run: &NewTrainingRun<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO training_runs
             (id, name, description, status, dataset_path, base_config, base_checkpoint, epochs,
              batch_size, frozen_stages, device, job_id)
         VALUES ($1, $2, $3, 'Waiting', $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(run.id)
    .bind(run.name)
    .bind(run.description)
    .bind(run.dataset_path)
    .bind(run.base_config)
    .bind(run.base_checkpoint)
    .bind(run.epochs)
    .bind(run.batch_size)
    .bind(run.frozen_stages)
    .bind(run.device)
    .bind(run.job_id)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_training_run(pool: &PgPool, id: Uuid) -> Result<Option<TrainingRunRow>> {
    Ok(sqlx::query_as("SELECT * FROM training_runs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

pub async fn list_training_runs(
    pool: &PgPool,
    limit: i64,
    offset: i64,
) -> Result<Vec<TrainingRunRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM training_runs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2",
    )
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?)
}

pub async fn start_training_run(conn: &mut PgConnection, id: Uuid, device: &str) -> Result<()> {
    sqlx::query(
        "UPDATE training_runs SET status = 'Processing', device = $2, started_at = now(),
                                  error_message = NULL
         WHERE id = $1",
    )
    .bind(id)
    .bind(device)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_trained_model(
    conn: &mut PgConnection,
    run_id: Uuid,
    model_id: Uuid,
) -> Result<()> {
    sqlx::query("UPDATE training_runs SET trained_model_id = $2 WHERE id = $1")
        .bind(run_id)
        .bind(model_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A run whose status followed its job to an end.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunStatusChange {
    pub id: Uuid,
    pub kind: String,
    pub status: String,
    pub error_message: Option<String>,
}

/// Makes the runs of these jobs follow their new state, in the transaction that applied it,
/// so a run is never left Processing when its job has failed: back to Waiting while a retry
/// is pending, Success or Error at the end.
pub async fn follow_job_states(
    conn: &mut PgConnection,
    job_ids: &[JobId],
    states: &[&str],
    messages: &[Option<&str>],
) -> Result<Vec<RunStatusChange>> {
    let changes = sqlx::query_as(
        "WITH changed AS (
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS c(job_id, state, message)
         ), detection AS (
             UPDATE detection_runs r
             SET status = CASE c.state WHEN 'succeeded' THEN 'Success'
                                       WHEN 'failed' THEN 'Error' WHEN 'deleted' THEN 'Error'
                                       WHEN 'processing' THEN 'Processing' ELSE 'Waiting' END,
                 error_message = CASE WHEN c.state IN ('failed', 'deleted')
                                      THEN coalesce(c.message, 'job ' || c.state) END,
                 finished_at = CASE WHEN c.state IN ('succeeded', 'failed', 'deleted')
                                    THEN now() END
             FROM changed c
             WHERE r.job_id = c.job_id AND r.status <> 'Canceled'
             RETURNING r.id, 'detection' AS kind, r.status, r.error_message
         ), training AS (
             UPDATE training_runs r
             SET status = CASE c.state WHEN 'succeeded' THEN 'Success'
                                       WHEN 'failed' THEN 'Error' WHEN 'deleted' THEN 'Error'
                                       WHEN 'processing' THEN 'Processing' ELSE 'Waiting' END,
                 error_message = CASE WHEN c.state IN ('failed', 'deleted')
                                      THEN coalesce(c.message, 'job ' || c.state) END,
                 finished_at = CASE WHEN c.state IN ('succeeded', 'failed', 'deleted')
                                    THEN now() END
             FROM changed c
             WHERE r.job_id = c.job_id AND r.status <> 'Canceled'
             RETURNING r.id, 'training' AS kind, r.status, r.error_message
         )
         SELECT * FROM detection UNION ALL SELECT * FROM training",
    )
    .bind(job_ids)
    .bind(states)
    .bind(messages)
    .fetch_all(conn)
    .await?;
    Ok(changes)
}

/// Runs whose status disagrees with their job (Processing or Waiting while the job has ended,
/// or whose job is gone) are set from the job's final state. Returns what changed.
pub async fn reconcile(pool: &PgPool) -> Result<Vec<RunStatusChange>> {
    let changes = sqlx::query_as(
        "WITH stale AS (
             SELECT r.id, 'detection' AS kind, j.state, j.id AS job_id FROM detection_runs r
             LEFT JOIN jobs j ON j.id = r.job_id
             WHERE r.status IN ('Processing', 'Waiting')
               AND (j.id IS NULL OR j.state IN ('succeeded', 'failed', 'deleted'))
             UNION ALL
             SELECT r.id, 'training', j.state, j.id FROM training_runs r
             LEFT JOIN jobs j ON j.id = r.job_id
             WHERE r.status IN ('Processing', 'Waiting')
               AND (j.id IS NULL OR j.state IN ('succeeded', 'failed', 'deleted'))
         ), decided AS (
             SELECT s.id, s.kind,
                    CASE WHEN s.state = 'succeeded' THEN 'Success' ELSE 'Error' END AS status,
                    CASE WHEN s.state = 'succeeded' THEN NULL
                         WHEN s.job_id IS NULL THEN 'its job no longer exists'
                         ELSE coalesce((SELECT h.data ->> 'message' FROM job_states h
                                        WHERE h.job_id = s.job_id AND h.state = 'failed'
                                        ORDER BY h.id DESC LIMIT 1), 'job ' || s.state)
                    END AS error_message
             FROM stale s
         ), detection AS (
             UPDATE detection_runs r SET status = d.status, error_message = d.error_message,
                                         finished_at = coalesce(r.finished_at, now())
             FROM decided d WHERE d.kind = 'detection' AND r.id = d.id
             RETURNING r.id, 'detection' AS kind, r.status, r.error_message
         ), training AS (
             UPDATE training_runs r SET status = d.status, error_message = d.error_message,
                                        finished_at = coalesce(r.finished_at, now())
             FROM decided d WHERE d.kind = 'training' AND r.id = d.id
             RETURNING r.id, 'training' AS kind, r.status, r.error_message
         )
         SELECT * FROM detection UNION ALL SELECT * FROM training",
    )
    .fetch_all(pool)
    .await?;
    Ok(changes)
}

/// A run's status and job, locked for the transaction that deletes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LockedRun {
    pub status: String,
    pub job_id: Option<JobId>,
    /// The model a training run produced (None for detection runs).
    pub trained_model_id: Option<Uuid>,
}

pub async fn lock_detection_run(conn: &mut PgConnection, id: Uuid) -> Result<Option<LockedRun>> {
    Ok(sqlx::query_as(
        "SELECT status, job_id, NULL::uuid AS trained_model_id FROM detection_runs
         WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

pub async fn lock_training_run(conn: &mut PgConnection, id: Uuid) -> Result<Option<LockedRun>> {
    Ok(sqlx::query_as(
        "SELECT status, job_id, trained_model_id FROM training_runs WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// How many detection runs use `model` (locking the model row, so none is created meanwhile).
pub async fn detection_runs_using_model(conn: &mut PgConnection, model: Uuid) -> Result<i64> {
    sqlx::query("SELECT 1 FROM models WHERE id = $1 FOR UPDATE")
        .bind(model)
        .execute(&mut *conn)
        .await?;
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM detection_runs WHERE model_id = $1")
            .bind(model)
            .fetch_one(conn)
            .await?,
    )
}

/// Deletes a detection run row (its detections go with it).
pub async fn delete_detection_run(conn: &mut PgConnection, id: Uuid) -> Result<bool> {
    let done = sqlx::query("DELETE FROM detection_runs WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a training run row and the model it produced, if any.
pub async fn delete_training_run(conn: &mut PgConnection, id: Uuid) -> Result<bool> {
    let deleted: Option<Option<Uuid>> =
        sqlx::query_scalar("DELETE FROM training_runs WHERE id = $1 RETURNING trained_model_id")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(Some(model)) = deleted {
        sqlx::query("DELETE FROM models WHERE id = $1")
            .bind(model)
            .execute(conn)
            .await?;
    }
    Ok(deleted.is_some())
}
