//! Statements over `plugins` and `plugin_events`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::StorageError;

type Result<T> = std::result::Result<T, StorageError>;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PluginVersion {
    pub slot: String,
    pub version: i32,
    pub sha256: String,
    pub size: i32,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
    pub active: bool,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PluginEvent {
    pub slot: String,
    pub version: Option<i32>,
    pub event: String,
    pub actor: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An active version (servers fetch its bytes only when they do not hold it yet).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActivePlugin {
    pub slot: String,
    pub version: i32,
    pub sha256: String,
}

/// Stores a new version (the next number of its slot); returns the number.
pub async fn insert(
    conn: &mut PgConnection,
    slot: &str,
    sha256: &str,
    bytes: &[u8],
    actor: &str,
) -> Result<i32> {
    let version = sqlx::query_scalar(
        "WITH next AS (
             SELECT coalesce(max(version), 0) + 1 AS version FROM plugins WHERE slot = $1
         ), inserted AS (
             INSERT INTO plugins (slot, version, sha256, bytes, uploaded_by)
             SELECT $1, version, $2, $3, $4 FROM next
             RETURNING version
         ), event AS (
             INSERT INTO plugin_events (slot, version, event, actor)
             SELECT $1, version, 'uploaded', $4 FROM inserted
         )
         SELECT version FROM inserted",
    )
    .bind(slot)
    .bind(sha256)
    .bind(bytes)
    .bind(actor)
    .fetch_one(conn)
    .await?;
    Ok(version)
}

/// The version of `slot` with exactly these bytes (by hash), if one was uploaded.
pub async fn version_with_sha256(
    conn: &mut PgConnection,
    slot: &str,
    sha256: &str,
) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT version FROM plugins WHERE slot = $1 AND sha256 = $2 ORDER BY version LIMIT 1",
    )
    .bind(slot)
    .bind(sha256)
    .fetch_optional(conn)
    .await?)
}

/// Makes `version` the active one of its slot (the caller holds [`lock_slot`]). Returns false
/// when no such version exists.
pub async fn activate(
    conn: &mut PgConnection,
    slot: &str,
    version: i32,
    event: &str,
    actor: &str,
    reason: Option<&str>,
) -> Result<bool> {
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT version FROM plugins WHERE slot = $1 AND version = $2")
            .bind(slot)
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?;
    if exists.is_none() {
        return Ok(false);
    }
    // Two statements: the unique index on the active version is checked row by row.
    sqlx::query("UPDATE plugins SET active = false WHERE slot = $1 AND active AND version <> $2")
        .bind(slot)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE plugins SET active = true WHERE slot = $1 AND version = $2")
        .bind(slot)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO plugin_events (slot, version, event, actor, reason) VALUES ($1, $2, $3, $4, $5)")
        .bind(slot)
        .bind(version)
        .bind(event)
        .bind(actor)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

/// The active version of a slot.
pub async fn active_version(conn: &mut PgConnection, slot: &str) -> Result<Option<i32>> {
    Ok(
        sqlx::query_scalar("SELECT version FROM plugins WHERE slot = $1 AND active")
            .bind(slot)
            .fetch_optional(conn)
            .await?,
    )
}

/// The slot's switches in order: (event, version) for every activation, rollback and
/// deactivation. The catalog replays them to find what was active before.
pub async fn switches(conn: &mut PgConnection, slot: &str) -> Result<Vec<(String, Option<i32>)>> {
    Ok(sqlx::query_as(
        "SELECT event, version FROM plugin_events
         WHERE slot = $1
           AND event IN ('activated', 'rolled back', 'rolled back automatically', 'deactivated')
         ORDER BY id",
    )
    .bind(slot)
    .fetch_all(conn)
    .await?)
}

/// Serialises every change to `slot` (uploads, activations, rollbacks) until the transaction
/// ends, also when the slot has no row yet.
pub async fn lock_slot(conn: &mut PgConnection, slot: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '/' || $1, 0))")
        .bind(slot)
        .execute(conn)
        .await?;
    Ok(())
}

/// Turns a slot off (no version active: the built-in policy decides).
pub async fn deactivate(
    conn: &mut PgConnection,
    slot: &str,
    actor: &str,
    reason: &str,
) -> Result<u64> {
    let done = sqlx::query("UPDATE plugins SET active = false WHERE slot = $1 AND active")
        .bind(slot)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO plugin_events (slot, event, actor, reason) VALUES ($1, 'deactivated', $2, $3)",
    )
    .bind(slot)
    .bind(actor)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

pub async fn all_active(pool: &PgPool) -> Result<Vec<ActivePlugin>> {
    Ok(
        sqlx::query_as("SELECT slot, version, sha256 FROM plugins WHERE active ORDER BY slot")
            .fetch_all(pool)
            .await?,
    )
}

/// The component of one version.
pub async fn bytes_of(pool: &PgPool, slot: &str, version: i32) -> Result<Option<Vec<u8>>> {
    Ok(
        sqlx::query_scalar("SELECT bytes FROM plugins WHERE slot = $1 AND version = $2")
            .bind(slot)
            .bind(version)
            .fetch_optional(pool)
            .await?,
    )
}

pub async fn versions(pool: &PgPool, slot: Option<&str>) -> Result<Vec<PluginVersion>> {
    Ok(sqlx::query_as(
        "SELECT slot, version, sha256, octet_length(bytes) AS size, uploaded_by, uploaded_at, active
         FROM plugins WHERE $1::text IS NULL OR slot = $1 ORDER BY slot, version",
    )
    .bind(slot)
    .fetch_all(pool)
    .await?)
}

pub async fn events(pool: &PgPool, slot: &str) -> Result<Vec<PluginEvent>> {
    Ok(sqlx::query_as(
        "SELECT slot, version, event, actor, reason, created_at FROM plugin_events
         WHERE slot = $1 ORDER BY id",
    )
    .bind(slot)
    .fetch_all(pool)
    .await?)
}

/// Wakes every server's plugin registry when the transaction commits.
pub async fn notify_changed(conn: &mut PgConnection, channel: &str, slot: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(slot)
        .execute(conn)
        .await?;
    Ok(())
}
