//! Test guest for the host's hot-swap tests — version B of a pair (`test-retry-a` is the
//! other).
//!
//! `decide` always answers `retry-after(2222)`, so a test that swaps the two versions under load
//! can tell, from each decision alone, which version made it (a torn swap or a mixed instance
//! would show up as a wrong or missing delay).

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

/// This version's signature delay, in milliseconds.
const SIGNATURE_MS: u64 = 2222;

struct TestRetryB;

impl Guest for TestRetryB {
    fn decide(_job: Job, _error: JobError) -> Decision {
        Decision::RetryAfter(SIGNATURE_MS)
    }
}

export!(TestRetryB);
