//! Detection runs, training runs and models.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::problem::{parse_uuid, ApiJson};
use super::{ApiError, AppState, Authorized, RunsRead, RunsWrite};
use crate::runs::deletion::{Deleted, RunKind};
use crate::runs::detection::CreateDetectionRun;
use crate::runs::training::CreateTrainingRun;
use crate::storage::runs::{self, Detection, DetectionRunRow, ModelRow, TrainingRunRow};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/detection-runs",
            get(list_detection_runs).post(create_detection_run),
        )
        .route(
            "/v1/detection-runs/{id}",
            get(get_detection_run).delete(delete_detection_run),
        )
        .route(
            "/v1/training-runs",
            get(list_training_runs).post(create_training_run),
        )
        .route(
            "/v1/training-runs/{id}",
            get(get_training_run).delete(delete_training_run),
        )
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default = "default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
}

fn default_limit() -> i64 {
    50
}

impl Page {
    fn checked(self) -> Result<(i64, i64), ApiError> {
        if !(1..=1000).contains(&self.limit) {
            return Err(ApiError::Invalid {
                field: "limit".into(),
                detail: "must be between 1 and 1000".into(),
            });
        }
        if self.offset < 0 {
            return Err(ApiError::Invalid {
                field: "offset".into(),
                detail: "must not be negative".into(),
            });
        }
        Ok((self.limit, self.offset))
    }
}

fn page(
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<(i64, i64), ApiError> {
    let Query(page) = query.map_err(|rejection| ApiError::BadRequest {
        field: None,
        detail: rejection.body_text(),
    })?;
    page.checked()
}

#[derive(Debug, Serialize)]
struct DetectionRunView {
    #[serde(flatten)]
    run: DetectionRunRow,
    detections: Vec<Detection>,
}

async fn create_detection_run(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<RunsWrite>,
    ApiJson(request): ApiJson<CreateDetectionRun>,
) -> Result<(StatusCode, Json<DetectionRunView>), ApiError> {
    let run = state.runs.create_detection_run(&request).await?;
    tracing::info!(run = %run.id, caller = %caller.name, "detection run created");
    Ok((
        StatusCode::CREATED,
        Json(DetectionRunView {
            run,
            detections: Vec::new(),
        }),
    ))
}

async fn list_detection_runs(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DetectionRunRow>>, ApiError> {
    let (limit, offset) = page(query)?;
    // As the seed did when its run list was opened: no run shows Processing for a dead job.
    runs::reconcile(&state.pool).await?;
    Ok(Json(
        runs::list_detection_runs(&state.pool, limit, offset).await?,
    ))
}

async fn get_detection_run(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
    Path(id): Path<String>,
) -> Result<Json<DetectionRunView>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let run = runs::get_detection_run(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("detection run {id} does not exist")))?;
    let detections = runs::detections(&state.pool, id).await?;
    Ok(Json(DetectionRunView { run, detections }))
}

async fn create_training_run(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<RunsWrite>,
    ApiJson(request): ApiJson<CreateTrainingRun>,
) -> Result<(StatusCode, Json<TrainingRunRow>), ApiError> {
    let run = state.runs.create_training_run(&request).await?;
    tracing::info!(run = %run.id, caller = %caller.name, "training run created");
    Ok((StatusCode::CREATED, Json(run)))
}

async fn list_training_runs(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<TrainingRunRow>>, ApiError> {
    let (limit, offset) = page(query)?;
    runs::reconcile(&state.pool).await?;
    Ok(Json(
        runs::list_training_runs(&state.pool, limit, offset).await?,
    ))
}

async fn get_training_run(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
    Path(id): Path<String>,
) -> Result<Json<TrainingRunRow>, ApiError> {
    let id = parse_uuid("id", &id)?;
    runs::get_training_run(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("training run {id} does not exist")))
}

async fn list_models(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
) -> Result<Json<Vec<ModelRow>>, ApiError> {
    Ok(Json(runs::list_models(&state.pool).await?))
}

async fn get_model(
    State(state): State<AppState>,
    _: Authorized<RunsRead>,
    Path(id): Path<String>,
) -> Result<Json<ModelRow>, ApiError> {
    let id = parse_uuid("id", &id)?;
    runs::get_model(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("model {id} does not exist")))
}

async fn delete_run(
    state: &AppState,
    caller: &str,
    kind: RunKind,
    id: &str,
) -> Result<Json<Deleted>, ApiError> {
    let id = parse_uuid("id", id)?;
    let deleted = state.runs.delete_run(&state.cleanup, kind, id).await?;
    tracing::info!(run = %id, caller, "run deleted over HTTP");
    Ok(Json(deleted))
}

async fn delete_detection_run(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<RunsWrite>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    delete_run(&state, &caller.name, RunKind::Detection, &id).await
}

async fn delete_training_run(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<RunsWrite>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    delete_run(&state, &caller.name, RunKind::Training, &id).await
}
