//! The producer (the master of the systems gemmq grew from): makes or loads A and B, cuts
//! C = A·B into tile tasks, announces the job and publishes the tasks with publisher confirms.
//!
//! Nothing is published until the inputs are known to be consistent: shapes that cannot be
//! multiplied, NaN/Inf, a tile that cannot fit a message or a job id already used for another
//! job are refused first. Running it again with the same `--job-id` republishes the tasks of the
//! same job; the collector keeps the first result of each tile, so C is unchanged.
//!
//! Read in this order: [`prepare`] (inputs, plan, manifest), [`order`] (the job's messages in
//! publishing order), [`publisher`] (tries until all is confirmed), [`send`] (one try's
//! messages), [`resume`] (what an interrupted try leaves to the next).

mod limits;
mod order;
mod prepare;
mod publisher;
mod resume;
mod send;

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use gemmq::config::{BrokerSettings, ConfigError, ConfigFile, Layered};
use gemmq::job::Announced;
use gemmq::message::{MAX_GROUP, Manifest};
use gemmq::tiling::{GroupSize, Operands};
use gemmq::topology;
use gemmq::{DType, TileSize};
use serde::Deserialize;

/// What to multiply and how to cut it. Every flag also reads the environment variable shown and
/// the `[producer]` section of the config file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProducerOptions {
    /// Rows of A and of C [default: 1024]
    #[arg(long, env = "GEMMQ_M")]
    pub m: Option<u64>,
    /// Columns of A = rows of B [default: 1024]
    #[arg(long, env = "GEMMQ_K")]
    pub k: Option<u64>,
    /// Columns of B and of C [default: 1024]
    #[arg(long, env = "GEMMQ_N")]
    pub n: Option<u64>,
    /// Side of a square tile of C (edge tiles are smaller), or `auto`: as large as a message
    /// allows while leaving at least 16 tiles [default: auto]
    #[arg(long, env = "GEMMQ_TILE")]
    pub tile: Option<TileSize>,
    /// Seed from which A and B are generated (uniform in [-1, 1)) [default: 42]
    #[arg(long, env = "GEMMQ_SEED")]
    pub seed: Option<u64>,
    /// Element type: f64 or f32 [default: f64]
    #[arg(long, env = "GEMMQ_DTYPE")]
    pub dtype: Option<DType>,
    /// Job id (A-Z a-z 0-9 - _); running again with the same id resumes that job
    /// [default: job-<time>]
    #[arg(long, env = "GEMMQ_JOB_ID")]
    pub job_id: Option<String>,
    /// Load A from this .npy file instead of generating it (needs --b)
    #[arg(long, env = "GEMMQ_A", requires = "b", value_name = "A.npy")]
    pub a: Option<PathBuf>,
    /// Load B from this .npy file instead of generating it (needs --a)
    #[arg(long, env = "GEMMQ_B", requires = "a", value_name = "B.npy")]
    pub b: Option<PathBuf>,
    /// Also write the inputs as DIR/A.npy and DIR/B.npy
    #[arg(long, env = "GEMMQ_SAVE_INPUTS", value_name = "DIR")]
    pub save_inputs: Option<PathBuf>,
    /// How A and B reach the workers: `stream` publishes each block once, into the job's operand
    /// stream, from which each worker reads the blocks its tasks need, and caches them; `inline`
    /// puts the blocks in every task
    /// [default: stream]
    #[arg(long, env = "GEMMQ_OPERANDS")]
    pub operands: Option<Operands>,
    /// Tasks per task message, or `auto`: a message holds a rectangle of tiles that share their
    /// blocks, so a worker receives fewer blocks per tile; `auto` takes as many as leave 16
    /// messages, or two per worker consuming when the job is published if that is more (as far
    /// as the tiles allow), up to 256 a message. Workers take, retry and acknowledge a group
    /// together; each tile still has its own result, and a group's results must fit one
    /// message. Workers started after the job share what is left: start them first. Streamed
    /// operands only
    /// [default: auto]
    #[arg(long, env = "GEMMQ_GROUP")]
    pub group: Option<GroupSize>,
    /// Publisher confirms outstanding at once [default: 64]
    #[arg(long, env = "GEMMQ_CONFIRM_WINDOW")]
    pub confirm_window: Option<usize>,
    /// Refuse a job whose C would be larger than this; the collector's setting of the same
    /// name refuses it too [default: 8GiB]
    #[arg(long, env = "GEMMQ_MAX_OUTPUT_BYTES", value_name = "SIZE")]
    pub max_output_bytes: Option<bytesize::ByteSize>,
    /// The management API, asked for the broker's free disk before a job is published
    /// [default: http://<the AMQP host>:15672 with the AMQP account]
    #[arg(long, env = "GEMMQ_MANAGEMENT_URL", value_name = "URL")]
    pub management_url: Option<String>,
}

gemmq::layered!(ProducerOptions {
    m,
    k,
    n,
    tile,
    seed,
    dtype,
    job_id,
    a,
    b,
    save_inputs,
    operands,
    group,
    confirm_window,
    max_output_bytes,
    management_url
});

