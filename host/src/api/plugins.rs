//! Plugin management (claim `plugins:manage`): upload a version (the body is the component's
//! bytes), activate one, roll back, list versions and events.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState, Authorized, PluginsManage};
use crate::plugins::{catalog, switch, PluginError};
use crate::storage::plugins;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/plugins", get(list))
        .route("/v1/plugins/{kind}/{name}/versions", post(push_named))
        .route("/v1/plugins/{kind}/versions", post(push_unnamed))
        .route(
            "/v1/plugins/{kind}/{name}/versions/{version}/activate",
            post(activate_named),
        )
        .route(
            "/v1/plugins/{kind}/versions/{version}/activate",
            post(activate_unnamed),
        )
        .route("/v1/plugins/{kind}/{name}/rollback", post(rollback_named))
        .route("/v1/plugins/{kind}/rollback", post(rollback_unnamed))
        .route(
            "/v1/plugins/{kind}/{name}/deactivate",
            post(deactivate_named),
        )
        .route("/v1/plugins/{kind}/deactivate", post(deactivate_unnamed))
        .route("/v1/plugins/{kind}/{name}", get(show_named))
        .route("/v1/plugins/{kind}", get(show_unnamed))
        // Room for the largest component hangar accepts (and a little more, so the catalog
        // says what the limit is rather than the transport).
        .layer(DefaultBodyLimit::max(catalog::MAX_PLUGIN_BYTES + 1024))
}

/// The bytes of an upload; a body over the limit is a 413 problem that says the limit.
fn upload(body: Result<Bytes, BytesRejection>) -> Result<Vec<u8>, ApiError> {
    match body {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::TooLarge(format!(
                "plugins may be at most {} bytes",
                catalog::MAX_PLUGIN_BYTES
            )))
        }
        Err(rejection) => Err(ApiError::BadRequest {
            field: Some("body".into()),
            detail: rejection.body_text(),
        }),
    }
}

impl From<PluginError> for ApiError {
    fn from(error: PluginError) -> Self {
        match error {
            PluginError::Invalid(detail) => ApiError::Invalid {
                field: "plugin".into(),
                detail,
            },
            PluginError::NotFound(detail) => ApiError::NotFound(detail),
            PluginError::Storage(e) => e.into(),
        }
    }
}

fn slot(kind: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{kind}/{name}"),
        None => kind.to_owned(),
    }
}

async fn list(
    State(state): State<AppState>,
    _: Authorized<PluginsManage>,
) -> Result<Json<Value>, ApiError> {
    let versions = plugins::versions(&state.pool, None).await?;
    // Calls and faults are counted per server: these are the answering server's.
    let stats = state.plugins().map(|registry| registry.stats());
    Ok(Json(json!({ "versions": versions, "this_server": stats })))
}

async fn show(state: &AppState, slot: &str) -> Result<Json<Value>, ApiError> {
    crate::plugins::PluginKind::of_slot(slot)?;
    let versions = plugins::versions(&state.pool, Some(slot)).await?;
    let events = plugins::events(&state.pool, slot).await?;
    let active = versions.iter().find(|v| v.active).map(|v| v.version);
    Ok(Json(
        json!({ "slot": slot, "active": active, "versions": versions, "events": events }),
    ))
}

async fn push(
    state: &AppState,
    actor: &str,
    slot: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let registry = state.plugins().ok_or_else(|| {
        ApiError::Conflict("plugins are disabled on this server (plugins_enabled = false)".into())
    })?;
    let bytes = upload(body)?;
    let pushed = catalog::push(
        &state.pool,
        &registry.engine,
        registry.cache_dir(),
        slot,
        bytes,
        actor,
    )
    .await?;
    let status = if pushed.new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!(pushed))))
}

fn parse_version(version: &str) -> Result<i32, ApiError> {
    version.parse().map_err(|_| ApiError::BadRequest {
        field: Some("version".into()),
        detail: format!("version: {version:?} is not a version number"),
    })
}

async fn activate(
    state: &AppState,
    actor: &str,
    slot: &str,
    version: &str,
) -> Result<Json<Value>, ApiError> {
    let version = parse_version(version)?;
    switch::activate(&state.pool, &state.schema, slot, version, actor).await?;
    Ok(Json(json!({ "slot": slot, "active": version })))
}

async fn rollback(state: &AppState, actor: &str, slot: &str) -> Result<Json<Value>, ApiError> {
    let version = switch::rollback(&state.pool, &state.schema, slot, actor).await?;
    Ok(Json(json!({ "slot": slot, "active": version })))
}

async fn deactivate(state: &AppState, actor: &str, slot: &str) -> Result<Json<Value>, ApiError> {
    let was = switch::deactivate(&state.pool, &state.schema, slot, actor).await?;
    Ok(Json(
        json!({ "slot": slot, "active": null, "was_active": was }),
    ))
}

async fn deactivate_named(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    deactivate(&state, &caller.name, &slot(&kind, Some(&name))).await
}

async fn deactivate_unnamed(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path(kind): Path<String>,
) -> Result<Json<Value>, ApiError> {
    deactivate(&state, &caller.name, &slot(&kind, None)).await
}

async fn push_named(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path((kind, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    push(&state, &caller.name, &slot(&kind, Some(&name)), body).await
}

async fn push_unnamed(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path(kind): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    push(&state, &caller.name, &slot(&kind, None), body).await
}

async fn activate_named(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path((kind, name, version)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    activate(&state, &caller.name, &slot(&kind, Some(&name)), &version).await
}

async fn activate_unnamed(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path((kind, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    activate(&state, &caller.name, &slot(&kind, None), &version).await
}

async fn rollback_named(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    rollback(&state, &caller.name, &slot(&kind, Some(&name))).await
}

async fn rollback_unnamed(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<PluginsManage>,
    Path(kind): Path<String>,
) -> Result<Json<Value>, ApiError> {
    rollback(&state, &caller.name, &slot(&kind, None)).await
}

async fn show_named(
    State(state): State<AppState>,
    _: Authorized<PluginsManage>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    show(&state, &slot(&kind, Some(&name))).await
}

async fn show_unnamed(
    State(state): State<AppState>,
    _: Authorized<PluginsManage>,
    Path(kind): Path<String>,
) -> Result<Json<Value>, ApiError> {
    show(&state, &slot(&kind, None)).await
}
