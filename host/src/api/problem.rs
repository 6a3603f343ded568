//! One error type for every endpoint, rendered as `application/problem+json`.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::client::ClientError;
use crate::runs::RunError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        field: Option<String>,
        detail: String,
    },
    #[error("{}", invalid_detail(field, detail))]
    Invalid { field: String, detail: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this token lacks the claim {0:?}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("internal error")]
    Internal(String),
}

/// "field: problem", unless the problem already starts with the field's name.
fn invalid_detail(field: &str, detail: &str) -> String {
    if detail.starts_with(field) {
        detail.to_owned()
    } else {
        format!("{field}: {detail}")
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

impl From<RunError> for ApiError {
    fn from(error: RunError) -> Self {
        match error {
            RunError::Invalid { field, problem } => ApiError::Invalid {
                field: field.into(),
                detail: problem,
            },
            RunError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            RunError::Conflict(detail) => ApiError::Conflict(detail),
            RunError::Storage(e) => e.into(),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::NotFound(_) => ApiError::NotFound(error.to_string()),
            ClientError::Processing(_) => ApiError::Conflict(error.to_string()),
            ClientError::Invalid(detail) => ApiError::BadRequest {
                field: None,
                detail,
            },
            ClientError::Storage(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title, field) = match &self {
            ApiError::BadRequest { field, .. } => {
                (StatusCode::BAD_REQUEST, "Bad request", field.clone())
            }
            ApiError::Invalid { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid field",
                Some(field.clone()),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found", None),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized", None),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict", None),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "Payload too large", None),
            ApiError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None)
            }
            ApiError::Internal(detail) => {
                // Logged inside the request's span; the client gets a generic body.
                tracing::error!(error = %detail, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "Internal error", None)
            }
        };
        let mut body = json!({
            "type": "about:blank",
            "title": title,
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        if let Some(field) = field {
            body["field"] = json!(field);
        }
        let mut response = (status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// `axum::Json` whose rejections are problem documents naming the offending field.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> ApiError {
    let text = rejection.body_text();
    // axum prefixes serde's message with a sentence of its own; keep serde's, which is precise.
    let detail = text
        .split_once("target type: ")
        .map_or(text.clone(), |(_, serde)| serde.to_owned());
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::Invalid {
            field: field_in_serde_message(&detail).unwrap_or_else(|| "body".into()),
            detail,
        },
        _ => ApiError::BadRequest {
            field: None,
            detail,
        },
    }
}

/// serde names the field in "unknown field `x`", "missing field `x`" or "x: invalid type".
fn field_in_serde_message(message: &str) -> Option<String> {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            return rest.split('`').next().map(str::to_owned);
        }
    }
    let candidate = message.split(": ").next()?.trim();
    (!candidate.is_empty()
        && candidate
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    .then(|| candidate.to_owned())
}

/// Parses a path id, naming it in the error.
pub fn parse_uuid(field: &str, value: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(value).map_err(|_| ApiError::BadRequest {
        field: Some(field.into()),
        detail: format!("{field}: {value:?} is not a UUID"),
    })
}
