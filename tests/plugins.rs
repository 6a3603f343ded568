//! Policies as WASI components in the election pipeline: the seed's retry schedule decided by
//! a plugin, state filters, hot swaps under load, a second server picking up an activation,
//! rollback, and a plugin that faults at run time overruled and then rolled back.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar::plugins::{catalog, switch};
use hangar::state::NewJob;
use support::plugins::plugin_wasm;
use support::plugins::{
    activate, enqueue_with, push, registry, server_with_plugins, store_unvalidated, wait_active,
};
use support::{wait_all_succeeded, wait_for, wait_for_state, TestDb};

const WAIT: Duration = Duration::from_secs(60);

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
    let registries = [registry(&db, &config), registry(&db, &config)];
    let a = push(&db, &registries[0], "retry-policy", "test-retry-a").await;
    let b = push(&db, &registries[0], "retry-policy", "test-retry-b").await;
    activate(&db, "retry-policy", a).await;
    let mut servers = Vec::new();
    for (n, plugins) in registries.iter().enumerate() {
        let config = hangar::config::Config {
            server_name: format!("server-{n}"),
            ..config.clone()
        };
        servers.push(server_with_plugins(&db, config, Arc::clone(plugins)).await);
    }
    const JOBS: usize = 1500;
    let burst: Vec<NewJob> = (0..JOBS)
        .map(|_| NewJob::new("fail-once", "default"))
        .collect();
    let ids = db.client().enqueue_many(&burst).await.expect("enqueue");
    // Alternate the active version, as fast as activations commit, until every job is done.
    let done = tokio_util::sync::CancellationToken::new();
    let swapper = {
        let (pool, schema, done) = (db.pool.clone(), db.config.schema_name.clone(), done.clone());
        tokio::spawn(async move {
            let mut swaps = 0u32;
            while !done.is_cancelled() {
                let version = if swaps % 2 == 0 { b } else { a };
                switch::activate(&pool, &schema, "retry-policy", version, "swapper")
                    .await
                    .expect("swap");
                swaps += 1;
                tokio::task::yield_now().await;
            }
            swaps
        })
    };
    wait_all_succeeded(&db, JOBS).await;
    done.cancel();
    let swaps = swapper.await.expect("swapper");
    let mut by_version = BTreeMap::new();
    for id in ids {
        let details = db.job(id).await;
        let retries: Vec<_> = details
            .history
            .iter()
            .filter(|h| h.state == "scheduled")
            .collect();
        assert_eq!(retries.len(), 1, "job {id}: {:#?}", details.history);
        let decided_by = retries[0].data["decided_by"].as_str().unwrap_or_default();
        let delay = &retries[0].data["delay_ms"];
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
    println!("{swaps} activations; decisions by version: {by_version:?}");
    assert_eq!(
        by_version.len(),
        2,
        "both versions decided during the swaps"
    );
    for plugins in &registries {
        let faults = plugins
            .total_faults
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(faults, 0, "no failed call");
    }
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
    let restored = switch::rollback(&db.pool, &db.config.schema_name, "retry-policy", "test")
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
    let bad = store_unvalidated(&db, "retry-policy", "test-loop-forever").await;
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

    // An operator puts the faulty version back: it is rolled back again after as many faults.
    activate(&db, "retry-policy", bad).await;
    wait_active(&plugins, &format!("retry-policy@{bad}#")).await;
    for _ in 0..2 {
        let id = enqueue_with(&db, "fail-once", &[("retry.unit-ms", "20")]).await;
        wait_for_state(&db, id, "succeeded", WAIT).await;
    }
    wait_active(&plugins, &format!("retry-policy@{good}#")).await;
    let events = hangar::storage::plugins::events(&db.pool, "retry-policy")
        .await
        .expect("events");
    let automatic = events
        .iter()
        .filter(|e| e.event == "rolled back automatically")
        .count();
    assert_eq!(automatic, 2, "{events:#?}");
    server.shutdown().await;
}

