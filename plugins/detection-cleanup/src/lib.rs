//! `detection-cleanup`: removes the files of a finished or deleted run.
//!
//! hangar decides which files a run owns (for a detection run: `logs/succ_<id>.txt`,
//! `logs/error_<id>.txt`, `detections/<id>`, and `errors/<id>_errMsg.txt` when it failed) and
//! passes them in `run.files`, relative to the run's data directory. The host preopens that
//! directory (read-write) as `.`, so plain `std::fs` calls with relative paths reach it, and
//! nothing else of the file system is visible.
//!
//! For each listed path this hook:
//!
//! - refuses (reports in `failed`) a path that is empty, absolute, contains a `..` component,
//!   names the data directory itself (`.`), or goes through a symbolic link;
//! - skips silently a path that does not exist (it is neither removed nor failed);
//! - removes a symbolic link itself, never what it points to (also when the path is written
//!   with a trailing `/`, which would otherwise name the target);
//! - removes a directory with all its contents, and a file;
//! - reports each removed path in `removed`, and each error in `failed`.
//!
//! The WASI sandbox already keeps the plugin inside its preopened directory; the checks above
//! make the hook refuse clearly instead of relying on it.

wit_bindgen::generate!({
    world: "cleanup-hook-plugin",
    path: "../../wit",
});

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use exports::hangar::policy::cleanup_hook::{Failure, Guest, Report, Run};
use hangar::policy::host::{self, Level};

struct DetectionCleanup;

impl Guest for DetectionCleanup {
    fn cleanup(run: Run) -> Report {
        let mut report = Report {
            removed: Vec::new(),
            failed: Vec::new(),
        };
        for file in &run.files {
            match remove(file) {
                Ok(Removal::Removed) => report.removed.push(file.clone()),
                Ok(Removal::Absent) => {}
                Err(error) => {
                    host::log(
                        Level::Warn,
                        &format!("run {}: cannot remove {file:?}: {error}", run.id),
                    );
                    report.failed.push(Failure {
                        path: file.clone(),
                        error,
                    });
                }
            }
        }
        host::log(
            Level::Debug,
            &format!(
                "run {} ({}, {}): removed {} of {} paths, {} failed",
                run.id,
                run.kind,
                run.status,
                report.removed.len(),
                run.files.len(),
                report.failed.len()
            ),
        );
        report
    }
}

/// What [`remove`] did with a path.
enum Removal {
    Removed,
    /// There was nothing to remove.
    Absent,
}

/// Removes `file` (relative to the data directory) if it is safe to; the error is a reason for
/// the report.
fn remove(file: &str) -> Result<Removal, String> {
    check_relative(Path::new(file))?;
    // Rebuilt from its components, the path loses its `.` parts and any trailing `/`. That
    // matters: "link/" names the directory a link points to, not the link, so the checks
    // below would pass through the link and `remove_dir_all` would empty its target.
    let path: PathBuf = Path::new(file).components().collect();
    let path = path.as_path();

    // Every directory on the way must be a real directory: a symbolic link there could lead out
    // of the run's directories (the sandbox would refuse too, but with a less clear error).
    let mut ancestors: Vec<&Path> = path
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .collect();
    ancestors.reverse();
    for ancestor in ancestors {
        match fs::symlink_metadata(ancestor) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "refused: {} is a symbolic link",
                    ancestor.display()
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
            Err(e) => return Err(e.to_string()),
        }
    }

    // `symlink_metadata` describes the path itself, not what a link points to.
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Absent),
        Err(e) => return Err(e.to_string()),
    };
    let result = if meta.is_dir() {
        // Does not follow links inside the directory: they are removed, not their targets.
        fs::remove_dir_all(path)
    } else {
        // A file, or a symbolic link (to anything): unlinks the link itself.
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(Removal::Removed),
        // Gone in the meantime: nothing to report.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removal::Absent),
        Err(e) => Err(e.to_string()),
    }
}

/// Accepts only a non-empty relative path that stays below the data directory.
fn check_relative(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("refused: empty path".to_string());
    }
    let mut normal = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            Component::ParentDir => return Err("refused: path contains `..`".to_string()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("refused: absolute path".to_string())
            }
        }
    }
    if normal == 0 {
        return Err("refused: path names the data directory itself".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_that_leave_the_data_directory() {
        for bad in [
            "",
            "/etc/hostname",
            "../x",
            "logs/../../x",
            "logs/..",
            ".",
            "./",
            "./.",
        ] {
            assert!(check_relative(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
        for good in ["logs/succ_1.txt", "./detections/1", "detections/1/", "a"] {
            assert!(check_relative(Path::new(good)).is_ok(), "{good:?} refused");
        }
    }

    /// Natively (not under WASI): the data directory is the current directory, as in the
    /// sandbox, with an `outside` directory next to it that must survive.
    #[cfg(unix)]
    #[test]
    fn removes_files_dirs_and_links_but_never_link_targets() {
        use std::os::unix::fs::symlink;

        let base = std::env::temp_dir().join(format!("detection-cleanup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let data = base.join("data");
        let outside = base.join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("target.txt"), "keep").unwrap();
        fs::write(outside.join("dir/victim.txt"), "keep").unwrap();
        fs::create_dir_all(data.join("logs")).unwrap();
        fs::create_dir_all(data.join("detections/1/a")).unwrap();
        fs::write(data.join("logs/succ_1.txt"), "").unwrap();
        fs::write(data.join("logs/succ_2.txt"), "").unwrap();
        fs::write(data.join("detections/1/a/b.txt"), "").unwrap();
        symlink("../../../outside/dir", data.join("detections/1/escape")).unwrap();
        symlink("../outside/target.txt", data.join("link-file")).unwrap();
        symlink("../outside/dir", data.join("link-dir")).unwrap();
        symlink("../outside", data.join("link-parent")).unwrap();
        std::env::set_current_dir(&data).unwrap();

        let removed = |p: &str| matches!(remove(p), Ok(Removal::Removed));
        assert!(removed("logs/succ_1.txt"));
        assert!(removed("detections/1"));
        assert!(removed("link-file"));
        assert!(removed("link-dir/"));
        assert!(removed("./logs/./succ_2.txt"));
        assert!(matches!(remove("logs/error_1.txt"), Ok(Removal::Absent)));
        assert!(matches!(remove("errors/1_errMsg.txt"), Ok(Removal::Absent)));
        assert!(remove("link-parent/dir").is_err());
        assert!(remove("../outside/target.txt").is_err());

        assert!(!data.join("logs/succ_1.txt").exists());
        assert!(!data.join("detections/1").exists());
        assert!(fs::symlink_metadata(data.join("link-file")).is_err());
        assert!(fs::symlink_metadata(data.join("link-dir")).is_err());
        assert!(data.join("logs").is_dir());
        assert_eq!(
            fs::read_to_string(outside.join("target.txt")).unwrap(),
            "keep"
        );
        assert_eq!(
            fs::read_to_string(outside.join("dir/victim.txt")).unwrap(),
            "keep"
        );

        std::env::set_current_dir(&base).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }
}

export!(DetectionCleanup);
