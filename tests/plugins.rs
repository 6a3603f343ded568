//! Policies as WASI components: the seed's retry schedule decided by a plugin, hot swaps under
//! load, a second server picking up an activation, rollback, and malicious components
//! contained while the host keeps serving.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hangar::executor::{HandlerRegistry, JobContext, JobHandler};
use hangar::plugins::adapters::{CleanupRun, LoadedPlugin};
use hangar::plugins::registry::PluginRegistry;
use hangar::plugins::sandbox::Preopen;
use hangar::plugins::{catalog, PluginError, PluginKind};
use hangar::server::{RunningServer, ServerParts};
use hangar::state::{JobError, NewJob};
use support::{plugin_wasm, wait_for, wait_for_state, TestDb};

const WAIT: Duration = Duration::from_secs(60);

/// Fails its first attempt, succeeds afterwards.
struct FailOnce;

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
struct AlwaysFail;

impl JobHandler for AlwaysFail {
    fn run<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async { Err(JobError::new("Broken", "this job always fails")) })
    }
}

fn handlers() -> HandlerRegistry {
    let mut handlers = HandlerRegistry::default();
    handlers.register("fail-once", FailOnce);
    handlers.register("always-fail", AlwaysFail);
    handlers
}

fn registry(db: &TestDb, config: &hangar::config::Config) -> Arc<PluginRegistry> {
    hangar::plugins::registry::for_config(config, db.pool.clone()).expect("plugin engine")
}

async fn server_with_plugins(
    db: &TestDb,
    config: hangar::config::Config,
    plugins: Arc<PluginRegistry>,
) -> RunningServer {
    let mut parts = ServerParts::new(Arc::new(config), db.pool.clone(), handlers());
    parts.plugins = Some(plugins);
    RunningServer::start(parts).await.expect("server")
}

async fn push(db: &TestDb, registry: &PluginRegistry, slot: &str, plugin: &str) -> i32 {
    let bytes = std::fs::read(plugin_wasm(plugin)).expect("component");
    catalog::push(&db.pool, &registry.engine, slot, bytes, "test")
        .await
        .expect("push")
        .version
}

