//! Eight servers race for a burst of 10,000 jobs: every (job, attempt) starts exactly once.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hangar::executor::{HandlerRegistry, JobContext, JobHandler};
use hangar::state::{JobError, NewJob};
use support::{wait_all_succeeded, TestDb};

/// The servers that started each (job, attempt).
type Starts = HashMap<(i64, i32), Vec<String>>;

/// Counts the starts of each (job, attempt) and which server ran it.
#[derive(Clone, Default)]
struct StartRecorder {
    starts: Arc<Mutex<Starts>>,
}

impl JobHandler for StartRecorder {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            self.starts
                .lock()
                .expect("lock")
                .entry((ctx.job.id, ctx.job.attempt))
                .or_default()
                .push(ctx.fence.owner.clone());
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_servers_start_each_job_of_a_burst_exactly_once() {
    const JOBS: usize = 10_000;
    let db = TestDb::new().await;
    let recorder = StartRecorder::default();
    let mut servers = Vec::new();
    for n in 0..8 {
        let mut handlers = HandlerRegistry::default();
        handlers.register("record", recorder.clone());
        let config = hangar::config::Config {
            server_name: format!("server-{n}"),
            worker_count: 16,
            ..db.config.clone()
        };
        servers.push(db.server(config, handlers).await);
    }
    let burst: Vec<NewJob> = (0..JOBS)
        .map(|_| NewJob::new("record", "default"))
        .collect();
    let ids = db
        .client()
        .enqueue_many(&burst)
        .await
        .expect("enqueue the burst");
    assert_eq!(ids.len(), JOBS);

    wait_all_succeeded(&db, JOBS).await;

    let starts = recorder.starts.lock().expect("lock").clone();
    assert_eq!(starts.len(), JOBS, "every job started");
    let twice: Vec<_> = starts
        .iter()
        .filter(|(_, owners)| owners.len() != 1)
        .collect();
    assert!(
        twice.is_empty(),
        "started more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    assert!(
        starts.keys().all(|(_, attempt)| *attempt == 1),
        "no job needed a second attempt"
    );
    for id in &ids {
        assert!(starts.contains_key(&(*id, 1)), "job {id} never started");
    }
    let servers_used: std::collections::HashSet<&String> = starts.values().flatten().collect();
    assert!(
        servers_used.len() > 1,
        "the burst was shared between servers"
    );
    for server in servers {
        server.shutdown().await;
    }
}
