//! The only module that calls `bindgen!`: the generated types of the three policy worlds stay
//! private here; `adapters` wraps them in small typed calls.

use super::sandbox::PluginState;

pub mod retry {
    wasmtime::component::bindgen!({
        world: "retry-policy-plugin",
        path: "../wit",
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        world: "state-filter-plugin",
        path: "../wit",
        with: {
            "hangar:policy/host": super::retry::hangar::policy::host,
            "hangar:policy/types": super::retry::hangar::policy::types,
        },
    });
}

pub mod cleanup {
    wasmtime::component::bindgen!({
        world: "cleanup-hook-plugin",
        path: "../wit",
        with: {
            "hangar:policy/host": super::retry::hangar::policy::host,
        },
    });
}

pub use retry::hangar::policy::host::{Host, Level};
pub use retry::hangar::policy::types::{Job, JobError, State, StateName};

impl Host for PluginState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = self.label.as_str();
        let job = self.job_id;
        match level {
            Level::Trace => tracing::trace!(plugin, job, "{message}"),
            Level::Debug => tracing::debug!(plugin, job, "{message}"),
            Level::Info => tracing::info!(plugin, job, "{message}"),
            Level::Warn => tracing::warn!(plugin, job, "{message}"),
            Level::Error => tracing::error!(plugin, job, "{message}"),
        }
    }

    fn get_parameter(&mut self, name: String) -> Option<String> {
        self.parameters.get(&name).cloned()
    }
}

impl retry::hangar::policy::types::Host for PluginState {}
