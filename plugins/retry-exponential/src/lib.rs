//! `retry-exponential`: hangar's built-in retry policy, as a plugin.
//!
//! After a failed attempt, the job is retried up to `max` times; the n-th retry waits
//! `unit * 2^(n-1)` milliseconds. With the defaults (`max` = 3, `unit` = 1 minute):
//!
//! | failures | decision              |
//! |----------|-----------------------|
//! | 1        | retry after 1 minute  |
//! | 2        | retry after 2 minutes |
//! | 3        | retry after 4 minutes |
//! | ≥ 4      | fail                  |
//!
//! An operator can change the limits per job through its parameters:
//!
//! - `retry.max`: the number of retries (a non-negative integer; 0 = never retry);
//! - `retry.unit-ms`: the delay before the first retry, in milliseconds (default 60000).
//!
//! A parameter that is not a valid number is ignored (the default applies). The decision
//! itself is in the job's history (hangar records who decided and the delay).
//!
//! The plugin reads the parameters from the job record and imports nothing, not even hangar's
//! `host` interface: an import that passes strings makes every instantiation set up the
//! canonical ABI's shims, a third of a decision's cost.

// A decision runs thousands of times a second, each in a fresh instance: without Rust's std the
// component imports no WASI interfaces, and hangar instantiates it markedly faster. The pure
// logic below still has native unit tests (with std).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(not(test))]
mod runtime {
    /// An instance lives for one call, so memory is never given back: a bump allocator, first
    /// over an arena in the module's own memory (a decision needs a few hundred bytes, and no
    /// `memory.grow` means no call into the host), then over pages grown for what does not fit
    /// (a job with large parameters), up to the host's memory cap.
    struct Bump;

    const ARENA_SIZE: usize = 64 << 10;
    const WASM_PAGE: usize = 64 << 10;
    static mut ARENA: [u8; ARENA_SIZE] = [0; ARENA_SIZE];
    /// The free region still to hand out: `[NEXT, LIMIT)`; both 0 until the first allocation.
    static mut NEXT: usize = 0;
    static mut LIMIT: usize = 0;

    unsafe impl core::alloc::GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
            // SAFETY: an instance runs one call on one thread; nothing else touches these.
            unsafe {
                if LIMIT == 0 {
                    NEXT = core::ptr::addr_of_mut!(ARENA) as usize;
                    LIMIT = NEXT + ARENA_SIZE;
                }
                let align = layout.align();
                let start = (NEXT + align - 1) & !(align - 1);
                if start
                    .checked_add(layout.size())
                    .is_none_or(|end| end > LIMIT)
                {
                    // Fresh pages at the end of memory: what is left of the current region
                    // is abandoned.
                    let pages = (layout.size() + align).div_ceil(WASM_PAGE);
                    let old_pages = core::arch::wasm32::memory_grow(0, pages);
                    if old_pages == usize::MAX {
                        return core::ptr::null_mut();
                    }
                    NEXT = old_pages * WASM_PAGE;
                    LIMIT = NEXT + pages * WASM_PAGE;
                    return self.alloc(layout);
                }
                NEXT = start + layout.size();
                start as *mut u8
            }
        }

        unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
    }

    #[global_allocator]
    static ALLOCATOR: Bump = Bump;

    /// The canonical ABI's allocator, through which hangar hands over strings and lists (std's
    /// libc would provide it; without std, the plugin does).
    #[no_mangle]
    unsafe extern "C" fn cabi_realloc(
        old: *mut u8,
        old_len: usize,
        align: usize,
        new_len: usize,
    ) -> *mut u8 {
        use core::alloc::GlobalAlloc;
        if new_len == 0 {
            return align as *mut u8;
        }
        // SAFETY: the canonical ABI passes a power-of-two alignment and a non-zero size.
        unsafe {
            let layout = core::alloc::Layout::from_size_align_unchecked(new_len, align);
            let new = ALLOCATOR.alloc(layout);
            if new.is_null() {
                core::arch::wasm32::unreachable();
            }
            if !old.is_null() && old_len > 0 {
                core::ptr::copy_nonoverlapping(old, new, old_len.min(new_len));
            }
            new
        }
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        core::arch::wasm32::unreachable()
    }
}

use alloc::string::String;

// Generates the Rust side of the `retry-policy-plugin` world: the imports (`host`, `types`) as
// plain functions and types, and the `Guest` trait for the export (`retry-policy`).
wit_bindgen::generate!({
    world: "retry-policy-plugin",
    path: "../../wit",
});

