//! End-to-end tier: a real (tiny) MMDetection training run and detection run through hangar —
//! queue, executor, Python drivers, runs, models — on the MMDetection venv that `make test`
//! installs (`hangar mmdet install`).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hangar::executor::HandlerRegistry;
use hangar::runs::detection::CreateDetectionRun;
use hangar::runs::training::CreateTrainingRun;
use hangar::runs::RunService;
use hangar::server::{RunningServer, ServerParts};
use hangar::storage::runs;
use support::{wait_for, TestDb};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn mmdet_python() -> PathBuf {
    let python = std::env::var_os("HANGAR_E2E_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".hangar/mmdet-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: the end-to-end tier needs the MMDetection venv; `make test` installs it \
         (or run `target/debug/hangar mmdet install`)",
        python.display()
    );
    python
}

fn run_python(python: &Path, args: &[&str]) {
    let status = std::process::Command::new(python)
        .arg(repo().join("python/hangar_mmdet/make_synthetic_coco.py"))
        .args(args)
        .status()
        .expect("run the dataset generator");
    assert!(status.success(), "make_synthetic_coco.py {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_training_run_then_detection_run_through_hangar() {
    let python = mmdet_python();
    let db = TestDb::new().await;
    let dir = db.dir.path().to_owned();
    let dataset = dir.join("dataset");
    let scene = dir.join("scene.png");
    run_python(
        &python,
        &[
            "--out",
            dataset.to_str().expect("utf-8"),
            "--images",
            "10",
            "--seed",
            "1",
        ],
    );
    run_python(
        &python,
        &["--big-image", scene.to_str().expect("utf-8"), "--seed", "2"],
    );

    let config = hangar::config::Config {
        queues: vec!["detection".into()],
        device_queues: vec!["detection".into()],
        max_retries: 0,
        mmdet_python: Some(python),
        lease_duration: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        kill_grace_period: Duration::from_secs(2),
        ..db.config.clone()
    };
    let mut handlers = HandlerRegistry::default();
    hangar::runs::register_handlers(&mut handlers, &config);
    let mut parts = ServerParts::new(Arc::new(config.clone()), db.pool.clone(), handlers);
    parts
        .observers
        .push(Arc::new(hangar::runs::observer::RunStatusFollower {
            files: hangar::runs::files::RunFiles::new(&config),
        }));
    let server = RunningServer::start(parts).await.expect("server");
    let service = RunService {
        pool: db.pool.clone(),
        client: db.client(),
    };

    let training = service
        .create_training_run(&CreateTrainingRun {
            name: "e2e".into(),
            description: None,
            dataset_path: dataset.display().to_string(),
            base_config: None,
            base_checkpoint: None,
            epochs: Some(2),
            batch_size: Some(2),
            frozen_stages: Some(0),
            device: None,
        })
        .await
        .expect("create the training run");
    let trained = wait_for(
        "the training run to end",
        Duration::from_secs(900),
        || async {
            let run = runs::get_training_run(&db.pool, training.id)
                .await
                .expect("read")
                .expect("run");
            (run.status == "Success" || run.status == "Error").then_some(run)
        },
    )
    .await;
    let job = db.job(trained.job_id.expect("job")).await;
    assert_eq!(
        trained.status, "Success",
        "{trained:#?}\n{:#?}",
        job.history
    );
    assert_eq!(trained.device.as_deref(), Some("cpu"));
    let model = runs::get_model(&db.pool, trained.trained_model_id.expect("a model"))
        .await
        .expect("read")
        .expect("model row");
    assert_eq!(
        model.classes,
        serde_json::json!(["red_square", "blue_disc"])
    );
    assert!(
        Path::new(&model.checkpoint_path).is_file(),
        "{}",
        model.checkpoint_path
    );
    let work_dir = config
        .data_dir
        .join("trainings")
        .join(training.id.to_string());
    let checkpoints: Vec<_> = std::fs::read_dir(&work_dir)
        .expect("work dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pth"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "only the best checkpoint is kept");
    let training_log = config
        .data_dir
        .join("logs")
        .join(format!("succ_{}.txt", training.id));
    assert!(std::fs::read_to_string(training_log)
        .expect("log")
        .contains("Epoch(train)"));

    let detection = service
        .create_detection_run(&CreateDetectionRun {
            name: "e2e detection".into(),
            description: None,
            image_path: scene.display().to_string(),
            model_id: model.id,
            score_threshold: Some(0.05),
            device: None,
        })
        .await
        .expect("create the detection run");
    let detected = wait_for(
        "the detection run to end",
        Duration::from_secs(600),
        || async {
            let run = runs::get_detection_run(&db.pool, detection.id)
                .await
                .expect("read")
                .expect("run");
            (run.status == "Success" || run.status == "Error").then_some(run)
        },
    )
    .await;
    assert_eq!(detected.status, "Success", "{detected:#?}");
    let output = config
        .data_dir
        .join("detections")
        .join(detection.id.to_string())
        .join("detection_bboxes.json");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).expect("output")).expect("json");
    assert!(
        written["metadata"]["tiles"].as_u64().expect("tiles") > 1,
        "the 1800x1500 scene is tiled"
    );
    let stored = runs::detections(&db.pool, detection.id)
        .await
        .expect("detections");
    assert_eq!(
        stored.len(),
        written["detections"].as_array().expect("list").len()
    );
    for found in &stored {
        assert!(["red_square", "blue_disc"].contains(&found.class_name.as_deref().unwrap_or("")));
        assert!(found.score >= 0.05 && found.x2 > found.x1 && found.y2 > found.y1);
    }

    // A broken image: the driver fails, the run ends in Error with its message file, and the
    // job's history carries the tail of the driver's stderr.
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"this is not an image").expect("write");
    let failing = service
        .create_detection_run(&CreateDetectionRun {
            name: "broken".into(),
            description: None,
            image_path: broken.display().to_string(),
            model_id: model.id,
            score_threshold: None,
            device: None,
        })
        .await
        .expect("create");
    let failed = wait_for(
        "the broken run to end",
        Duration::from_secs(300),
        || async {
            let run = runs::get_detection_run(&db.pool, failing.id)
                .await
                .expect("read")
                .expect("run");
            (run.status == "Success" || run.status == "Error").then_some(run)
        },
    )
    .await;
    assert_eq!(failed.status, "Error");
    let error_file = config
        .data_dir
        .join("errors")
        .join(format!("{}_errMsg.txt", failing.id));
    assert!(error_file.is_file());
    let history = db.job(failed.job_id.expect("job")).await.history;
    let entry = history.last().expect("entry");
    assert_eq!(entry.state, "failed");
    assert!(
        !entry.data["details"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "stderr tail recorded"
    );
    server.shutdown().await;
}
