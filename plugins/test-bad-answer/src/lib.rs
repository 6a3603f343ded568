//! Test guest for the host's containment tests — attacks the host's VALIDATION of answers.
//!
//! `elect` answers `processing`, which a state filter may never elect (only the candidate
//! unchanged, `scheduled`, `deleted` or `failed` are legal). The host must reject the answer,
//! keep the candidate (or its built-in choice), and count the fault. `applied` does nothing.

wit_bindgen::generate!({
    world: "state-filter-plugin",
    path: "../../wit",
});

use exports::hangar::policy::state_filter::Guest;
use hangar::policy::types::{Job, State, StateName};

struct BadAnswer;

impl Guest for BadAnswer {
    fn elect(_job: Job, _candidate: State) -> State {
        State {
            name: StateName::Processing,
            reason: "test-bad-answer: an illegal state for a filter".to_string(),
            delay_ms: None,
        }
    }

    fn applied(_job: Job, _applied_state: State) {}
}

export!(BadAnswer);
