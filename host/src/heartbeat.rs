//! The server's heartbeat and lease watchdog.
//!
//! The heartbeat renews, in one statement, the lease of every job this server holds, and
//! notices jobs it no longer holds. The watchdog runs apart from it: if renewals stall (the
//! database is slow, unreachable, or a lock blocks the statement), it stops each job's
//! subprocess early enough that the kill path (SIGTERM, grace, SIGKILL) ends before the lease
//! can expire — so no other server ever starts a job whose previous process is still alive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::running::RunningJobs;
use crate::storage::{jobs, servers, StorageError};

/// How old a lease basis may get before the watchdog stops the job.
pub fn stop_deadline(config: &Config) -> Duration {
    config
        .lease_duration
        .saturating_sub(config.kill_grace_period)
        .saturating_sub(config.heartbeat_interval)
}

pub async fn run_heartbeat(
    pool: PgPool,
    config: Arc<Config>,
    server_id: String,
    running: RunningJobs,
    stop: CancellationToken,
) {
    let lease_ms = i64::try_from(config.lease_duration.as_millis()).unwrap_or(i64::MAX);
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let sent_at = Instant::now();
        let held = running.held();
        match renew(
            &pool,
            &server_id,
            &held,
            lease_ms,
            config.heartbeat_interval,
        )
        .await
        {
            Ok(renewal) => running.renewed(sent_at, &renewal),
            Err(error) => {
                tracing::warn!(%error, server = %server_id, "heartbeat failed; leases not renewed")
            }
        }
    }
}

async fn renew(
    pool: &PgPool,
    server_id: &str,
    held: &[(i64, i32)],
    lease_ms: i64,
    budget: Duration,
) -> Result<jobs::LeaseRenewal, StorageError> {
    let mut tx = pool.begin().await?;
    // A renewal that takes longer than a heartbeat is useless: give up and let the next one try.
    crate::storage::set_local_statement_timeout(&mut tx, budget).await?;
    let mut renewal = jobs::renew_leases(&mut tx, server_id, held, lease_ms, false).await?;
    servers::heartbeat(&mut tx, server_id).await?;
    tx.commit().await?;
    let busy = busy_attempts(held, &renewal);
    if !busy.is_empty() {
        // Rows someone held locked a moment ago (a client's delete, a run's writer, the
        // completer ending them): wait for each briefly, in its own transaction.
        renewal.absorb(renew_each_waiting(pool, server_id, &busy, lease_ms, budget / 2).await);
    }
    Ok(renewal)
}

/// The held attempts a renewal neither renewed nor found lost: their rows were locked.
fn busy_attempts(held: &[(i64, i32)], renewal: &jobs::LeaseRenewal) -> Vec<(i64, i32)> {
    let answered: std::collections::HashSet<&(i64, i32)> =
        renewal.renewed.iter().chain(&renewal.lost).collect();
    held.iter()
        .filter(|attempt| !answered.contains(attempt))
        .copied()
        .collect()
}

/// Renews each of `busy` in a transaction of its own that waits for that row's lock only: a
/// transaction holding no other lock while it waits cannot close a deadlock cycle, and one row
/// held long costs only its own renewal. All of it within `budget`.
async fn renew_each_waiting(
    pool: &PgPool,
    server_id: &str,
    busy: &[(i64, i32)],
    lease_ms: i64,
    budget: Duration,
) -> jobs::LeaseRenewal {
    let started = Instant::now();
    let mut renewal = jobs::LeaseRenewal::default();
    for attempt in busy {
        let Some(left) = budget.checked_sub(started.elapsed()) else {
            break;
        };
        let wait = left.min(Duration::from_millis(500));
        match renew_one_waiting(pool, server_id, *attempt, lease_ms, wait).await {
            Ok(one) => renewal.absorb(one),
            Err(error) => tracing::warn!(
                %error,
                server = %server_id,
                job_id = attempt.0,
                "lease not renewed this time: its job's row stayed locked"
            ),
        }
    }
    renewal
}

async fn renew_one_waiting(
    pool: &PgPool,
    server_id: &str,
    attempt: (i64, i32),
    lease_ms: i64,
    wait: Duration,
) -> Result<jobs::LeaseRenewal, StorageError> {
    let mut tx = pool.begin().await?;
    crate::storage::set_local_lock_timeout(&mut tx, wait).await?;
    crate::storage::set_local_statement_timeout(&mut tx, wait * 2).await?;
    let renewal = jobs::renew_leases(&mut tx, server_id, &[attempt], lease_ms, true).await?;
    tx.commit().await?;
    Ok(renewal)
}

pub async fn run_watchdog(config: Arc<Config>, running: RunningJobs, stop: CancellationToken) {
    let deadline = stop_deadline(&config);
    let period = (config.heartbeat_interval / 4)
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => running.stop_expiring(Instant::now(), deadline),
        }
    }
}
