//! Keeps run statuses in step with their jobs, inside the transaction that changes the job.

use futures::future::BoxFuture;
use sqlx::PgConnection;

use super::files::RunFiles;
use super::{DETECTION_KIND, TRAINING_KIND};
use crate::completer::{AppliedState, StateObserver};
use crate::storage::{runs, StorageError};

pub struct RunStatusFollower {
    pub files: RunFiles,
}

impl StateObserver for RunStatusFollower {
    fn on_applied<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        applied: &'a [AppliedState],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let runs: Vec<&AppliedState> = applied
                .iter()
                .filter(|a| a.kind == DETECTION_KIND || a.kind == TRAINING_KIND)
                .collect();
            if runs.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = runs.iter().map(|a| a.job_id).collect();
            let states: Vec<&str> = runs.iter().map(|a| a.state.as_str()).collect();
            let messages: Vec<Option<&str>> = runs.iter().map(|a| a.message.as_deref()).collect();
            let changes = runs::follow_job_states(conn, &ids, &states, &messages).await?;
            self.files.record_errors(&changes);
            Ok(())
        })
    }
}
