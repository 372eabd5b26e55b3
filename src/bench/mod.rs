//! `tollgate bench ...`: the measuring tools `scripts/bench.sh` drives,
//! kept apart from the product's commands. [`loadgen`] is open-loop load
//! (fixed-rate latency, time to first token, many open streams);
//! [`pipeline`] measures the usage pipeline (ingest ceiling, Kafka, bytes
//! per event, tap CPU, freshness).

pub mod loadgen;
pub mod pipeline;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Open-loop load at a fixed rate (latency, time to first byte) or many
    /// open streams at once; prints JSON.
    Loadgen(loadgen::LoadgenArgs),
    /// The usage pipeline's figures as JSON.
    Pipeline(pipeline::BenchArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Loadgen(args) => loadgen::run(args).await,
        BenchCommand::Pipeline(args) => pipeline::run(args).await,
    }
}
