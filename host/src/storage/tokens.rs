//! Statements over `api_tokens`.

use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;

type Result<T> = std::result::Result<T, StorageError>;

pub async fn insert(
    pool: &PgPool,
    id: Uuid,
    name: &str,
    sha256: &[u8],
    claims: &[String],
) -> Result<()> {
    sqlx::query("INSERT INTO api_tokens (id, name, token_sha256, claims) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(name)
        .bind(sha256)
        .bind(claims)
        .execute(pool)
        .await?;
    Ok(())
}

/// The token's (name, claims) if it exists and is not revoked.
pub async fn find_active(pool: &PgPool, sha256: &[u8]) -> Result<Option<(String, Vec<String>)>> {
    let row = sqlx::query_as(
        "SELECT name, claims FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
    )
    .bind(sha256)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

pub async fn revoke(pool: &PgPool, name: &str) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
    )
    .bind(name)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
