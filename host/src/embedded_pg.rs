//! hangar's own PostgreSQL cluster, started from the machine's PostgreSQL binaries when no
//! `DATABASE_URL` is given. The tests use the same code with a throwaway data directory.
//!
//! The postmaster listens only on a private Unix socket. It is started from a keeper thread
//! that lives as long as the server and is its parent, with `PR_SET_PDEATHSIG`: if hangar dies
//! without stopping it (SIGKILL), the kernel sends the postmaster SIGQUIT and it shuts down
//! instead of being left running.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The account PostgreSQL runs under when hangar runs as root (postgres refuses root).
const UNPRIVILEGED_USER: (u32, u32) = (65534, 65534);
const SUPERUSER: &str = "hangar";
const PORT: u16 = 5432;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb and postgres on PATH and in \
         /usr/lib/postgresql/*/bin). Install them (Debian/Ubuntu: `apt-get install postgresql`), \
         or set DATABASE_URL to use an existing server"
    )]
    BinariesNotFound,
    #[error("embedded PostgreSQL: {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded PostgreSQL: initdb failed ({status}): {output}")]
    Initdb { status: String, output: String },
    #[error("embedded PostgreSQL did not become ready within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
    #[error(
        "embedded PostgreSQL: hangar runs as root, so PostgreSQL runs as the unprivileged user \
         nobody, which cannot reach {0}: put the data directory under a path every user can \
         traverse (e.g. /tmp or /var/lib), or run hangar as a normal user"
    )]
    Unreachable(PathBuf),
}

fn io_error(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedPgError {
    let action = action.into();
    move |source| EmbeddedPgError::Io { action, source }
}

/// A running embedded cluster. Dropping it stops the server (fast shutdown).
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    postmaster_pid: Option<i32>,
    stopped: Option<mpsc::Receiver<()>>,
}

/// Options for a cluster. `throwaway` trades durability for speed (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub data_dir: PathBuf,
    pub throwaway: bool,
    pub max_connections: u32,
}

impl EmbeddedPostgres {
    /// Initialises `data_dir` if it holds no cluster yet, and starts the server on it. A server
    /// already running on the same directory (another hangar process) is reused, not owned.
    pub fn start(options: &EmbeddedOptions) -> Result<Self, EmbeddedPgError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedPgError::BinariesNotFound)?;
        std::fs::create_dir_all(&options.data_dir)
            .map_err(io_error(format!("create {}", options.data_dir.display())))?;
        let data_dir = options
            .data_dir
            .canonicalize()
            .map_err(io_error("resolve the data directory"))?;
        let cluster_dir = data_dir.join("cluster");
        let socket_dir = socket_dir_for(&data_dir);
        let as_root = nix::unistd::geteuid().is_root();

        for dir in [&data_dir, &socket_dir] {
            std::fs::create_dir_all(dir).map_err(io_error(format!("create {}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error(format!("chmod {}", dir.display())))?;
            if as_root {
                chown(dir)?;
            }
        }
        if as_root && !reachable_by_unprivileged(&data_dir) {
            return Err(EmbeddedPgError::Unreachable(data_dir));
        }

        let mut server = Self {
            data_dir: data_dir.clone(),
            socket_dir,
            postmaster_pid: None,
            stopped: None,
        };
        if server.accepting_connections(&bin_dir) {
            tracing::info!(data_dir = %data_dir.display(), "reusing the embedded PostgreSQL already running");
            return Ok(server);
        }
        if !cluster_dir.join("PG_VERSION").exists() {
            initdb(&bin_dir, &cluster_dir, as_root)?;
        }
        server.spawn_postmaster(&bin_dir, &cluster_dir, options, as_root)?;
        let timeout = Duration::from_secs(60);
        let started = Instant::now();
        while !server.accepting_connections(&bin_dir) {
            if started.elapsed() > timeout || server.exited() {
                return Err(EmbeddedPgError::NotReady(
                    timeout,
                    data_dir.join("postgres.log"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(data_dir = %data_dir.display(), socket = %server.socket_dir.display(), "embedded PostgreSQL started");
        Ok(server)
    }

    /// The private directory that holds the cluster's Unix socket (outside its data
    /// directory: socket paths are short).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Connection URL for `database` on the private socket.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{database}?host={}&port={PORT}",
            self.socket_dir.display()
        )
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn spawn_postmaster(
        &mut self,
        bin_dir: &Path,
        cluster_dir: &Path,
        options: &EmbeddedOptions,
        as_root: bool,
    ) -> Result<(), EmbeddedPgError> {
        let log = std::fs::File::create(self.data_dir.join("postgres.log"))
            .map_err(io_error("create postgres.log"))?;
        let log_err = log.try_clone().map_err(io_error("clone the log handle"))?;
        let mut command = Command::new(bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(cluster_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-p", &PORT.to_string(), "-c", "listen_addresses="])
            .args([
                "-c",
                &format!("max_connections={}", options.max_connections),
            ])
            .args(["-c", "shared_buffers=128MB"]);
        if options.throwaway {
            // A throwaway cluster needs no crash safety; these make it several times faster.
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        if as_root {
            command.uid(UNPRIVILEGED_USER.0).gid(UNPRIVILEGED_USER.1);
        }
        // SAFETY: prctl and setpgid are async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Its own process group, so a Ctrl-C in hangar's terminal reaches hangar only
                // and hangar stops the cluster in order.
                libc::setpgid(0, 0);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (pid_sender, pid_receiver) = mpsc::channel();
        let (stopped_sender, stopped_receiver) = mpsc::channel();
        // PR_SET_PDEATHSIG fires when the *thread* that forked exits, so the postmaster is
        // spawned by a thread that lives exactly as long as it does.
        std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || match command.spawn() {
                Ok(mut child) => {
                    let _ = pid_sender.send(Ok(child.id() as i32));
                    let _ = child.wait();
                    let _ = stopped_sender.send(());
                }
                Err(error) => {
                    let _ = pid_sender.send(Err(error));
                }
            })
            .map_err(io_error("start the keeper thread"))?;
        let pid = pid_receiver
            .recv()
            .map_err(|_| EmbeddedPgError::Io {
                action: "start postgres".into(),
                source: std::io::Error::other("keeper thread ended"),
            })?
            .map_err(io_error("start postgres"))?;
        self.postmaster_pid = Some(pid);
        self.stopped = Some(stopped_receiver);
        Ok(())
    }

    fn exited(&self) -> bool {
        self.stopped
            .as_ref()
            .is_some_and(|stopped| stopped.try_recv().is_ok())
    }

    fn accepting_connections(&self, bin_dir: &Path) -> bool {
        Command::new(bin_dir.join("pg_isready"))
            .arg("-q")
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &PORT.to_string()])
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Fast shutdown: active sessions are ended, the cluster is checkpointed.
    pub fn stop(&mut self) {
        if let Some(pid) = self.postmaster_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
            if let Some(stopped) = self.stopped.take() {
                let _ = stopped.recv_timeout(Duration::from_secs(30));
            }
            // The postmaster removed its socket; its private directory goes too (only if empty:
            // another cluster never shares it, but never remove what is not ours).
            let _ = std::fs::remove_dir(&self.socket_dir);
            tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn initdb(bin_dir: &Path, cluster_dir: &Path, as_root: bool) -> Result<(), EmbeddedPgError> {
    let mut command = Command::new(bin_dir.join("initdb"));
    command
        .arg("-D")
        .arg(cluster_dir)
        .args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdin(Stdio::null());
    if as_root {
        command.uid(UNPRIVILEGED_USER.0).gid(UNPRIVILEGED_USER.1);
    }
    let output = command.output().map_err(io_error("run initdb"))?;
    if !output.status.success() {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        return Err(EmbeddedPgError::Initdb {
            status: output.status.to_string(),
            output: text,
        });
    }
    Ok(())
}

/// Unix socket paths are limited to ~107 bytes, so the socket lives in a short private
/// directory derived from the data directory rather than inside it.
fn socket_dir_for(data_dir: &Path) -> PathBuf {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    PathBuf::from(format!(
        "/tmp/hangar-pg-{}-{}",
        nix::unistd::geteuid(),
        &hex::encode(digest)[..12]
    ))
}

fn chown(dir: &Path) -> Result<(), EmbeddedPgError> {
    nix::unistd::chown(
        dir,
        Some(nix::unistd::Uid::from_raw(UNPRIVILEGED_USER.0)),
        Some(nix::unistd::Gid::from_raw(UNPRIVILEGED_USER.1)),
    )
    .map_err(|errno| EmbeddedPgError::Io {
        action: format!("chown {}", dir.display()),
        source: errno.into(),
    })
}

/// Whether every ancestor of `dir` lets other users traverse it.
fn reachable_by_unprivileged(dir: &Path) -> bool {
    dir.ancestors().skip(1).all(|ancestor| {
        std::fs::metadata(ancestor).is_ok_and(|meta| meta.permissions().mode() & 0o001 != 0)
    })
}

/// `initdb` and `postgres` from PATH, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_server(dir)) {
            // PATH often holds symlinks to a few of the binaries (e.g. /usr/local/bin/postgres);
            // the real directory has the rest (pg_isready).
            return dir
                .join("postgres")
                .canonicalize()
                .ok()
                .and_then(|real| real.parent().map(Path::to_path_buf))
                .or(Some(dir));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
