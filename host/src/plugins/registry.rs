//! The active plugin of every slot, as one immutable snapshot swapped atomically. A call loads
//! the snapshot once and finishes on the versions it holds, whatever is activated meanwhile.
//! Compiled components are cached on disk by sha256 and the engine's compatibility hash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::adapters::LoadedPlugin;
use super::artifacts::load;
use super::engine::PluginEngine;
use super::switch::{self, AutoRollback};
use super::{PluginFault, PluginKind};
use crate::storage::{plugins, StorageError};

/// The plugins in force at one moment.
#[derive(Default)]
pub struct ActiveSet {
    pub retry_policy: Option<Arc<LoadedPlugin>>,
    /// In the configured order (`state_filter_order`, then by name).
    pub state_filters: Vec<Arc<LoadedPlugin>>,
    pub cleanup_hooks: HashMap<String, Arc<LoadedPlugin>>,
    /// Every loaded plugin by label, to reuse across reloads.
    by_label: HashMap<String, Arc<LoadedPlugin>>,
    /// Active versions this server could not load (not retried until another is activated).
    unloadable: HashSet<String>,
}

impl ActiveSet {
    pub fn is_empty(&self) -> bool {
        self.by_label.is_empty()
    }
}

pub struct PluginRegistry {
    pub engine: Arc<PluginEngine>,
    pool: PgPool,
    channel: String,
    cache_dir: PathBuf,
    active: ArcSwap<ActiveSet>,
    /// How each plugin's calls went on this server, by label.
    stats: Mutex<HashMap<String, PluginStats>>,
    /// After this many faults in a row, the previous version is reactivated.
    fault_limit: u32,
    /// Faults since start, for operators.
    pub total_faults: std::sync::atomic::AtomicU64,
    /// Serialises reloads.
    reloading: tokio::sync::Mutex<()>,
    /// Names of state filters in the order they run; the others follow by name.
    filter_order: Vec<String>,
}

/// How a plugin's calls went on this server.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PluginStats {
    pub calls: u64,
    pub faults: u64,
    pub consecutive_faults: u32,
    pub last_fault: Option<String>,
}

/// A plugin's label: slot, version and the start of its hash.
pub fn label(slot: &str, version: i32, sha256: &str) -> String {
    format!("{slot}@{version}#{}", &sha256[..sha256.len().min(8)])
}

impl PluginRegistry {
    pub fn new(
        engine: Arc<PluginEngine>,
        pool: PgPool,
        schema: &str,
        cache_dir: PathBuf,
        fault_limit: u32,
    ) -> Self {
        Self {
            engine,
            pool,
            channel: crate::storage::plugins_channel(schema),
            cache_dir,
            active: ArcSwap::from_pointee(ActiveSet::default()),
            stats: Mutex::new(HashMap::new()),
            fault_limit: fault_limit.max(1),
            total_faults: std::sync::atomic::AtomicU64::new(0),
            reloading: tokio::sync::Mutex::new(()),
            filter_order: Vec::new(),
        }
    }

    /// Runs the state filters named in `order` first, in that order.
    pub fn with_filter_order(mut self, order: Vec<String>) -> Self {
        self.filter_order = order;
        self
    }

    /// Where a filter's slot runs: its place in the configured order, then by name.
    fn filter_rank(&self, slot: &str) -> (usize, String) {
        let name = slot.strip_prefix("state-filter/").unwrap_or(slot);
        let place = self
            .filter_order
            .iter()
            .position(|n| n == name)
            .unwrap_or(usize::MAX);
        (place, name.to_owned())
    }

