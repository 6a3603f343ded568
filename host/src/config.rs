//! Server configuration: defaults, then a TOML file, then `HANGAR_*` environment variables.
//!
//! Names and meanings follow Hangfire's options where one exists (`queue_poll_interval`,
//! `transaction_timeout`, `schema_name`, `prepare_schema_if_necessary`, `worker_count`, `queues`,
//! `server_name`); durations are written the human way (`"15s"`, `"2m"`, `"250ms"`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

/// `HANGAR_*` variables that are not settings (read elsewhere, or set for subprocesses).
const NOT_SETTINGS: [&str; 12] = [
    "LOG",
    "LOG_FORMAT",
    "CONFIG",
    "CACHE",
    "PYTHON",
    "MMDET_VENV_LINK",
    "URL",
    "TOKEN",
    "JOB_ID",
    "JOB_ATTEMPT",
    "RUN_ID",
    "DEVICE",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL to use. None (the default) starts hangar's own embedded cluster under
    /// `data_dir/pg`. Also read from the plain `DATABASE_URL` variable.
    pub database_url: Option<String>,
    /// Where hangar keeps its embedded database, logs and run outputs. Default `.hangar`.
    pub data_dir: PathBuf,
    /// PostgreSQL schema holding every hangar table. Default `hangar`.
    pub schema_name: String,
    /// Apply pending migrations on start. When off and the schema is behind, hangar refuses to
    /// start and says to run `hangar migrate`. Default true.
    pub prepare_schema_if_necessary: bool,
    /// Fallback poll of the queues; LISTEN/NOTIFY wakes the producer first. Default 15s.
    #[serde(with = "humantime_serde")]
    pub queue_poll_interval: Duration,
    /// Longest a statement or an idle transaction may take. Default 1m.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Concurrent jobs per server. Default 2 × CPUs.
    pub worker_count: usize,
    /// Queues this server serves, highest priority first. Default `["detection", "default"]`.
    pub queues: Vec<String>,
    /// Queues whose jobs need a device slot (a GPU, or one of `cpu_run_slots` without GPUs);
    /// they are fetched only while a slot is free. Default `["detection"]`.
    pub device_queues: Vec<String>,
    /// Human name of this server; its id adds a per-boot nonce. Default: the host name.
    pub server_name: String,
    /// How long a fetched job belongs to this server without a heartbeat. Default 30s.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often the heartbeat renews the leases of running jobs. Default 5s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// On SIGINT/SIGTERM, how long running jobs may drain before they are stopped and released.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace_period: Duration,
    /// Between SIGTERM and SIGKILL when a subprocess is stopped. Default 10s.
    #[serde(with = "humantime_serde")]
    pub kill_grace_period: Duration,
    /// Timeout of a job that sets none. Default none.
    #[serde(with = "humantime_serde")]
    pub default_job_timeout: Option<Duration>,
    /// Built-in retry policy: how many retries before Failed. Default 3 (the seed's).
    pub max_retries: u32,
    /// Built-in retry policy: the n-th retry waits 2^(n-1) × this unit. Default 1m (the seed's
    /// 1, 2, 4 minutes); tests scale it down.
    #[serde(with = "humantime_serde")]
    pub retry_unit: Duration,
    /// GPU indices this server may use. None (default) detects them with `nvidia-smi -L`.
    pub gpus: Option<Vec<u32>>,
    /// Concurrent runs on CPU when the server has no GPU. Default 1 (the seed ran one at a time).
    pub cpu_run_slots: usize,
    /// Address of the HTTP API. Default `127.0.0.1:8080`.
    pub http_listen: String,
    /// Python of the MMDetection venv. Default `data_dir/mmdet-venv/bin/python`.
    pub mmdet_python: Option<PathBuf>,
    /// hangar's Python drivers. Default: `python/hangar_mmdet` of this source tree.
    pub drivers_dir: Option<PathBuf>,
    /// How often the leader moves due scheduled jobs to their queue. Default 1s.
    #[serde(with = "humantime_serde")]
    pub scheduler_interval: Duration,
    /// How often the leader rescues jobs whose owner's lease expired. Default 5s.
    #[serde(with = "humantime_serde")]
    pub rescuer_interval: Duration,
    /// How often the leader reconciles runs stuck in Processing. Default 30s.
    #[serde(with = "humantime_serde")]
    pub run_reconcile_interval: Duration,
    /// How long finished jobs are kept. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// Load policy plugins (WASI components) from the database. Default true.
    pub plugins_enabled: bool,
    /// Wall time one plugin call may take before it is interrupted. Default 10ms.
    #[serde(with = "humantime_serde")]
    pub plugin_time_budget: Duration,
    /// Wall time one cleanup-hook call may take (it removes files). Default 60s.
    #[serde(with = "humantime_serde")]
    pub plugin_cleanup_time_budget: Duration,
    /// Memory one plugin call may use, in bytes. Default 16 MiB.
    pub plugin_memory_limit: usize,
    /// Faults in a row after which a plugin's previous version is reactivated. Default 5.
    pub plugin_fault_limit: u32,
    /// Reset a finished call's written memory pages in place and keep them mapped for the next
    /// call, where that is available (Linux 6.7+, no swap): decisions take about half the
    /// time. Default true. Turn it off where no call may ever see another's memory: wasmtime
    /// 48 misses a written page that the kernel is migrating at the moment of the reset
    /// (compaction), which the next call in that slot could then read (wasmtime PR #14357).
    pub plugin_memory_reset_in_place: bool,
    /// The order in which state filters run, by name (`state-filter/<name>` → `<name>`);
    /// active filters not named here run after these, by name. Default empty.
    pub state_filter_order: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            database_url: None,
            data_dir: PathBuf::from(".hangar"),
            schema_name: "hangar".into(),
            prepare_schema_if_necessary: true,
            queue_poll_interval: Duration::from_secs(15),
            transaction_timeout: Duration::from_secs(60),
            worker_count: 2 * cpus,
            queues: vec!["detection".into(), "default".into()],
            device_queues: vec!["detection".into()],
            server_name: hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "hangar".into()),
            lease_duration: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            shutdown_grace_period: Duration::from_secs(30),
            kill_grace_period: Duration::from_secs(10),
            default_job_timeout: None,
            max_retries: 3,
            retry_unit: Duration::from_secs(60),
            gpus: None,
            cpu_run_slots: 1,
            http_listen: "127.0.0.1:8080".into(),
            mmdet_python: None,
            drivers_dir: None,
            scheduler_interval: Duration::from_secs(1),
            rescuer_interval: Duration::from_secs(5),
            run_reconcile_interval: Duration::from_secs(30),
            job_retention: Duration::from_secs(7 * 24 * 3600),
            plugins_enabled: true,
            plugin_time_budget: Duration::from_millis(10),
            plugin_cleanup_time_budget: Duration::from_secs(60),
            plugin_memory_limit: 16 << 20,
            plugin_fault_limit: 5,
            plugin_memory_reset_in_place: true,
            state_filter_order: Vec::new(),
        }
    }
}

