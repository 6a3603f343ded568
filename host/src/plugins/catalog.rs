//! Uploading, activating and rolling back plugin versions. An upload is refused unless it
//! compiles, implements its slot's world and answers a smoke call with canned inputs; an
//! activation is one transaction plus a NOTIFY, after which every server swaps it in.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::adapters::{CleanupRun, FilterState, LoadedPlugin, PolicyJob};
use super::engine::PluginEngine;
use super::registry::{label, load, LoadError};
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
    let label = label(slot, 0, &sha256);
    let checked_sha = sha256.clone();
    tokio::task::spawn_blocking(move || {
        let plugin = load(engine, kind, label, &checked_sha, &bytes, &cache_dir).map_err(|e| match e {
            LoadError::Compile(e) => PluginError::Invalid(format!(
                "not a WebAssembly component hangar can compile (build it with `cargo build --target wasm32-wasip2`): {e}"
            )),
            LoadError::Link(e) => PluginError::Invalid(format!(
                "it does not implement {} (or imports more than hangar offers): {e}",
                kind.world()
            )),
        })?;
        smoke_call(&plugin).map_err(|fault| {
            PluginError::Invalid(format!("the smoke call with canned inputs failed: it {fault}"))
        })
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
    let mut conn = pool.acquire().await?;
    // The same component pushed again (a script run twice) is the version it already is.
    if let Some(version) = plugins::version_with_sha256(&mut conn, slot, &sha256).await? {
        tracing::info!(slot, version, sha256 = %sha256, actor, "plugin already uploaded");
        return Ok(Pushed {
            slot: slot.to_owned(),
            version,
            sha256,
            new: false,
        });
    }
    let version = plugins::insert(&mut conn, slot, &sha256, &bytes, actor).await?;
    tracing::info!(slot, version, sha256 = %sha256, actor, "plugin uploaded");
    Ok(Pushed {
        slot: slot.to_owned(),
        version,
        sha256,
        new: true,
    })
}

/// Activates `version` of `slot` on every server.
pub async fn activate(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    version: i32,
    actor: &str,
) -> Result<(), PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    if !plugins::activate(&mut tx, slot, version, "activated", actor, None).await? {
        return Err(PluginError::NotFound(format!(
            "{slot} has no version {version}"
        )));
    }
    plugins::notify_changed(&mut tx, &crate::storage::plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(slot, version, actor, "plugin activated");
    Ok(())
}

/// Turns `slot` off on every server (the built-in policy decides); returns the version that
/// was active, if one was.
pub async fn deactivate(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    actor: &str,
) -> Result<Option<i32>, PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    let Some(current) = plugins::active_version(&mut tx, slot).await? else {
        return Ok(None);
    };
    plugins::deactivate(&mut tx, slot, actor, "turned off").await?;
    plugins::notify_changed(&mut tx, &crate::storage::plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(slot, version = current, actor, "plugin slot turned off");
    Ok(Some(current))
}

/// Reactivates the version that was active before the current one; returns it.
pub async fn rollback(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    actor: &str,
) -> Result<i32, PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    let current = plugins::active_version(&mut tx, slot)
        .await?
        .ok_or_else(|| {
            PluginError::NotFound(format!("{slot} has no active version to roll back from"))
        })?;
    let previous = plugins::previous_version(&mut tx, slot, current)
        .await?
        .ok_or_else(|| {
            PluginError::NotFound(format!("{slot}@{current} has no earlier active version"))
        })?;
    plugins::activate(
        &mut tx,
        slot,
        previous,
        "rolled back",
        actor,
        Some(&format!("from version {current}")),
    )
    .await?;
    plugins::notify_changed(&mut tx, &crate::storage::plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(
        slot,
        from = current,
        to = previous,
        actor,
        "plugin rolled back"
    );
    Ok(previous)
}

/// What an automatic rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRollback {
    /// The version active before the faulty one is active again.
    Restored(i32),
    /// The faulty version had no predecessor: the slot is off, the built-in policy decides.
    TurnedOff,
    /// The faulty version is no longer active (another server, or an operator, acted first).
    AlreadyReplaced,
}

/// The automatic rollback of a faulty plugin (label "slot@version#sha"): only if that version
/// is still the active one; with no earlier version the slot is turned off (built-in policy).
pub async fn rollback_faulty(
    pool: &PgPool,
    channel: &str,
    label: &str,
    reason: &str,
) -> Result<AutoRollback, PluginError> {
    let parsed = label.split_once('@').and_then(|(slot, rest)| {
        let version = rest.split('#').next()?.parse::<i32>().ok()?;
        Some((slot, version))
    });
    let Some((slot, version)) = parsed else {
        return Err(PluginError::Invalid(format!(
            "{label:?} is not a plugin label"
        )));
    };
    let mut tx = pool.begin().await?;
    if plugins::active_version(&mut tx, slot).await? != Some(version) {
        return Ok(AutoRollback::AlreadyReplaced);
    }
    let outcome = match plugins::previous_version(&mut tx, slot, version).await? {
        Some(previous) => {
            plugins::activate(
                &mut tx,
                slot,
                previous,
                "rolled back automatically",
                "hangar",
                Some(reason),
            )
            .await?;
            AutoRollback::Restored(previous)
        }
        None => {
            plugins::deactivate(&mut tx, slot, "hangar", reason).await?;
            AutoRollback::TurnedOff
        }
    };
    plugins::notify_changed(&mut tx, channel, slot).await?;
    tx.commit().await?;
    Ok(outcome)
}
