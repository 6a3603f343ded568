//! `hangar bench`: no-op job throughput end to end, and enqueue→start latency, against a
//! throwaway embedded PostgreSQL.

use clap::Args;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs in the throughput burst.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Workers of the server under test.
    #[arg(long, default_value_t = 2000)]
    pub workers: usize,
    /// Jobs enqueued one at a time for the latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub latency_samples: usize,
}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
