//! The sandbox of plugin calls: malicious or broken uploads are refused with a reason (an
//! infinite loop, a memory bomb, the wrong world, an illegal answer, random bytes) while the
//! host keeps serving; a cleanup hook removes exactly a run's files and cannot reach outside
//! its preopened directory, through `..` or a symbolic link; and no call sees what an earlier
//! one left in a pool slot.

mod support;

use std::sync::Arc;

use hangar::plugins::adapters::{CleanupRun, LoadedPlugin};
use hangar::plugins::engine::{CallLimits, PluginEngine};
use hangar::plugins::sandbox::Preopen;
use hangar::plugins::{catalog, PluginError, PluginKind};
use hangar::runs::cleanup::clean_run;
use hangar::runs::files::RunFiles;
use support::plugins::plugin_wasm;
use support::plugins::{push, registry};
use support::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_or_broken_uploads_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let plugins = registry(&db, &db.config);
    let refuse_on = |engine: Arc<PluginEngine>, slot: &'static str, bytes: Vec<u8>| {
        let pool = db.pool.clone();
        let cache = plugins.cache_dir().to_owned();
        async move {
            match catalog::push(&pool, &engine, &cache, slot, bytes, "attacker").await {
                Err(PluginError::Invalid(reason)) => reason,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    };
    let refuse = |slot, bytes| refuse_on(Arc::clone(&plugins.engine), slot, bytes);
    let read = |name| std::fs::read(plugin_wasm(name)).expect("component");
    let reason = refuse("retry-policy", read("test-loop-forever")).await;
    assert!(reason.contains("time budget"), "{reason}");
    // On an engine whose time budget is generous, so that only the memory cap can stop it
    // (on a busy machine 10 ms of wall time may run out first).
    let patient = PluginEngine::new(CallLimits {
        time_budget: std::time::Duration::from_secs(30),
        ..CallLimits::default()
    })
    .expect("engine");
    let reason = refuse_on(Arc::new(patient), "retry-policy", read("test-memory-bomb")).await;
    assert!(reason.contains("ran out of memory"), "{reason}");
    // A component built against an older contract: the message says what to do.
    let old = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/retry-exponential-policy-0.1.0.wasm"),
    )
    .expect("fixture");
    let reason = refuse("retry-policy", old).await;
    assert!(
        reason.contains("built against hangar:policy@0.1.0") && reason.contains("rebuild"),
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
    // The host still serves: a good component passes on the same engine, and decides.
    let version = push(&db, &plugins, "retry-policy", "retry-exponential").await;
    assert_eq!(version, 1);
    let bytes = std::fs::read(plugin_wasm("retry-exponential")).expect("component");
    let component =
        wasmtime::component::Component::new(&plugins.engine.engine, bytes).expect("compile");
    let good = LoadedPlugin::link(
        Arc::clone(&plugins.engine),
        PluginKind::RetryPolicy,
        "good".into(),
        &component,
    )
    .expect("link");
    let parameters = std::collections::BTreeMap::new();
    let job = hangar::plugins::adapters::PolicyJob {
        id: 1,
        kind: "k",
        queue: "default",
        attempt: 1,
        failures: 1,
        parameters: &parameters,
    };
    let decision = good
        .decide(&job, &hangar::state::JobError::new("E", "boom"))
        .expect("decision");
    assert_eq!(
        decision,
        hangar::election::RetryDecision::RetryAfter(std::time::Duration::from_secs(60))
    );
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
    let report = report.expect("the hook answers");
    // What may succeed stays inside the preopened directory: listing the guest's own root
    // (the preopen), planting a link there, removing the link itself.
    for attempt in &report.removed {
        assert!(
            ["read_dir /", "symlink escape-parent", "remove_dir_all link"]
                .contains(&attempt.as_str()),
            "{attempt} should have been refused: {report:?}"
        );
    }
    for refused in [
        "remove_file ../outside.txt",
        "create ../escaped.txt",
        "read_dir link",
        "remove_dir_all link/",
    ] {
        assert!(
            report.failed.iter().any(|(attempt, _)| attempt == refused),
            "{refused} was attempted and refused: {report:?}"
        );
    }
    assert!(!db.dir.path().join("escaped.txt").exists());
    assert!(!outside.join("created-by-plugin.txt").exists());
    assert!(outside.is_dir(), "the link's target is still there");
    assert_eq!(
        std::fs::read_to_string(outside.join("victim.txt")).expect("victim"),
        "keep me"
    );
    assert_eq!(
        std::fs::read_to_string(db.dir.path().join("outside.txt")).expect("outside"),
        "keep me too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_by_a_hook_never_lead_hangar_outside_the_run() {
    let db = TestDb::new().await;
    let data = db.dir.path().join("data");
    let victim = db.dir.path().join("victim");
    let hook = Arc::new(cleanup_plugin(&db, "test-plant-links"));
    // Error: the hook traps and hangar removes what is staged; Success: the hook says it
    // left everything, and hangar moves back what is staged.
    for status in ["Error", "Success"] {
        let run = uuid::Uuid::now_v7();
        let mut own = vec![
            format!("logs/succ_{run}.txt"),
            format!("logs/error_{run}.txt"),
            format!("detections/{run}/detection_bboxes.json"),
        ];
        if status == "Error" {
            own.push(format!("errors/{run}_errMsg.txt"));
        }
        // Outside: files named as hangar will look for them through the planted links.
        let bait = [
            format!("succ_{run}.txt"),
            format!("error_{run}.txt"),
            format!("{run}_errMsg.txt"),
            format!("{run}/important.txt"),
        ];
        for (dir, files) in [(&data, &own[..]), (&victim, &bait[..])] {
            for file in files {
                let path = dir.join(file);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
                std::fs::write(&path, "mine").expect("file");
            }
        }
        let files = RunFiles::at(data.clone());
        let used = Arc::clone(&hook);
        let outcome = tokio::task::spawn_blocking(move || {
            clean_run(&files, Some(&used), "detection", run, status)
        })
        .await
        .expect("thread");
        assert_eq!(outcome.fault.is_some(), status == "Error", "{outcome:?}");
        for file in &bait {
            assert_eq!(
                std::fs::read_to_string(victim.join(file)).ok().as_deref(),
                Some("mine"),
                "{status}: {file} outside the data directory is untouched ({outcome:?})"
            );
        }
        for file in &own {
            assert!(
                data.join(file).symlink_metadata().is_err(),
                "{status}: {file} was removed by the hook and nothing took its place"
            );
        }
        assert!(
            !data.join("cleanup").join(run.to_string()).exists(),
            "{status}: no staging (and no planted link) is left"
        );
    }
}

/// `crate_name`'s component as a retry policy on an engine of its own with `limits`; the time
/// budget is generous, since these tests are about memory and the pool, not the clock (many
/// threads share 2 cores here).
fn retry_policy_on(limits: CallLimits, crate_name: &str) -> Arc<LoadedPlugin> {
    let engine = Arc::new(
        PluginEngine::new(CallLimits {
            time_budget: std::time::Duration::from_secs(30),
            ..limits
        })
        .expect("engine"),
    );
    let bytes = std::fs::read(plugin_wasm(crate_name)).expect("component");
    let component = wasmtime::component::Component::new(&engine.engine, bytes).expect("compile");
    Arc::new(
        LoadedPlugin::link(
            Arc::clone(&engine),
            PluginKind::RetryPolicy,
            crate_name.into(),
            &component,
        )
        .expect("link"),
    )
}

type Decided = Result<hangar::election::RetryDecision, hangar::plugins::PluginFault>;

/// `calls` decisions about a first failure on each of `threads` threads at once.
fn decide_from_threads(plugin: &Arc<LoadedPlugin>, threads: i64, calls: usize) -> Vec<Decided> {
    let callers: Vec<_> = (0..threads)
        .map(|n| {
            let plugin = Arc::clone(plugin);
            std::thread::spawn(move || {
                let parameters = std::collections::BTreeMap::new();
                let job = hangar::plugins::adapters::PolicyJob {
                    id: n,
                    kind: "k",
                    queue: "default",
                    attempt: 1,
                    failures: 1,
                    parameters: &parameters,
                };
                let error = hangar::state::JobError::new("E", "boom");
                (0..calls)
                    .map(|_| plugin.decide(&job, &error))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    callers
        .into_iter()
        .flat_map(|caller| caller.join().expect("caller"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_calls_at_once_than_the_pool_holds_wait_instead_of_failing() {
    let limits = CallLimits {
        concurrent_calls: 4,
        ..CallLimits::default()
    };
    let plugin = retry_policy_on(limits, "test-retry-a");
    let faults: Vec<_> = decide_from_threads(&plugin, 16, 200)
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        faults.is_empty(),
        "16 threads on 4 slots: every call waits its turn, yet {faults:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_starts_from_a_fresh_instance_however_often_its_slot_is_reused() {
    // A small pool, so that each slot serves many calls; the guest counts its calls in its
    // memory image and marks 512 KiB of zeroed memory, more than a slot keeps resident. Pages
    // reset in place (where this machine allows it), and pages given back.
    for reset_in_place in [true, false] {
        let limits = CallLimits {
            concurrent_calls: 4,
            reset_in_place,
            ..CallLimits::default()
        };
        let plugin = retry_policy_on(limits, "test-remembers");
        for decision in decide_from_threads(&plugin, 4, 100) {
            assert_eq!(
                decision.expect("decision"),
                hangar::election::RetryDecision::RetryAfter(std::time::Duration::from_millis(
                    1001
                )),
                "a call saw what an earlier one left in its slot (reset in place: {reset_in_place})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_large_parameters_is_decided_by_its_parameters() {
    let plugin = retry_policy_on(CallLimits::default(), "retry-exponential");
    // Far more than the plugin's 64 KiB arena: it grows its memory for the rest.
    let parameters = std::collections::BTreeMap::from([
        ("notes".to_owned(), "x".repeat(300_000)),
        ("retry.max".to_owned(), "5".to_owned()),
        ("retry.unit-ms".to_owned(), "1000".to_owned()),
    ]);
    let error = hangar::state::JobError::new("E", "boom");
    let decide = |failures| {
        let job = hangar::plugins::adapters::PolicyJob {
            id: 1,
            kind: "k",
            queue: "default",
            attempt: failures,
            failures,
            parameters: &parameters,
        };
        plugin.decide(&job, &error).expect("decision")
    };
    use hangar::election::RetryDecision;
    use std::time::Duration;
    assert_eq!(
        decide(5),
        RetryDecision::RetryAfter(Duration::from_secs(16))
    );
    assert_eq!(decide(6), RetryDecision::Fail);
}
