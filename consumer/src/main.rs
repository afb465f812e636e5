//! `gemmq-consumer`: a worker. See `--help`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gemmq::config::CommonArgs;
use gemmq_consumer::{ConsumerOptions, Settings};

/// Compute tiles of C = A·B from RabbitMQ's task queue.
///
/// Holds at most --queue-size tasks at once (the AMQP prefetch), computes --concurrency of them
/// at a time, publishes each result and waits for the broker's confirm before acking the task.
/// Failed tasks go back through the retry queue; after --max-attempts they are parked. Run as
/// many as you like, on any machine that reaches the broker. SIGTERM/Ctrl-C stops gracefully.
///
/// Settings: flag > environment variable > config file (config/gemmq.toml) > default.
#[derive(Parser, Debug)]
#[command(name = "gemmq-consumer", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    options: ConsumerOptions,
}

#[tokio::main]
async fn main() -> ExitCode {
    gemmq::telemetry::init();
    let cli = Cli::parse();
    let shutdown = gemmq::shutdown::on_signals();
    let result = async {
        let (file, broker) = cli.common.load()?;
        let settings = Settings::resolve(cli.options, &file, broker)?;
        gemmq_consumer::run(&settings, shutdown)
            .await
            .context("the worker stopped with an error")
    }
    .await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::from(gemmq::config::exit_code(err.as_ref()))
        }
    }
}
