//! hangar: a job host on PostgreSQL that supervises MMDetection runs as subprocesses, with
//! the policies that decide a job's fate as WASI components.
//!
//! The parts, as in DESIGN.md: [`client`] creates jobs; a server's [`producer`] fetches them
//! for its free slots; the [`executor`] runs each and reports an outcome; the [`completer`]
//! elects and writes the next state (fenced on job, attempt and owner); the [`heartbeat`]
//! keeps leases alive; [`maintenance`] services run on one elected leader. [`runs`] is the
//! MMDetection workload and [`api`] its HTTP face. All SQL lives in [`storage`].

pub mod api;
pub mod auth;
pub mod client;
pub mod completer;
pub mod config;
pub mod database;
pub mod election;
pub mod embedded_pg;
pub mod executor;
pub mod heartbeat;
pub mod maintenance;
pub mod plugins;
pub mod producer;
pub mod running;
pub mod runs;
pub mod server;
pub mod state;
pub mod storage;
