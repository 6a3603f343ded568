//! Test guest for the host's containment tests — attacks the MEMORY cap.
//!
//! `decide` keeps allocating 1 MiB chunks, writes every byte of each (so the pages are really
//! used, not just reserved), and keeps them all alive. It never returns normally: it ends when
//! an allocation fails (the allocator aborts, which traps) or when the host stops it. The host
//! must refuse to grow the linear memory past its cap, overrule the plugin, and stay healthy.

wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use core::hint::black_box;

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

const CHUNK: usize = 1 << 20;

struct MemoryBomb;

impl Guest for MemoryBomb {
    fn decide(_job: Job, _error: JobError) -> Decision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Not `vec![0; CHUNK]`: zeroed allocations may be satisfied by fresh memory without
            // writing to it. 0xA5 forces every byte to be written.
            let chunk = vec![0xA5u8; CHUNK];
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

export!(MemoryBomb);
