//! Policies as WASI components: retry policies, state filters and cleanup hooks that operators
//! swap while everything runs.
//!
//! [`engine`] holds the process's wasmtime engine; [`bindings`] the generated code of the WIT
//! worlds in `wit/`; [`adapters`] typed calls, each in a fresh [`sandbox`] store; [`artifacts`]
//! compiled components cached on disk; [`registry`]
//! the active version of every slot, swapped atomically when PostgreSQL says it changed;
//! [`catalog`] uploads (validated); [`switch`] activations, rollbacks and turning slots off;
//! [`policies`] the election pipeline that uses them, falling back to the built-in policy on
//! any fault.

pub mod adapters;
pub mod artifacts;
mod bindings;
pub mod catalog;
pub mod engine;
pub mod policies;
pub mod registry;
pub mod sandbox;
pub mod switch;

/// The three worlds a plugin can implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    RetryPolicy,
    StateFilter,
    CleanupHook,
}

/// The version of the `hangar:policy` package (`wit/policy.wit`) this hangar implements. A
/// component built against another version does not link (records such as `job` differ
/// between versions), and is refused with a message that says so.
pub const CONTRACT_VERSION: &str = "0.2.0";

impl PluginKind {
    pub fn world(self) -> &'static str {
        match self {
            PluginKind::RetryPolicy => "hangar:policy/retry-policy-plugin@0.2.0",
            PluginKind::StateFilter => "hangar:policy/state-filter-plugin@0.2.0",
            PluginKind::CleanupHook => "hangar:policy/cleanup-hook-plugin@0.2.0",
        }
    }

    /// The kind a slot name stands for: `retry-policy`, `state-filter/<name>` (names of
    /// lowercase letters, digits and `-`, except the words of the API's paths) or
    /// `cleanup-hook/detection` and `cleanup-hook/training` (the kinds of run).
    pub fn of_slot(slot: &str) -> Result<Self, PluginError> {
        const RESERVED: [&str; 3] = ["versions", "rollback", "deactivate"];
        let valid_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && !RESERVED.contains(&name)
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        match slot.split_once('/') {
            None if slot == "retry-policy" => Ok(PluginKind::RetryPolicy),
            Some(("state-filter", name)) if valid_name(name) => Ok(PluginKind::StateFilter),
            Some(("cleanup-hook", "detection" | "training")) => Ok(PluginKind::CleanupHook),
            _ => Err(PluginError::Invalid(format!(
                "unknown slot {slot:?}: use retry-policy, state-filter/<name> (a name of \
                 lowercase letters, digits and -, not versions, rollback or deactivate), \
                 cleanup-hook/detection or cleanup-hook/training"
            ))),
        }
    }
}

/// Why a plugin call did not produce a usable answer. The built-in policy decides instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginFault {
    #[error("ran past its time budget")]
    Timeout,
    #[error("ran out of memory")]
    OutOfMemory,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("answered something illegal: {0}")]
    Illegal(String),
    #[error("could not be set up: {0}")]
    Setup(String),
    /// Every call slot of this server was taken for too long: the host's limit, not the
    /// plugin's doing.
    #[error("found no free call slot on this server")]
    Busy,
}

impl PluginFault {
    pub fn from_error(error: wasmtime::Error) -> Self {
        if error
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            return PluginFault::Busy;
        }
        if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
            if *trap == wasmtime::Trap::Interrupt {
                return PluginFault::Timeout;
            }
        }
        let text = format!("{error:#}");
        if text.contains("memory")
            && (text.contains("grow") || text.contains("limit") || text.contains("allocat"))
        {
            return PluginFault::OutOfMemory;
        }
        PluginFault::Trap(text)
    }

    /// A short label for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            PluginFault::Timeout => "timeout",
            PluginFault::OutOfMemory => "memory",
            PluginFault::Trap(_) => "trap",
            PluginFault::Illegal(_) => "illegal",
            PluginFault::Setup(_) => "setup",
            PluginFault::Busy => "busy",
        }
    }

    /// Whether the plugin itself misbehaved (and the fault counts towards its rollback), as
    /// opposed to the host failing to run it.
    pub fn is_the_plugins(&self) -> bool {
        !matches!(self, PluginFault::Setup(_) | PluginFault::Busy)
    }
}

/// Why an upload, activation or rollback was refused.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl From<sqlx::Error> for PluginError {
    fn from(error: sqlx::Error) -> Self {
        PluginError::Storage(error.into())
    }
}

#[cfg(test)]
mod contract_tests {
    use super::*;

    #[test]
    fn the_contract_version_is_the_wit_packages() {
        let wit = include_str!("../../../wit/policy.wit");
        assert!(
            wit.contains(&format!("package hangar:policy@{CONTRACT_VERSION};")),
            "wit/policy.wit and CONTRACT_VERSION disagree"
        );
        for kind in [
            PluginKind::RetryPolicy,
            PluginKind::StateFilter,
            PluginKind::CleanupHook,
        ] {
            assert!(kind.world().ends_with(&format!("@{CONTRACT_VERSION}")));
        }
    }

    /// The contract as released under [`CONTRACT_VERSION`]. Editing `wit/policy.wit` fails
    /// this test on purpose: if a type or function changed, bump the package version and
    /// [`CONTRACT_VERSION`] (components of the old version will be refused); if only comments
    /// changed, update the hash.
    const RELEASED_WIT_SHA256: &str =
        "f53ca842ec234d49d5e5e9a722491fd66a0a2aee66636639c3d94095aa1d7bf3";

    #[test]
    fn the_wit_is_the_released_contract_of_its_version() {
        use sha2::Digest;
        let wit = include_bytes!("../../../wit/policy.wit");
        assert_eq!(
            hex::encode(sha2::Sha256::digest(wit)),
            RELEASED_WIT_SHA256,
            "wit/policy.wit changed: bump hangar:policy@{CONTRACT_VERSION} if a type or \
             function did, else update RELEASED_WIT_SHA256"
        );
    }
}
