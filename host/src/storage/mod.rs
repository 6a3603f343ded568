//! Everything hangar says to PostgreSQL. Each submodule owns the statements of its tables;
//! no SQL lives anywhere else. Database errors are translated here, once.

pub mod jobs;
pub mod plugins;
pub mod runs;
pub mod servers;
pub mod tokens;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::config::Config;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating schema {schema}: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "schema {schema} is at migration {current} but this hangar needs {required}; \
         run `hangar migrate` (or set prepare_schema_if_necessary = true)"
    )]
    SchemaBehind {
        schema: String,
        current: i64,
        required: i64,
    },
    #[error("invalid database URL: {0}")]
    Url(String),
}

impl StorageError {
    /// A unique or foreign-key violation: the caller's input conflicts with stored data.
    pub fn is_constraint_violation(&self) -> bool {
        matches!(self, StorageError::Database(sqlx::Error::Database(e))
            if e.is_unique_violation() || e.is_foreign_key_violation() || e.is_check_violation())
    }
}

/// The channel NOTIFY wakes producers on; one per schema so that schemas sharing a database
/// (tests) do not wake each other.
pub fn jobs_channel(schema: &str) -> String {
    format!("hangar_{schema}_jobs")
}

/// Connect options for `url` with every session pinned to `schema`.
pub fn connect_options(
    url: &str,
    schema: &str,
    transaction_timeout: Duration,
) -> Result<PgConnectOptions, StorageError> {
    let timeout_ms = transaction_timeout.as_millis().to_string();
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StorageError::Url(e.to_string()))?
        .options([
            ("search_path", schema),
            ("statement_timeout", timeout_ms.as_str()),
            ("idle_in_transaction_session_timeout", timeout_ms.as_str()),
        ])
        .application_name("hangar");
    Ok(options)
}

/// A pool on `url` pinned to the configured schema.
pub async fn connect(
    url: &str,
    config: &Config,
    max_connections: u32,
) -> Result<PgPool, StorageError> {
    let options = connect_options(url, &config.schema_name, config.transaction_timeout)?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Creates the schema if needed and applies pending migrations.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StorageError> {
    // The name was checked by Config::validate to be a plain identifier.
    pool.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
        .await?;
    MIGRATOR
        .run(pool)
        .await
        .map_err(|source| StorageError::Migrate {
            schema: schema.to_owned(),
            source,
        })
}

/// Migrates when allowed, else refuses a schema that is behind this binary.
pub async fn prepare_schema(pool: &PgPool, config: &Config) -> Result<(), StorageError> {
    if config.prepare_schema_if_necessary {
        return migrate(pool, &config.schema_name).await;
    }
    let required = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let current: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .or_else(|error| match &error {
                // No migration table yet: the schema was never migrated.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(error),
            })?;
    let current = current.unwrap_or(0);
    if current < required {
        return Err(StorageError::SchemaBehind {
            schema: config.schema_name.clone(),
            current,
            required,
        });
    }
    Ok(())
}

/// Limits every statement of the current transaction to `budget`.
pub async fn set_local_statement_timeout(
    conn: &mut sqlx::PgConnection,
    budget: Duration,
) -> Result<(), StorageError> {
    set_local_milliseconds(conn, "statement_timeout", budget).await
}

/// Limits every wait for a lock in the current transaction to `budget`.
pub async fn set_local_lock_timeout(
    conn: &mut sqlx::PgConnection,
    budget: Duration,
) -> Result<(), StorageError> {
    set_local_milliseconds(conn, "lock_timeout", budget).await
}

/// `SET LOCAL setting = ms` (at least 1 ms: 0 would mean no limit).
async fn set_local_milliseconds(
    conn: &mut sqlx::PgConnection,
    setting: &str,
    budget: Duration,
) -> Result<(), StorageError> {
    let budget_ms = budget.as_millis().max(1);
    conn.execute(format!("SET LOCAL {setting} = {budget_ms}").as_str())
        .await?;
    Ok(())
}

/// The channel that tells servers the active plugins changed.
pub fn plugins_channel(schema: &str) -> String {
    format!("hangar_{schema}_plugins")
}

/// Installs pg_walinspect (PostgreSQL 15's reader of the WAL itself), for the benchmark.
pub async fn install_wal_inspection(pool: &PgPool) -> Result<(), StorageError> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .execute(pool)
        .await?;
    Ok(())
}
