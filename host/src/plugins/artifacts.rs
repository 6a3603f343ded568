//! Compiled plugin artefacts, cached on disk by the component's sha256 and the engine's
//! compatibility hash, so a server compiles a version once — and not at all when the upload
//! was validated on the same machine. Only components that proved good are cached.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::Component;

use super::adapters::LoadedPlugin;
use super::engine::PluginEngine;
use super::PluginKind;

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Compile(String),
    #[error("{0}")]
    Link(String),
}

/// A component compiled for the engine, from the cache or afresh.
pub struct Compiled {
    pub component: Component,
    /// The artefact, when it was compiled afresh: written to the cache by [`Compiled::keep`].
    fresh: Option<(Vec<u8>, PathBuf)>,
}

impl Compiled {
    /// Caches the artefact (if it was compiled afresh); call once the component proved good.
    pub fn keep(self) -> Component {
        if let Some((artifact, path)) = self.fresh {
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    // Written aside and renamed into place whole: a reader never sees half.
                    let partial = path.with_extension(format!("{}.partial", std::process::id()));
                    std::fs::write(&partial, &artifact)?;
                    std::fs::rename(&partial, &path)
                });
            if let Err(error) = written {
                tracing::warn!(path = %path.display(), %error, "cannot cache a compiled plugin");
            }
        }
        self.component
    }
}

/// Compiles `bytes` (or takes its artefact from `cache_dir`).
pub fn compile(
    engine: &PluginEngine,
    sha256: &str,
    bytes: &[u8],
    cache_dir: &Path,
) -> Result<Compiled, LoadError> {
    let path = cache_dir.join(format!("{sha256}-{}.cwasm", engine.compatibility));
    if path.is_file() {
        // SAFETY: the file was written by `precompile_component` of an engine with the same
        // compatibility hash, into hangar's own cache directory (renamed into place whole).
        match unsafe { Component::deserialize_file(&engine.engine, &path) } {
            Ok(component) => {
                return Ok(Compiled {
                    component,
                    fresh: None,
                })
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "ignoring an unreadable cached plugin");
            }
        }
    }
    let artifact = engine
        .engine
        .precompile_component(bytes)
        .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    // SAFETY: these bytes were just produced by this engine's `precompile_component`.
    let component = unsafe { Component::deserialize(&engine.engine, &artifact) }
        .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    Ok(Compiled {
        component,
        fresh: Some((artifact, path)),
    })
}

/// Compiles (or takes from the cache) and links one plugin of an active version.
pub fn load(
    engine: Arc<PluginEngine>,
    kind: PluginKind,
    label: String,
    sha256: &str,
    bytes: &[u8],
    cache_dir: &Path,
) -> Result<LoadedPlugin, LoadError> {
    let compiled = compile(&engine, sha256, bytes, cache_dir)?;
    let plugin = LoadedPlugin::link(Arc::clone(&engine), kind, label, &compiled.component)
        .map_err(LoadError::Link)?;
    compiled.keep();
    Ok(plugin)
}
