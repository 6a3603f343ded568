//! The election pipeline with plugins: candidate state → retry policy (on failure) → state
//! filters in order → applied. Any plugin fault makes the built-in policy decide that step;
//! the history records which plugin version (or the built-in) decided.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::Utc;

use super::adapters::{FilterState, PolicyJob};
use super::registry::{ActiveSet, PluginRegistry};
use crate::election::{elected_from_decision, Elected, FailedJob, RetryPolicy};
use crate::executor::Outcome;
use crate::state::{FetchedJob, JobId, JobState};
use crate::storage::jobs::AttemptEnd;

/// The parameters of the jobs in one election, by job.
pub type JobParameters = HashMap<JobId, BTreeMap<String, String>>;

/// A state that was applied to a job, as the state filters are told of it.
pub struct AppliedNotice {
    id: JobId,
    kind: String,
    queue: String,
    attempt: i32,
    failures: i32,
    state: FilterState,
}

impl AppliedNotice {
    pub fn new(job: &FetchedJob, end: &AttemptEnd) -> Self {
        Self {
            id: job.id,
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            attempt: job.attempt,
            failures: job.failures + i32::from(end.failed),
            state: FilterState {
                state: end.state,
                reason: end.reason.clone(),
                delay: end
                    .scheduled_at
                    .and_then(|at| (at - Utc::now()).to_std().ok()),
            },
        }
    }
}

/// The policies of a server: the built-in retry policy and, when enabled, the plugins.
#[derive(Clone)]
pub struct Policies {
    pub builtin: Arc<dyn RetryPolicy>,
    pub registry: Option<Arc<PluginRegistry>>,
}

impl Policies {
    pub fn builtin_only(builtin: Arc<dyn RetryPolicy>) -> Self {
        Self {
            builtin,
            registry: None,
        }
    }

    /// The plugins in force now, if any (None: no plugin would be called).
    pub fn active_plugins(&self) -> Option<Arc<ActiveSet>> {
        let snapshot = self.registry.as_ref()?.snapshot();
        (!snapshot.is_empty()).then_some(snapshot)
    }

    /// The write that ends `job`'s attempt with `outcome`, as the pipeline elects it; None
    /// when nothing is to be written (the lease was lost). `plugins` and `parameters` come from
    /// [`Self::active_plugins`] and the job's parameters.
    pub fn attempt_end(
        &self,
        plugins: Option<&ActiveSet>,
        parameters: &BTreeMap<String, String>,
        owner: &str,
        job: &FetchedJob,
        outcome: &Outcome,
    ) -> Option<AttemptEnd> {
        let now = Utc::now();
        let (elected, failed) = match outcome {
            Outcome::Abandoned => return None,
            Outcome::Released => {
                let end = Elected {
                    state: JobState::Enqueued,
                    reason: "released at shutdown".into(),
                    data: serde_json::json!({ "server": owner }),
                    scheduled_at: None,
                };
                return Some(to_end(job, owner, end, false));
            }
            Outcome::Succeeded => (
                Elected {
                    state: JobState::Succeeded,
                    reason: "completed".into(),
                    data: serde_json::json!({}),
                    scheduled_at: None,
                },
                false,
            ),
            Outcome::Failed(error) => {
                let failed_job = FailedJob {
                    id: job.id,
                    kind: &job.kind,
                    queue: &job.queue,
                    attempt: job.attempt,
                    failures: job.failures + 1,
                    error,
                };
                let plugin = plugins.and_then(|p| p.retry_policy.as_ref());
                let (decision, decided_by) = match plugin {
                    None => (self.builtin.decide(&failed_job), self.builtin.name()),
                    Some(plugin) => {
                        let policy_job = policy_job(job, job.failures + 1, parameters);
                        let answer = plugin.decide(&policy_job, error);
                        self.record(plugin, true, answer.as_ref().err());
                        match answer {
                            Ok(decision) => (decision, format!("plugin:{}", plugin.label)),
                            Err(fault) => (
                                self.builtin.decide(&failed_job),
                                format!(
                                    "{} (plugin {} {fault})",
                                    self.builtin.name(),
                                    plugin.label
                                ),
                            ),
                        }
                    }
                };
                (
                    elected_from_decision(decision, &decided_by, &failed_job, now),
                    true,
                )
            }
        };
        let elected = match plugins {
            Some(plugins) if !plugins.state_filters.is_empty() => {
                let failures = job.failures + i32::from(failed);
                self.filter(plugins, &policy_job(job, failures, parameters), elected)
            }
            _ => elected,
        };
        Some(to_end(job, owner, elected, failed))
    }

