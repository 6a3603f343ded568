//! Opens the database a configuration names: `database_url`, or hangar's embedded cluster.

use sqlx::{Connection, PgPool};

use crate::config::Config;
use crate::embedded_pg::{EmbeddedOptions, EmbeddedPgError, EmbeddedPostgres};
use crate::storage::{self, StorageError};

pub const EMBEDDED_DATABASE: &str = "hangar";

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedPgError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for DatabaseError {
    fn from(error: sqlx::Error) -> Self {
        DatabaseError::Storage(StorageError::Database(error))
    }
}

/// An open database; holds the embedded cluster (stopped on drop) when there is one.
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    pub embedded: Option<EmbeddedPostgres>,
}

/// Starts the embedded cluster (under `data_dir/pg`) and makes sure its database exists.
pub async fn start_embedded(
    data_dir: &std::path::Path,
    throwaway: bool,
) -> Result<(EmbeddedPostgres, String), DatabaseError> {
    let options = EmbeddedOptions {
        data_dir: data_dir.to_owned(),
        throwaway,
        max_connections: 200,
    };
    let embedded = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&options))
        .await
        .map_err(|e| EmbeddedPgError::Io {
            action: "start".into(),
            source: std::io::Error::other(e),
        })??;
    let mut admin = sqlx::PgConnection::connect(&embedded.url("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(EMBEDDED_DATABASE)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {EMBEDDED_DATABASE}"))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    let url = embedded.url(EMBEDDED_DATABASE);
    Ok((embedded, url))
}

/// Opens the configured database with a pool of `max_connections`, and prepares the schema.
pub async fn open(config: &Config, max_connections: u32) -> Result<Database, DatabaseError> {
    let (embedded, url) = match &config.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let (embedded, url) = start_embedded(&config.data_dir.join("pg"), false).await?;
            (Some(embedded), url)
        }
    };
    let pool = storage::connect(&url, config, max_connections).await?;
    storage::prepare_schema(&pool, config).await?;
    Ok(Database {
        pool,
        url,
        embedded,
    })
}
