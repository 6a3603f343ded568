//! API tokens. A token is `hgr_` + 32 random bytes (hex); only its SHA-256 is stored, with the
//! claims it carries. Create one with `hangar token create --name NAME --claim runs:write ...`.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::storage::{tokens, StorageError};

/// Every claim hangar checks. `admin` implies all of them.
pub const CLAIMS: [&str; 6] = [
    "runs:read",
    "runs:write",
    "jobs:read",
    "jobs:write",
    "plugins:manage",
    "admin",
];

const PREFIX: &str = "hgr_";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown claim {0:?}; known claims: {known}", known = CLAIMS.join(", "))]
    UnknownClaim(String),
    #[error("a token needs a name and at least one claim")]
    Incomplete,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Who is calling, and what they may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub claims: Vec<String>,
}

impl Caller {
    pub fn has(&self, claim: &str) -> bool {
        self.claims.iter().any(|c| c == claim || c == "admin")
    }
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token and returns its secret (shown once; only the hash is kept).
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    claims: &[String],
) -> Result<String, TokenError> {
    if name.trim().is_empty() || claims.is_empty() {
        return Err(TokenError::Incomplete);
    }
    if let Some(unknown) = claims.iter().find(|c| !CLAIMS.contains(&c.as_str())) {
        return Err(TokenError::UnknownClaim(unknown.clone()));
    }
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let token = format!("{PREFIX}{}", hex::encode(secret));
    tokens::insert(pool, Uuid::new_v4(), name, &digest(&token), claims).await?;
    Ok(token)
}

/// The caller a bearer token stands for, if it is valid and not revoked.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Caller>, StorageError> {
    if !token.starts_with(PREFIX) {
        return Ok(None);
    }
    Ok(tokens::find_active(pool, &digest(token))
        .await?
        .map(|(name, claims)| Caller { name, claims }))
}

pub async fn revoke(pool: &PgPool, name: &str) -> Result<u64, StorageError> {
    tokens::revoke(pool, name).await
}