/// Where A and B come from.
#[derive(Debug, Clone)]
pub enum Source {
    Seed {
        m: u64,
        k: u64,
        n: u64,
        dtype: DType,
        seed: u64,
    },
    Files {
        a: PathBuf,
        b: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub source: Source,
    pub tile: TileSize,
    pub job_id: String,
    pub save_inputs: Option<PathBuf>,
    pub operands: Operands,
    pub group: GroupSize,
    pub confirm_window: usize,
    pub max_output_bytes: u64,
    pub management_url: Option<String>,
}

impl Settings {
    /// Resolves flags/env over the config file's `[producer]` section over defaults.
    pub fn resolve(
        flags: ProducerOptions,
        file: &ConfigFile,
        broker: BrokerSettings,
    ) -> Result<Self, ConfigError> {
        let o = flags.or(file.section("producer")?);
        let source = match (o.a, o.b) {
            (Some(a), Some(b)) => Source::Files { a, b },
            (None, None) => Source::Seed {
                m: o.m.unwrap_or(1024),
                k: o.k.unwrap_or(1024),
                n: o.n.unwrap_or(1024),
                dtype: o.dtype.unwrap_or_default(),
                seed: o.seed.unwrap_or(42),
            },
            _ => {
                return Err(ConfigError::invalid(
                    "a/b",
                    "give both A and B files, or neither",
                ));
            }
        };
        let job_id = o.job_id.unwrap_or_else(new_job_id);
        topology::check_name("job-id", &job_id)?;
        let confirm_window = o
            .confirm_window
            .unwrap_or(gemmq::broker::DEFAULT_CONFIRM_WINDOW);
        if confirm_window == 0 {
            return Err(ConfigError::invalid("confirm-window", "must be at least 1"));
        }
        let operands = o.operands.unwrap_or_default();
        let group = o.group.unwrap_or_default();
        match group {
            GroupSize::Fixed(0) => return Err(ConfigError::invalid("group", "must be at least 1")),
            GroupSize::Fixed(g) if g > MAX_GROUP as u64 => {
                return Err(ConfigError::invalid(
                    "group",
                    format!("{g} is over the {MAX_GROUP} tasks a message may hold"),
                ));
            }
            GroupSize::Fixed(g) if g > 1 && operands == Operands::Inline => {
                return Err(ConfigError::invalid(
                    "group",
                    "inline tasks carry their blocks and travel one to a message: use --operands stream, or --group 1",
                ));
            }
            _ => {}
        }
        Ok(Settings {
            broker,
            source,
            tile: o.tile.unwrap_or_default(),
            job_id,
            save_inputs: o.save_inputs,
            operands,
            group,
            confirm_window,
            max_output_bytes: o.max_output_bytes.map_or(8 << 30, |b| b.as_u64()),
            management_url: o.management_url,
        })
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_job_id() -> String {
    format!("job-{}-{:04x}", unix_ms() / 1000, rand::random::<u16>())
}

/// What the producer did.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub manifest: Manifest,
    pub tasks: u64,
    /// Task messages: fewer than tasks when tiny tiles travel in groups.
    pub messages: u64,
    pub bytes: u64,
    pub announced: Announced,
    /// Tries it took: 1, plus one per interruption (a lost connection, an unroutable message,
    /// the job's stream gone) after which publishing went on.
    pub tries: u32,
}

/// Loads or generates the inputs, announces the job and publishes every task.
pub async fn run(s: &Settings) -> Result<Receipt> {
    let job = prepare::prepare(s).await?;
    let tasks = job.manifest.plan.tasks();
    let mut publisher = publisher::Publisher::new(s, job)?;
    let started = Instant::now();
    publisher.run().await?;
    publisher.log_done(started);
    Ok(Receipt {
        tasks,
        messages: publisher.messages(),
        bytes: publisher.bytes,
        announced: publisher.announced.unwrap_or(Announced::New),
        tries: publisher.tries,
        manifest: publisher.into_manifest(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::config::BrokerOptions;

    fn resolve(group: &str, operands: Operands) -> Result<Settings, ConfigError> {
        let flags = ProducerOptions {
            group: Some(group.parse().expect("a number or auto")),
            operands: Some(operands),
            ..Default::default()
        };
        let broker = BrokerOptions::default().resolve().expect("default broker");
        Settings::resolve(flags, &ConfigFile::default(), broker)
    }

    #[test]
    fn group_sizes_that_cannot_work_are_refused_with_what_to_do_instead() {
        let refused = |group, operands, says: &str| {
            let err = resolve(group, operands).unwrap_err().to_string();
            assert!(err.contains("group") && err.contains(says), "{err}");
        };
        refused("0", Operands::Stream, "at least 1");
        refused("257", Operands::Stream, "256 tasks");
        refused("8", Operands::Inline, "--operands stream");
        for ok in ["auto", "1", "256"] {
            assert!(resolve(ok, Operands::Stream).is_ok(), "{ok}");
        }
        assert!(resolve("1", Operands::Inline).is_ok());
        assert!(
            resolve("auto", Operands::Inline).is_ok(),
            "auto never groups inline tasks"
        );
    }
}
