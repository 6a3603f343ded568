//! Test guest for the host's isolation test: it remembers what earlier calls left in its
//! memory, so that a pool slot reused without being reset would show.
//!
//! Each call bumps a counter in initialised data (it starts at 1000) and checks, then marks,
//! every page of a 512 KiB zero-initialised buffer — more than the host keeps resident per
//! slot, so both of its ways of resetting a memory (in place, and giving pages back) are
//! covered. In a fresh instance the answer is always `retry-after(1001)`; a leftover counter
//! adds to it, a leftover mark adds a million.

use std::cell::UnsafeCell;

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

const BUFFER_SIZE: usize = 512 << 10;
const PAGE: usize = 4096;
const MARK: u8 = 0xAB;

/// Memory an instance keeps between calls if it is ever reused (it must not be).
struct Leftover<T>(UnsafeCell<T>);

// SAFETY: an instance runs one call at a time on one thread.
unsafe impl<T> Sync for Leftover<T> {}

/// In initialised data (the module's memory image).
static CALLS: Leftover<u64> = Leftover(UnsafeCell::new(1000));
/// Zero-initialised, so not in the image.
static BUFFER: Leftover<[u8; BUFFER_SIZE]> = Leftover(UnsafeCell::new([0; BUFFER_SIZE]));

struct TestRemembers;

impl Guest for TestRemembers {
    fn decide(_job: Job, _error: JobError) -> Decision {
        // SAFETY: see `Leftover`; volatile so that the reads are not folded away.
        unsafe {
            let calls = CALLS.0.get();
            calls.write_volatile(calls.read_volatile() + 1);
            let buffer = BUFFER.0.get().cast::<u8>();
            let mut marked = false;
            for page in (0..BUFFER_SIZE).step_by(PAGE) {
                let byte = buffer.add(page);
                marked |= byte.read_volatile() == MARK;
                byte.write_volatile(MARK);
            }
            Decision::RetryAfter(calls.read_volatile() + if marked { 1_000_000 } else { 0 })
        }
    }
}

export!(TestRemembers);
