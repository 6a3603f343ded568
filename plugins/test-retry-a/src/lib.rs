//! Test guest for the host's hot-swap tests — version A of a pair (`test-retry-b` is the
//! other).
//!
//! `decide` always answers `retry-after(1111)`, so a test that swaps the two versions under load
//! can tell, from each decision alone, which version made it (a torn swap or a mixed instance
//! would show up as a wrong or missing delay).

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

/// This version's signature delay, in milliseconds.
const SIGNATURE_MS: u64 = 1111;

struct TestRetryA;

impl Guest for TestRetryA {
    fn decide(_job: Job, _error: JobError) -> Decision {
        Decision::RetryAfter(SIGNATURE_MS)
    }
}

export!(TestRetryA);
