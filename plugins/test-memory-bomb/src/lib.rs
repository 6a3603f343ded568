//! Test guest for the host's containment tests — attacks the MEMORY cap.
//!
//! `decide` keeps allocating 1 MiB chunks, writes a byte into every page of each (so the pages
//! are really used, not just reserved), and keeps them all alive. It never returns normally:
//! it ends when an allocation fails (the allocator aborts, which traps) or when the host stops
//! it. The host must refuse to grow the linear memory past its cap, overrule the plugin, and
//! stay healthy.

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use core::hint::black_box;

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn decide(_job: Job, _error: JobError) -> Decision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Zeroed memory fresh from `memory.grow` costs nothing to allocate; one byte written
            // per 4 KiB page then really uses every page. The cap is reached in microseconds,
            // so it is the memory cap that stops this, not the time budget.
            let mut chunk = vec![0u8; CHUNK];
            for page in chunk.chunks_mut(PAGE) {
                page[0] = 0xA5;
            }
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

export!(MemoryBomb);
