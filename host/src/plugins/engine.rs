//! The one wasmtime engine of a process, and every setting of it: the component model, epoch
//! interruption driven by a ticker thread, and a pooling allocator sized to the workers.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::sandbox::PluginState;

/// How often the ticker advances the engine's epoch; a call's time budget is counted in ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The limits of every plugin call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallLimits {
    /// Wall time a decision (retry policy, state filter) may take before it is interrupted.
    /// Default 10 ms.
    pub time_budget: Duration,
    /// Wall time a cleanup hook may take: it removes files, and a run's output can be large.
    /// Default 60 s.
    pub cleanup_time_budget: Duration,
    /// Linear memory a call may grow to. Default 16 MiB.
    pub memory_bytes: usize,
    /// Calls that may run at once in this process (sizes the pooling allocator).
    pub concurrent_calls: u32,
    /// Reset written pages in place where that is safe from swap (see
    /// [`memory_reset_in_place_is_safe`]). Default true.
    pub reset_in_place: bool,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            time_budget: Duration::from_millis(10),
            cleanup_time_budget: Duration::from_secs(60),
            memory_bytes: 16 << 20,
            concurrent_calls: 64,
            reset_in_place: true,
        }
    }
}

/// Ticks until a deadline `budget` away; one more than the budget needs, since the first tick
/// may come at once.
pub fn deadline_ticks(budget: Duration) -> u64 {
    let ticks = budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1)
}

pub struct PluginEngine {
    pub engine: Engine,
    /// One per instance the pooling allocator holds: a call waits for one rather than fail.
    slots: CallSlots,
    /// WASI (no capabilities granted by default) and hangar's `host` interface.
    pub linker: Linker<PluginState>,
    pub limits: CallLimits,
    /// Identifies the engine's code generation: compiled artefacts are cached under it.
    pub compatibility: String,
    /// Whether finished calls' pages are reset in place (configured, and safe here).
    pub resets_in_place: bool,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("plugin engine: {0}")]
pub struct EngineError(String);

static PROCESS_ENGINE: OnceLock<Arc<PluginEngine>> = OnceLock::new();

/// The process's engine, created with `limits` on first use.
pub fn process_engine(limits: CallLimits) -> Result<Arc<PluginEngine>, EngineError> {
    if let Some(engine) = PROCESS_ENGINE.get() {
        return Ok(Arc::clone(engine));
    }
    let engine = Arc::new(PluginEngine::new(limits)?);
    Ok(Arc::clone(PROCESS_ENGINE.get_or_init(|| engine)))
}

/// Written linear-memory bytes a pool slot resets in place rather than gives back to the
/// kernel, per memory (see the pooling settings in [`PluginEngine::new`]).
const LINEAR_MEMORY_KEEP_RESIDENT: usize = 256 << 10;
/// The same for tables: a guest's function tables are small.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Whether a dropped store's written pages may be reset in place: the kernel must offer
/// PAGEMAP_SCAN (Linux 6.7+), and no swap may be configured. wasmtime 48 resets the written
/// pages that are *present*; one swapped out during a call would be neither reset nor given
/// back, and the next instance in the slot would read it (wasmtime PR #14357). Swap turned on
/// while hangar runs is not seen: restart it after `swapon`. The same holds, for a far shorter
/// window, for a page the kernel is migrating (compaction) as the store is dropped; where
/// that matters, `plugin_memory_reset_in_place = false` turns the whole mode off.
fn memory_reset_in_place_is_safe() -> bool {
    let swap_configured = match std::fs::read_to_string("/proc/swaps") {
        // A header line, then one line per swap area.
        Ok(swaps) => swaps.lines().skip(1).any(|line| !line.trim().is_empty()),
        Err(_) => true,
    };
    !swap_configured && PoolingAllocationConfig::is_pagemap_scan_available()
}

/// How long a call waits for a free slot before the built-in policy decides instead.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// A counting semaphore for blocking threads (plugin calls are synchronous).
struct CallSlots {
    free: Mutex<u32>,
    freed: Condvar,
}

/// A taken call slot, given back on drop.
pub struct CallSlot<'a>(&'a CallSlots);

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.0.free.lock() {
            *free += 1;
            self.0.freed.notify_one();
        }
    }
}

impl CallSlots {
    fn new(slots: u32) -> Self {
        Self {
            free: Mutex::new(slots),
            freed: Condvar::new(),
        }
    }

    fn take(&self, wait: Duration) -> Option<CallSlot<'_>> {
        let free = self.free.lock().ok()?;
        let (mut free, _) = self
            .freed
            .wait_timeout_while(free, wait, |free| *free == 0)
            .ok()?;
        if *free == 0 {
            return None;
        }
        *free -= 1;
        Some(CallSlot(self))
    }
}

impl PluginEngine {
    /// A slot for one call (one instance in the pool), waiting up to a second for one.
    pub fn call_slot(&self) -> Option<CallSlot<'_>> {
        self.slots.take(SLOT_WAIT)
    }

    pub fn new(limits: CallLimits) -> Result<Self, EngineError> {
        let mut pooling = PoolingAllocationConfig::default();
        let slots = limits.concurrent_calls.max(4);
        // A call instantiates one component; a Rust guest's holds a few core instances (its
        // module and the canonical-ABI shims), one memory and a few tables. The call slots
        // keep the component count within the pool. Memories and tables of dropped stores
        // wait in the decommit batch before they can be reused: room for a full batch too.
        let decommit_batch = 64;
        pooling
            .total_component_instances(slots)
            .total_core_instances(slots * 8)
            .total_memories(slots * 2 + decommit_batch)
            .total_tables(slots * 8 + decommit_batch * 4)
            .total_stacks(slots)
            .max_memories_per_component(2)
            .max_memory_size(limits.memory_bytes)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .decommit_batch_size(decommit_batch as usize);
        // A fresh instance's page faults, and the `madvise` and TLB shootdowns of giving its
        // pages back, were ~40% of a decision. With PAGEMAP_SCAN a dropped store's *written*
        // pages are found and reset in place, up to `keep_resident` bytes of them, and stay
        // mapped for the next call: a decision writes a few pages (its stack top, data,
        // arena), wherever the guest's layout puts them. Measured with `hangar bench
        // --election-plugin`: p50 22 → 15 µs, p99 80 → 35 µs. What a larger working set writes
        // beyond `keep_resident` is decommitted, so a slot keeps at most that much resident.
        // Without it, keeping pages resident means a blind memset of the low addresses, which
        // for a Rust guest (its stack ends 1 MiB in) costs more than the faults it saves.
        let reset_in_place = limits.reset_in_place && memory_reset_in_place_is_safe();
        if reset_in_place {
            pooling
                .pagemap_scan(wasmtime::Enabled::Auto)
                .linear_memory_keep_resident(LINEAR_MEMORY_KEEP_RESIDENT);
        } else {
            pooling
                .pagemap_scan(wasmtime::Enabled::No)
                .linear_memory_keep_resident(0);
        }
        tracing::debug!(reset_in_place, "plugin memory reset chosen");
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| EngineError(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| EngineError(e.to_string()))?;
        bindings::retry::RetryPolicyPlugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )
        .map_err(|e| EngineError(e.to_string()))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compatibility = format!("{:016x}", hasher.finish());

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let stop = Arc::clone(&ticker_stop);
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| EngineError(e.to_string()))?;
        Ok(Self {
            engine,
            slots: CallSlots::new(slots),
            linker,
            limits,
            compatibility,
            resets_in_place: reset_in_place,
            ticker_stop,
        })
    }
}