/// Enqueues a job of `kind` with `parameters`, in one transaction (so no attempt can start
/// before the parameters are there).
async fn enqueue_with(db: &TestDb, kind: &str, parameters: &[(&str, &str)]) -> i64 {
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

async fn activate(db: &TestDb, slot: &str, version: i32) {
    catalog::activate(&db.pool, &db.config.schema_name, slot, version, "test")
        .await
        .expect("activate");
}

async fn wait_active(registry: &PluginRegistry, expected: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_retry_schedule_is_decided_by_the_wasm_plugin() {
    let db = TestDb::new().await;
    let plugins = registry(&db, &db.config);
    let version = push(&db, &plugins, "retry-policy", "retry-exponential").await;
    activate(&db, "retry-policy", version).await;
    let server = server_with_plugins(&db, db.config.clone(), Arc::clone(&plugins)).await;
    wait_active(&plugins, "retry-policy@1").await;

    // The seed's minutes, scaled: the plugin reads its unit from the job's parameters.
    let id = enqueue_with(&db, "always-fail", &[("retry.unit-ms", "40")]).await;
    wait_for_state(&db, id, "failed", WAIT).await;
    let details = db.job(id).await;
    let retries: Vec<_> = details
        .history
        .iter()
        .filter(|h| h.state == "scheduled")
        .collect();
    assert_eq!(retries.len(), 3, "{:#?}", details.history);
    for (n, entry) in retries.iter().enumerate() {
        let decided_by = entry.data["decided_by"].as_str().unwrap_or_default();
        assert!(
            decided_by.starts_with("plugin:retry-policy@1"),
            "{decided_by}"
        );
        assert_eq!(
            entry.data["delay_ms"],
            40 * (1 << n),
            "retry {} of {:#?}",
            n + 1,
            details.history
        );
    }
    let failed = details.history.last().expect("entry");
    assert_eq!(failed.state, "failed");
    assert!(failed.data["decided_by"]
        .as_str()
        .unwrap_or_default()
        .starts_with("plugin:retry-policy@1"));
    assert_eq!(
        plugins
            .total_faults
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_swap_under_load_with_every_decision_attributable() {
    let db = TestDb::new().await;
    let config = hangar::config::Config {
        worker_count: 32,
        ..db.config.clone()
    };
    let plugins = registry(&db, &config);
    let a = push(&db, &plugins, "retry-policy", "test-retry-a").await;
    let b = push(&db, &plugins, "retry-policy", "test-retry-b").await;
    activate(&db, "retry-policy", a).await;
    let servers = vec![
        server_with_plugins(&db, config.clone(), Arc::clone(&plugins)).await,
        server_with_plugins(
            &db,
            hangar::config::Config {
                server_name: "second".into(),
                ..config.clone()
            },
            registry(&db, &config),
        )
        .await,
    ];
    const JOBS: usize = 1500;
    let burst: Vec<NewJob> = (0..JOBS)
        .map(|_| NewJob::new("fail-once", "default"))
        .collect();
    let ids = db.client().enqueue_many(&burst).await.expect("enqueue");
    // Alternate the active version while the elections happen.
    let swapper = {
        let pool = db.pool.clone();
        let schema = db.config.schema_name.clone();
        tokio::spawn(async move {
            for round in 0..40 {
                let version = if round % 2 == 0 { b } else { a };
                catalog::activate(&pool, &schema, "retry-policy", version, "swapper")
                    .await
                    .expect("swap");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    wait_for("every job to succeed", Duration::from_secs(120), || async {
        let counts = hangar::storage::jobs::count_by_state(&db.pool)
            .await
            .expect("count");
        (counts == vec![("succeeded".to_owned(), JOBS as i64)]).then_some(())
    })
    .await;
    swapper.await.expect("swapper");
    let mut by_version = BTreeMap::new();
    for id in ids {
        let details = db.job(id).await;
        let retry = details
            .history
            .iter()
            .find(|h| h.state == "scheduled")
            .expect("a retry decision");
        let decided_by = retry.data["decided_by"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let delay = &retry.data["delay_ms"];
        let version = if decided_by.starts_with(&format!("plugin:retry-policy@{a}#")) {
            assert_eq!(delay, 1111, "version {a} decides 1111 ms");
            a
        } else if decided_by.starts_with(&format!("plugin:retry-policy@{b}#")) {
            assert_eq!(delay, 2222, "version {b} decides 2222 ms");
            b
        } else {
            panic!("job {id} was decided by {decided_by:?}");
        };
        *by_version.entry(version).or_insert(0) += 1;
    }
    assert_eq!(
        plugins
            .total_faults
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no failed call"
    );
    println!("decisions by version: {by_version:?}");
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_picks_up_an_activation_and_rollback_restores_the_previous_version() {
    let db = TestDb::new().await;
    let first = registry(&db, &db.config);
    let second = registry(&db, &db.config);
    let one = push(&db, &first, "retry-policy", "test-retry-a").await;
    let two = push(&db, &first, "retry-policy", "test-retry-b").await;
    let server_a = server_with_plugins(&db, db.config.clone(), Arc::clone(&first)).await;
    let server_b = server_with_plugins(&db, db.config.clone(), Arc::clone(&second)).await;
    activate(&db, "retry-policy", one).await;
    wait_active(&first, &format!("retry-policy@{one}#")).await;
    wait_active(&second, &format!("retry-policy@{one}#")).await;
    activate(&db, "retry-policy", two).await;
    wait_active(&second, &format!("retry-policy@{two}#")).await;
    let restored = catalog::rollback(&db.pool, &db.config.schema_name, "retry-policy", "test")
        .await
        .expect("rollback");
    assert_eq!(restored, one);
    wait_active(&first, &format!("retry-policy@{one}#")).await;
    wait_active(&second, &format!("retry-policy@{one}#")).await;
    let events = hangar::storage::plugins::events(&db.pool, "retry-policy")
        .await
        .expect("events");
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "uploaded",
            "uploaded",
            "activated",
            "activated",
            "rolled back"
        ]
    );
    server_a.shutdown().await;
    server_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_or_broken_uploads_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let plugins = registry(&db, &db.config);
    let engine = &plugins.engine;
    let refuse = |slot: &'static str, bytes: Vec<u8>| {
        let pool = db.pool.clone();
        let engine = Arc::clone(engine);
        async move {
            match catalog::push(&pool, &engine, slot, bytes, "attacker").await {
                Err(PluginError::Invalid(reason)) => reason,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    };
    let read = |name| std::fs::read(plugin_wasm(name)).expect("component");
    let reason = refuse("retry-policy", read("test-loop-forever")).await;
    assert!(reason.contains("time budget"), "{reason}");
    let reason = refuse("retry-policy", read("test-memory-bomb")).await;
    assert!(
        reason.contains("memory") || reason.contains("trapped"),
        "{reason}"
    );
    let reason = refuse("retry-policy", read("delete-failing-jobs")).await;
    assert!(
        reason.contains("does not implement"),
        "wrong world: {reason}"
    );
    let reason = refuse("state-filter/bad", read("test-bad-answer")).await;
    assert!(reason.contains("illegal"), "{reason}");
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let reason = refuse("retry-policy", random).await;
    assert!(reason.contains("not a WebAssembly component"), "{reason}");
    let reason = refuse("retry-policy", vec![0; catalog::MAX_PLUGIN_BYTES + 1]).await;
    assert!(reason.contains("at most"), "{reason}");
    let reason = refuse("no-such-slot", read("retry-exponential")).await;
    assert!(reason.contains("unknown slot"), "{reason}");
    assert!(
        hangar::storage::plugins::versions(&db.pool, None)
            .await
            .expect("versions")
            .is_empty(),
        "nothing was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_faults_at_run_time_is_overruled_and_then_rolled_back() {
    let db = TestDb::new().await;
    let config = hangar::config::Config {
        plugin_fault_limit: 2,
        ..db.config.clone()
    };
    let plugins = registry(&db, &config);
    let good = push(&db, &plugins, "retry-policy", "retry-exponential").await;
    activate(&db, "retry-policy", good).await;
    // The infinite loop never passes validation, so it is stored behind hangar's back (as a
    // plugin that only misbehaves on some inputs would be).
    let bomb = std::fs::read(plugin_wasm("test-loop-forever")).expect("component");
    let mut conn = db.pool.acquire().await.expect("conn");
    let bad =
        hangar::storage::plugins::insert(&mut conn, "retry-policy", "0badc0de", &bomb, "attacker")
            .await
            .expect("insert");
    drop(conn);
    activate(&db, "retry-policy", bad).await;
    let server = server_with_plugins(&db, config.clone(), Arc::clone(&plugins)).await;
    wait_active(&plugins, &format!("retry-policy@{bad}#")).await;

    let first = enqueue_with(&db, "fail-once", &[("retry.unit-ms", "20")]).await;
    let second = enqueue_with(&db, "fail-once", &[("retry.unit-ms", "20")]).await;
    // The built-in policy decides instead (1 unit = 50 ms in tests) and the jobs still succeed.
    wait_for_state(&db, first, "succeeded", WAIT).await;
    wait_for_state(&db, second, "succeeded", WAIT).await;
    let retry = db
        .job(first)
        .await
        .history
        .into_iter()
        .find(|h| h.state == "scheduled")
        .expect("retry");
    let decided_by = retry.data["decided_by"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        decided_by.starts_with("builtin:exponential (plugin retry-policy@2"),
        "{decided_by}"
    );
    assert!(decided_by.contains("time budget"), "{decided_by}");
    // Two faults in a row: the previous version is back, on every server.
    wait_active(&plugins, &format!("retry-policy@{good}#")).await;
    let events = hangar::storage::plugins::events(&db.pool, "retry-policy")
        .await
        .expect("events");
    let last = events.last().expect("event");
    assert_eq!(last.event, "rolled back automatically");
    assert!(last
        .reason
        .as_deref()
        .unwrap_or_default()
        .contains("time budget"));
    // And the host still serves: a new failing job is decided by the good plugin again.
    let third = enqueue_with(&db, "fail-once", &[("retry.unit-ms", "20")]).await;
    wait_for_state(&db, third, "succeeded", WAIT).await;
    let retry = db
        .job(third)
        .await
        .history
        .into_iter()
        .find(|h| h.state == "scheduled")
        .expect("retry");
    assert!(retry.data["decided_by"]
        .as_str()
        .unwrap_or_default()
        .starts_with(&format!("plugin:retry-policy@{good}#")));
    server.shutdown().await;
}

fn cleanup_plugin(db: &TestDb, name: &str) -> LoadedPlugin {
    let engine =
        hangar::plugins::engine::process_engine(db.config.plugin_limits()).expect("engine");
    let bytes = std::fs::read(plugin_wasm(name)).expect("component");
    let component = wasmtime::component::Component::new(&engine.engine, bytes).expect("compile");
    LoadedPlugin::link(engine, PluginKind::CleanupHook, name.into(), &component).expect("link")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_exactly_the_runs_files() {
    let db = TestDb::new().await;
    let root = db.dir.path().join("data");
    let run = "0190a1b2-0000-7000-8000-000000000001";
    let other = "0190a1b2-0000-7000-8000-000000000002";
    for id in [run, other] {
        std::fs::create_dir_all(root.join(format!("detections/{id}/vis"))).expect("dirs");
        std::fs::write(
            root.join(format!("detections/{id}/detection_bboxes.json")),
            "{}",
        )
        .expect("file");
        std::fs::write(root.join(format!("detections/{id}/vis/a.jpg")), "x").expect("file");
        std::fs::create_dir_all(root.join("logs")).expect("dir");
        std::fs::write(root.join(format!("logs/succ_{id}.txt")), "out").expect("file");
        std::fs::write(root.join(format!("logs/error_{id}.txt")), "err").expect("file");
        std::fs::create_dir_all(root.join("errors")).expect("dir");
        std::fs::write(root.join(format!("errors/{id}_errMsg.txt")), "boom").expect("file");
    }
    let plugin = cleanup_plugin(&db, "detection-cleanup");
    let cleanup = CleanupRun {
        id: run.into(),
        kind: "detection".into(),
        status: "Error".into(),
        files: vec![
            format!("errors/{run}_errMsg.txt"),
            format!("logs/succ_{run}.txt"),
            format!("logs/error_{run}.txt"),
            format!("detections/{run}"),
            "../outside".into(),
            "/etc/passwd".into(),
        ],
    };
    let preopen = Preopen {
        host: root.clone(),
        guest: ".".into(),
    };
    let report = tokio::task::spawn_blocking(move || plugin.cleanup(&cleanup, &[preopen]))
        .await
        .expect("thread")
        .expect("cleanup");
    assert_eq!(report.removed.len(), 4, "{report:?}");
    assert_eq!(
        report.failed.len(),
        2,
        "the escapes are refused: {report:?}"
    );
    assert!(!root.join(format!("detections/{run}")).exists());
    assert!(!root.join(format!("logs/succ_{run}.txt")).exists());
    assert!(!root.join(format!("errors/{run}_errMsg.txt")).exists());
    for path in [
        format!("detections/{other}/vis/a.jpg"),
        format!("logs/succ_{other}.txt"),
        format!("logs/error_{other}.txt"),
        format!("errors/{other}_errMsg.txt"),
    ] {
        assert!(root.join(&path).exists(), "{path} belongs to another run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_hook_cannot_reach_outside_its_directories() {
    let db = TestDb::new().await;
    let outside = db.dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("dir");
    std::fs::write(outside.join("victim.txt"), "keep me").expect("file");
    std::fs::write(db.dir.path().join("outside.txt"), "keep me too").expect("file");
    let run_dir = db.dir.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("dir");
    std::os::unix::fs::symlink(&outside, run_dir.join("link")).expect("symlink");
    let plugin = cleanup_plugin(&db, "test-escape-fs");
    let run = CleanupRun {
        id: "x".into(),
        kind: "detection".into(),
        status: "Success".into(),
        files: vec!["link".into()],
    };
    let preopen = Preopen {
        host: run_dir.clone(),
        guest: ".".into(),
    };
    let report = tokio::task::spawn_blocking(move || plugin.cleanup(&run, &[preopen]))
        .await
        .expect("thread");
    println!("escape attempt: {report:?}");
    assert_eq!(
        std::fs::read_to_string(outside.join("victim.txt")).expect("victim"),
        "keep me"
    );
    assert_eq!(
        std::fs::read_to_string(db.dir.path().join("outside.txt")).expect("outside"),
        "keep me too"
    );
}
