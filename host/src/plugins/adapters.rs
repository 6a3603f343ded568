//! Typed adapters over the generated bindings: a compiled, pre-instantiated plugin of one
//! world, and one method per export. Every call gets a fresh store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::Store;

use super::bindings::{self, cleanup, filter, retry};
use super::engine::PluginEngine;
use super::sandbox::{new_store, PluginState, Preopen};
use super::{PluginFault, PluginKind};
use crate::election::RetryDecision;
use crate::state::{JobError, JobState};

/// The job a policy decides about.
#[derive(Debug, Clone)]
pub struct PolicyJob<'a> {
    pub id: i64,
    pub kind: &'a str,
    pub queue: &'a str,
    pub attempt: i32,
    pub failures: i32,
    pub parameters: &'a BTreeMap<String, String>,
}

/// A state as filters see and return it.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterState {
    pub state: JobState,
    pub reason: String,
    pub delay: Option<Duration>,
}

/// A run handed to a cleanup hook.
#[derive(Debug, Clone)]
pub struct CleanupRun {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CleanupReport {
    pub removed: Vec<String>,
    pub failed: Vec<(String, String)>,
}

enum Pre {
    Retry(retry::RetryPolicyPluginPre<PluginState>),
    Filter(filter::StateFilterPluginPre<PluginState>),
    Cleanup(cleanup::CleanupHookPluginPre<PluginState>),
}

/// A plugin version compiled and linked against its world, ready to instantiate per call.
pub struct LoadedPlugin {
    /// "slot@version", for logs and history.
    pub label: String,
    pub kind: PluginKind,
    engine: Arc<PluginEngine>,
    pre: Pre,
}

/// How often a call tries again to instantiate when the pool is momentarily full.
const POOL_RETRIES: u32 = 50;

/// The longest retry delay a policy may ask for; more is an illegal answer.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

impl LoadedPlugin {
    /// Links `component` against `kind`'s world: fails if it does not implement that world or
    /// imports anything hangar does not offer.
    pub fn link(
        engine: Arc<PluginEngine>,
        kind: PluginKind,
        label: String,
        component: &Component,
    ) -> Result<Self, String> {
        // Checked first: a component of another version may even link (an interface of
        // types only matches anything) and fail later with a less helpful message.
        if let Some(version) = contract_version_of(&engine.engine, component) {
            if version != super::CONTRACT_VERSION {
                return Err(format!(
                    "it was built against hangar:policy@{version}, and this hangar implements \
                     hangar:policy@{}: rebuild it against this hangar's wit/",
                    super::CONTRACT_VERSION
                ));
            }
        }
        let instance_pre = engine
            .linker
            .instantiate_pre(component)
            .map_err(|e| format!("{e:#}"))?;
        let pre = match kind {
            PluginKind::RetryPolicy => Pre::Retry(
                retry::RetryPolicyPluginPre::new(instance_pre).map_err(|e| format!("{e:#}"))?,
            ),
            PluginKind::StateFilter => Pre::Filter(
                filter::StateFilterPluginPre::new(instance_pre).map_err(|e| format!("{e:#}"))?,
            ),
            PluginKind::CleanupHook => Pre::Cleanup(
                cleanup::CleanupHookPluginPre::new(instance_pre).map_err(|e| format!("{e:#}"))?,
            ),
        };
        Ok(Self {
            label,
            kind,
            engine,
            pre,
        })
    }

