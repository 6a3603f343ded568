//! Test guest for the host's containment tests — attacks the TIME budget.
//!
//! `decide` never returns: it spins in a pure-compute loop (no host calls, no allocation) that
//! the optimiser cannot remove, because every step goes through `core::hint::black_box`. The
//! host must interrupt it (epoch or fuel) within its time budget, overrule it with the built-in
//! policy, and count the fault.

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use core::hint::black_box;

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

struct LoopForever;

impl Guest for LoopForever {
    fn decide(job: Job, _error: JobError) -> Decision {
        let mut counter = black_box(job.id as u64);
        loop {
            counter = black_box(counter.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export!(LoopForever);
