//! Job lifecycle on real PostgreSQL: history, retries, schedule, continuations, parameters,
//! deletion.

mod support;

use std::time::Duration;

use hangar::state::{ContinuationOption, NewJob};
use support::{command_handlers, shell_job, wait_for_state, TestDb};

const WAIT: Duration = Duration::from_secs(20);

fn states(details: &hangar::client::JobDetails) -> Vec<String> {
    details.history.iter().map(|h| h.state.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_and_its_history_records_every_state() {
    let db = TestDb::new().await;
    let server = db.server(db.config.clone(), command_handlers()).await;
    let id = db
        .client()
        .enqueue(&shell_job("default", "echo hello"))
        .await
        .expect("enqueue");
    wait_for_state(&db, id, "succeeded", WAIT).await;
    let details = db.job(id).await;
    assert_eq!(states(&details), ["enqueued", "processing", "succeeded"]);
    assert_eq!(details.job.attempt, 1);
    assert_eq!(details.history[1].data["server"], server.id());
    assert!(details.job.finished_at.is_some());
    assert!(details.job.lease_owner.is_none());
    let log = std::fs::read_to_string(db.config.logs_dir().join(format!("job_{id}.out")))
        .expect("stdout log");
    assert_eq!(log, "hello\n");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_follows_the_seed_retry_schedule_then_fails() {
    let db = TestDb::new().await;
    let server = db.server(db.config.clone(), command_handlers()).await;
    let id = db
        .client()
        .enqueue(&shell_job("default", "echo 'model exploded' >&2; exit 7"))
        .await
        .expect("enqueue");
    wait_for_state(&db, id, "failed", WAIT).await;
    let details = db.job(id).await;
    assert_eq!(details.job.attempt, 4, "1 attempt + 3 retries");
    let retries: Vec<_> = details
        .history
        .iter()
        .filter(|h| h.state == "scheduled")
        .collect();
    assert_eq!(retries.len(), 3);
    // The n-th retry waits 2^(n-1) units: 1, 2, 4 (the seed's minutes, scaled to 50 ms here).
    for (n, entry) in retries.iter().enumerate() {
        assert_eq!(entry.data["delay_ms"], 50 * (1 << n), "retry {}", n + 1);
        // And the job waited that long: the next attempt started no earlier.
        let scheduled_at: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(entry.data["scheduled_at"].clone()).expect("scheduled_at");
        let next_start = details
            .history
            .iter()
            .find(|h| h.state == "processing" && h.attempt == entry.attempt + 1)
            .expect("the next attempt");
        assert!(
            next_start.created_at >= scheduled_at,
            "retry {} started early",
            n + 1
        );
        assert_eq!(entry.data["decided_by"], "builtin:exponential");
    }
    let failed = details.history.last().expect("history");
    assert_eq!(failed.state, "failed");
    assert_eq!(failed.data["exception_type"], "SubprocessFailed");
    assert!(failed.data["message"]
        .as_str()
        .is_some_and(|m| m.contains("status 7")));
    assert!(failed.data["details"]
        .as_str()
        .is_some_and(|d| d.contains("model exploded")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_waits_for_its_time() {
    let db = TestDb::new().await;
    let server = db.server(db.config.clone(), command_handlers()).await;
    let client = db.client();
    let later = client
        .schedule(
            &shell_job("default", "true"),
            chrono::Utc::now() + chrono::Duration::hours(1),
        )
        .await
        .expect("schedule");
    let soon = client
        .schedule_after(&shell_job("default", "true"), Duration::from_millis(300))
        .await
        .expect("schedule");
    wait_for_state(&db, soon, "succeeded", WAIT).await;
    let details = db.job(soon).await;
    assert_eq!(
        states(&details),
        ["scheduled", "enqueued", "processing", "succeeded"]
    );
    let started = details.history[2].created_at;
    assert!(started >= details.history[0].created_at + chrono::Duration::milliseconds(300));
    assert_eq!(db.state(later).await, "scheduled");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuations_wait_for_the_final_state_of_their_parent() {
    let db = TestDb::new().await;
    let client = db.client();
    // The parent blocks until the test creates a file, so its children are created while it
    // is still running.
    let gate = db.dir.path().join("gate");
    let parent_ok = client
        .enqueue(&shell_job(
            "default",
            &format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display()),
        ))
        .await
        .expect("enqueue");
    let parent_fails = client
        .enqueue(&shell_job("default", "exit 1"))
        .await
        .expect("enqueue");
    let server = db
        .server(
            hangar::config::Config {
                max_retries: 0,
                ..db.config.clone()
            },
            command_handlers(),
        )
        .await;
    wait_for_state(&db, parent_ok, "processing", WAIT).await;
    let child_success = client
        .continue_with(
            parent_ok,
            &shell_job("default", "true"),
            ContinuationOption::OnSuccess,
        )
        .await
        .expect("continue");
    let child_any = client
        .continue_with(
            parent_ok,
            &shell_job("default", "true"),
            ContinuationOption::OnAnyFinal,
        )
        .await
        .expect("continue");
    assert_eq!(db.state(child_success).await, "awaiting");
    assert_eq!(db.state(child_any).await, "awaiting");

    wait_for_state(&db, parent_fails, "failed", WAIT).await;
    let after_failure_success = client
        .continue_with(
            parent_fails,
            &shell_job("default", "true"),
            ContinuationOption::OnSuccess,
        )
        .await
        .expect("continue");
    let after_failure_any = client
        .continue_with(
            parent_fails,
            &shell_job("default", "true"),
            ContinuationOption::OnAnyFinal,
        )
        .await
        .expect("continue");
    assert_eq!(
        db.state(after_failure_success).await,
        "deleted",
        "on_success after a failure is deleted"
    );
    wait_for_state(&db, after_failure_any, "succeeded", WAIT).await;

    // Still awaiting while the parent runs.
    assert_eq!(db.state(child_success).await, "awaiting");
    std::fs::write(&gate, b"").expect("open the gate");
    wait_for_state(&db, child_success, "succeeded", WAIT).await;
    wait_for_state(&db, child_any, "succeeded", WAIT).await;
    let parent_finished = db.job(parent_ok).await.job.finished_at.expect("finished");
    let child_started = db.job(child_success).await.history[2].created_at;
    assert!(
        child_started >= parent_finished,
        "a child never starts before its parent's final state"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_parent_deletes_its_waiting_children_transitively() {
    let db = TestDb::new().await;
    let client = db.client();
    let parent = client
        .schedule_after(&shell_job("default", "true"), Duration::from_secs(3600))
        .await
        .expect("schedule");
    let child = client
        .continue_with(
            parent,
            &shell_job("default", "true"),
            ContinuationOption::OnAnyFinal,
        )
        .await
        .expect("continue");
    let grandchild = client
        .continue_with(
            child,
            &shell_job("default", "true"),
            ContinuationOption::OnAnyFinal,
        )
        .await
        .expect("continue");
    client.delete(parent).await.expect("delete");
    assert_eq!(db.state(parent).await, "deleted");
    assert_eq!(db.state(child).await, "deleted");
    assert_eq!(db.state(grandchild).await, "deleted");
    assert_eq!(
        db.job(child)
            .await
            .history
            .last()
            .expect("entry")
            .reason
            .as_deref(),
        Some("parent deleted")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_set_read_and_shown() {
    let db = TestDb::new().await;
    let client = db.client();
    let id = client
        .enqueue(&NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    client
        .set_parameter(id, "detectionRunId", "abc")
        .await
        .expect("set");
    client
        .set_parameter(id, "priority", "low")
        .await
        .expect("set");
    client
        .set_parameter(id, "priority", "high")
        .await
        .expect("overwrite");
    assert_eq!(
        client
            .get_parameter(id, "priority")
            .await
            .expect("get")
            .as_deref(),
        Some("high")
    );
    assert_eq!(
        client.get_parameter(id, "missing").await.expect("get"),
        None
    );
    let details = db.job(id).await;
    assert_eq!(
        details.parameters.get("detectionRunId").map(String::as_str),
        Some("abc")
    );
    let missing = client.set_parameter(id + 1000, "x", "y").await;
    assert!(
        matches!(missing, Err(hangar::client::ClientError::NotFound(_))),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_join_the_callers_transaction() {
    let db = TestDb::new().await;
    let client = db.client();
    let mut tx = db.pool.begin().await.expect("begin");
    let id = client
        .enqueue_in(&mut tx, &NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    client
        .set_parameter_in(&mut tx, id, "k", "v")
        .await
        .expect("set");
    tx.rollback().await.expect("rollback");
    assert!(
        client.details(id).await.expect("details").is_none(),
        "rolled back with the caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processing_job_cannot_be_deleted() {
    let db = TestDb::new().await;
    let server = db.server(db.config.clone(), command_handlers()).await;
    let gate = db.dir.path().join("gate");
    let id = db
        .client()
        .enqueue(&shell_job(
            "default",
            &format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display()),
        ))
        .await
        .expect("enqueue");
    wait_for_state(&db, id, "processing", WAIT).await;
    let refused = db.client().delete(id).await;
    assert!(
        matches!(refused, Err(hangar::client::ClientError::Processing(_))),
        "{refused:?}"
    );
    std::fs::write(&gate, b"").expect("gate");
    wait_for_state(&db, id, "succeeded", WAIT).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let error = db
        .client()
        .enqueue(&NewJob::new("", "default"))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("kind"), "{error}");
    let error = db
        .client()
        .enqueue(&NewJob::new("noop", "default").with_timeout(Duration::ZERO))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("timeout"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expirer_removes_finished_jobs_past_retention_only() {
    let db = TestDb::new().await;
    let client = db.client();
    let done = client
        .enqueue(&NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    client.delete(done).await.expect("finish it");
    let waiting_parent = client
        .schedule_after(&NewJob::new("noop", "nowhere"), Duration::from_secs(3600))
        .await
        .expect("schedule");
    let child = client
        .continue_with(
            waiting_parent,
            &NewJob::new("noop", "nowhere"),
            ContinuationOption::OnAnyFinal,
        )
        .await
        .expect("continue");
    let context = maintenance_context(&db, Duration::ZERO);
    let removed = hangar::maintenance::expirer::run_once(&context)
        .await
        .expect("expire");
    assert_eq!(removed, 1);
    assert!(
        client.details(done).await.expect("details").is_none(),
        "the finished job is gone"
    );
    assert_eq!(
        db.state(waiting_parent).await,
        "scheduled",
        "unfinished jobs stay"
    );
    assert_eq!(db.state(child).await, "awaiting");
}

fn maintenance_context(
    db: &TestDb,
    retention: Duration,
) -> hangar::maintenance::MaintenanceContext {
    let config = std::sync::Arc::new(hangar::config::Config {
        job_retention: retention,
        ..db.config.clone()
    });
    hangar::maintenance::MaintenanceContext {
        pool: db.pool.clone(),
        config: config.clone(),
        apply: hangar::completer::ApplyContext {
            pool: db.pool.clone(),
            channel: hangar::storage::jobs_channel(&config.schema_name),
            observers: std::sync::Arc::new(Vec::new()),
        },
        policies: hangar::plugins::policies::Policies::builtin_only(
            hangar::server::builtin_retry_policy(&config),
        ),
    }
}

/// Moves a job's creation (and its end, if it ended) `age` into the past.
async fn age(db: &TestDb, id: i64, age: Duration) {
    sqlx::query(
        "UPDATE jobs SET created_at = created_at - $2 * interval '1 millisecond',
                         finished_at = finished_at - $2 * interval '1 millisecond'
         WHERE id = $1",
    )
    .bind(id)
    .bind(i64::try_from(age.as_millis()).expect("age in ms"))
    .execute(&db.pool)
    .await
    .expect("age the job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expirer_walks_the_oldest_jobs_past_unfinished_ones_and_stops_at_recent_ones() {
    let db = TestDb::new().await;
    let client = db.client();
    let hour = Duration::from_secs(3600);
    let mut finished_long_ago = Vec::new();
    let mut unfinished_old = Vec::new();
    // Oldest first, interleaved: expired, unfinished, expired, unfinished, expired.
    for n in 0..5 {
        let id = client
            .enqueue(&NewJob::new("noop", "nowhere"))
            .await
            .expect("enqueue");
        if n % 2 == 0 {
            client.delete(id).await.expect("finish it");
            finished_long_ago.push(id);
        } else {
            unfinished_old.push(id);
        }
        age(&db, id, 3 * hour).await;
    }
    // Created long ago but finished just now: kept.
    let just_finished = client
        .enqueue(&NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    age(&db, just_finished, 3 * hour).await;
    client.delete(just_finished).await.expect("finish it");
    // Finished within the retention: kept, and the walk stops there.
    let recent = client
        .enqueue(&NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    client.delete(recent).await.expect("finish it");
    // Past the retention but after the stop (as a job from a long transaction can be): this
    // run does not reach it.
    let beyond_the_stop = client
        .enqueue(&NewJob::new("noop", "nowhere"))
        .await
        .expect("enqueue");
    client.delete(beyond_the_stop).await.expect("finish it");
    age(&db, beyond_the_stop, 3 * hour).await;

    // One job per statement, so the walk crosses several steps and every kind of job.
    let context = maintenance_context(&db, hour);
    let removed = hangar::maintenance::expirer::run_in_chunks(&context, 1)
        .await
        .expect("expire");
    assert_eq!(removed, finished_long_ago.len());
    for id in &finished_long_ago {
        assert!(
            client.details(*id).await.expect("details").is_none(),
            "job {id} finished 3 h ago is gone"
        );
    }
    let history_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_states WHERE job_id = ANY($1)")
            .bind(&finished_long_ago)
            .fetch_one(&db.pool)
            .await
            .expect("count history");
    assert_eq!(history_left, 0, "their history went with them");
    assert_eq!(
        db.state(beyond_the_stop).await,
        "deleted",
        "the walk stopped at the first recent job"
    );
    for id in unfinished_old {
        assert_eq!(db.state(id).await, "enqueued", "an unfinished job stays");
    }
    assert_eq!(db.state(recent).await, "deleted", "a recent one stays");
    assert_eq!(
        db.state(just_finished).await,
        "deleted",
        "one that just ended stays"
    );
    // The next run (once `recent` has aged too) gets to it.
    age(&db, recent, 3 * hour).await;
    let again = hangar::maintenance::expirer::run_once(&context)
        .await
        .expect("expire again");
    assert_eq!(again, 2, "the recent job, now old, and the one beyond it");
    assert!(client
        .details(beyond_the_stop)
        .await
        .expect("details")
        .is_none());
}
