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
    /// Jobs in each of the two throughput bursts.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Workers of the server under test (for no-op jobs, how many it fetches at once: 2000
    /// measured fastest here, 1000 about a tenth slower).
    #[arg(long, default_value_t = 2000)]
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
    // For the WAL records per job; without it the bench reports bytes only.
    if let Err(error) = storage::install_wal_inspection(&pool).await {
        eprintln!("pg_walinspect is not available ({error}); WAL is reported in bytes only");
    }
    let client = Client::new(pool.clone(), &config.schema_name);
    println!(
        "hangar bench: {} no-op jobs per burst, {} workers, PostgreSQL {} (embedded, {}), {} CPUs",
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

    // Throughput, twice: on the fresh cluster, then again once it has run one burst (its WAL
    // segments exist, tables and indexes have grown, caches are filled), as on a server that
    // has been up a while. The second is the figure to compare.
    let mut server: Option<(RunningServer, StartClock)> = None;
    for what in ["cold cluster", "warm cluster"] {
        if let Some((running, _)) = server.take() {
            running.shutdown().await;
            // What autovacuum would do between two bursts, done now so that it does not
            // land in the middle of the measured one.
            storage::jobs::vacuum(&pool).await?;
        }
        let clock = StartClock::default();
        let (burst, running) = run_burst(&client, &config, &pool, &clock, args.jobs).await?;
        println!(
            "throughput ({what}): {} jobs enqueued in {:.2}s ({:.0}/s); processed end to end in {:.2}s = {:.0} jobs/s",
            args.jobs,
            burst.enqueue_took.as_secs_f64(),
            args.jobs as f64 / burst.enqueue_took.as_secs_f64(),
            burst.took.as_secs_f64(),
            args.jobs as f64 / burst.took.as_secs_f64()
        );
        let per_job = |total: f64| total / args.jobs as f64;
        let wal = match burst.wal.records_and_images {
            Some((records, images)) => format!(
                "{:.0} bytes, {:.1} records, {:.0} bytes of full-page images",
                per_job(burst.wal.bytes),
                per_job(records),
                per_job(images)
            ),
            None => format!("{:.0} bytes", per_job(burst.wal.bytes)),
        };
        println!(
            "  per job: WAL {wal}; CPU busy {}",
            burst.cpu.map_or("unknown".into(), |cpu| format!(
                "{:.1} µs, idle {:.0} % of the machine",
                per_job(cpu.busy_seconds) * 1e6,
                cpu.idle_share() * 100.0
            )),
        );
        server = Some((running, clock));
    }
    let (server, clock) = server.context("no burst ran")?;

    // Latency: right after the bursts, the index of ready jobs still holds their dead entries,
    // which every fetch walks past until a vacuum removes them; then as autovacuum leaves it.
    let after_bursts = (args.latency_samples / 4).max(1);
    print_latency(
        &format!("right after the bursts, {after_bursts} jobs"),
        &measure_latency(&client, &clock, after_bursts).await?,
    );
    storage::jobs::vacuum(&pool).await?;
    print_latency(
        &format!("after a vacuum, {} jobs", args.latency_samples),
        &measure_latency(&client, &clock, args.latency_samples).await?,
    );
    server.shutdown().await;
    pool.close().await;
    drop(embedded);
    Ok(())
}

/// Pickup (from the enqueue's commit, when the client's call returned, to the handler) and
/// enqueue→start (adding the client's own commit), one job at a time into an idle server.
struct Latency {
    pickups: Vec<Duration>,
    enqueue_to_start: Vec<Duration>,
}

async fn measure_latency(
    client: &Client,
    clock: &StartClock,
    samples: usize,
) -> anyhow::Result<Latency> {
    let mut latency = Latency {
        pickups: Vec::with_capacity(samples),
        enqueue_to_start: Vec::with_capacity(samples),
    };
    for _ in 0..samples {
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
        latency.enqueue_to_start.push(start.duration_since(before));
        latency
            .pickups
            .push(start.saturating_duration_since(committed));
    }
    latency.pickups.sort();
    latency.enqueue_to_start.sort();
    Ok(latency)
}

