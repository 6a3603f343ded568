//! Uploading plugin versions. An upload is refused unless it compiles, implements its slot's
//! world and answers a smoke call with canned inputs; it is stored inactive ([`super::switch`]
//! activates it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::adapters::{CleanupRun, FilterState, LoadedPlugin, PolicyJob};
use super::artifacts::compile;
use super::engine::PluginEngine;
use super::sandbox::Preopen;
use super::{PluginError, PluginKind};
use crate::state::{JobError, JobState};
use crate::storage::plugins;

/// The largest component hangar accepts.
pub const MAX_PLUGIN_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub slot: String,
    pub version: i32,
    pub sha256: String,
    /// False when the slot already had these exact bytes (that version is returned).
    pub new: bool,
}

/// Validates `bytes` for `slot` (compile, world, smoke call) without storing anything; the
/// compiled artefact lands in `cache_dir`, so the servers sharing it need not compile again.
pub async fn validate(
    engine: &Arc<PluginEngine>,
    cache_dir: &Path,
    slot: &str,
    bytes: Vec<u8>,
) -> Result<String, PluginError> {
    let kind = PluginKind::of_slot(slot)?;
    if bytes.is_empty() {
        return Err(PluginError::Invalid("the upload is empty".into()));
    }
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(PluginError::Invalid(format!(
            "the upload is {} bytes; plugins may be at most {MAX_PLUGIN_BYTES} bytes",
            bytes.len()
        )));
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let engine = Arc::clone(engine);
    let cache_dir = cache_dir.to_owned();
    // Not a version yet: the label says what the call is, for the plugin's log lines.
    let label = format!("{slot}@upload-check#{}", &sha256[..8]);
    let checked_sha = sha256.clone();
    tokio::task::spawn_blocking(move || {
        let compiled = compile(&engine, &checked_sha, &bytes, &cache_dir).map_err(|e| {
            PluginError::Invalid(format!(
                "not a WebAssembly component hangar can compile (build it with `cargo build --target wasm32-wasip2`): {e}"
            ))
        })?;
        let plugin = LoadedPlugin::link(engine, kind, label, &compiled.component).map_err(|e| {
            PluginError::Invalid(format!(
                "it does not implement {} (or imports more than hangar offers): {e}",
                kind.world()
            ))
        })?;
        smoke_call(&plugin).map_err(|fault| {
            PluginError::Invalid(format!("the smoke call with canned inputs failed: it {fault}"))
        })?;
        // Proved good: the servers on this machine will not need to compile it again.
        compiled.keep();
        Ok::<(), PluginError>(())
    })
    .await
    .map_err(|e| PluginError::Invalid(format!("validation panicked: {e}")))??;
    Ok(sha256)
}

fn smoke_call(plugin: &LoadedPlugin) -> Result<(), super::PluginFault> {
    let parameters = BTreeMap::new();
    let job = PolicyJob {
        id: 0,
        kind: "smoke-test",
        queue: "default",
        attempt: 1,
        failures: 1,
        parameters: &parameters,
    };
    match plugin.kind {
        PluginKind::RetryPolicy => plugin
            .decide(
                &job,
                &JobError::new("SmokeTest", "a canned failure")
                    .with_details("from hangar's upload check"),
            )
            .map(drop),
        PluginKind::StateFilter => {
            let candidate = FilterState {
                state: JobState::Succeeded,
                reason: "smoke test".into(),
                delay: None,
            };
            plugin.elect(&job, &candidate)?;
            plugin.applied(&job, &candidate)
        }
        PluginKind::CleanupHook => {
            let empty =
                tempfile::tempdir().map_err(|e| super::PluginFault::Setup(e.to_string()))?;
            let run = CleanupRun {
                id: "00000000-0000-0000-0000-000000000000".into(),
                kind: "detection".into(),
                status: "Success".into(),
                files: vec!["logs/succ_00000000-0000-0000-0000-000000000000.txt".into()],
            };
            let preopen = Preopen {
                host: empty.path().to_owned(),
                guest: ".".into(),
            };
            plugin.cleanup(&run, &[preopen]).map(drop)
        }
    }
}

/// Validates and stores a new version of `slot` (inactive until activated).
pub async fn push(
    pool: &PgPool,
    engine: &Arc<PluginEngine>,
    cache_dir: &Path,
    slot: &str,
    bytes: Vec<u8>,
    actor: &str,
) -> Result<Pushed, PluginError> {
    let sha256 = validate(engine, cache_dir, slot, bytes.clone()).await?;
    let mut tx = pool.begin().await?;
    // Uploads to one slot number their versions one after the other.
    plugins::lock_slot(&mut tx, slot).await?;
    // The same component pushed again (a script run twice) is the version it already is.
    if let Some(version) = plugins::version_with_sha256(&mut tx, slot, &sha256).await? {
        tracing::info!(slot, version, sha256 = %sha256, actor, "plugin already uploaded");
        return Ok(Pushed {
            slot: slot.to_owned(),
            version,
            sha256,
            new: false,
        });
    }
    let version = plugins::insert(&mut tx, slot, &sha256, &bytes, actor).await?;
    tx.commit().await?;
    tracing::info!(slot, version, sha256 = %sha256, actor, "plugin uploaded");
    Ok(Pushed {
        slot: slot.to_owned(),
        version,
        sha256,
        new: true,
    })
}
