//! Plugins in tests: the components of `plugins/` (built once per test binary), a registry per
//! server, uploads and activations, and handlers that fail on purpose.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use hangar::executor::{HandlerRegistry, JobContext, JobHandler};
use hangar::plugins::registry::PluginRegistry;
use hangar::plugins::{catalog, switch};
use hangar::server::{RunningServer, ServerParts};
use hangar::state::{JobError, NewJob};

use super::{wait_for, TestDb};

/// Fails its first attempt, succeeds afterwards.
pub struct FailOnce;

impl JobHandler for FailOnce {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            if ctx.job.attempt == 1 {
                Err(JobError::new("FirstTry", "the first attempt always fails"))
            } else {
                Ok(())
            }
        })
    }
}

/// Always fails.
pub struct AlwaysFail;

impl JobHandler for AlwaysFail {
    fn run<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async { Err(JobError::new("Broken", "this job always fails")) })
    }
}

/// Fails as a run on a full GPU does.
pub struct CudaOutOfMemory;

impl JobHandler for CudaOutOfMemory {
    fn run<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async {
            Err(JobError::new("SubprocessFailed", "exit status 1")
                .with_details("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"))
        })
    }
}

pub fn handlers() -> HandlerRegistry {
    let mut handlers = HandlerRegistry::default();
    handlers.register("fail-once", FailOnce);
    handlers.register("always-fail", AlwaysFail);
    handlers.register("cuda-oom", CudaOutOfMemory);
    handlers
}

pub fn registry(db: &TestDb, config: &hangar::config::Config) -> Arc<PluginRegistry> {
    hangar::plugins::registry::for_config(config, db.pool.clone()).expect("plugin engine")
}

pub async fn server_with_plugins(
    db: &TestDb,
    config: hangar::config::Config,
    plugins: Arc<PluginRegistry>,
) -> RunningServer {
    let mut parts = ServerParts::new(Arc::new(config), db.pool.clone(), handlers());
    parts.plugins = Some(plugins);
    RunningServer::start(parts).await.expect("server")
}

pub async fn push(db: &TestDb, registry: &PluginRegistry, slot: &str, plugin: &str) -> i32 {
    let bytes = std::fs::read(plugin_wasm(plugin)).expect("component");
    catalog::push(
        &db.pool,
        &registry.engine,
        registry.cache_dir(),
        slot,
        bytes,
        "test",
    )
    .await
    .expect("push")
    .version
}

/// Stores a component as the next version of `slot` without validation (as a plugin that only
/// misbehaves on some inputs would get through it); returns the version.
pub async fn store_unvalidated(db: &TestDb, slot: &str, plugin: &str) -> i32 {
    let bytes = std::fs::read(plugin_wasm(plugin)).expect("component");
    let sha256 = format!("unvalidated-{plugin}");
    let mut conn = db.pool.acquire().await.expect("conn");
    hangar::storage::plugins::insert(&mut conn, slot, &sha256, &bytes, "attacker")
        .await
        .expect("insert")
}

/// Enqueues a job of `kind` with `parameters`, in one transaction (so no attempt can start
/// before the parameters are there).
pub async fn enqueue_with(db: &TestDb, kind: &str, parameters: &[(&str, &str)]) -> i64 {
    let client = db.client();
    let mut tx = db.pool.begin().await.expect("begin");
    let id = client
        .enqueue_in(&mut tx, &NewJob::new(kind, "default"))
        .await
        .expect("enqueue");
    for (name, value) in parameters {
        client
            .set_parameter_in(&mut tx, id, name, value)
            .await
            .expect("parameter");
    }
    tx.commit().await.expect("commit");
    id
}

pub async fn activate(db: &TestDb, slot: &str, version: i32) {
    switch::activate(&db.pool, &db.config.schema_name, slot, version, "test")
        .await
        .expect("activate");
}

pub async fn wait_active(registry: &PluginRegistry, expected: &str) {
    wait_for(
        &format!("{expected} to be active"),
        Duration::from_secs(5),
        || async {
            let snapshot = registry.snapshot();
            let label = snapshot.retry_policy.as_ref().map(|p| p.label.clone());
            label.is_some_and(|l| l.starts_with(expected)).then_some(())
        },
    )
    .await;
}

static PLUGINS_BUILT: OnceLock<PathBuf> = OnceLock::new();

/// The path of a plugin component, building the `plugins/` workspace (once per test binary)
/// for `wasm32-wasip2`.
pub fn plugin_wasm(crate_name: &str) -> PathBuf {
    let dir = PLUGINS_BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        build_for_wasi(&root);
        root.join("target/wasm32-wasip2/release")
    });
    dir.join(component_file(crate_name))
}

/// Builds a standalone cargo project (an example) for `wasm32-wasip2` and returns its component.
pub fn build_component(manifest_dir: &Path, crate_name: &str) -> PathBuf {
    build_for_wasi(manifest_dir);
    manifest_dir
        .join("target/wasm32-wasip2/release")
        .join(component_file(crate_name))
}

fn component_file(crate_name: &str) -> String {
    format!("{}.wasm", crate_name.replace('-', "_"))
}

fn build_for_wasi(manifest_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(manifest_dir.join("Cargo.toml"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building {} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)",
        manifest_dir.display()
    );
}
