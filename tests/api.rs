//! The HTTP API: authentication, problem documents for bad input, runs and jobs.

mod support;

use axum::http::StatusCode;
use serde_json::json;

use support::http::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_needs_a_valid_token_with_the_right_claim() {
    let api = Api::new().await;
    let (status, body) = api.call("GET", "/v1/detection-runs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("hangar token create")),
        "{body}"
    );
    let (status, _) = api
        .call("GET", "/v1/detection-runs", Some("hgr_0000"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let reader = hangar::auth::create_token(&api.db.pool, "reader", &["runs:read".into()])
        .await
        .expect("token");
    let (status, _) = api
        .call("GET", "/v1/detection-runs", Some(&reader), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api
        .call("POST", "/v1/detection-runs", Some(&reader), Some("{}"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("runs:write")),
        "{body}"
    );
    hangar::auth::revoke(&api.db.pool, "reader")
        .await
        .expect("revoke");
    let (status, _) = api
        .call("GET", "/v1/detection-runs", Some(&reader), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a revoked token is refused"
    );
    let unknown = hangar::auth::create_token(&api.db.pool, "x", &["runs:everything".into()]).await;
    assert!(unknown.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_problem_document_naming_the_field() {
    let api = Api::new().await;
    let model = api.model().await;
    let image = api.image();
    let valid = json!({"name": "run", "image_path": image, "model_id": model});
    let cases: Vec<(String, StatusCode, Option<&str>)> = vec![
        ("{not json".into(), StatusCode::BAD_REQUEST, None),
        (
            json!({"name": "run", "image_path": image, "model_id": model, "colour": "red"})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("colour"),
        ),
        (
            json!({"name": "run", "model_id": model}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("image_path"),
        ),
        (
            json!({"name": "run", "image_path": "/no/such.png", "model_id": model}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("image_path"),
        ),
        (
            json!({"name": "run", "image_path": image, "model_id": uuid::Uuid::nil()}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("model_id"),
        ),
        (
            json!({"name": "run", "image_path": image, "model_id": "abc"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("model_id"),
        ),
        (
            json!({"name": "run", "image_path": image, "model_id": model, "score_threshold": 2.0})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("score_threshold"),
        ),
        (
            json!({"name": "run", "image_path": image, "model_id": model, "device": "tpu"})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("device"),
        ),
        (
            json!({"name": "", "image_path": image, "model_id": model}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
        (
            json!({"name": 5, "image_path": image, "model_id": model}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
        ),
    ];
    for (body, expected, field) in cases {
        let (status, problem) = api.post("/v1/detection-runs", &body).await;
        assert_eq!(status, expected, "{body} -> {problem}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{body} -> {problem}");
        }
    }
    let (status, problem) = api.get("/v1/detection-runs/not-a-uuid").await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("id"))
    );
    let (status, _) = api
        .get(&format!("/v1/detection-runs/{}", uuid::Uuid::nil()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem) = api.get("/v1/jobs/abc").await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("id"))
    );
    let (status, _) = api.get("/v1/jobs/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem) = api.get("/v1/detection-runs?limit=0").await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("limit"))
    );
    let (status, _) = api
        .post(
            "/v1/training-runs",
            &json!({"name": "t", "dataset_path": api.db.dir.path()}).to_string(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a dataset without its splits is refused"
    );
    // Nothing was created by any of it.
    let (_, list) = api.get("/v1/detection-runs").await;
    assert_eq!(list, json!([]));
    // And the valid request works.
    let (status, run) = api.post("/v1/detection-runs", &valid.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    assert_eq!(run["status"], "Waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_job_fails_early_ends_in_error_with_its_error_file() {
    let api = Api::new().await;
    let model = api.model().await;
    let body = json!({"name": "doomed", "image_path": api.image(), "model_id": model}).to_string();
    let (status, run) = api.post("/v1/detection-runs", &body).await;
    assert_eq!(status, StatusCode::CREATED);
    let run_id = run["id"].as_str().expect("id").to_owned();
    let job_id = run["job_id"].as_i64().expect("job");

    let server = api
        .run_server(api.db.dir.path().join("no-venv/bin/python"))
        .await;
    let finished = api
        .wait_until_ended(&format!("/v1/detection-runs/{run_id}"))
        .await;
    assert_eq!(finished["status"], "Error", "{finished}");
    let message = finished["error_message"].as_str().expect("message");
    assert!(message.contains("hangar mmdet install"), "{message}");
    let error_file = api
        .db
        .config
        .data_dir
        .join("errors")
        .join(format!("{run_id}_errMsg.txt"));
    assert_eq!(
        std::fs::read_to_string(error_file).expect("errMsg file"),
        message
    );

    let (status, job) = api.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "failed");
    assert_eq!(job["parameters"]["detectionRunId"], run_id.as_str());
    let failed = job["history"]
        .as_array()
        .expect("history")
        .last()
        .expect("entry")
        .clone();
    assert_eq!(failed["data"]["exception_type"], "MMDetectionNotInstalled");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_reconciles_a_run_whose_job_ended_behind_its_back() {
    let api = Api::new().await;
    let model = api.model().await;
    let body = json!({"name": "orphan", "image_path": api.image(), "model_id": model}).to_string();
    let (_, run) = api.post("/v1/detection-runs", &body).await;
    // The job is deleted directly (an operator), bypassing the run.
    api.db
        .client()
        .delete(run["job_id"].as_i64().expect("job"))
        .await
        .expect("delete");
    let (status, list) = api.get("/v1/detection-runs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["status"], "Error", "{list}");
    assert!(
        list[0]["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("deleted")),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_on_port_zero_answers_over_tcp() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = Api::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let router = api.router.clone();
    let serving = tokio::spawn(async move { axum::serve(listener, router).await });
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        api.token
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("[]"), "{response}");
    serving.abort();
}
