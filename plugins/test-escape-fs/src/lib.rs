//! Test guest for the host's containment tests — attacks the FILE-SYSTEM sandbox.
//!
//! The host preopens one directory (the run's data directory) as `.`. This hook ignores what it
//! was asked to clean and instead tries to reach outside it:
//!
//! - list `..` and `/`;
//! - remove `../outside.txt` and the absolute `/etc/hostname`;
//! - create `../escaped.txt`;
//! - hard-link and rename `../outside.txt` into the preopen;
//! - plant symbolic links to `..` and `/` inside the preopen and go through them;
//! - for each of `run.files` (which the host test makes a symbolic link pointing outside):
//!   list it, write to, create and remove `<path>/victim.txt` through it, list and
//!   `remove_dir_all` `<path>/` (a trailing slash names the link's target), then
//!   `remove_dir_all(<path>)`.
//!
//! The report lists every attempt, named `"<operation> <path>"`: in `removed` when the
//! operation succeeded, in `failed` (with the error) when it did not. So the host test expects
//! `removed` to hold at most `"remove_dir_all <path>"` for the listed links (which removes the
//! link itself, inside the preopen) and checks that nothing outside was touched.

wit_bindgen::generate!({
    world: "cleanup-hook-plugin",
    path: "../../wit",
});

use std::ffi::{c_char, c_int, CString};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};

use exports::hangar::policy::cleanup_hook::{Failure, Guest, Report, Run};

struct EscapeFs;

/// Records each attempt's outcome.
struct Attempts(Report);

impl Attempts {
    fn attempt<T>(&mut self, operation: &str, path: &str, result: io::Result<T>) -> bool {
        let name = format!("{operation} {path}");
        match result {
            Ok(_) => {
                self.0.removed.push(name);
                true
            }
            Err(e) => {
                self.0.failed.push(Failure {
                    path: name,
                    error: e.to_string(),
                });
                false
            }
        }
    }
}

// `std::os::wasi::fs::symlink_path` is unstable; wasi-libc (linked by std) has `symlink`.
extern "C" {
    fn symlink(target: *const c_char, link: *const c_char) -> c_int;
}

/// Creates the symbolic link `link` pointing to `target`.
fn symlink_path(target: &str, link: &str) -> io::Result<()> {
    let target = CString::new(target)?;
    let link = CString::new(link)?;
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    if unsafe { symlink(target.as_ptr(), link.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lists a directory, to the end (an escape if it succeeds).
fn list(path: &str) -> io::Result<Vec<String>> {
    fs::read_dir(path)?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect()
}

/// Opens an existing file for writing, through whatever the path goes through, and writes it.
fn overwrite(path: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    file.write_all(b"written by test-escape-fs\n")
}

/// Creates a new file and writes it.
fn create(path: &str) -> io::Result<()> {
    fs::File::create(path)?.write_all(b"created by test-escape-fs\n")
}

impl Guest for EscapeFs {
    fn cleanup(run: Run) -> Report {
        let mut a = Attempts(Report {
            removed: Vec::new(),
            failed: Vec::new(),
        });

        // Up and out, by name.
        a.attempt("read_dir", "..", list(".."));
        a.attempt("read_dir", "/", list("/"));
        a.attempt(
            "remove_file",
            "../outside.txt",
            fs::remove_file("../outside.txt"),
        );
        a.attempt(
            "remove_file",
            "/etc/hostname",
            fs::remove_file("/etc/hostname"),
        );
        a.attempt("create", "../escaped.txt", create("../escaped.txt"));

        // Pull an outside file in.
        a.attempt(
            "hard_link",
            "../outside.txt",
            fs::hard_link("../outside.txt", "stolen-hardlink.txt"),
        );
        a.attempt(
            "rename",
            "../outside.txt",
            fs::rename("../outside.txt", "stolen-renamed.txt"),
        );

        // Plant links that point out, then go through them. (Creating a link is allowed in a
        // read-write preopen; following it out must not be.)
        for (link, target) in [("escape-parent", ".."), ("escape-root", "/")] {
            if a.attempt("symlink", link, symlink_path(target, link)) {
                a.attempt("read_dir", link, list(link));
                let outside = format!("{link}/outside.txt");
                a.attempt("overwrite", &outside, overwrite(&outside));
                a.attempt("remove_file", &outside, fs::remove_file(&outside));
                // Tidy up our own link (inside the preopen; not reported).
                let _ = fs::remove_file(link);
            }
        }

        // The paths the host gave us: links to outside. Go through them first, then remove.
        for path in &run.files {
            a.attempt("read_dir", path, list(path));
            let victim = format!("{path}/victim.txt");
            a.attempt("overwrite", &victim, overwrite(&victim));
            let created = format!("{path}/created-by-plugin.txt");
            a.attempt("create", &created, create(&created));
            a.attempt("remove_file", &victim, fs::remove_file(&victim));
            // A trailing `/` makes the path name the link's target rather than the link.
            let through = format!("{}/", path.trim_end_matches('/'));
            a.attempt("read_dir", &through, list(&through));
            a.attempt("remove_dir_all", &through, fs::remove_dir_all(&through));
            a.attempt("remove_dir_all", path, fs::remove_dir_all(path));
        }

        a.0
    }
}

export!(EscapeFs);
