//! `gemmq-consumer`: a worker. See `--help`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gemmq::config::CommonArgs;
use gemmq_consumer::{ConsumerOptions, Settings};

/// Compute tiles of C = A·B from RabbitMQ's task queue.
///
/// Holds at most --queue-size task messages at once (the AMQP prefetch; a message is one task or
/// a group), computes --concurrency of them at a time, publishes each result and waits for the
/// broker's confirm before acking the task.
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

fn main() -> ExitCode {
    gemmq::telemetry::init();
    let cli = Cli::parse();
    let settings = match cli
        .common
        .load()
        .and_then(|(file, broker)| Settings::resolve(cli.options, &file, broker))
    {
        Ok(s) => s,
        Err(err) => {
            tracing::error!("{err}");
            return ExitCode::from(2);
        }
    };
    // Before any other thread exists; see the module for why and what it costs.
    if !gemmq_consumer::memory::keep_freed_memory(settings.operand_cache) {
        tracing::debug!(
            "this C library cannot be asked to keep freed memory; jobs start on fresh pages"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gemmq-consumer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = gemmq::shutdown::on_signals();
        match gemmq_consumer::run(&settings, shutdown)
            .await
            .context("the worker stopped with an error")
        {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("{err:#}");
                ExitCode::from(gemmq::config::exit_code(err.as_ref()))
            }
        }
    })
}