/// `bytes` with a custom section appended: the same component, other bytes (another hash).
fn variant(bytes: &[u8], n: u8) -> Vec<u8> {
    let name = b"hangar-test";
    let payload = [n];
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push(u8::try_from(1 + name.len() + payload.len()).expect("small"));
    out.push(u8::try_from(name.len()).expect("small"));
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_to_one_slot_each_get_their_own_version() {
    let db = TestDb::new().await;
    let plugins = registry(&db, &db.config);
    let bytes = std::fs::read(plugin_wasm("test-retry-a")).expect("component");
    let uploads = (0..8u8).map(|n| {
        let (pool, engine, cache) = (
            db.pool.clone(),
            Arc::clone(&plugins.engine),
            plugins.cache_dir().to_owned(),
        );
        let bytes = variant(&bytes, n);
        tokio::spawn(async move {
            catalog::push(&pool, &engine, &cache, "retry-policy", bytes, "racer").await
        })
    });
    let mut versions: Vec<i32> = Vec::new();
    for upload in futures::future::join_all(uploads).await {
        let pushed = upload.expect("task").expect("every upload is stored");
        assert!(pushed.new);
        versions.push(pushed.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_filters_run_in_the_configured_order_and_hear_what_was_applied() {
    let db = TestDb::new().await;
    let config = hangar::config::Config {
        state_filter_order: vec!["delete-failing".into()],
        ..db.config.clone()
    };
    let plugins = registry(&db, &config);
    let retry = push(&db, &plugins, "retry-policy", "retry-exponential").await;
    activate(&db, "retry-policy", retry).await;
    let filter = push(
        &db,
        &plugins,
        "state-filter/delete-failing",
        "delete-failing-jobs",
    )
    .await;
    activate(&db, "state-filter/delete-failing", filter).await;
    // A filter that answers something illegal never passes validation; stored behind
    // hangar's back, it is overruled on every call.
    let bad = store_unvalidated(&db, "state-filter/a-bad", "test-bad-answer").await;
    activate(&db, "state-filter/a-bad", bad).await;
    let server = server_with_plugins(&db, config.clone(), Arc::clone(&plugins)).await;
    let order = wait_for("both filters", Duration::from_secs(5), || async {
        let labels: Vec<String> = plugins
            .snapshot()
            .state_filters
            .iter()
            .map(|f| f.label.clone())
            .collect();
        (labels.len() == 2).then_some(labels)
    })
    .await;
    assert!(
        order[0].starts_with("state-filter/delete-failing@"),
        "{order:?}"
    );
    assert!(order[1].starts_with("state-filter/a-bad@"), "{order:?}");

    // One retry, then the retry policy gives up; the filter deletes the job instead.
    let id = enqueue_with(
        &db,
        "always-fail",
        &[
            ("retry.max", "1"),
            ("retry.unit-ms", "10"),
            ("filter.max-failures", "2"),
        ],
    )
    .await;
    wait_for_state(&db, id, "deleted", WAIT).await;
    let history = db.job(id).await.history;
    let last = history.last().expect("entry");
    assert!(
        last.reason
            .as_deref()
            .unwrap_or_default()
            .contains("deleted by delete-failing-jobs"),
        "{last:?}"
    );
    assert!(last.data["filtered_by"]
        .as_str()
        .unwrap_or_default()
        .starts_with("plugin:state-filter/delete-failing@"));
    assert!(
        last.data["filter_faults"][0]
            .as_str()
            .unwrap_or_default()
            .contains("may not turn deleted into processing"),
        "{last:?}"
    );
    // Two states were applied (the retry, the deletion): each filter elected twice and was
    // told twice.
    let filter_label = order[0].clone();
    wait_for("the filter to hear both states", WAIT, || async {
        let calls = plugins.stats().get(&filter_label).map_or(0, |s| s.calls);
        (calls == 4).then_some(())
    })
    .await;
    let bad_stats = plugins.stats().get(&order[1]).cloned().expect("stats");
    assert_eq!((bad_stats.calls, bad_stats.faults), (4, 2), "{bad_stats:?}");
    assert_eq!(
        bad_stats.consecutive_faults, 2,
        "notifications do not vouch for answers"
    );
    server.shutdown().await;
}
