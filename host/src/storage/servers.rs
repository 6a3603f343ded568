//! Statements over `servers`, and the leader lock of the maintenance services.

use sqlx::{PgConnection, PgPool};

use super::StorageError;

type Result<T> = std::result::Result<T, StorageError>;

/// Advisory lock key of the maintenance leader; schema-specific so that schemas sharing a
/// database elect their own leaders.
pub fn leader_lock_key(schema: &str) -> i64 {
    // FNV-1a: stable across builds and processes, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"hangar-leader:".iter().chain(schema.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

pub async fn register(
    pool: &PgPool,
    id: &str,
    name: &str,
    queues: &[String],
    worker_count: i32,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO servers (id, name, queues, worker_count) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
    )
    .bind(id)
    .bind(name)
    .bind(queues)
    .bind(worker_count)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn heartbeat(conn: &mut PgConnection, id: &str) -> Result<()> {
    sqlx::query("UPDATE servers SET heartbeat_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that the server's producer has stopped: no fetch by it commits after this.
pub async fn mark_draining(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("UPDATE servers SET draining_since = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Marks the server stopped; the row stays (for operators) until the rescuer forgets it.
pub async fn mark_stopped(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("UPDATE servers SET stopped_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<ServerRow>> {
    let row = sqlx::query_as("SELECT * FROM servers WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row)
}

/// Forgets servers whose heartbeat is older than `timeout_ms` (their jobs are rescued by lease).
pub async fn remove_dead(pool: &PgPool, timeout_ms: i64) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM servers WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(timeout_ms)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Tries to become the leader on this (dedicated) connection; held until it closes.
pub async fn try_lead(conn: &mut PgConnection, key: i64) -> Result<bool> {
    let got = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await?;
    Ok(got)
}

/// A cheap round trip proving the leader's connection (and so its lock) is alive.
pub async fn ping(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT 1").execute(conn).await?;
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ServerRow {
    pub id: String,
    pub name: String,
    pub queues: Vec<String>,
    pub worker_count: i32,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    pub draining_since: Option<chrono::DateTime<chrono::Utc>>,
    pub stopped_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn list(pool: &PgPool) -> Result<Vec<ServerRow>> {
    let rows = sqlx::query_as("SELECT * FROM servers ORDER BY started_at")
        .fetch_all(pool)
        .await?;
    Ok(rows)
}
