//! A hangar server: producer, workers, completer, heartbeat and lease watchdog, and the
//! maintenance leader loop, with one lifecycle.
//!
//! Shutdown (SIGINT/SIGTERM, or [`RunningServer::shutdown`]): the producer stops first, so
//! nothing is fetched after the signal; running jobs drain in parallel until the grace period
//! is about to end; the rest are stopped (their subprocess trees killed) early enough to be
//! gone within the grace period, and released to their queue for another server.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::completer::{ApplyContext, Completer, StateObserver};
use crate::config::Config;
use crate::election::{ExponentialRetry, RetryPolicy};
use crate::executor::devices::DevicePool;
use crate::executor::HandlerRegistry;
use crate::heartbeat;
use crate::maintenance::{self, MaintenanceContext};
use crate::plugins::policies::Policies;
use crate::plugins::registry::PluginRegistry;
use crate::producer::{self, ProducerContext};
use crate::running::RunningJobs;
use crate::storage::{jobs_channel, servers, StorageError};

/// Everything a server is made of, before it starts.
pub struct ServerParts {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub handlers: HandlerRegistry,
    pub observers: Vec<Arc<dyn StateObserver>>,
    /// None: the built-in policy from the config.
    pub retry_policy: Option<Arc<dyn RetryPolicy>>,
    /// The plugin registry (None: built-in policies only). The server keeps it current.
    pub plugins: Option<Arc<PluginRegistry>>,
    /// Whether this server takes part in the maintenance leader election.
    pub maintenance: bool,
}

impl ServerParts {
    pub fn new(config: Arc<Config>, pool: PgPool, handlers: HandlerRegistry) -> Self {
        Self {
            config,
            pool,
            handlers,
            observers: Vec::new(),
            retry_policy: None,
            plugins: None,
            maintenance: true,
        }
    }
}

/// The built-in retry policy the config describes.
pub fn builtin_retry_policy(config: &Config) -> Arc<dyn RetryPolicy> {
    Arc::new(ExponentialRetry {
        max_retries: config.max_retries,
        unit: config.retry_unit,
    })
}

pub struct RunningServer {
    id: String,
    config: Arc<Config>,
    pool: PgPool,
    stop_fetching: CancellationToken,
    stop_background: CancellationToken,
    jobs_stop: CancellationToken,
    running: RunningJobs,
    workers: Arc<Semaphore>,
    producer: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    completer: Completer,
}

/// A server id: its name plus a per-boot nonce, so a restarted server is a new owner.
pub fn new_server_id(name: &str) -> String {
    format!("{name}:{}", uuid::Uuid::new_v4().simple())
}

impl RunningServer {
    pub async fn start(parts: ServerParts) -> Result<Self, StorageError> {
        let ServerParts {
            config,
            pool,
            handlers,
            observers,
            retry_policy,
            plugins,
            maintenance,
        } = parts;
        let id = new_server_id(&config.server_name);
        servers::register(
            &pool,
            &id,
            &config.server_name,
            &config.queues,
            i32::try_from(config.worker_count).unwrap_or(i32::MAX),
        )
        .await?;
        let policies = Policies {
            builtin: retry_policy.unwrap_or_else(|| builtin_retry_policy(&config)),
            registry: plugins.clone(),
        };
        let channel = jobs_channel(&config.schema_name);
        let apply = ApplyContext {
            pool: pool.clone(),
            channel: channel.clone(),
            observers: Arc::new(observers),
        };
        let running = RunningJobs::default();
        let completer =
            Completer::start(apply.clone(), policies.clone(), id.clone(), running.clone());
        let workers = Arc::new(Semaphore::new(config.worker_count));
        let stop_fetching = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let jobs_stop = CancellationToken::new();
        let wake = Arc::new(Notify::new());

        let mut background = vec![
            tokio::spawn(producer::run_listener(
                pool.clone(),
                channel.clone(),
                config.queues.clone(),
                Arc::clone(&wake),
                stop_fetching.clone(),
            )),
            tokio::spawn(heartbeat::run_heartbeat(
                pool.clone(),
                Arc::clone(&config),
                id.clone(),
                running.clone(),
                stop_background.clone(),
            )),
            tokio::spawn(heartbeat::run_watchdog(
                Arc::clone(&config),
                running.clone(),
                stop_background.clone(),
            )),
        ];
        if let Some(registry) = plugins {
            // The first load happens before any job is fetched, so no election misses a plugin.
            if let Err(error) = registry.reload().await {
                tracing::warn!(%error, "loading plugins failed; retrying in the background");
            }
            background.push(tokio::spawn(registry.run_listener(stop_background.clone())));
        }
        if maintenance {
            let context = MaintenanceContext {
                pool: pool.clone(),
                config: Arc::clone(&config),
                apply,
                policies,
            };
            background.push(tokio::spawn(maintenance::run_leader_loop(
                context,
                id.clone(),
                stop_background.clone(),
            )));
        }
        let producer_context = ProducerContext {
            pool: pool.clone(),
            config: Arc::clone(&config),
            server_id: id.clone(),
            channel,
            handlers,
            devices: DevicePool::new(config.gpus.as_deref(), config.cpu_run_slots),
            running: running.clone(),
            completer: completer.handle(),
            workers: Arc::clone(&workers),
            slot_freed: Arc::new(Notify::new()),
            jobs_stop: jobs_stop.clone(),
        };
        let producer = tokio::spawn(producer::run_producer(
            producer_context,
            wake,
            stop_fetching.clone(),
        ));
        tracing::info!(server = %id, queues = ?config.queues, workers = config.worker_count, "server started");
        Ok(Self {
            id,
            config,
            pool,
            stop_fetching,
            stop_background,
            jobs_stop,
            running,
            workers,
            producer,
            background,
            completer,
        })
    }

    /// This server's id (name + per-boot nonce): the lease owner of the jobs it runs.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn running_jobs(&self) -> usize {
        self.running.len()
    }

    /// Graceful shutdown: see the module documentation.
    pub async fn shutdown(self) {
        let grace = self.config.shutdown_grace_period;
        let started = tokio::time::Instant::now();
        self.stop_fetching.cancel();
        let _ = self.producer.await;
        if let Err(error) = servers::mark_draining(&self.pool, &self.id).await {
            tracing::warn!(%error, "could not record the drain");
        }
        tracing::info!(server = %self.id, running = self.running.len(), grace = ?grace, "stopped fetching; draining");
        // Leave the kill path (SIGTERM, grace, SIGKILL) room to finish inside the grace period.
        let drain_deadline = started + grace.saturating_sub(self.config.kill_grace_period);
        let total = self.config.worker_count;
        if !producer::wait_idle(&self.workers, total, drain_deadline).await {
            tracing::warn!(server = %self.id, running = self.running.len(), "grace period ending; stopping and releasing the remaining jobs");
            self.jobs_stop.cancel();
            let patience = crate::executor::stop_patience(&self.config);
            let _ =
                producer::wait_idle(&self.workers, total, tokio::time::Instant::now() + patience)
                    .await;
        }
        let patience = crate::executor::stop_patience(&self.config) + Duration::from_secs(5);
        if tokio::time::timeout(patience, self.completer.stop())
            .await
            .is_err()
        {
            tracing::error!(
                "completer did not finish; unwritten jobs will be rescued when their lease expires"
            );
        }
        self.stop_background.cancel();
        for task in self.background {
            let _ = task.await;
        }
        if let Err(error) = servers::mark_stopped(&self.pool, &self.id).await {
            tracing::warn!(%error, "could not record the stop");
        }
        tracing::info!(server = %self.id, took = ?started.elapsed(), "server stopped");
    }
}
