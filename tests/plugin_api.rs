//! Plugins and runs over HTTP: managing versions (claims, problem documents, activation,
//! rollback), the plugin author's walk-through in `examples/` end to end, and deleting runs by
//! the seed's rules, with the cleanup hook removing exactly their files.

mod support;

use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};

use hangar::plugins::catalog;
use support::http::Api;
use support::plugins::plugin_wasm;
use support::plugins::{build_component, enqueue_with, server_with_plugins, wait_active};
use support::wait_for;

fn component(name: &str) -> Vec<u8> {
    std::fs::read(plugin_wasm(name)).expect("component")
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_managed_over_http_with_clear_refusals() {
    let api = Api::with_plugins().await;
    let registry = api.plugins.clone().expect("registry");
    let versions = "/v1/plugins/retry-policy/versions";

    let reader = hangar::auth::create_token(&api.db.pool, "reader", &["runs:read".into()])
        .await
        .expect("token");
    let (status, body) = api.call("GET", "/v1/plugins", Some(&reader), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(detail(&body).contains("plugins:manage"), "{body}");

    let (status, body) = api.upload(versions, b"definitely not wasm".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "plugin");
    assert!(
        detail(&body).contains("not a WebAssembly component"),
        "{body}"
    );
    let (status, body) = api.upload(versions, Vec::new()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail(&body).contains("empty"), "{body}");
    let (status, body) = api
        .upload(
            "/v1/plugins/retry-policies/versions",
            component("retry-exponential"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail(&body).contains("unknown slot"), "{body}");
    for slot in [
        "state-filter/versions",
        "state-filter/rollback",
        "cleanup-hook/escape",
        "state-filter/Upper",
    ] {
        let (status, body) = api
            .upload(
                &format!("/v1/plugins/{slot}/versions"),
                component("retry-exponential"),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{slot}: {body}");
        assert!(detail(&body).contains("unknown slot"), "{body}");
    }
    let (status, body) = api
        .call(
            "PUT",
            "/v1/plugins/retry-policy/versions",
            Some(&api.token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::METHOD_NOT_ALLOWED,
        "a problem document too: {body}"
    );
    let oversized = vec![0u8; catalog::MAX_PLUGIN_BYTES + 4096];
    let (status, body) = api.upload(versions, oversized).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail(&body).contains("at most"), "{body}");

    let (status, first) = api.upload(versions, component("retry-exponential")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["version"], 1);
    let (status, again) = api.upload(versions, component("retry-exponential")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same bytes are the same version"
    );
    assert_eq!(
        (again["version"].clone(), again["new"].clone()),
        (json!(1), json!(false))
    );
    let (status, second) = api.upload(versions, component("test-retry-a")).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    assert_eq!(second["version"], 2);

    let (status, body) = api
        .post("/v1/plugins/retry-policy/versions/two/activate", "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "version");
    let (status, _) = api
        .post("/v1/plugins/retry-policy/versions/9/activate", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.post("/v1/plugins/retry-policy/rollback", "").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing is active yet: {body}"
    );

    for version in [1, 2] {
        let (status, body) = api
            .post(
                &format!("/v1/plugins/retry-policy/versions/{version}/activate"),
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["active"], version);
    }
    let (_, slot) = api.get("/v1/plugins/retry-policy").await;
    assert_eq!(slot["active"], 2);
    let events: Vec<&str> = slot["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert_eq!(events, ["uploaded", "uploaded", "activated", "activated"]);
    let (status, body) = api.post("/v1/plugins/retry-policy/rollback", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], 1);
    registry.reload().await.expect("reload");
    wait_active(&registry, "retry-policy@1#").await;

    let (status, body) = api
        .upload(
            "/v1/plugins/state-filter/delete-failing/versions",
            component("delete-failing-jobs"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, listed) = api.get("/v1/plugins").await;
    let active: Vec<String> = listed["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter(|v| v["active"] == true)
        .map(|v| format!("{}@{}", v["slot"].as_str().unwrap_or(""), v["version"]))
        .collect();
    assert_eq!(active, ["retry-policy@1"]);
    let (status, body) = api.post("/v1/plugins/retry-policy/deactivate", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["active"].clone(), body["was_active"].clone()),
        (Value::Null, json!(1))
    );
    registry.reload().await.expect("reload");
    assert!(
        registry.snapshot().retry_policy.is_none(),
        "the built-in policy decides again"
    );

    let without = Api::new().await;
    let (status, body) = without
        .upload(versions, component("retry-exponential"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(detail(&body).contains("plugins_enabled"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_retry_policy_is_built_pushed_over_http_and_decides() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/custom-retry-policy");
    let wasm = build_component(&example, "custom-retry-policy");
    let api = Api::with_plugins().await;
    let (status, pushed) = api
        .upload(
            "/v1/plugins/retry-policy/versions",
            std::fs::read(wasm).expect("component"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    let (status, body) = api
        .post("/v1/plugins/retry-policy/versions/1/activate", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let registry = api.plugins.clone().expect("registry");
    let server = server_with_plugins(&api.db, api.db.config.clone(), Arc::clone(&registry)).await;
    wait_active(&registry, "retry-policy@1#").await;

    // The example's rules: CUDA out of memory retries after 10 s, anything else backs off
    // linearly from 30 s.
    let oom = enqueue_with(&api.db, "cuda-oom", &[]).await;
    let broken = enqueue_with(&api.db, "always-fail", &[]).await;
    for (id, delay) in [(oom, 10_000), (broken, 30_000)] {
        let retry = wait_for(
            "the first retry decision",
            std::time::Duration::from_secs(30),
            || async {
                let details = api.db.job(id).await;
                details.history.into_iter().find(|h| h.state == "scheduled")
            },
        )
        .await;
        let decided_by = retry.data["decided_by"].as_str().unwrap_or_default();
        assert!(
            decided_by.starts_with("plugin:retry-policy@1#"),
            "{decided_by}"
        );
        assert_eq!(retry.data["delay_ms"], delay, "job {id}");
    }
    server.shutdown().await;
}

/// A run's files as the executor and drivers leave them.
fn plant_run_files(root: &Path, run: &str) -> Vec<String> {
    let files = [
        format!("logs/succ_{run}.txt"),
        format!("logs/error_{run}.txt"),
        format!("detections/{run}/detection_bboxes.json"),
        format!("detections/{run}/vis/scene.jpg"),
    ];
    for file in &files {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        std::fs::write(&path, "x").expect("file");
    }
    files.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_runs_follows_the_seed_rules_and_the_hook_removes_exactly_their_files() {
    let api = Api::with_plugins().await;
    let registry = api.plugins.clone().expect("registry");
    let root = api.db.config.data_dir.clone();
    let (status, body) = api
        .upload(
            "/v1/plugins/cleanup-hook/detection/versions",
            component("detection-cleanup"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = api
        .post("/v1/plugins/cleanup-hook/detection/versions/1/activate", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    registry.reload().await.expect("reload");

    let model = api.model().await;
    let create = |name: &str| {
        json!({"name": name, "image_path": api.image(), "model_id": model}).to_string()
    };
    let run_uri = |run: &Value| format!("/v1/detection-runs/{}", run["id"].as_str().unwrap_or(""));

    // Waiting: the run leaves the queue with its job.
    let (_, waiting) = api.post("/v1/detection-runs", &create("waiting")).await;
    let (status, deleted) = api.delete(&run_uri(&waiting)).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["status"], "Waiting");
    assert_eq!(api.get(&run_uri(&waiting)).await.0, StatusCode::NOT_FOUND);
    let (_, job) = api.get(&format!("/v1/jobs/{}", waiting["job_id"])).await;
    assert_eq!(job["state"], "deleted");

    // Finished (Error): the hook removes its files, and no other run's.
    let (_, doomed) = api.post("/v1/detection-runs", &create("doomed")).await;
    let (_, other) = api.post("/v1/detection-runs", &create("other")).await;
    let server = api.run_server(root.join("no-venv/bin/python")).await;
    let doomed = api.wait_until_ended(&run_uri(&doomed)).await;
    let other = api.wait_until_ended(&run_uri(&other)).await;
    server.shutdown().await;
    assert_eq!(doomed["status"], "Error");
    let doomed_id = doomed["id"].as_str().expect("id");
    let other_id = other["id"].as_str().expect("id");
    let mut doomed_files = plant_run_files(&root, doomed_id);
    doomed_files.push(format!("errors/{doomed_id}_errMsg.txt"));
    let mut other_files = plant_run_files(&root, other_id);
    other_files.push(format!("errors/{other_id}_errMsg.txt"));
    for file in doomed_files.iter().chain(&other_files) {
        assert!(root.join(file).exists(), "{file} is there before");
    }
    let (status, deleted) = api.delete(&run_uri(&doomed)).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    let mut removed: Vec<&str> = deleted["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    removed.sort_unstable();
    let expected = [
        format!("detections/{doomed_id}"),
        format!("errors/{doomed_id}_errMsg.txt"),
        format!("logs/error_{doomed_id}.txt"),
        format!("logs/succ_{doomed_id}.txt"),
    ];
    assert_eq!(
        removed,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        deleted["removed_by"]
            .as_str()
            .is_some_and(|by| by.starts_with("plugin:cleanup-hook/detection@1#")),
        "{deleted}"
    );
    for file in &doomed_files {
        assert!(!root.join(file).exists(), "{file} is removed");
    }
    for file in &other_files {
        assert!(root.join(file).exists(), "{file} belongs to another run");
    }
    assert!(
        !root.join("cleanup").join(doomed_id).exists(),
        "no staging left"
    );
    assert_eq!(api.get(&run_uri(&doomed)).await.0, StatusCode::NOT_FOUND);

    // Processing: refused, and the run and its job stay.
    let blocker = root.join("blocking-python");
    std::fs::write(&blocker, "#!/bin/sh\nexec sleep 600\n").expect("script");
    let mut permissions = std::fs::metadata(&blocker).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&blocker, permissions).expect("chmod");
    let (_, busy) = api.post("/v1/detection-runs", &create("busy")).await;
    let server = api.run_server(blocker).await;
    api.wait_for_status(&run_uri(&busy), |status| status == "Processing")
        .await;
    let (status, body) = api.delete(&run_uri(&busy)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(detail(&body).contains("processing"), "{body}");
    assert_eq!(api.get(&run_uri(&busy)).await.0, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_run_goes_with_its_model_unless_detection_runs_use_it() {
    let api = Api::new().await;
    let dataset = api.db.dir.path().join("dataset");
    for split in ["train", "valid", "test"] {
        std::fs::create_dir_all(dataset.join(split)).expect("split");
        std::fs::write(dataset.join(split).join("annotations_coco.json"), "{}").expect("coco");
    }
    let body = json!({"name": "t", "dataset_path": dataset.display().to_string()}).to_string();
    let (status, training) = api.post("/v1/training-runs", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{training}");
    let training_id: uuid::Uuid = training["id"].as_str().expect("id").parse().expect("uuid");
    let model = api.model().await;
    let mut conn = api.db.pool.acquire().await.expect("conn");
    hangar::storage::runs::set_trained_model(&mut conn, training_id, model)
        .await
        .expect("model");
    drop(conn);
    let (_, detection) = api
        .post(
            "/v1/detection-runs",
            &json!({"name": "d", "image_path": api.image(), "model_id": model}).to_string(),
        )
        .await;

    let (status, body) = api
        .delete(&format!("/v1/training-runs/{training_id}"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(detail(&body).contains("delete those first"), "{body}");
    let (status, _) = api
        .delete(&format!(
            "/v1/detection-runs/{}",
            detection["id"].as_str().unwrap_or("")
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api
        .delete(&format!("/v1/training-runs/{training_id}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        api.get(&format!("/v1/models/{model}")).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = api.delete("/v1/training-runs/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "id");
}
