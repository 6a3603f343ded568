//! The HTTP API (axum). `app(state)` builds the router without a socket, so tests call it
//! with `oneshot`. Errors are RFC 9457 problem documents; client errors name the field.

mod jobs;
mod plugins;
mod problem;
mod runs;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::Router;
use sqlx::PgPool;

use std::sync::Arc;

use crate::auth::{self, Caller};
use crate::client::Client;
use crate::config::Config;
use crate::plugins::registry::PluginRegistry;
use crate::runs::deletion::RunCleanup;
use crate::runs::files::RunFiles;
use crate::runs::RunService;
pub use problem::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub schema: String,
    pub client: Client,
    pub runs: RunService,
    /// The run files and the plugins whose cleanup hooks remove them. Its registry also
    /// validates uploads; None when plugins are disabled.
    pub cleanup: RunCleanup,
}

impl AppState {
    pub fn new(pool: PgPool, config: &Config) -> Self {
        let client = Client::new(pool.clone(), &config.schema_name);
        Self {
            runs: RunService {
                pool: pool.clone(),
                client: client.clone(),
            },
            pool,
            schema: config.schema_name.clone(),
            client,
            cleanup: RunCleanup {
                files: RunFiles::new(config),
                plugins: None,
            },
        }
    }

    pub fn with_plugins(mut self, plugins: Arc<PluginRegistry>) -> Self {
        self.cleanup.plugins = Some(plugins);
        self
    }

    pub fn plugins(&self) -> Option<&Arc<PluginRegistry>> {
        self.cleanup.plugins.as_ref()
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(runs::routes())
        .merge(jobs::routes())
        .merge(plugins::routes())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .with_state(state)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header =
            parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .ok_or(ApiError::Unauthorized(
                "send `Authorization: Bearer <token>`; create a token with `hangar token create`",
            ))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ))?;
        auth::authenticate(&state.pool, token.trim())
            .await?
            .ok_or(ApiError::Unauthorized("the token is unknown or revoked"))
    }
}

/// A claim an endpoint requires, as a type so the check runs before the body is read.
pub trait Claim {
    const NAME: &'static str;
}

macro_rules! claims {
    ($($type:ident => $name:literal),* $(,)?) => {
        $(
            pub struct $type;
            impl Claim for $type {
                const NAME: &'static str = $name;
            }
        )*
    };
}

claims! {
    RunsRead => "runs:read",
    RunsWrite => "runs:write",
    JobsRead => "jobs:read",
    PluginsManage => "plugins:manage",
}

/// A caller holding claim `C`; extracting it refuses everyone else (401 or 403).
pub struct Authorized<C>(pub Caller, std::marker::PhantomData<C>);

impl<C: Claim + Send + Sync> FromRequestParts<AppState> for Authorized<C> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.has(C::NAME) {
            return Err(ApiError::Forbidden(C::NAME));
        }
        Ok(Authorized(caller, std::marker::PhantomData))
    }
}
