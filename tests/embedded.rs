//! The embedded default and the schema guard, through the `hangar` binary as a user runs it.

mod support;

use std::process::Command;

use support::TestDb;

fn hangar(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hangar"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HANGAR_DATA_DIR", data_dir)
        .env("HANGAR_LOG", "warn");
    command
}

#[test]
fn without_database_url_hangar_runs_its_own_cluster_and_keeps_it_between_runs() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().join("data");
    let first = hangar(&data_dir)
        .args(["token", "create", "--name", "first", "--claim", "admin"])
        .output()
        .expect("run hangar");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let token = String::from_utf8_lossy(&first.stdout).trim().to_owned();
    assert!(token.starts_with("hgr_"), "{token}");
    let cluster = data_dir.join("pg/cluster");
    assert!(cluster.join("PG_VERSION").exists());
    assert!(
        !cluster.join("postmaster.pid").exists(),
        "the cluster is stopped on exit"
    );

    // The second run finds the same cluster (the first token is still there: revoking it works).
    let second = hangar(&data_dir)
        .args(["token", "revoke", "--name", "first"])
        .output()
        .expect("run hangar");
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stdout).contains("revoked 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_behind_is_refused_until_migrated() {
    let db = TestDb::new().await;
    let schema = format!("{}_fresh", db.config.schema_name);
    let serve = |prepare: &str| {
        hangar(db.dir.path())
            .args(["job", "show", "1"])
            .env("DATABASE_URL", &db.url)
            .env("HANGAR_SCHEMA_NAME", &schema)
            .env("HANGAR_PREPARE_SCHEMA_IF_NECESSARY", prepare)
            .output()
            .expect("run hangar")
    };
    let refused = serve("false");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("hangar migrate"), "{message}");

    let migrated = hangar(db.dir.path())
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("HANGAR_SCHEMA_NAME", &schema)
        .env("HANGAR_PREPARE_SCHEMA_IF_NECESSARY", "false")
        .output()
        .expect("run hangar");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let after = serve("false");
    let message = String::from_utf8_lossy(&after.stderr);
    assert!(
        message.contains("job 1 does not exist"),
        "the schema is accepted now: {message}"
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let output = hangar(dir.path())
        .args(["serve"])
        .env("HANGAR_WORKER_COUNT", "many")
        .output()
        .expect("run hangar");
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("worker_count") || message.contains("WORKER_COUNT"),
        "{message}"
    );

    let output = hangar(dir.path())
        .args(["serve"])
        .env("HANGAR_LEASE_DURATION", "1s")
        .output()
        .expect("run hangar");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("lease_duration"));

    let output = hangar(dir.path())
        .args(["--config", "/no/such/hangar.toml", "serve"])
        .output()
        .expect("run hangar");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/no/such/hangar.toml"));
}
