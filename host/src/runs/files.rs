//! Where the files of runs live under the data directory (the original application's layout):
//!
//! ```text
//! logs/succ_<run>.txt, logs/error_<run>.txt    the driver's stdout and stderr
//! errors/<run>_errMsg.txt                      why a run ended in Error
//! detections/<run>/detection_bboxes.json       a detection run's output
//! trainings/<run>/                             a training run's work dir (checkpoint, config)
//! ```

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::config::Config;
use crate::storage::runs::RunStatusChange;

#[derive(Debug, Clone)]
pub struct RunFiles {
    root: PathBuf,
}

impl RunFiles {
    pub fn new(config: &Config) -> Self {
        Self {
            root: config.data_dir.clone(),
        }
    }

    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stdout_log(&self, run: Uuid) -> PathBuf {
        self.root.join("logs").join(format!("succ_{run}.txt"))
    }

    pub fn stderr_log(&self, run: Uuid) -> PathBuf {
        self.root.join("logs").join(format!("error_{run}.txt"))
    }

    pub fn error_message(&self, run: Uuid) -> PathBuf {
        self.root.join("errors").join(format!("{run}_errMsg.txt"))
    }

    pub fn detection_output(&self, run: Uuid) -> PathBuf {
        self.root.join("detections").join(run.to_string())
    }

    pub fn training_work_dir(&self, run: Uuid) -> PathBuf {
        self.root.join("trainings").join(run.to_string())
    }

    /// Writes `<run>_errMsg.txt` for every run that ended in Error.
    pub fn record_errors(&self, changes: &[RunStatusChange]) {
        for change in changes.iter().filter(|c| c.status == "Error") {
            let path = self.error_message(change.id);
            let message = change.error_message.as_deref().unwrap_or("unknown error");
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&path, message));
            if let Err(error) = written {
                tracing::error!(run = %change.id, path = %path.display(), %error, "cannot write the run's error message file");
            }
        }
    }
}
