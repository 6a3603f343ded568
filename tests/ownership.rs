//! Ownership and leases: a killed server's job is rescued once and its late completion
//! refused; a server whose heartbeat stalls stops its subprocess before the lease expires; a
//! timed-out child that ignores SIGTERM is killed before its retry starts; max attempts hold
//! when the executor process itself dies; a renewal skips a locked lease, then waits for it,
//! and tells lost leases apart.

mod support;

use std::path::Path;
use std::time::Duration;

use hangar::state::JobState;
use hangar::storage::jobs::{self, AttemptEnd};
use support::{
    alive, command_handlers, shell_job, wait_for, wait_for_state, ServerProcess, TestDb,
};

const WAIT: Duration = Duration::from_secs(30);

async fn read_pid(path: &Path) -> i32 {
    wait_for(&format!("{}", path.display()), WAIT, || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    })
    .await
}

fn processing_entries(
    details: &hangar::client::JobDetails,
) -> Vec<&hangar::storage::jobs::HistoryEntry> {
    details
        .history
        .iter()
        .filter(|h| h.state == "processing")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_job_is_rescued_once_and_its_late_completion_refused() {
    let db = TestDb::new().await;
    let dir = db.dir.path();
    let config = hangar::config::Config {
        server_name: "alpha".into(),
        ..db.config.clone()
    };
    let mut first = ServerProcess::spawn(&config, &[]);
    let script = format!(
        "echo $$ > {dir}/pid_$HANGAR_JOB_ATTEMPT
         if [ \"$HANGAR_JOB_ATTEMPT\" = 1 ]; then exec sleep 600; fi
         while [ ! -e {dir}/gate ]; do sleep 0.02; done",
        dir = dir.display()
    );
    let id = db
        .client()
        .enqueue(&shell_job("default", &script))
        .await
        .expect("enqueue");
    let first_pid = read_pid(&dir.join("pid_1")).await;
    let first_owner = db.job(id).await.job.lease_owner.expect("owned");
    first.kill9();
    // The kernel takes the child with its parent (PR_SET_PDEATHSIG).
    wait_for("the orphaned child to die", WAIT, || async {
        (!alive(first_pid)).then_some(())
    })
    .await;

    let _second = ServerProcess::spawn(&config, &[]);
    read_pid(&dir.join("pid_2")).await;
    let details = db.job(id).await;
    let second_owner = details.job.lease_owner.clone().expect("owned again");
    assert_ne!(
        second_owner, first_owner,
        "a restarted server is a new owner"
    );
    assert!(second_owner.starts_with("alpha:"), "{second_owner}");

    // The old owner's completion arrives late: refused by the fence.
    let mut conn = db.pool.acquire().await.expect("conn");
    let late = jobs::end_attempts(
        &mut conn,
        &[AttemptEnd {
            id,
            attempt: 1,
            owner: first_owner.clone(),
            state: JobState::Succeeded,
            reason: "late".into(),
            data: serde_json::json!({}),
            scheduled_at: None,
            failed: false,
        }],
        false,
    )
    .await
    .expect("write");
    assert!(
        late.is_empty(),
        "a rescued attempt cannot be completed by its old owner"
    );
    assert_eq!(db.state(id).await, "processing");

    std::fs::write(dir.join("gate"), b"").expect("gate");
    wait_for_state(&db, id, "succeeded", WAIT).await;
    let details = db.job(id).await;
    let rescues: Vec<_> = details
        .history
        .iter()
        .filter(|h| h.data["exception_type"] == "LeaseExpired")
        .collect();
    assert_eq!(
        rescues.len(),
        1,
        "rescued exactly once: {:#?}",
        details.history
    );
    assert_eq!(
        rescues[0].state, "scheduled",
        "a rescue counts as a failed attempt and is retried"
    );
    assert_eq!(processing_entries(&details).len(), 2);
    assert_eq!(details.job.attempt, 2);
    assert_eq!(details.job.failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_heartbeat_stops_the_subprocess_before_the_lease_expires() {
    let db = TestDb::new().await;
    let dir = db.dir.path();
    let server = db.server(db.config.clone(), command_handlers()).await;
    let script = format!(
        "echo $$ > {dir}/pid_$HANGAR_JOB_ATTEMPT
         if [ \"$HANGAR_JOB_ATTEMPT\" = 1 ]; then exec sleep 600; fi",
        dir = dir.display()
    );
    let id = db
        .client()
        .enqueue(&shell_job("default", &script))
        .await
        .expect("enqueue");
    let pid = read_pid(&dir.join("pid_1")).await;

    // Hold the job's row: the heartbeat's renewal blocks on it (as it would on a lock storm or
    // a database that stopped answering), so the lease is no longer extended.
    let mut blocker = db.pool.begin().await.expect("begin");
    jobs::lock_state(&mut blocker, id).await.expect("lock");
    let lease_expires_at = jobs::get(&mut blocker, id)
        .await
        .expect("read")
        .and_then(|job| job.lease_expires_at)
        .expect("leased");

    wait_for("the owner to stop its subprocess", WAIT, || async {
        (!alive(pid)).then_some(())
    })
    .await;
    let stopped_at = chrono::Utc::now();
    assert!(
        stopped_at < lease_expires_at,
        "stopped at {stopped_at}, after the lease expired at {lease_expires_at}"
    );
    assert_eq!(
        processing_entries(&db.job(id).await).len(),
        1,
        "nobody else started it meanwhile"
    );
    blocker.rollback().await.expect("release");

    // Once the lease has expired the rescuer gives the job another attempt.
    wait_for_state(&db, id, "succeeded", WAIT).await;
    let details = db.job(id).await;
    let second_start = processing_entries(&details)[1].created_at;
    assert!(
        second_start > lease_expires_at,
        "the retry starts only after the lease expired"
    );
    assert!(!dir.join("pid_3").exists());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_child_ignoring_sigterm_is_killed_before_its_retry() {
    let db = TestDb::new().await;
    let dir = db.dir.path();
    let server = db.server(db.config.clone(), command_handlers()).await;
    // Attempt 2 fails (exit 99) if attempt 1's process is still alive when it starts.
    let script = format!(
        "trap '' TERM
         echo $$ > {dir}/pid_$HANGAR_JOB_ATTEMPT
         if [ \"$HANGAR_JOB_ATTEMPT\" -ge 2 ]; then
             if kill -0 \"$(cat {dir}/pid_1)\" 2>/dev/null; then exit 99; fi
             exit 0
         fi
         while :; do sleep 0.05; done",
        dir = dir.display()
    );
    let job = shell_job("default", &script).with_timeout(Duration::from_millis(500));
    let id = db.client().enqueue(&job).await.expect("enqueue");
    wait_for_state(&db, id, "succeeded", WAIT).await;
    let details = db.job(id).await;
    assert_eq!(details.job.attempt, 2, "{:#?}", details.history);
    let timeout = details
        .history
        .iter()
        .find(|h| h.data["exception_type"] == "TimeoutError")
        .expect("a timeout entry");
    assert_eq!(timeout.state, "scheduled");
    let text = timeout.data["details"].as_str().unwrap_or_default();
    assert!(
        text.contains("SIGKILL"),
        "the child ignored SIGTERM and was killed: {text}"
    );
    let first_pid: i32 = std::fs::read_to_string(dir.join("pid_1"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(!alive(first_pid));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_hold_when_the_executor_process_dies_every_time() {
    let db = TestDb::new().await;
    let dir = db.dir.path();
    let config = hangar::config::Config {
        server_name: "crashy".into(),
        ..db.config.clone()
    };
    let script = format!(
        "echo $$ > {}/pid_$HANGAR_JOB_ATTEMPT; exec sleep 600",
        dir.display()
    );
    let id = db
        .client()
        .enqueue(&shell_job("default", &script))
        .await
        .expect("enqueue");
    // 1 attempt + 3 retries; each time the server dies with its job running.
    for attempt in 1..=4 {
        let mut server = ServerProcess::spawn(&config, &[]);
        let pid = read_pid(&dir.join(format!("pid_{attempt}"))).await;
        server.kill9();
        wait_for("the child to die with its server", WAIT, || async {
            (!alive(pid)).then_some(())
        })
        .await;
    }
    let _last = ServerProcess::spawn(&config, &[]);
    wait_for_state(&db, id, "failed", WAIT).await;
    let details = db.job(id).await;
    assert_eq!(details.job.attempt, 4);
    assert_eq!(details.job.failures, 4);
    assert_eq!(processing_entries(&details).len(), 4);
    let last = details.history.last().expect("history");
    assert_eq!(last.data["exception_type"], "LeaseExpired");
    assert!(!dir.join("pid_5").exists(), "no fifth attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_skips_a_locked_lease_then_waits_for_it_and_tells_lost_ones_apart() {
    let db = TestDb::new().await;
    let client = db.client();
    for _ in 0..2 {
        client
            .enqueue(&hangar::state::NewJob::new("k", "default"))
            .await
            .expect("enqueue");
    }
    let fetched = jobs::fetch(&db.pool, "me", &["default".into()], &[2], 2, 60_000)
        .await
        .expect("fetch");
    let held: Vec<(i64, i32)> = fetched.iter().map(|j| (j.id, j.attempt)).collect();
    let (kept, locked) = (held[0], held[1]);
    // Someone else briefly holds one job's row (as a run's writer or a client's delete does).
    let mut other = db.pool.begin().await.expect("begin");
    let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *other)
        .await
        .expect("pid");
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR SHARE")
        .bind(locked.0)
        .execute(&mut *other)
        .await
        .expect("lock");
    // And one attempt the server believes it holds was rescued behind its back.
    let gone = (held[0].0, held[0].1 + 7);
    let asked = [kept, locked, gone];

    let mut conn = db.pool.acquire().await.expect("connection");
    let first = jobs::renew_leases(&mut conn, "me", &asked, 60_000, false)
        .await
        .expect("renewal");
    assert_eq!(first.renewed, vec![kept]);
    assert_eq!(first.lost, vec![gone], "the locked one is neither");

    let pool = db.pool.clone();
    let waiting = tokio::spawn(async move {
        let mut conn = pool.acquire().await.expect("connection");
        jobs::renew_leases(&mut conn, "me", &[locked], 60_000, true).await
    });
    // The waiting renewal blocks on the holder until it commits.
    support::wait_for("the renewal to wait for the lock", WAIT, || async {
        let waiters: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(holder)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (waiters > 0).then_some(())
    })
    .await;
    other.commit().await.expect("commit");
    let second = waiting.await.expect("task").expect("renewal");
    assert_eq!(second.renewed, vec![locked]);
    assert!(second.lost.is_empty());
}

/// After an ANALYZE of a queue where nothing runs, the statistics put processing jobs at about
/// one row. The statements over many held jobs must still find them by primary key, with no
/// nested loop: their generic plans once rescanned every given attempt for each job found
/// (3.2 s to end 2000 attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_over_many_held_jobs_keep_a_primary_key_plan_after_an_idle_analyze() {
    let db = TestDb::new().await;
    let burst: Vec<hangar::state::NewJob> = (0..3000)
        .map(|_| hangar::state::NewJob::new("noop", "nowhere"))
        .collect();
    db.client().enqueue_many(&burst).await.expect("enqueue");
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("ANALYZE jobs")
        .execute(&mut *tx)
        .await
        .expect("analyze");
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .expect("generic plans");
    sqlx::query(jobs::NESTED_LOOPS_OFF)
        .execute(&mut *tx)
        .await
        .expect("as the statements run");
    for (name, statement, types) in jobs::HELD_JOB_STATEMENTS {
        sqlx::query(&format!("PREPARE {name}({types}) AS {statement}"))
            .execute(&mut *tx)
            .await
            .expect("prepare");
        let arguments = types
            .split(", ")
            .map(|t| format!("NULL::{t}"))
            .collect::<Vec<_>>()
            .join(", ");
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name}({arguments})"))
            .fetch_all(&mut *tx)
            .await
            .expect("explain");
        let plan = plan.join("\n");
        assert!(!plan.contains("Nested Loop"), "{name}:\n{plan}");
        assert!(plan.contains("jobs_pkey"), "{name} by primary key:\n{plan}");
        assert!(!plan.contains("Seq Scan on jobs"), "{name}:\n{plan}");
    }
}
