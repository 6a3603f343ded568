//! Job details: state, parameters and history (with exception details).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use super::problem::ApiError;
use super::{AppState, Authorized, JobsRead};
use crate::client::JobDetails;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/jobs/{id}", get(get_job))
}

async fn get_job(
    State(state): State<AppState>,
    _: Authorized<JobsRead>,
    Path(id): Path<String>,
) -> Result<Json<JobDetails>, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::BadRequest {
        field: Some("id".into()),
        detail: format!("id: {id:?} is not a job id (a positive integer)"),
    })?;
    state
        .client
        .details(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))
}
