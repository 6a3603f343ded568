//! Test harness: one throwaway PostgreSQL cluster per test binary (hangar's own embedded
//! cluster code), a fresh schema per test so tests run in parallel, servers in-process or as
//! real `hangar` subprocesses, and waits on state — never on fixed sleeps.
#![allow(dead_code)]

pub mod http;
pub mod plugins;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hangar::config::Config;
use hangar::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use hangar::executor::HandlerRegistry;
use hangar::server::{RunningServer, ServerParts};
use hangar::storage;
use sqlx::PgPool;

struct Cluster {
    url: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
/// The cluster's data directory and socket directory, removed when the test process exits.
static CLUSTER_DIRS: OnceLock<[PathBuf; 2]> = OnceLock::new();

extern "C" fn remove_cluster_dir() {
    for dir in CLUSTER_DIRS.get().into_iter().flatten() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("hangar-test-pg-")
            .tempdir()
            .expect("create a temporary directory")
            .keep();
        let options = EmbeddedOptions {
            data_dir: dir.clone(),
            throwaway: true,
            max_connections: 500,
        };
        let server = EmbeddedPostgres::start(&options).expect("start the test PostgreSQL cluster");
        let url = server.url("postgres");
        let socket_dir = server.socket_dir().to_owned();
        // The cluster lives as long as the test process: its keeper thread is the postmaster's
        // parent, and PR_SET_PDEATHSIG stops it when the process exits.
        std::mem::forget(server);
        let _ = CLUSTER_DIRS.set([dir, socket_dir]);
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(remove_cluster_dir);
        }
        Cluster { url }
    })
}

/// Settings scaled for tests: short leases and heartbeats, retries in tens of milliseconds.
pub fn test_config(schema: &str, data_dir: &Path) -> Config {
    Config {
        database_url: Some(cluster().url.clone()),
        data_dir: data_dir.to_owned(),
        schema_name: schema.to_owned(),
        worker_count: 4,
        queues: vec!["default".into()],
        device_queues: vec![],
        server_name: "test".into(),
        queue_poll_interval: Duration::from_secs(1),
        lease_duration: Duration::from_millis(2500),
        heartbeat_interval: Duration::from_millis(200),
        kill_grace_period: Duration::from_millis(500),
        shutdown_grace_period: Duration::from_secs(5),
        retry_unit: Duration::from_millis(50),
        scheduler_interval: Duration::from_millis(50),
        rescuer_interval: Duration::from_millis(100),
        run_reconcile_interval: Duration::from_millis(200),
        gpus: Some(vec![]),
        mmdet_python: None,
        // Generous, so that a busy machine (parallel tests) never makes a sound plugin call
        // run out of wall time; the hostile guests still hit it.
        plugin_time_budget: Duration::from_millis(500),
        ..Config::default()
    }
}

/// A schema of its own on the shared test cluster.
pub struct TestDb {
    pub pool: PgPool,
    pub config: Config,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let url = tokio::task::spawn_blocking(|| cluster().url.clone())
            .await
            .expect("cluster thread");
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = test_config(&schema, dir.path());
        let pool = storage::connect(&url, &config, 50).await.expect("connect");
        storage::migrate(&pool, &schema).await.expect("migrate");
        TestDb {
            pool,
            config,
            url,
            dir,
        }
    }

    pub fn client(&self) -> hangar::client::Client {
        hangar::client::Client::new(self.pool.clone(), &self.config.schema_name)
    }

    /// An in-process server with `handlers` and `config`.
    pub async fn server(&self, config: Config, handlers: HandlerRegistry) -> RunningServer {
        let pool = storage::connect(
            &self.url,
            &config,
            u32::try_from(config.worker_count).unwrap_or(50) + 10,
        )
        .await
        .expect("connect");
        RunningServer::start(ServerParts::new(Arc::new(config), pool, handlers))
            .await
            .expect("start server")
    }

    pub async fn job(&self, id: i64) -> hangar::client::JobDetails {
        self.client()
            .details(id)
            .await
            .expect("details")
            .expect("job exists")
    }

    pub async fn state(&self, id: i64) -> String {
        self.job(id).await.job.state
    }
}

