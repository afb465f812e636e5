//! `gemmq-collector`: assemble a job's C. See `--help`.

use std::process::ExitCode;

use clap::Parser;
use gemmq::config::CommonArgs;
use gemmq_collector::{CollectorOptions, Settings};

/// Assemble C = A·B from a job's results, write it as .npy and verify it.
///
/// Takes the job given by --job-id (waiting for it to be announced) or the next announced job,
/// applies every tile's result exactly once whatever duplicates arrive, writes OUT/C.npy and
/// OUT/summary.json, and checks C against A and B (Freivalds). A second collector started for the
/// same job, here or on another machine, stands by and takes over if the first one stops: it
/// rebuilds C from the job's results stream, so it needs no shared disk.
///
/// Exit status: 0 complete and verified; 3 incomplete (tasks parked: see the report and
/// summary.json); 4 C failed verification; 2 bad settings; 1 other errors.
///
/// Settings: flag > environment variable > config file (config/gemmq.toml) > default.
#[derive(Parser, Debug)]
#[command(
    name = "gemmq-collector",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    options: CollectorOptions,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Show the live workers (from their heartbeats) and the queues' ready/unacked/consumer
    /// figures (from the management API); `--once --json` prints one snapshot for scripts
    Status(gemmq_collector::status::StatusArgs),
    /// Give a job up: delete its operand stream, results stream and manifest from the broker and
    /// tell the workers, which then drop its tasks still queued (streamed ones without computing
    /// them; none is parked). Refused while a collector holds the job. Exit status 0 also when
    /// there was no such job
    Cancel(gemmq_collector::cancel::CancelArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    gemmq::telemetry::init();
    let cli = Cli::parse();
    let shutdown = gemmq::shutdown::on_signals();
    let command = match cli.command {
        Some(Command::Status(args)) => {
            Some(gemmq_collector::status::run(args, shutdown.clone()).await)
        }
        Some(Command::Cancel(args)) => Some(
            gemmq_collector::cancel::run(args, shutdown.clone())
                .await
                .map(|_| ()),
        ),
        None => None,
    };
    if let Some(done) = command {
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("{err:#}");
                ExitCode::from(gemmq::config::exit_code(err.as_ref()))
            }
        };
    }
    let result = async {
        let (file, broker) = cli.common.load()?;
        let settings = Settings::resolve(cli.options, &file, broker)?;
        gemmq_collector::run(&settings, shutdown).await
    }
    .await;
    match result {
        Ok(summary) => ExitCode::from(summary.status.exit_code()),
        Err(err) if err.is::<gemmq_collector::CollectedElsewhere>() => {
            tracing::info!("{err}");
            ExitCode::SUCCESS
        }
        Err(err) if err.is::<gemmq_collector::JobCancelled>() => {
            tracing::error!("{err}");
            ExitCode::from(gemmq_collector::EXIT_CANCELLED)
        }
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::from(gemmq::config::exit_code(err.as_ref()))
        }
    }
}