impl Config {
    /// Defaults, then `file` (when given, it must exist), then `HANGAR_*` variables (e.g.
    /// `HANGAR_WORKER_COUNT=4`, `HANGAR_QUEUES='["gpu"]'`) and `DATABASE_URL`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid {
                    field: "config file",
                    problem: format!("{} does not exist", file.display()),
                });
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment
            .merge(Env::prefixed("HANGAR_").ignore(&NOT_SETTINGS))
            .merge(Env::raw().only(&["DATABASE_URL"]));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that keep jobs safe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if self.worker_count == 0 {
            return invalid("worker_count", "must be at least 1".into());
        }
        if self.queues.is_empty() {
            return invalid("queues", "must name at least one queue".into());
        }
        if !valid_identifier(&self.schema_name) {
            return invalid(
                "schema_name",
                format!(
                    "{:?} is not a plain identifier (letters, digits, _; not starting with a digit)",
                    self.schema_name
                ),
            );
        }
        // The owner must be able to stop its subprocess (SIGTERM, grace, SIGKILL) after two
        // missed heartbeats and still before its lease runs out.
        let needed = 2 * self.heartbeat_interval + self.kill_grace_period;
        if self.lease_duration <= needed {
            return invalid(
                "lease_duration",
                format!(
                    "{} must exceed 2 × heartbeat_interval + kill_grace_period = {}",
                    humantime::format_duration(self.lease_duration),
                    humantime::format_duration(needed)
                ),
            );
        }
        for (field, budget) in [
            ("plugin_time_budget", self.plugin_time_budget),
            (
                "plugin_cleanup_time_budget",
                self.plugin_cleanup_time_budget,
            ),
        ] {
            if budget < Duration::from_millis(1) {
                return invalid(field, "must be at least 1ms".into());
            }
        }
        // A Rust guest starts with a little over 1 MiB of linear memory (its stack first).
        if !(2 << 20..=1 << 32).contains(&self.plugin_memory_limit) {
            return invalid(
                "plugin_memory_limit",
                format!(
                    "{} bytes is not between 2 MiB (a Rust plugin needs a little over 1 MiB to \
                     start) and 4 GiB",
                    self.plugin_memory_limit
                ),
            );
        }
        if self.plugin_fault_limit == 0 {
            return invalid("plugin_fault_limit", "must be at least 1".into());
        }
        Ok(())
    }

    /// The limits of plugin calls; the pooling allocator is sized to the workers.
    pub fn plugin_limits(&self) -> crate::plugins::engine::CallLimits {
        crate::plugins::engine::CallLimits {
            time_budget: self.plugin_time_budget,
            cleanup_time_budget: self.plugin_cleanup_time_budget,
            memory_bytes: self.plugin_memory_limit,
            reset_in_place: self.plugin_memory_reset_in_place,
            // Elections run a batch at a time, but uploads, notifications and cleanups come
            // on top: room beyond the workers.
            concurrent_calls: u32::try_from((self.worker_count + 16).clamp(32, 512)).unwrap_or(512),
        }
    }

    /// Compiled plugin components, by sha256 and the engine's compatibility hash.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.data_dir.join("plugin-cache")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    pub fn mmdet_python(&self) -> PathBuf {
        self.mmdet_python
            .clone()
            .unwrap_or_else(|| self.data_dir.join("mmdet-venv/bin/python"))
    }

    pub fn drivers_dir(&self) -> PathBuf {
        self.drivers_dir.clone().unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../python/hangar_mmdet"
            ))
        })
    }
}

/// A schema name that is safe to splice into DDL without quoting surprises.
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn lease_shorter_than_kill_path_is_refused() {
        let config = Config {
            lease_duration: Duration::from_secs(5),
            ..Config::default()
        };
        let error = config.validate().expect_err("must refuse");
        assert!(error.to_string().contains("lease_duration"), "{error}");
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(valid_identifier("hangar_2"));
        assert!(!valid_identifier("2hangar"));
        assert!(!valid_identifier("a\"; drop"));
    }
}