/// Polls `check` until it returns Some, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the schema holds exactly `jobs` jobs, all succeeded.
pub async fn wait_all_succeeded(db: &TestDb, jobs: usize) {
    let expected = vec![(
        "succeeded".to_owned(),
        i64::try_from(jobs).unwrap_or(i64::MAX),
    )];
    wait_for("every job to succeed", Duration::from_secs(120), || async {
        let counts = storage::jobs::count_by_state(&db.pool)
            .await
            .expect("count");
        (counts == expected).then_some(())
    })
    .await;
}

/// Waits until job `id` is in `state`.
pub async fn wait_for_state(db: &TestDb, id: i64, state: &str, timeout: Duration) {
    wait_for(&format!("job {id} to be {state}"), timeout, || async {
        (db.state(id).await == state).then_some(())
    })
    .await;
}

/// A `hangar serve --no-http` subprocess on a test schema.
pub struct ServerProcess {
    pub child: std::process::Child,
}

impl ServerProcess {
    pub fn spawn(config: &Config, extra_env: &[(&str, &str)]) -> ServerProcess {
        let human = |d: Duration| format!("{}ms", d.as_millis());
        let queues = serde_json::to_string(&config.queues).expect("queues");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"));
        command
            .args(["serve", "--no-http"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", config.database_url.as_deref().expect("url"))
            .env("HANGAR_SCHEMA_NAME", &config.schema_name)
            .env("HANGAR_DATA_DIR", &config.data_dir)
            .env("HANGAR_SERVER_NAME", &config.server_name)
            .env("HANGAR_WORKER_COUNT", config.worker_count.to_string())
            .env("HANGAR_QUEUES", queues)
            .env("HANGAR_DEVICE_QUEUES", "[]")
            .env("HANGAR_GPUS", "[]")
            .env("HANGAR_LEASE_DURATION", human(config.lease_duration))
            .env(
                "HANGAR_HEARTBEAT_INTERVAL",
                human(config.heartbeat_interval),
            )
            .env("HANGAR_KILL_GRACE_PERIOD", human(config.kill_grace_period))
            .env(
                "HANGAR_SHUTDOWN_GRACE_PERIOD",
                human(config.shutdown_grace_period),
            )
            .env("HANGAR_RETRY_UNIT", human(config.retry_unit))
            .env(
                "HANGAR_SCHEDULER_INTERVAL",
                human(config.scheduler_interval),
            )
            .env("HANGAR_RESCUER_INTERVAL", human(config.rescuer_interval))
            .env(
                "HANGAR_QUEUE_POLL_INTERVAL",
                human(config.queue_poll_interval),
            )
            .env("HANGAR_LOG", "info,sqlx=warn");
        for (key, value) in extra_env {
            command.env(key, value);
        }
        // The server's log goes next to the test's files, not into the test output.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.data_dir.join("server.log"))
            .expect("server log");
        command.stderr(log);
        let child = command.spawn().expect("spawn hangar serve");
        ServerProcess { child }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a process with this pid is alive (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3 is the state; Z = zombie, X = dead.
    match status.rsplit_once(") ") {
        Some((_, rest)) => !rest.starts_with('Z') && !rest.starts_with('X'),
        None => false,
    }
}

/// A `command` job running `sh -c script`.
pub fn shell_job(queue: &str, script: &str) -> hangar::state::NewJob {
    hangar::state::NewJob::new("command", queue).with_args(serde_json::json!({
        "program": "sh",
        "args": ["-c", script],
    }))
}

/// The standard handlers of a test server.
pub fn command_handlers() -> HandlerRegistry {
    let mut handlers = HandlerRegistry::default();
    handlers.register("command", hangar::executor::command::CommandHandler);
    handlers.register("noop", hangar::executor::NoopHandler);
    handlers
}
