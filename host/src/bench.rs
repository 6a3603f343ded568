//! `hangar bench`: no-op job throughput end to end, and enqueue→start latency, against a
//! fresh embedded PostgreSQL cluster (hangar's default database) in a temporary directory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use hangar::client::Client;
use hangar::config::Config;
use hangar::executor::{HandlerRegistry, JobContext, JobHandler};
use hangar::server::{RunningServer, ServerParts};
use hangar::state::{JobError, NewJob};
use hangar::storage;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs in the throughput burst.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Workers of the server under test.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Jobs enqueued one at a time for the latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub latency_samples: usize,
    /// Run the cluster without fsync (as the test suite does) instead of hangar's durable default.
    #[arg(long)]
    pub no_fsync: bool,
    /// Instead of the queue: measure the election overhead of this retry-policy component
    /// (a fresh store per call), e.g. plugins/target/wasm32-wasip2/release/retry_exponential.wasm.
    #[arg(long)]
    pub election_plugin: Option<std::path::PathBuf>,
    /// Calls measured by the election benchmark.
    #[arg(long, default_value_t = 20_000)]
    pub election_calls: usize,
    /// Measure the election with `plugin_memory_reset_in_place` off: every call's pages are
    /// given back to the kernel.
    #[arg(long)]
    pub election_pages_given_back: bool,
}

