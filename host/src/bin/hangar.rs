//! The `hangar` command line: the server, migrations, tokens, the MMDetection install, jobs,
//! and the benchmark.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use hangar::api::{self, AppState};
use hangar::client::Client;
use hangar::config::Config;
use hangar::database;
use hangar::executor::command::CommandHandler;
use hangar::executor::{HandlerRegistry, NoopHandler};
use hangar::runs::files::RunFiles;
use hangar::runs::observer::RunStatusFollower;
use hangar::server::{RunningServer, ServerParts};
use hangar::state::NewJob;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "A job host for MMDetection runs on PostgreSQL"
)]
struct Cli {
    /// TOML configuration file (environment variables HANGAR_* override it).
    #[arg(long, short, global = true, env = "HANGAR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server: workers, maintenance and the HTTP API.
    Serve {
        /// Do not serve HTTP (a worker-only node).
        #[arg(long)]
        no_http: bool,
    },
    /// Apply pending migrations to the configured schema.
    Migrate,
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the MMDetection environment.
    Mmdet {
        #[command(subcommand)]
        command: MmdetCommand,
    },
    /// Create and inspect jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Manage policy plugins (WASI components) while the cluster runs.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Measure no-op job throughput and enqueue→start latency on a throwaway embedded database.
    Bench(hangar_bench::BenchArgs),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Upload a component as the next version of a slot (validated first).
    Push {
        /// retry-policy, state-filter/<name> or cleanup-hook/<name>.
        #[arg(long)]
        slot: String,
        /// The component (.wasm built for wasm32-wasip2).
        file: PathBuf,
        /// Activate it right away.
        #[arg(long)]
        activate: bool,
        /// Who uploads it (recorded).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Make a version the active one on every server.
    Activate {
        #[arg(long)]
        slot: String,
        #[arg(long)]
        version: i32,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Reactivate the version that was active before the current one.
    Rollback {
        #[arg(long)]
        slot: String,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Turn a slot off on every server: no version active, the built-in policy decides.
    Deactivate {
        #[arg(long)]
        slot: String,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// List versions (the active ones marked) and, for one slot, its events.
    List {
        #[arg(long)]
        slot: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is shown only once).
    Create {
        #[arg(long)]
        name: String,
        /// A claim the token carries (repeatable): runs:read, runs:write, jobs:read,
        /// jobs:write, plugins:manage, admin.
        #[arg(long = "claim", required = true)]
        claims: Vec<String>,
    },
    /// Revoke every token with this name.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum MmdetCommand {
    /// Create the MMDetection venv (cached under ~/.cache/hangar; quick when already done).
    Install,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Enqueue a job.
    Enqueue {
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "default")]
        queue: String,
        /// Arguments as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// Show a job: state, parameters, history.
    Show { id: i64 },
}

#[path = "../bench.rs"]
mod hangar_bench;

/// Logs to stderr; `default` is the filter when `HANGAR_LOG` is not set.
fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HANGAR_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a person at a terminal; none in log files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("HANGAR_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Like any Unix filter: end quietly when the reader of stdout goes away (`| head`).
    // SAFETY: setting a signal disposition before any other thread uses stdout.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // A server (and the benchmark) says what it does; a one-shot command only what went wrong.
    init_tracing(match cli.command {
        Command::Serve { .. } | Command::Bench(_) | Command::Mmdet { .. } => "info,sqlx=warn",
        _ => "warn",
    });
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hangar: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Bench(args) = cli.command {
        return hangar_bench::run(args).await;
    }
    let config = Arc::new(Config::load(cli.config.as_deref())?);
    match cli.command {
        Command::Serve { no_http } => serve(config, no_http).await,
        Command::Migrate => {
            let mut migrating = (*config).clone();
            migrating.prepare_schema_if_necessary = true;
            let db = database::open(&migrating, 2).await?;
            println!("schema {} is up to date", config.schema_name);
            drop(db);
            Ok(())
        }
        Command::Token { command } => {
            let db = database::open(&config, 2).await?;
            match command {
                TokenCommand::Create { name, claims } => {
                    let token = hangar::auth::create_token(&db.pool, &name, &claims).await?;
                    println!("{token}");
                }
                TokenCommand::Revoke { name } => {
                    let revoked = hangar::auth::revoke(&db.pool, &name).await?;
                    if revoked == 0 {
                        bail!("no active token is named {name:?}");
                    }
                    println!("revoked {revoked} token(s)");
                }
            }
            Ok(())
        }
        Command::Mmdet {
            command: MmdetCommand::Install,
        } => install_mmdet(&config),
        Command::Job { command } => {
            let db = database::open(&config, 2).await?;
            let client = Client::new(db.pool.clone(), &config.schema_name);
            match command {
                JobCommand::Enqueue { kind, queue, args } => {
                    let args: serde_json::Value =
                        serde_json::from_str(&args).context("--args is not valid JSON")?;
                    let id = client
                        .enqueue(&NewJob::new(kind, queue).with_args(args))
                        .await?;
                    println!("{id}");
                }
                JobCommand::Show { id } => {
                    let details = client
                        .details(id)
                        .await?
                        .with_context(|| format!("job {id} does not exist"))?;
                    println!("{}", serde_json::to_string_pretty(&details)?);
                }
            }
            Ok(())
        }
        Command::Plugin { command } => plugin_command(&config, command).await,
        Command::Bench(_) => unreachable!("handled above"),
    }
}

async fn plugin_command(config: &Config, command: PluginCommand) -> anyhow::Result<()> {
    use hangar::plugins::{catalog, switch};
    let db = database::open(config, 2).await?;
    let schema = &config.schema_name;
    match command {
        PluginCommand::Push {
            slot,
            file,
            activate,
            actor,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let engine = hangar::plugins::engine::process_engine(config.plugin_limits())?;
            let pushed = catalog::push(
                &db.pool,
                &engine,
                &config.plugin_cache_dir(),
                &slot,
                bytes,
                &actor,
            )
            .await?;
            let what = if pushed.new {
                "uploaded as"
            } else {
                "already uploaded as"
            };
            println!(
                "{} {what} version {} (sha256 {})",
                pushed.slot, pushed.version, pushed.sha256
            );
            if activate {
                switch::activate(&db.pool, schema, &slot, pushed.version, &actor).await?;
                println!("{} version {} is active", pushed.slot, pushed.version);
            }
        }
        PluginCommand::Activate {
            slot,
            version,
            actor,
        } => {
            switch::activate(&db.pool, schema, &slot, version, &actor).await?;
            println!("{slot} version {version} is active");
        }
        PluginCommand::Rollback { slot, actor } => {
            let version = switch::rollback(&db.pool, schema, &slot, &actor).await?;
            println!("{slot} rolled back to version {version}");
        }
        PluginCommand::Deactivate { slot, actor } => {
            match switch::deactivate(&db.pool, schema, &slot, &actor).await? {
                Some(version) => println!("{slot} is off (version {version} was active)"),
                None => println!("{slot} had no active version"),
            }
        }
        PluginCommand::List { slot } => {
            for v in hangar::storage::plugins::versions(&db.pool, slot.as_deref()).await? {
                let mark = if v.active { "*" } else { " " };
                println!(
                    "{mark} {}@{} sha256 {} {} bytes, by {} at {}",
                    v.slot, v.version, v.sha256, v.size, v.uploaded_by, v.uploaded_at
                );
            }
            if let Some(slot) = slot {
                for e in hangar::storage::plugins::events(&db.pool, &slot).await? {
                    let version = e.version.map_or_else(|| "-".to_owned(), |v| v.to_string());
                    println!(
                        "  {} {} v{version} by {} {}",
                        e.created_at,
                        e.event,
                        e.actor,
                        e.reason.unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

fn install_mmdet(config: &Config) -> anyhow::Result<()> {
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../python/install-mmdet.sh"
    ));
    let link = std::path::absolute(config.data_dir.join("mmdet-venv"))?;
    let status = std::process::Command::new("bash")
        .arg(&script)
        .env("HANGAR_MMDET_VENV_LINK", &link)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("installing the MMDetection environment failed ({status}); see the messages above");
    }
    Ok(())
}

/// The handlers a standard server runs.
fn standard_handlers(config: &Config) -> HandlerRegistry {
    let mut handlers = HandlerRegistry::default();
    hangar::runs::register_handlers(&mut handlers, config);
    handlers.register("command", CommandHandler);
    handlers.register("noop", NoopHandler);
    handlers
}

async fn serve(config: Arc<Config>, no_http: bool) -> anyhow::Result<()> {
    let max_connections = u32::try_from(config.worker_count)
        .unwrap_or(u32::MAX)
        .saturating_add(10);
    let db = database::open(&config, max_connections).await?;
    let mut parts = ServerParts::new(
        Arc::clone(&config),
        db.pool.clone(),
        standard_handlers(&config),
    );
    let mut app_state = AppState::new(db.pool.clone(), &config);
    if config.plugins_enabled {
        let registry = hangar::plugins::registry::for_config(&config, db.pool.clone())?;
        app_state = app_state.with_plugins(Arc::clone(&registry));
        parts.plugins = Some(registry);
    }
    parts.observers.push(Arc::new(RunStatusFollower {
        files: RunFiles::new(&config),
    }));
    let server = RunningServer::start(parts).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let http = if no_http {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&config.http_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http_listen))?;
        let address = listener.local_addr()?;
        println!(
            "hangar listening on http://{address} (server {})",
            server.id()
        );
        let app = api::app(app_state);
        let stop = shutdown.clone();
        Some(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }))
    };
    wait_for_signal().await?;
    tracing::info!("shutdown signal received");
    server.shutdown().await;
    shutdown.cancel();
    if let Some(http) = http {
        http.await??;
    }
    db.pool.close().await;
    drop(db);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
