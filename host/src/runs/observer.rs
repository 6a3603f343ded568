//! Keeps run statuses in step with their jobs, inside the transaction that changes the job.

use futures::future::BoxFuture;
use sqlx::PgConnection;

use super::files::RunFiles;
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
            let ids: Vec<i64> = applied.iter().map(|a| a.job_id).collect();
            let states: Vec<&str> = applied.iter().map(|a| a.state.as_str()).collect();
            let messages: Vec<Option<&str>> =
                applied.iter().map(|a| a.message.as_deref()).collect();
            let changes = runs::follow_job_states(conn, &ids, &states, &messages).await?;
            self.files.record_errors(&changes);
            Ok(())
        })
    }
}
