//! Graceful shutdown: on SIGTERM a server stops fetching at once, lets running jobs drain,
//! stops and releases what cannot finish, and is gone within the grace period.

mod support;

use std::time::{Duration, Instant};

use support::{shell_job, wait_for, ServerProcess, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_three_busy_queues_within_the_grace_period_and_fetches_nothing_after() {
    let db = TestDb::new().await;
    let grace = Duration::from_secs(4);
    let config = hangar::config::Config {
        server_name: "drainer".into(),
        queues: vec!["forever".into(), "short".into(), "medium".into()],
        worker_count: 6,
        shutdown_grace_period: grace,
        ..db.config.clone()
    };
    let client = db.client();
    let mut forever = Vec::new();
    for _ in 0..2 {
        forever.push(
            client
                .enqueue(&shell_job("forever", "exec sleep 600"))
                .await
                .expect("enqueue"),
        );
    }
    let mut finite = Vec::new();
    for _ in 0..2 {
        finite.push(
            client
                .enqueue(&shell_job("short", "sleep 0.5"))
                .await
                .expect("enqueue"),
        );
    }
    for _ in 0..10 {
        finite.push(
            client
                .enqueue(&shell_job("medium", "sleep 1"))
                .await
                .expect("enqueue"),
        );
    }
    let mut server = ServerProcess::spawn(&config, &[]);
    wait_for("all six workers busy", Duration::from_secs(30), || async {
        let counts = hangar::storage::jobs::count_by_state(&db.pool)
            .await
            .expect("count");
        counts
            .iter()
            .any(|(state, n)| state == "processing" && *n == 6)
            .then_some(())
    })
    .await;

    let signalled = Instant::now();
    nix::sys::signal::kill(server.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = wait_for(
        "the server to exit",
        grace + Duration::from_secs(10),
        || {
            let exited = server.child.try_wait().expect("wait");
            async move { exited }
        },
    )
    .await;
    let took = signalled.elapsed();
    assert!(status.success(), "clean exit: {status}");
    assert!(
        took <= grace + Duration::from_millis(500),
        "took {took:?} for a grace period of {grace:?}"
    );

    let servers = hangar::storage::servers::list(&db.pool)
        .await
        .expect("servers");
    let row = servers
        .iter()
        .find(|s| s.name == "drainer")
        .expect("server row");
    let draining_since = row.draining_since.expect("the drain was recorded");
    assert!(row.stopped_at.is_some());

    let mut fetched_after = 0;
    let mut started = 0;
    for id in forever.iter().chain(&finite) {
        let details = db.job(*id).await;
        assert_ne!(details.job.state, "processing", "job {id} left processing");
        for entry in details.history.iter().filter(|h| h.state == "processing") {
            started += 1;
            if entry.created_at > draining_since {
                fetched_after += 1;
            }
        }
    }
    assert_eq!(fetched_after, 0, "nothing is fetched after the signal");
    assert!(started >= 6);
    for id in &forever {
        let details = db.job(*id).await;
        assert_eq!(
            details.job.state, "enqueued",
            "a job that cannot finish is released"
        );
        assert_eq!(details.job.failures, 0, "a release is not a failure");
        let last = details.history.last().expect("history");
        assert_eq!(last.reason.as_deref(), Some("released at shutdown"));
    }
    for id in &finite {
        let details = db.job(*id).await;
        let ran = details.history.iter().any(|h| h.state == "processing");
        if ran {
            assert_eq!(
                details.job.state, "succeeded",
                "job {id} drained: {:#?}",
                details.history
            );
        } else {
            assert_eq!(details.job.state, "enqueued");
        }
    }
    // Another server picks the released jobs up.
    let _next = ServerProcess::spawn(
        &hangar::config::Config {
            server_name: "next".into(),
            ..config
        },
        &[],
    );
    wait_for(
        "a released job to restart elsewhere",
        Duration::from_secs(30),
        || async {
            let details = db.job(forever[0]).await;
            (details.job.state == "processing"
                && details
                    .job
                    .lease_owner
                    .is_some_and(|o| o.starts_with("next:")))
            .then_some(())
        },
    )
    .await;
    drop(server);
}