/// The election overhead: one retry-policy decision per call, each in a fresh store from the
/// pre-instantiated component, on one thread, for a job with a detection run's parameters.
fn bench_election(
    path: &std::path::Path,
    calls: usize,
    pages_given_back: bool,
) -> anyhow::Result<()> {
    use hangar::plugins::adapters::{LoadedPlugin, PolicyJob};
    let engine = hangar::plugins::engine::process_engine(hangar::plugins::engine::CallLimits {
        reset_in_place: !pages_given_back,
        ..hangar::plugins::engine::CallLimits::default()
    })?;
    let engine_resets_in_place = engine.resets_in_place;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let component = wasmtime::component::Component::new(&engine.engine, &bytes)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let plugin = LoadedPlugin::link(
        engine,
        hangar::plugins::PluginKind::RetryPolicy,
        "bench".into(),
        &component,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    // What a detection run's job carries.
    let parameters = std::collections::BTreeMap::from([
        (
            "detectionRunId".to_owned(),
            "0f8a5c62-3d6e-4f0b-9a51-6c2b7d9e8f10".to_owned(),
        ),
        ("priority".to_owned(), "high".to_owned()),
    ]);
    let error = JobError::new("SubprocessFailed", "exit status 1").with_details("Traceback ...");
    let mut timings = Vec::with_capacity(calls);
    for n in 0..(calls + calls / 10) {
        let job = PolicyJob {
            id: n as i64,
            kind: "detection-run",
            queue: "detection",
            attempt: 1 + (n % 4) as i32,
            failures: 1 + (n % 4) as i32,
            parameters: &parameters,
        };
        let started = Instant::now();
        plugin
            .decide(&job, &error)
            .map_err(|fault| anyhow::anyhow!("the plugin {fault}"))?;
        let took = started.elapsed();
        // The first tenth warms caches and the pool.
        if n >= calls / 10 {
            timings.push(took);
        }
    }
    timings.sort();
    let at = |p| percentile(&timings, p);
    println!(
        "election overhead ({}, fresh store per call, pages {}, {} calls): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        path.display(),
        if engine_resets_in_place {
            "reset in place"
        } else {
            "given back"
        },
        timings.len(),
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        timings.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
    );
    Ok(())
}

/// The `p`-quantile (0..=1) of `sorted`; zero when there are no samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get((last as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Notes when each job started.
#[derive(Clone, Default)]
struct StartClock {
    started: Arc<Mutex<HashMap<i64, Instant>>>,
    notify: Arc<Notify>,
}

impl StartClock {
    fn started_count(&self) -> usize {
        self.started.lock().map_or(0, |started| started.len())
    }
}

impl JobHandler for StartClock {
    fn run<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            if let Ok(mut started) = self.started.lock() {
                started.insert(ctx.job.id, Instant::now());
            }
            self.notify.notify_one();
            Ok(())
        })
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = args.election_plugin.clone() {
        return tokio::task::spawn_blocking(move || {
            bench_election(&path, args.election_calls, args.election_pages_given_back)
        })
        .await?;
    }
    let dir = tempfile::Builder::new().prefix("hangar-bench-").tempdir()?;
    let (embedded, url) =
        hangar::database::start_embedded(&dir.path().join("pg"), args.no_fsync).await?;
    let config = Config {
        database_url: Some(url.clone()),
        data_dir: dir.path().to_owned(),
        schema_name: "bench".into(),
        worker_count: args.workers,
        queues: vec!["default".into()],
        device_queues: vec![],
        gpus: Some(vec![]),
        queue_poll_interval: Duration::from_secs(1),
        ..Config::default()
    };
    let pool = storage::connect(&url, &config, 20).await?;
    storage::migrate(&pool, &config.schema_name).await?;
    let client = Client::new(pool.clone(), &config.schema_name);
    println!(
        "hangar bench: {} no-op jobs, {} workers, PostgreSQL {} (embedded, {}), {} CPUs",
        args.jobs,
        args.workers,
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&pool)
            .await?,
        if args.no_fsync {
            "fsync off"
        } else {
            "durable default"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );

    // Throughput: the burst is in the queue before the server starts; the clock runs from the
    // server's start until the last job's Succeeded state is committed.
    let enqueue_started = Instant::now();
    for chunk_start in (0..args.jobs).step_by(10_000) {
        let size = 10_000.min(args.jobs - chunk_start);
        let burst: Vec<NewJob> = (0..size).map(|_| NewJob::new("clock", "default")).collect();
        client.enqueue_many(&burst).await?;
    }
    let enqueue_took = enqueue_started.elapsed();
    let clock = StartClock::default();
    let wal_before = WalCounters::read(&pool).await?;
    let started = Instant::now();
    let server = start_server(&config, &pool, &clock).await?;
    // Wait on the handler's signal until every job has started (polling the database while
    // it works would load the system under test), then for the last completions to commit.
    while clock.started_count() < args.jobs {
        let notified = clock.notify.notified();
        if clock.started_count() >= args.jobs {
            break;
        }
        tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .context("no job started within 60 s")?;
    }
    while storage::jobs::count_unfinished(&pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    println!(
        "throughput: {} jobs enqueued in {:.2}s ({:.0}/s); processed end to end in {:.2}s = {:.0} jobs/s",
        args.jobs,
        enqueue_took.as_secs_f64(),
        args.jobs as f64 / enqueue_took.as_secs_f64(),
        took.as_secs_f64(),
        args.jobs as f64 / took.as_secs_f64()
    );
    let wal = WalCounters::read(&pool).await?.since(&wal_before);
    println!(
        "WAL per job: {:.0} bytes, {:.1} records, {:.2} full-page images",
        wal.bytes / args.jobs as f64,
        wal.records / args.jobs as f64,
        wal.full_page_images / args.jobs as f64,
    );

    // Latency: one job at a time into an idle server. Pickup: from the enqueue's commit (the
    // client's call returned) to the handler; enqueue→start adds the client's own commit.
    let mut latencies = Vec::with_capacity(args.latency_samples);
    let mut pickups = Vec::with_capacity(args.latency_samples);
    for _ in 0..args.latency_samples {
        let before = Instant::now();
        let id = client.enqueue(&NewJob::new("clock", "default")).await?;
        let committed = Instant::now();
        let start = loop {
            let notified = clock.notify.notified();
            if let Some(start) = clock.started.lock().ok().and_then(|s| s.get(&id).copied()) {
                break start;
            }
            tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .context("a job did not start within 10 s")?;
        };
        latencies.push(start.duration_since(before));
        pickups.push(start.saturating_duration_since(committed));
    }
    for (what, mut samples) in [
        ("pickup (commit→start)", pickups),
        ("enqueue→start", latencies),
    ] {
        samples.sort();
        let percentile = |p| percentile(&samples, p);
        println!(
            "{what} latency over {} jobs: p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            samples.len(),
            ms(percentile(0.50)),
            ms(percentile(0.95)),
            ms(*samples.last().unwrap_or(&Duration::ZERO)),
        );
    }
    server.shutdown().await;
    pool.close().await;
    drop(embedded);
    Ok(())
}

/// The cluster's WAL counters: bytes from the insert position (exact), records and full-page
/// images from `pg_stat_wal` (as of the backends' last statistics flush, about a second).
struct WalCounters {
    bytes: f64,
    records: f64,
    full_page_images: f64,
}

impl WalCounters {
    async fn read(pool: &sqlx::PgPool) -> anyhow::Result<Self> {
        let (bytes, records, full_page_images): (f64, f64, f64) = sqlx::query_as(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::float8,
                    wal_records::float8, wal_fpi::float8
             FROM pg_stat_wal",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            bytes,
            records,
            full_page_images,
        })
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            bytes: self.bytes - earlier.bytes,
            records: self.records - earlier.records,
            full_page_images: self.full_page_images - earlier.full_page_images,
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn start_server(
    config: &Config,
    pool: &sqlx::PgPool,
    clock: &StartClock,
) -> anyhow::Result<RunningServer> {
    let mut handlers = HandlerRegistry::default();
    handlers.register("clock", clock.clone());
    let mut parts = ServerParts::new(Arc::new(config.clone()), pool.clone(), handlers);
    parts.maintenance = false;
    Ok(RunningServer::start(parts).await?)
}