    /// One call in a fresh store: `instantiate` the pre-instantiated component in it, then
    /// `call` the export. Traps, timeouts and memory faults become [`PluginFault`]s.
    fn call<P, R>(
        &self,
        job: &PolicyJob<'_>,
        preopens: &[Preopen],
        instantiate: impl Fn(&mut Store<PluginState>) -> wasmtime::Result<P>,
        call: impl Fn(&P, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginFault> {
        let limits = &self.engine.limits;
        let budget = match self.kind {
            PluginKind::CleanupHook => limits.cleanup_time_budget,
            PluginKind::RetryPolicy | PluginKind::StateFilter => limits.time_budget,
        };
        let _slot = self.engine.call_slot().ok_or(PluginFault::Busy)?;
        let mut pool_retries = 0;
        let mut timed_out = false;
        loop {
            let mut store = new_store(
                &self.engine,
                &self.label,
                job.id,
                job.parameters.clone(),
                preopens,
                budget,
            )?;
            let outcome = instantiate(&mut store)
                .map_err(PluginFault::from_error)
                .and_then(|plugin| call(&plugin, &mut store).map_err(PluginFault::from_error));
            match outcome {
                // The pool reuses a dropped store's memory only once its decommit batch is
                // flushed; with a slot held, room comes back within moments.
                Err(PluginFault::Busy) if pool_retries < POOL_RETRIES => {
                    pool_retries += 1;
                    drop(store);
                    std::thread::sleep(Duration::from_micros(200));
                }
                // The budget is wall time: a thread the OS left waiting on a busy machine can
                // run out of it without the plugin being at fault. A decision is a pure
                // function, so it is asked once more; a plugin that really loops fails again.
                Err(PluginFault::Timeout) if !timed_out && self.kind != PluginKind::CleanupHook => {
                    timed_out = true;
                }
                outcome => return outcome,
            }
        }
    }

    fn wrong_world(&self) -> PluginFault {
        PluginFault::Setup(format!("{} is not a {}", self.label, self.kind.world()))
    }

    /// The retry policy's decision for a failed attempt.
    pub fn decide(
        &self,
        job: &PolicyJob<'_>,
        error: &JobError,
    ) -> Result<RetryDecision, PluginFault> {
        let Pre::Retry(pre) = &self.pre else {
            return Err(self.wrong_world());
        };
        let error = bindings::JobError {
            exception_type: error.exception_type.clone(),
            message: error.message.clone(),
            details: error.details.clone(),
        };
        let decision = self.call(
            job,
            &[],
            |store| pre.instantiate(store),
            |plugin, store| {
                plugin
                    .hangar_policy_retry_policy()
                    .call_decide(store, &wit_job(job), &error)
            },
        )?;
        use retry::exports::hangar::policy::retry_policy::Decision;
        Ok(match decision {
            Decision::RetryAfter(ms) => {
                let delay = Duration::from_millis(ms);
                if delay > MAX_RETRY_DELAY {
                    return Err(PluginFault::Illegal(format!(
                        "retry-after({ms} ms) is over a year"
                    )));
                }
                RetryDecision::RetryAfter(delay)
            }
            Decision::Fail => RetryDecision::Fail,
            Decision::Delete => RetryDecision::Delete,
        })
    }

    /// The state filter's choice for `candidate`; only scheduled, deleted, failed or the
    /// candidate itself are legal answers.
    pub fn elect(
        &self,
        job: &PolicyJob<'_>,
        candidate: &FilterState,
    ) -> Result<FilterState, PluginFault> {
        let Pre::Filter(pre) = &self.pre else {
            return Err(self.wrong_world());
        };
        let answer = self.call(
            job,
            &[],
            |store| pre.instantiate(store),
            |plugin, store| {
                plugin.hangar_policy_state_filter().call_elect(
                    store,
                    &wit_job(job),
                    &wit_state(candidate),
                )
            },
        )?;
        let answer = from_wit_state(&answer)?;
        let legal = answer.state == candidate.state
            || matches!(
                answer.state,
                JobState::Scheduled | JobState::Deleted | JobState::Failed
            );
        if !legal {
            return Err(PluginFault::Illegal(format!(
                "a filter may not turn {} into {}",
                candidate.state, answer.state
            )));
        }
        if answer.state == JobState::Scheduled && answer.delay.is_none_or(|d| d > MAX_RETRY_DELAY) {
            return Err(PluginFault::Illegal(
                "scheduled needs a delay of at most a year".into(),
            ));
        }
        Ok(answer)
    }

    /// Tells the filter a state was applied.
    pub fn applied(&self, job: &PolicyJob<'_>, state: &FilterState) -> Result<(), PluginFault> {
        let Pre::Filter(pre) = &self.pre else {
            return Err(self.wrong_world());
        };
        self.call(
            job,
            &[],
            |store| pre.instantiate(store),
            |plugin, store| {
                plugin.hangar_policy_state_filter().call_applied(
                    store,
                    &wit_job(job),
                    &wit_state(state),
                )
            },
        )
    }

    /// Runs the cleanup hook with only `preopens` visible.
    pub fn cleanup(
        &self,
        run: &CleanupRun,
        preopens: &[Preopen],
    ) -> Result<CleanupReport, PluginFault> {
        let Pre::Cleanup(pre) = &self.pre else {
            return Err(self.wrong_world());
        };
        let wit_run = cleanup::exports::hangar::policy::cleanup_hook::Run {
            id: run.id.clone(),
            kind: run.kind.clone(),
            status: run.status.clone(),
            files: run.files.clone(),
        };
        let no_parameters = BTreeMap::new();
        let no_job = PolicyJob {
            id: 0,
            kind: &run.kind,
            queue: "",
            attempt: 0,
            failures: 0,
            parameters: &no_parameters,
        };
        let report = self.call(
            &no_job,
            preopens,
            |store| pre.instantiate(store),
            |plugin, store| {
                plugin
                    .hangar_policy_cleanup_hook()
                    .call_cleanup(store, &wit_run)
            },
        )?;
        Ok(CleanupReport {
            removed: report.removed,
            failed: report
                .failed
                .into_iter()
                .map(|f| (f.path, f.error))
                .collect(),
        })
    }
}

/// The `hangar:policy` version a component's imports or exports name, if any: what it was
/// built against.
fn contract_version_of(engine: &wasmtime::Engine, component: &Component) -> Option<String> {
    let ty = component.component_type();
    let version = ty
        .imports(engine)
        .map(|(name, _)| name)
        .chain(ty.exports(engine).map(|(name, _)| name))
        .filter(|name| name.starts_with("hangar:policy/"))
        .find_map(|name| name.split_once('@').map(|(_, version)| version.to_owned()));
    version
}

fn wit_job(job: &PolicyJob<'_>) -> bindings::Job {
    bindings::Job {
        id: job.id,
        kind: job.kind.to_owned(),
        queue: job.queue.to_owned(),
        attempt: job.attempt,
        failures: job.failures,
        parameters: job
            .parameters
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
    }
}

fn wit_state(state: &FilterState) -> bindings::State {
    use bindings::StateName as N;
    let name = match state.state {
        JobState::Enqueued => N::Enqueued,
        JobState::Scheduled => N::Scheduled,
        JobState::Awaiting => N::Awaiting,
        JobState::Processing => N::Processing,
        JobState::Succeeded => N::Succeeded,
        JobState::Failed => N::Failed,
        JobState::Deleted => N::Deleted,
    };
    bindings::State {
        name,
        reason: state.reason.clone(),
        delay_ms: state
            .delay
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

fn from_wit_state(state: &bindings::State) -> Result<FilterState, PluginFault> {
    use bindings::StateName as N;
    let name = match state.name {
        N::Enqueued => JobState::Enqueued,
        N::Scheduled => JobState::Scheduled,
        N::Awaiting => JobState::Awaiting,
        N::Processing => JobState::Processing,
        N::Succeeded => JobState::Succeeded,
        N::Failed => JobState::Failed,
        N::Deleted => JobState::Deleted,
    };
    Ok(FilterState {
        state: name,
        reason: state.reason.clone(),
        delay: state.delay_ms.map(Duration::from_millis),
    })
}