fn print_latency(when: &str, latency: &Latency) {
    for (what, samples) in [
        ("pickup (commit→start)", &latency.pickups),
        ("enqueue→start", &latency.enqueue_to_start),
    ] {
        println!(
            "{what} latency, {when}: p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms",
            ms(percentile(samples, 0.50)),
            ms(percentile(samples, 0.95)),
            ms(samples.last().copied().unwrap_or_default()),
        );
    }
}

/// What one burst measured.
struct Burst {
    enqueue_took: Duration,
    took: Duration,
    wal: WalWritten,
    cpu: Option<CpuCounters>,
}

/// Enqueues `jobs` no-op jobs, then starts a server and waits until all have ended. The clock
/// runs from the server's start until the last job's Succeeded state is committed.
async fn run_burst(
    client: &Client,
    config: &Config,
    pool: &sqlx::PgPool,
    clock: &StartClock,
    jobs: usize,
) -> anyhow::Result<(Burst, RunningServer)> {
    let enqueue_started = Instant::now();
    for chunk_start in (0..jobs).step_by(10_000) {
        let size = 10_000.min(jobs - chunk_start);
        let burst: Vec<NewJob> = (0..size).map(|_| NewJob::new("clock", "default")).collect();
        client.enqueue_many(&burst).await?;
    }
    let enqueue_took = enqueue_started.elapsed();
    let wal_before = wal_position(pool).await?;
    let cpu_before = CpuCounters::read();
    let started = Instant::now();
    let server = start_server(config, pool, clock).await?;
    // Wait on the handler's signal until every job has started (polling the database while
    // it works would load the system under test), then for the last completions to commit.
    while clock.started_count() < jobs {
        let notified = clock.notify.notified();
        if clock.started_count() >= jobs {
            break;
        }
        tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .context("no job started within 60 s")?;
    }
    while storage::jobs::count_unfinished(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let cpu = cpu_before
        .zip(CpuCounters::read())
        .map(|(before, after)| after.since(&before));
    let wal = wal_written_since(pool, &wal_before).await?;
    let burst = Burst {
        enqueue_took,
        took,
        wal,
        cpu,
    };
    Ok((burst, server))
}

/// The machine's CPU time from /proc/stat (every process: hangar, PostgreSQL, and anything
/// else running, so measure on a quiet machine), in seconds. Busy time per job is steadier than throughput on a shared machine, whose speed
/// drifts from one minute to the next.
struct CpuCounters {
    busy_seconds: f64,
    idle_seconds: f64,
}

impl CpuCounters {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<f64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …, in clock ticks.
        let ticks =
            |range: std::ops::Range<usize>| fields.get(range).map(|f| f.iter().sum::<f64>());
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let busy = ticks(0..3)? + ticks(5..7)?;
        let idle = ticks(3..5)?;
        Some(Self {
            busy_seconds: busy / per_second,
            idle_seconds: idle / per_second,
        })
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            busy_seconds: self.busy_seconds - earlier.busy_seconds,
            idle_seconds: self.idle_seconds - earlier.idle_seconds,
        }
    }

    fn idle_share(&self) -> f64 {
        self.idle_seconds / (self.busy_seconds + self.idle_seconds).max(f64::EPSILON)
    }
}

/// The WAL a burst wrote, read from the WAL itself between two positions: the statistics
/// views lag (a backend that goes idle keeps its counts for up to ten seconds).
struct WalWritten {
    bytes: f64,
    /// Records and full-page-image bytes, from pg_walinspect; None where it is not installed.
    records_and_images: Option<(f64, f64)>,
}

/// The position up to which the WAL is flushed (every commit of a burst is, by its end).
async fn wal_position(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
            .fetch_one(pool)
            .await?,
    )
}

async fn wal_written_since(pool: &sqlx::PgPool, from: &str) -> anyhow::Result<WalWritten> {
    let to = wal_position(pool).await?;
    let bytes: f64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff($2::pg_lsn, $1::pg_lsn)::float8")
        .bind(from)
        .bind(&to)
        .fetch_one(pool)
        .await?;
    let records_and_images = sqlx::query_as::<_, (f64, f64)>(
        "SELECT coalesce(sum(count), 0)::float8, coalesce(sum(fpi_size), 0)::float8
         FROM pg_get_wal_stats($1::pg_lsn, $2::pg_lsn)",
    )
    .bind(from)
    .bind(&to)
    .fetch_one(pool)
    .await
    .ok();
    Ok(WalWritten {
        bytes,
        records_and_images,
    })
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
