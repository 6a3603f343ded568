//! Maintenance services. They run on one elected leader per schema: the server whose
//! dedicated connection holds the leader advisory lock. When that connection dies (the server
//! crashed or was partitioned), PostgreSQL releases the lock and another server takes over.

pub mod expirer;
pub mod reconciler;
pub mod rescuer;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use sqlx::{ConnectOptions, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::completer::ApplyContext;
use crate::config::Config;
use crate::plugins::policies::Policies;
use crate::storage::servers;

/// What every maintenance service works with.
#[derive(Clone)]
pub struct MaintenanceContext {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub apply: ApplyContext,
    pub policies: Policies,
}

/// How often a follower retries to become the leader.
const LEADER_RETRY: Duration = Duration::from_secs(2);

pub async fn run_leader_loop(
    context: MaintenanceContext,
    server_id: String,
    stop: CancellationToken,
) {
    let key = servers::leader_lock_key(&context.config.schema_name);
    loop {
        let options = context.pool.connect_options();
        match options.connect().await {
            Ok(mut conn) => match servers::try_lead(&mut conn, key).await {
                Ok(true) => {
                    tracing::info!(server = %server_id, "elected maintenance leader");
                    lead(&context, &mut conn, &stop).await;
                    tracing::info!(server = %server_id, "no longer the maintenance leader");
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election failed"),
            },
            Err(error) => tracing::warn!(%error, "leader election: cannot connect"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LEADER_RETRY) => {}
        }
    }
}

/// Runs the services on their intervals while `conn` (holding the lock) stays alive.
async fn lead(
    context: &MaintenanceContext,
    conn: &mut sqlx::PgConnection,
    stop: &CancellationToken,
) {
    let config = &context.config;
    let expirer_interval = Duration::from_secs(3600);
    let tick = config
        .scheduler_interval
        .min(config.rescuer_interval)
        .max(Duration::from_millis(10));
    let now = Instant::now();
    let (mut next_scheduler, mut next_rescuer, mut next_reconcile, mut next_expire) =
        (now, now, now, now);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if let Err(error) = servers::ping(conn).await {
            tracing::warn!(%error, "leader connection lost");
            return;
        }
        let now = Instant::now();
        if now >= next_scheduler {
            next_scheduler = now + config.scheduler_interval;
            log_outcome("scheduler", scheduler::run_once(context).await);
        }
        if now >= next_rescuer {
            next_rescuer = now + config.rescuer_interval;
            log_outcome("rescuer", rescuer::run_once(context).await);
        }
        if now >= next_reconcile {
            next_reconcile = now + config.run_reconcile_interval;
            log_outcome("run reconciler", reconciler::run_once(context).await);
        }
        if now >= next_expire {
            next_expire = now + expirer_interval;
            log_outcome("expirer", expirer::run_once(context).await);
        }
    }
}

fn log_outcome(service: &'static str, result: Result<usize, crate::storage::StorageError>) {
    match result {
        Ok(0) => {}
        Ok(count) => tracing::info!(service, count, "maintenance pass"),
        Err(error) => tracing::warn!(service, %error, "maintenance pass failed"),
    }
}
