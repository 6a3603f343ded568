//! The one wasmtime engine of a process, and every setting of it: the component model, epoch
//! interruption driven by a ticker thread, and a pooling allocator sized to the workers.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
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
    /// Wall time a call may run before it is interrupted. Default 10 ms.
    pub time_budget: Duration,
    /// Linear memory a call may grow to. Default 16 MiB.
    pub memory_bytes: usize,
    /// Calls that may run at once in this process (sizes the pooling allocator).
    pub concurrent_calls: u32,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            time_budget: Duration::from_millis(10),
            memory_bytes: 16 << 20,
            concurrent_calls: 64,
        }
    }
}

impl CallLimits {
    /// Ticks until the deadline; one more than the budget needs, since the first tick may come
    /// at once.
    pub fn deadline_ticks(&self) -> u64 {
        let ticks = self.time_budget.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
        u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1)
    }
}

pub struct PluginEngine {
    pub engine: Engine,
    /// WASI (no capabilities granted by default) and hangar's `host` interface.
    pub linker: Linker<PluginState>,
    pub limits: CallLimits,
    /// Identifies the engine's code generation: compiled artefacts are cached under it.
    pub compatibility: String,
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

impl PluginEngine {
    pub fn new(limits: CallLimits) -> Result<Self, EngineError> {
        let mut pooling = PoolingAllocationConfig::default();
        let slots = limits.concurrent_calls.max(4);
        pooling
            .total_component_instances(slots)
            .total_core_instances(slots * 4)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .total_stacks(slots)
            .max_memories_per_component(2)
            .max_memory_size(limits.memory_bytes)
            // Measured (`hangar bench --election-plugin`): keeping linear-memory pages resident
            // costs more on every drop (a memset) than it saves in page faults, since a Rust
            // guest's stack and data start 1 MiB in; decommits are batched instead. Tables are
            // small, and keeping them resident saves ~15% of a call.
            .linear_memory_keep_resident(0)
            .table_keep_resident(64 << 10)
            .decommit_batch_size(64);
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
            linker,
            limits,
            compatibility,
            ticker_stop,
        })
    }
}
