//! The sandbox of one plugin call: a fresh store whose only capabilities are the `host`
//! interface (logging, the job's parameters), a memory cap, a time budget, and for cleanup
//! hooks the run's directories. No network, no environment, no other files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::engine::PluginEngine;
use super::PluginFault;

/// What a plugin call's store holds.
pub struct PluginState {
    /// Built on the guest's first WASI call: a decision that imports no WASI (a `no_std`
    /// plugin) or does not call it never pays for a context (its random sources are seeded
    /// per context).
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    limits: StoreLimits,
    /// "name@version", for logs.
    pub label: String,
    pub job_id: i64,
    /// The parameters of the job being decided (the only ones a plugin may read).
    pub parameters: BTreeMap<String, String>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| WasiCtxBuilder::new().build()),
            table: &mut self.table,
        }
    }
}

/// A directory a cleanup hook may touch: `host` shown to the guest as `guest`.
#[derive(Debug, Clone)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
}

/// Builds the store of one call.
pub fn new_store(
    engine: &PluginEngine,
    label: &str,
    job_id: i64,
    parameters: BTreeMap<String, String>,
    preopens: &[Preopen],
    budget: std::time::Duration,
) -> Result<Store<PluginState>, PluginFault> {
    // A cleanup hook's context holds its run's directories; a decision's is built when first
    // used, with nothing in it.
    let wasi = if preopens.is_empty() {
        None
    } else {
        let mut wasi = WasiCtxBuilder::new();
        // File operations run on the calling thread (a blocking one), not through a runtime.
        wasi.allow_blocking_current_thread(true);
        for dir in preopens {
            wasi.preopened_dir(&dir.host, &dir.guest, FsPerms::ReadWrite)
                .map_err(|e| PluginFault::Setup(format!("preopen {}: {e}", dir.host.display())))?;
        }
        Some(wasi.build())
    };
    let limits = StoreLimitsBuilder::new()
        .memory_size(engine.limits.memory_bytes)
        .instances(4)
        .tables(8)
        .memories(2)
        // A failed growth traps instead of returning -1: a memory bomb ends at once.
        .trap_on_grow_failure(true)
        .build();
    let mut store = Store::new(
        &engine.engine,
        PluginState {
            wasi,
            table: ResourceTable::new(),
            limits,
            label: label.to_owned(),
            job_id,
            parameters,
        },
    );
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(super::engine::deadline_ticks(budget));
    Ok(store)
}
