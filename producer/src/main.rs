//! `gemmq-producer`: publish one matrix-multiplication job. See `--help`.

use std::process::ExitCode;

use clap::Parser;
use gemmq::config::CommonArgs;
use gemmq_producer::{ProducerOptions, Settings};

/// Publish C = A·B as tile tasks to RabbitMQ.
///
/// Generates A (m×k) and B (k×n) from a seed, or loads them from .npy files, cuts C into tiles,
/// announces the job (its manifest) and publishes one task per tile with publisher confirms.
/// Run consumers to compute the tiles and a collector to assemble C.
///
/// Settings: flag > environment variable > config file (config/gemmq.toml) > default.
#[derive(Parser, Debug)]
#[command(name = "gemmq-producer", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    options: ProducerOptions,
}

#[tokio::main]
async fn main() -> ExitCode {
    gemmq::telemetry::init();
    let cli = Cli::parse();
    let result = async {
        let (file, broker) = cli.common.load()?;
        let settings = Settings::resolve(cli.options, &file, broker)?;
        gemmq_producer::run(&settings).await
    }
    .await;
    match result {
        Ok(receipt) => {
            println!("{}", receipt.manifest.job);
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::from(gemmq::config::exit_code(err.as_ref()))
        }
    }
}