    /// Where compiled components are cached.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.cache_dir
    }

    /// How the calls of every plugin called on this server went, by label.
    pub fn stats(&self) -> BTreeMap<String, PluginStats> {
        self.stats
            .lock()
            .map(|stats| stats.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn snapshot(&self) -> Arc<ActiveSet> {
        self.active.load_full()
    }

    /// Fetches, compiles (or takes from the cache) and links a newly activated version; None
    /// (logged) when it cannot be loaded on this server.
    async fn load_new(
        &self,
        kind: PluginKind,
        label: &str,
        row: &plugins::ActivePlugin,
    ) -> Result<Option<Arc<LoadedPlugin>>, StorageError> {
        let Some(bytes) = plugins::bytes_of(&self.pool, &row.slot, row.version).await? else {
            return Ok(None);
        };
        let engine = Arc::clone(&self.engine);
        let cache_dir = self.cache_dir.clone();
        let (owned_label, sha256) = (label.to_owned(), row.sha256.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            load(engine, kind, owned_label, &sha256, &bytes, &cache_dir)
        })
        .await;
        Ok(match loaded {
            Ok(Ok(plugin)) => {
                tracing::info!(plugin = %label, "plugin loaded");
                // Activated (again): its record of faults in a row starts afresh.
                if let Ok(mut stats) = self.stats.lock() {
                    if let Some(entry) = stats.get_mut(label) {
                        entry.consecutive_faults = 0;
                    }
                }
                Some(Arc::new(plugin))
            }
            Ok(Err(error)) => {
                tracing::error!(plugin = %label, %error, "cannot load the active plugin; the built-in policy stands in");
                None
            }
            Err(error) => {
                tracing::error!(plugin = %label, %error, "plugin loader panicked");
                None
            }
        })
    }

    /// Loads the active versions from PostgreSQL and swaps them in.
    pub async fn reload(&self) -> Result<(), StorageError> {
        let _one_at_a_time = self.reloading.lock().await;
        let rows = plugins::all_active(&self.pool).await?;
        let current = self.snapshot();
        let mut next = ActiveSet::default();
        let mut filters = Vec::new();
        for row in rows {
            let Ok(kind) = PluginKind::of_slot(&row.slot) else {
                tracing::warn!(slot = %row.slot, "ignoring a plugin in an unknown slot");
                continue;
            };
            let label = label(&row.slot, row.version, &row.sha256);
            let plugin = match current.by_label.get(&label) {
                Some(loaded) => Arc::clone(loaded),
                None if current.unloadable.contains(&label) => {
                    next.unloadable.insert(label);
                    continue;
                }
                // A database error leaves the current set in force until the next reload.
                None => match self.load_new(kind, &label, &row).await? {
                    Some(plugin) => plugin,
                    None => {
                        next.unloadable.insert(label);
                        continue;
                    }
                },
            };
            next.by_label.insert(label, Arc::clone(&plugin));
            match kind {
                PluginKind::RetryPolicy => next.retry_policy = Some(plugin),
                PluginKind::StateFilter => filters.push((self.filter_rank(&row.slot), plugin)),
                PluginKind::CleanupHook => {
                    next.cleanup_hooks.insert(row.slot.clone(), plugin);
                }
            }
        }
        filters.sort_by(|a, b| a.0.cmp(&b.0));
        next.state_filters = filters.into_iter().map(|(_, plugin)| plugin).collect();
        self.active.store(Arc::new(next));
        Ok(())
    }

    /// Records how a call went; after `fault_limit` faults in a row the slot is rolled back.
    /// Only a sound answer (`decisive`: a decision, an election, a cleanup) ends a run of
    /// faults; a notification that went well does not vouch for the plugin's answers.
    pub fn record(&self, plugin: &LoadedPlugin, decisive: bool, fault: Option<&PluginFault>) {
        let Ok(mut stats) = self.stats.lock() else {
            return;
        };
        let entry = stats.entry(plugin.label.clone()).or_default();
        entry.calls += 1;
        let Some(fault) = fault else {
            if decisive {
                entry.consecutive_faults = 0;
            }
            return;
        };
        if !fault.is_the_plugins() {
            drop(stats);
            tracing::warn!(plugin = %plugin.label, fault = fault.class(), reason = %fault, "plugin could not be called; the built-in policy decided instead");
            return;
        }
        self.total_faults
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        entry.faults += 1;
        entry.consecutive_faults += 1;
        entry.last_fault = Some(fault.to_string());
        let count = entry.consecutive_faults;
        drop(stats);
        tracing::warn!(plugin = %plugin.label, fault = fault.class(), reason = %fault, consecutive = count, "plugin fault; the built-in policy decided instead");
        // Every `fault_limit` faults in a row, not once: a rollback that failed (the database
        // was away) is tried again, and so is one that another server's activation undid.
        if count % self.fault_limit == 0 {
            let pool = self.pool.clone();
            let channel = self.channel.clone();
            let label = plugin.label.clone();
            let reason = format!("{} consecutive faults, the last: {fault}", self.fault_limit);
            tokio::spawn(async move {
                match switch::rollback_faulty(&pool, &channel, &label, &reason).await {
                    Ok(AutoRollback::Restored(version)) => {
                        tracing::error!(plugin = %label, restored = version, %reason, "plugin rolled back automatically")
                    }
                    Ok(AutoRollback::TurnedOff) => {
                        tracing::error!(plugin = %label, %reason, "plugin turned off automatically (no earlier version); the built-in policy decides")
                    }
                    Ok(AutoRollback::AlreadyReplaced) => {}
                    Err(error) => {
                        tracing::error!(plugin = %label, %error, "automatic rollback failed")
                    }
                }
            });
        }
    }

    /// Reloads on every NOTIFY of the plugins channel, and every few seconds as a fallback.
    pub async fn run_listener(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let listen = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(&self.channel).await?;
                self.reload()
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), listener.recv()).await {
                        Ok(notification) => {
                            notification?;
                        }
                        Err(_elapsed) => {}
                    }
                    if let Err(error) = self.reload().await {
                        tracing::warn!(%error, "reloading plugins failed");
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = listen => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "plugin listener lost its connection; reconnecting");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

/// The registry a server with `config` uses, on the process's engine.
pub fn for_config(
    config: &crate::config::Config,
    pool: PgPool,
) -> Result<Arc<PluginRegistry>, super::engine::EngineError> {
    let engine = super::engine::process_engine(config.plugin_limits())?;
    Ok(Arc::new(
        PluginRegistry::new(
            engine,
            pool,
            &config.schema_name,
            config.plugin_cache_dir(),
            config.plugin_fault_limit,
        )
        .with_filter_order(config.state_filter_order.clone()),
    ))
}