    fn filter(&self, plugins: &ActiveSet, job: &PolicyJob<'_>, mut elected: Elected) -> Elected {
        for filter in &plugins.state_filters {
            let now = Utc::now();
            let candidate = FilterState {
                state: elected.state,
                reason: elected.reason.clone(),
                delay: elected.scheduled_at.and_then(|at| (at - now).to_std().ok()),
            };
            let answer = filter.elect(job, &candidate);
            self.record(filter, true, answer.as_ref().err());
            match answer {
                Ok(answer) if answer != candidate => {
                    elected.state = answer.state;
                    elected.reason = answer.reason;
                    elected.scheduled_at = (answer.state == JobState::Scheduled).then(|| {
                        now + chrono::Duration::from_std(answer.delay.unwrap_or_default())
                            .unwrap_or_default()
                    });
                    if let (Some(at), Some(delay)) = (elected.scheduled_at, answer.delay) {
                        elected.data["scheduled_at"] = serde_json::json!(at);
                        elected.data["delay_ms"] =
                            serde_json::json!(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                    }
                    elected.data["filtered_by"] =
                        serde_json::json!(format!("plugin:{}", filter.label));
                }
                Ok(_) => {}
                Err(fault) => {
                    let note = serde_json::json!(format!("plugin {} {fault}", filter.label));
                    match elected.data["filter_faults"].as_array_mut() {
                        Some(faults) => faults.push(note),
                        None => elected.data["filter_faults"] = serde_json::json!([note]),
                    }
                }
            }
        }
        elected
    }

    /// Tells every state filter of `plugins` about each applied state, on a blocking thread
    /// (fire and forget: the states are committed already).
    pub fn tell_applied(
        &self,
        plugins: Arc<ActiveSet>,
        parameters: Arc<JobParameters>,
        notices: Vec<AppliedNotice>,
    ) {
        if plugins.state_filters.is_empty() || notices.is_empty() {
            return;
        }
        let policies = self.clone();
        tokio::task::spawn_blocking(move || {
            let none = BTreeMap::new();
            for notice in &notices {
                let job = PolicyJob {
                    id: notice.id,
                    kind: &notice.kind,
                    queue: &notice.queue,
                    attempt: notice.attempt,
                    failures: notice.failures,
                    parameters: parameters.get(&notice.id).unwrap_or(&none),
                };
                for filter in &plugins.state_filters {
                    let told = filter.applied(&job, &notice.state);
                    policies.record(filter, false, told.as_ref().err());
                }
            }
        });
    }

    fn record(
        &self,
        plugin: &super::adapters::LoadedPlugin,
        decisive: bool,
        fault: Option<&super::PluginFault>,
    ) {
        if let Some(registry) = &self.registry {
            registry.record(plugin, decisive, fault);
        }
    }
}

fn policy_job<'a>(
    job: &'a FetchedJob,
    failures: i32,
    parameters: &'a BTreeMap<String, String>,
) -> PolicyJob<'a> {
    PolicyJob {
        id: job.id,
        kind: &job.kind,
        queue: &job.queue,
        attempt: job.attempt,
        failures,
        parameters,
    }
}

fn to_end(job: &FetchedJob, owner: &str, elected: Elected, failed: bool) -> AttemptEnd {
    AttemptEnd {
        id: job.id,
        attempt: job.attempt,
        owner: owner.to_owned(),
        state: elected.state,
        reason: elected.reason,
        data: elected.data,
        scheduled_at: elected.scheduled_at,
        failed,
    }
}
