//! The HTTP API in tests: the router called with `oneshot` (no socket), a token with every
//! claim, and row factories for what requests need (a model, an image file).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use hangar::api::{app, AppState};
use hangar::plugins::registry::PluginRegistry;
use hangar::runs::observer::RunStatusFollower;
use hangar::server::{RunningServer, ServerParts};
use hangar::storage::runs::{self, NewModel};

use super::TestDb;

pub struct Api {
    pub db: TestDb,
    pub router: axum::Router,
    pub token: String,
    /// The plugins the API manages, when built with [`Api::with_plugins`].
    pub plugins: Option<Arc<PluginRegistry>>,
}

impl Api {
    /// The API without plugins (as with `plugins_enabled = false`).
    pub async fn new() -> Api {
        Self::build(false).await
    }

    /// The API with a plugin registry of its own (not yet loaded: call `reload`).
    pub async fn with_plugins() -> Api {
        Self::build(true).await
    }

    async fn build(plugins: bool) -> Api {
        let db = TestDb::new().await;
        let mut state = AppState::new(db.pool.clone(), &db.config);
        let registry = plugins.then(|| {
            hangar::plugins::registry::for_config(&db.config, db.pool.clone())
                .expect("plugin engine")
        });
        if let Some(registry) = &registry {
            state = state.with_plugins(Arc::clone(registry));
        }
        let token = hangar::auth::create_token(&db.pool, "tester", &["admin".into()])
            .await
            .expect("token");
        Api {
            router: app(state),
            db,
            token,
            plugins: registry,
        }
    }

    /// A JSON request (or none, without a body).
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let content_type = body.map(|_| "application/json");
        let bytes = body.unwrap_or("").as_bytes().to_vec();
        self.send(method, uri, token, content_type, bytes).await
    }

    /// Any request. Client errors must be problem documents with their status.
    pub async fn send(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(Body::from(body)).expect("request");
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("response");
        let status = response.status();
        let is_problem = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("") == "application/problem+json");
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_client_error() {
            assert!(is_problem, "{status} must be a problem document: {value}");
            assert_eq!(value["status"], status.as_u16());
        }
        (status, value)
    }

    pub async fn post(&self, uri: &str, body: &str) -> (StatusCode, Value) {
        self.call("POST", uri, Some(&self.token.clone()), Some(body))
            .await
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, Some(&self.token.clone()), None).await
    }

    pub async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        self.call("DELETE", uri, Some(&self.token.clone()), None)
            .await
    }

    /// Uploads a component's bytes.
    pub async fn upload(&self, uri: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        self.send(
            "POST",
            uri,
            Some(&self.token.clone()),
            Some("application/wasm"),
            bytes,
        )
        .await
    }

    /// A server that runs detection and training runs with `python` as the MMDetection
    /// environment's interpreter (one that does not exist makes every run fail early), on the
    /// API's plugins.
    pub async fn run_server(&self, python: std::path::PathBuf) -> RunningServer {
        let config = hangar::config::Config {
            queues: vec!["detection".into()],
            device_queues: vec!["detection".into()],
            max_retries: 0,
            shutdown_grace_period: std::time::Duration::from_millis(200),
            mmdet_python: Some(python),
            ..self.db.config.clone()
        };
        let mut handlers = hangar::executor::HandlerRegistry::default();
        hangar::runs::register_handlers(&mut handlers, &config);
        let mut parts = ServerParts::new(Arc::new(config.clone()), self.db.pool.clone(), handlers);
        parts.observers.push(Arc::new(RunStatusFollower {
            files: hangar::runs::files::RunFiles::new(&config),
        }));
        parts.plugins = self.plugins.clone();
        RunningServer::start(parts).await.expect("server")
    }

    /// Waits until the run at `uri` has ended (neither Waiting nor Processing) and returns it.
    pub async fn wait_until_ended(&self, uri: &str) -> Value {
        self.wait_for_status(uri, |status| status != "Waiting" && status != "Processing")
            .await
    }

    /// Waits until the run at `uri` has a status that `accept`s, and returns it.
    pub async fn wait_for_status(&self, uri: &str, accept: impl Fn(&str) -> bool) -> Value {
        super::wait_for(
            &format!("{uri} to reach the expected status"),
            std::time::Duration::from_secs(30),
            || async {
                let (_, run) = self.get(uri).await;
                run["status"].as_str().is_some_and(&accept).then_some(run)
            },
        )
        .await
    }

    /// A model row whose files need not exist (no detection actually runs on it).
    pub async fn model(&self) -> uuid::Uuid {
        let id = uuid::Uuid::now_v7();
        let mut conn = self.db.pool.acquire().await.expect("conn");
        runs::insert_model(
            &mut conn,
            &NewModel {
                id,
                name: "tiny",
                config_path: "/nonexistent/config.py",
                checkpoint_path: "/nonexistent/epoch_1.pth",
                classes: &json!(["red_square", "blue_disc"]),
                training_run_id: None,
            },
        )
        .await
        .expect("model");
        id
    }

    pub fn image(&self) -> String {
        let path = self.db.dir.path().join("image.png");
        std::fs::write(&path, b"not really a png").expect("image");
        path.display().to_string()
    }
}
