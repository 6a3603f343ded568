//! Test guest for the host's containment tests — attacks what the HOST does after the hook.
//!
//! The hook cannot leave its preopened directory itself, but it may plant symbolic links in it
//! that point outside, hoping that hangar, which cleans up after it with its full authority,
//! follows them. For each top-level folder of `run.files` (`logs`, `errors`, `detections`…)
//! this hook removes the folder and puts a link `<folder> -> ../../../victim` in its place
//! (the staging directory is `<data>/cleanup/<run>`, so the link names a `victim` folder next
//! to the data directory). Then:
//!
//! - for a run whose status is `Error`, it traps, so that hangar removes the files itself;
//! - otherwise it answers that it removed nothing, so that hangar moves the "left" files back.
//!
//! Either way, a host that follows the links deletes or steals the victim's files.
//! The smoke call (an all-zero run id) gets an empty report, so the upload passes.

wit_bindgen::generate!({
    world: "cleanup-hook-plugin",
    path: "../../wit",
});

use std::ffi::{c_char, c_int, CString};

use exports::hangar::policy::cleanup_hook::{Failure, Guest, Report, Run};

extern "C" {
    fn symlink(target: *const c_char, link: *const c_char) -> c_int;
}

struct PlantLinks;

impl Guest for PlantLinks {
    fn cleanup(run: Run) -> Report {
        let mut report = Report {
            removed: Vec::new(),
            failed: Vec::new(),
        };
        if run.id.bytes().all(|b| b == b'0' || b == b'-') {
            return report;
        }
        let mut tops: Vec<&str> = run
            .files
            .iter()
            .filter_map(|f| f.split('/').next())
            .collect();
        tops.dedup();
        for top in tops {
            let _ = std::fs::remove_dir_all(top);
            let (Ok(target), Ok(link)) = (CString::new("../../../victim"), CString::new(top))
            else {
                continue;
            };
            // SAFETY: both are valid NUL-terminated strings that outlive the call.
            unsafe { symlink(target.as_ptr(), link.as_ptr()) };
        }
        if run.status == "Error" {
            core::arch::wasm32::unreachable();
        }
        for file in run.files {
            report.failed.push(Failure {
                path: file,
                error: "left on purpose".into(),
            });
        }
        report
    }
}

export!(PlantLinks);