use exports::hangar::policy::retry_policy::{Decision, Guest};
use hangar::policy::types::{Job, JobError};

/// Retries when `retry.max` is absent.
const DEFAULT_MAX_RETRIES: u32 = 3;
/// The first retry's delay when `retry.unit-ms` is absent: one minute.
const DEFAULT_UNIT_MS: u64 = 60_000;
/// No retry waits longer than this (a week), whatever the parameters say.
const MAX_DELAY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

struct RetryExponential;

impl Guest for RetryExponential {
    fn decide(job: Job, _error: JobError) -> Decision {
        let max = parameter(&job.parameters, "retry.max", DEFAULT_MAX_RETRIES);
        let unit_ms = parameter(&job.parameters, "retry.unit-ms", DEFAULT_UNIT_MS);
        policy(job.failures, max, unit_ms)
    }
}

/// The policy itself: after the `failures`-th failure, retry (the `failures`-th retry) if at
/// most `max` retries are used up by then, else fail.
fn policy(failures: i32, max: u32, unit_ms: u64) -> Decision {
    // `failures` counts the attempt that just failed, so the n-th failure asks for the n-th
    // retry. (It is at least 1 when hangar calls; anything lower is treated as 1.)
    let retry = u32::try_from(failures).unwrap_or(0).max(1);
    if retry > max {
        Decision::Fail
    } else {
        Decision::RetryAfter(delay_ms(unit_ms, retry))
    }
}

/// `unit_ms * 2^(retry-1)`, capped at [`MAX_DELAY_MS`].
fn delay_ms(unit_ms: u64, retry: u32) -> u64 {
    2u64.checked_pow(retry - 1)
        .and_then(|factor| unit_ms.checked_mul(factor))
        .map_or(MAX_DELAY_MS, |ms| ms.min(MAX_DELAY_MS))
}

/// The parameter `name` parsed as `T`, or `default` when the job has no such parameter or
/// its value does not parse.
fn parameter<T: core::str::FromStr>(parameters: &[(String, String)], name: &str, default: T) -> T {
    parameters
        .iter()
        .find(|(candidate, _)| candidate == name)
        .and_then(|(_, raw)| raw.trim().parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(ms: u64) -> Option<u64> {
        Some(ms)
    }

    fn delay(d: Decision) -> Option<u64> {
        match d {
            Decision::RetryAfter(ms) => Some(ms),
            Decision::Fail | Decision::Delete => None,
        }
    }

    #[test]
    fn defaults_match_the_seed() {
        let d = |f| delay(policy(f, DEFAULT_MAX_RETRIES, DEFAULT_UNIT_MS));
        assert_eq!(d(1), after(60_000));
        assert_eq!(d(2), after(120_000));
        assert_eq!(d(3), after(240_000));
        assert_eq!(d(4), None);
        assert_eq!(d(100), None);
        assert_eq!(d(0), after(60_000));
        assert_eq!(d(-5), after(60_000));
    }

    #[test]
    fn parameters_change_the_limits() {
        assert_eq!(delay(policy(1, 0, 1000)), None);
        assert_eq!(delay(policy(5, 5, 1000)), after(16_000));
        assert_eq!(delay(policy(6, 5, 1000)), None);
        assert_eq!(delay(policy(1, 3, 0)), after(0));
    }

    #[test]
    fn parameters_are_read_by_name_and_bad_values_ignored() {
        let parameters = vec![
            ("detectionRunId".to_string(), "7".to_string()),
            ("retry.max".to_string(), " 5 ".to_string()),
            ("retry.unit-ms".to_string(), "-1".to_string()),
        ];
        assert_eq!(parameter(&parameters, "retry.max", 3u32), 5);
        assert_eq!(parameter(&parameters, "retry.unit-ms", 60_000u64), 60_000);
        assert_eq!(parameter(&parameters, "retry.absent", 9u32), 9);
    }

    #[test]
    fn huge_delays_are_capped() {
        assert_eq!(delay(policy(64, u32::MAX, 1)), after(MAX_DELAY_MS));
        assert_eq!(delay(policy(1000, u32::MAX, 60_000)), after(MAX_DELAY_MS));
        assert_eq!(delay(policy(2, 3, u64::MAX)), after(MAX_DELAY_MS));
    }
}

// Registers `RetryExponential` as the implementation of the world's export.
export!(RetryExponential);
