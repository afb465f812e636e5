//! The producer (the seeds' master): makes or loads A and B, cuts C = A·B into tile tasks,
//! announces the job and publishes the tasks with publisher confirms.
//!
//! Nothing is published until the inputs are known to be consistent: shapes that cannot be
//! multiplied, NaN/Inf, a tile that cannot fit a message or a job id already used for another
//! job are refused first. Running it again with the same `--job-id` republishes the tasks of the
//! same job; the collector keeps the first result of each tile, so C is unchanged.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use gemmq::broker::{Broker, ConfirmWindow, persistent};
use gemmq::config::{BrokerSettings, ConfigError, ConfigFile, Layered};
use gemmq::job::{self, Announced};
use gemmq::matrix::{self, Element, Matrix};
use gemmq::message::{
    self, BlockId, Header, Inputs, MAX_GROUP, Manifest, OperandHeader, Side, TaskGroup, TaskHeader,
    Tiles, kind,
};
use gemmq::tiling::{GroupSize, Operands};
use gemmq::topology::{self, TASK_KEY};
use gemmq::verify;
use gemmq::{DType, Plan, TileSize};
use ndarray::{Array2, s};
use serde::Deserialize;
use tracing::{info, warn};

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
    /// stream and to every running worker's live queue, and workers cache them; `inline` puts
    /// the blocks in every task
    /// [default: stream]
    #[arg(long, env = "GEMMQ_OPERANDS")]
    pub operands: Option<Operands>,
    /// Tasks per task message, or `auto`: tiles too small to be worth a message of their own
    /// (under ~8 MFLOP, e.g. 16×16 tiles) travel several to a message, up to 64 and leaving at
    /// least 16 messages, which workers take, retry and acknowledge together; each tile still
    /// has its own result, and a group's results must fit one message. Streamed operands only
    /// [default: auto]
    #[arg(long, env = "GEMMQ_GROUP")]
    pub group: Option<GroupSize>,
    /// Publisher confirms outstanding at once [default: 256]
    #[arg(long, env = "GEMMQ_CONFIRM_WINDOW")]
    pub confirm_window: Option<usize>,
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
    confirm_window
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
        })
    }
}

fn unix_ms() -> u64 {
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
    let plan_for = |m: u64, k: u64, n: u64, dtype: DType| {
        let tile = match s.tile {
            TileSize::Fixed(t) => t,
            TileSize::Auto => {
                gemmq::tiling::auto_tile(m, k, n, dtype, s.broker.max_message_bytes, s.operands)
            }
        };
        Plan::with_operands(m, k, n, dtype, tile, s.broker.max_message_bytes, s.operands)
            .map_err(|e| ConfigError::invalid("tile", e.to_string()))
    };
    // What, besides the job id, plan and inputs, tells this job's data from another's: for
    // files, their sizes and modification times (same paths, new contents: another run).
    let mut stamp = String::new();
    let (a, b, inputs, plan) = match s.source.clone() {
        Source::Seed {
            m,
            k,
            n,
            dtype,
            seed,
        } => {
            // Plan first: a bad tile is reported before gigabytes are generated.
            let plan = plan_for(m, k, n, dtype)?;
            let (a, b) = tokio::task::spawn_blocking(move || {
                matrix::generate(m as usize, k as usize, n as usize, dtype, seed)
            })
            .await
            .context("generating A and B")?;
            (a, b, Inputs::Seed(seed), plan)
        }
        Source::Files { a, b } => {
            let ma = Matrix::read_npy(&a).map_err(|e| ConfigError::invalid("a", e.to_string()))?;
            let mb = Matrix::read_npy(&b).map_err(|e| ConfigError::invalid("b", e.to_string()))?;
            matrix::check_operands(&ma, &mb).map_err(|e| {
                ConfigError::invalid("inputs", format!("A·B cannot be computed: {e}"))
            })?;
            let ((m, k), (_, n)) = (ma.shape(), mb.shape());
            let plan = plan_for(m as u64, k as u64, n as u64, ma.dtype())?;
            for path in [&a, &b] {
                let meta = std::fs::metadata(path).ok();
                let len = meta.as_ref().map_or(0, |m| m.len());
                let modified = meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                stamp.push_str(&format!("{len}:{modified};"));
            }
            let inputs = Inputs::Files {
                a: a.display().to_string(),
                b: b.display().to_string(),
            };
            (ma, mb, inputs, plan)
        }
    };

    if let Some(dir) = &s.save_inputs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        a.write_npy(&dir.join("A.npy"))?;
        b.write_npy(&dir.join("B.npy"))?;
        info!(dir = %dir.display(), "inputs saved as A.npy and B.npy");
    }

    // Freivalds' expectation, while A and B are in memory: the collector then needs neither.
    let (a, b, check) = tokio::task::spawn_blocking(move || {
        let tall = a.shape().0 * verify::ROUNDS as usize > verify::MAX_CHECK_VALUES;
        let check = if tall {
            Ok(None) // the collector works it out from the seed or the files
        } else {
            verify::expect(a.view(), b.view(), verify::ROUNDS, verify::VECTOR_SEED)
                .map(|e| Some(e.to_check(verify::VECTOR_SEED)))
        };
        (a, b, check)
    })
    .await
    .context("computing the verification vectors")?;
    let check = check.context("computing the verification vectors")?;

    let run = message::run_of(&[
        s.job_id.as_bytes(),
        &serde_json::to_vec(&plan).context("describing the plan")?,
        &serde_json::to_vec(&inputs).context("describing the inputs")?,
        stamp.as_bytes(),
    ]);
    let mut manifest = Manifest {
        version: message::VERSION,
        job: s.job_id.clone(),
        plan,
        inputs,
        created_ms: unix_ms(),
        run,
        check,
    };
    let max_bytes = s.broker.max_message_bytes;
    let group = match s.group {
        GroupSize::Auto => gemmq::tiling::auto_group(&manifest.plan, max_bytes),
        GroupSize::Fixed(g) if g > gemmq::tiling::max_group(&manifest.plan, max_bytes) => {
            let most = gemmq::tiling::max_group(&manifest.plan, max_bytes);
            let tile = manifest.plan.tile;
            return Err(ConfigError::invalid(
                "group",
                format!("the results of {g} tiles of {tile}x{tile} would not fit one {max_bytes}-byte message, as a group's must: use --group {most} or less"),
            )
            .into());
        }
        GroupSize::Fixed(g) => g,
    } as usize;
    let messages = manifest.plan.tasks().div_ceil(group as u64);
    let broker = Broker::new(&s.broker, &format!("gemmq-producer {}", s.job_id))?;
    let topo = s.broker.topology();
    let started = Instant::now();
    // Tasks are published in plan order and confirmed in order, so after a lost connection the
    // publishing resumes at the first task not confirmed. Tasks published twice are harmless:
    // the collector keeps one result per tile.
    let items = items(&manifest.plan, group);
    let (mut confirmed, mut bytes, mut failures, mut tries) = (0u64, 0u64, 0u32, 0u32);
    // Set when the job's operand stream vanished: the blocks it held must go out again.
    let mut blocks_lost = false;
    let (mut retries, mut confirmed_before) = (gemmq::broker::retry_pauses(), 0u64);
    let mut announced = None;
    loop {
        let attempt = async {
            let ch = broker
                .confirm_channel()
                .await
                .context("connecting to RabbitMQ")?;
            topo.declare(&ch).await?;
            // After an interrupted try, before the job's queues are declared again: a stream
            // that is gone took the blocks published so far with it, and they go out again;
            // unless the job was finished and retired meanwhile (a collector deletes its queues
            // as soon as it has every tile): declaring them again would bring it back.
            if confirmed > 0 && manifest.plan.operands == Operands::Stream {
                let queues = job_queues(&broker, &topo, &manifest.job).await?;
                match resume_after(queues, confirmed, items.len() as u64) {
                    Resuming::AsBefore => {}
                    Resuming::Done => {
                        info!(job = %manifest.job, "the job was finished and retired while its last confirms came in; nothing left to publish");
                        return Ok(());
                    }
                    Resuming::WithEveryBlock => {
                        warn!(job = %manifest.job, "the job's operand stream is gone; declaring it again and publishing every block again");
                        blocks_lost = true;
                    }
                }
            }
            let first = job::announce(&ch, &topo, &mut manifest).await?;
            if announced.is_none() {
                announced = Some(first);
                log_announced(&manifest, first, group, messages);
            }
            let mut window = ConfirmWindow::new(ch.clone(), s.confirm_window);
            // Its own channel: on the publishing one, each check would wait behind every block
            // still in flight, draining the pipeline.
            let check = broker.channel().await.context("connecting to RabbitMQ")?;
            let out = Out {
                window: &mut window,
                check: &check,
                bytes: &mut bytes,
            };
            // Published again first, when the stream was lost: not counted as progress.
            let again = if blocks_lost {
                let before = &items[..confirmed as usize];
                before
                    .iter()
                    .filter(|i| matches!(i, Item::Block(_)))
                    .count() as u64
            } else {
                0
            };
            let from = Resume {
                skip: confirmed,
                blocks_again: blocks_lost,
            };
            let r = match (&a, &b) {
                (Matrix::F32(a), Matrix::F32(b)) => {
                    publish_tasks(out, &topo, &manifest, a, b, &items, from).await
                }
                (Matrix::F64(a), Matrix::F64(b)) => {
                    publish_tasks(out, &topo, &manifest, a, b, &items, from).await
                }
                _ => Err(anyhow::anyhow!("A and B have different dtypes")),
            };
            let r = match r {
                Ok(()) => window
                    .flush()
                    .await
                    .context("waiting for the last confirms"),
                Err(e) => Err(e),
            };
            // Confirms come in publishing order: the blocks published again come first.
            if window.confirmed() >= again {
                blocks_lost = false;
            }
            confirmed += window.confirmed().saturating_sub(again);
            // The stream may be there again by the next try (a collector that reconnects
            // declares the job's queues), but empty: what failed this one says it was lost.
            if r.as_ref()
                .is_err_and(|e| stream_lost(e, &topo.operands_exchange()))
            {
                blocks_lost = true;
            }
            let _ = check.close(200, "done".into()).await;
            let _ = ch.close(200, "done".into()).await;
            r
        };
        tries += 1;
        match attempt.await {
            Ok(()) => break,
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                // Tries in a row that confirmed nothing new: a broker that accepts connections
                // but cannot take the job's queues yet (for seconds after it restarts) must be
                // waited for, not hammered ten times in a few milliseconds.
                if confirmed > confirmed_before {
                    retries = gemmq::broker::retry_pauses();
                    failures = 0;
                }
                confirmed_before = confirmed;
                failures += 1;
                let Some(pause) = retries.next() else {
                    return Err(
                        e.context(format!("giving up after {failures} tries without progress"))
                    );
                };
                warn!(
                    error = %format!("{e:#}"), confirmed, messages = items.len(), retry_in = ?pause,
                    "publishing interrupted; reconnecting to publish the unconfirmed messages again"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
    let p = &manifest.plan;
    let secs = started.elapsed().as_secs_f64();
    info!(
        job = %manifest.job,
        tasks = p.tasks(),
        messages,
        mib = bytes as f64 / (1 << 20) as f64,
        seconds = secs,
        mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        tries,
        "all tasks published and confirmed"
    );
    Ok(Receipt {
        tasks: p.tasks(),
        messages,
        bytes,
        announced: announced.unwrap_or(Announced::New),
        manifest,
        tries,
    })
}

/// The job's operand stream was deleted while its blocks were being published: the blocks it
/// held are gone with it, and are published again (into the stream the next try declares)
/// before publishing carries on.
#[derive(Debug, thiserror::Error)]
#[error("the operand stream of job {0} vanished while publishing")]
struct StreamVanished(String);

/// Whether a try failed because the job's stream was gone: it was found missing, or a block
/// went unroutable (the operands exchange found no stream, and no worker's live queue, for it).
/// An unroutable task says nothing about the stream: it is published again like any
/// unconfirmed message.
fn stream_lost(e: &anyhow::Error, operands_exchange: &str) -> bool {
    e.chain().any(|c| {
        c.is::<StreamVanished>()
            || matches!(
                c.downcast_ref::<gemmq::broker::PublishError>(),
                Some(gemmq::broker::PublishError::Unroutable { exchange, .. }) if exchange == operands_exchange
            )
    })
}

/// How a try goes on after an interrupted one.
#[derive(Debug, PartialEq)]
enum Resuming {
    /// The job's queues are there: publish what was not confirmed.
    AsBefore,
    /// Everything was confirmed and a collector has finished the job and deleted its queues:
    /// declaring them again would bring a finished job back.
    Done,
    /// The stream is gone, and the blocks with it: declare it again and publish every block.
    WithEveryBlock,
}

fn resume_after(queues: JobQueues, confirmed: u64, messages: u64) -> Resuming {
    match queues {
        JobQueues::There => Resuming::AsBefore,
        JobQueues::Retired if confirmed == messages => Resuming::Done,
        JobQueues::StreamGone | JobQueues::Retired => Resuming::WithEveryBlock,
    }
}

/// What is left of a job's queues on the broker.
enum JobQueues {
    There,
    /// The operand stream is missing, the results queue is there.
    StreamGone,
    /// Both are missing: a collector finished the job and deleted them, or someone deleted
    /// the job by hand.
    Retired,
}

async fn job_queues(broker: &Broker, topo: &topology::Topology, job: &str) -> Result<JobQueues> {
    // A missing queue closes the channel it was asked on: one throwaway channel per question.
    let exists = |queue: String| async move {
        let ch = broker.channel().await.context("connecting to RabbitMQ")?;
        let found = topology::queue_exists(&ch, &queue).await;
        let _ = ch.close(200, "checked".into()).await;
        found.with_context(|| format!("checking that {queue} exists"))
    };
    if exists(topo.operands_queue(job)).await? {
        return Ok(JobQueues::There);
    }
    Ok(if exists(topo.results_queue(job)).await? {
        JobQueues::StreamGone
    } else {
        JobQueues::Retired
    })
}

/// Errors that reconnecting cannot fix.
fn is_fatal(e: &anyhow::Error) -> bool {
    use gemmq::broker::BrokerError;
    use gemmq::topology::TopologyError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<BrokerError>(),
            Some(
                BrokerError::Unreachable { .. }
                    | BrokerError::AccessRefused { .. }
                    | BrokerError::Pool(_)
            )
        ) || matches!(
            c.downcast_ref::<TopologyError>(),
            Some(TopologyError::Mismatch { .. } | TopologyError::Refused { .. })
        ) || matches!(
            c.downcast_ref::<job::JobError>(),
            Some(
                job::JobError::Conflict(_)
                    | job::JobError::BadManifest { .. }
                    | job::JobError::Topology(
                        TopologyError::Mismatch { .. } | TopologyError::Refused { .. }
                    )
            )
        )
    })
}

fn log_announced(manifest: &Manifest, announced: Announced, group: usize, messages: u64) {
    let p = &manifest.plan;
    match announced {
        Announced::New => info!(
            job = %manifest.job, run = %manifest.run, m = p.m, k = p.k, n = p.n, dtype = %p.dtype, tile = p.tile,
            tiles = p.tiles(), k_parts = p.parts(), tasks = p.tasks(), group, messages,
            "job announced"
        ),
        Announced::AlreadyThere => info!(
            job = %manifest.job, run = %manifest.run,
            "job already announced with the same plan; publishing its tasks again (the collector keeps one result per tile)"
        ),
    }
}

/// How often, at most, the producer checks that the job's operand stream still exists.
const STREAM_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// One message the producer publishes.
enum Item {
    Block(BlockId),
    /// One task, or a group of them when tiles are tiny.
    Tasks(Vec<gemmq::TileId>),
}

/// Where the producer's messages go: the confirm window, the channel that checks the job's
/// stream, and the count of bytes published.
struct Out<'a> {
    window: &'a mut ConfirmWindow,
    check: &'a lapin::Channel,
    bytes: &'a mut u64,
}

/// Where a try starts publishing: at the first item not confirmed, after the blocks before it
/// when the stream that held them was lost.
struct Resume {
    skip: u64,
    blocks_again: bool,
}

/// The messages of a job, in the order they are published: one deterministic sequence — when
/// streamed, each task right after the blocks it is the first to need — so that workers start
/// while the rest is still being published, and resuming after a lost connection is "skip what
/// was confirmed".
fn items(plan: &Plan, group: usize) -> Vec<Item> {
    let streamed = plan.operands == Operands::Stream;
    let mut published = std::collections::HashSet::new();
    let mut items = Vec::new();
    let tiles: Vec<_> = plan.task_ids().collect();
    for tiles in tiles.chunks(group.max(1)) {
        if streamed {
            for tile in tiles {
                for block in [
                    BlockId {
                        side: Side::A,
                        index: tile.row,
                        part: tile.part,
                    },
                    BlockId {
                        side: Side::B,
                        index: tile.col,
                        part: tile.part,
                    },
                ] {
                    if published.insert(block) {
                        items.push(Item::Block(block));
                    }
                }
            }
        }
        items.push(Item::Tasks(tiles.to_vec()));
    }
    items
}

async fn publish_tasks<T: Element>(
    out: Out<'_>,
    topo: &topology::Topology,
    manifest: &Manifest,
    a: &Array2<T>,
    b: &Array2<T>,
    items: &[Item],
    from: Resume,
) -> Result<()> {
    let Out {
        window,
        check,
        bytes,
    } = out;
    let plan = &manifest.plan;
    let job = &manifest.job;
    let streamed = plan.operands == Operands::Stream;
    // Through the operands exchange: into the job's stream (its record) and at once to the live
    // queue of every running worker (see gemmq::topology).
    let operands_exchange = topo.operands_exchange();
    let mut stream_checked: Option<std::time::Instant> = None;
    let exchange = topo.tasks_exchange();
    // What a try publishes: everything from the first item not confirmed, and when the stream
    // was lost, the blocks before it too (first, so the confirmed count stays in order: see
    // `run`).
    let skip = from.skip as usize;
    let again = items
        .iter()
        .take(skip)
        .filter(|item| from.blocks_again && matches!(item, Item::Block(_)));
    let todo: Vec<&Item> = again.chain(items.iter().skip(skip)).collect();
    for item in todo {
        match item {
            Item::Block(block) => {
                let (rows, cols) = match block.side {
                    Side::A => (plan.rows(block.index), plan.depth(block.part)),
                    Side::B => (plan.depth(block.part), plan.cols(block.index)),
                };
                let data = match block.side {
                    Side::A => a.slice(s![rows.clone(), cols.clone()]),
                    Side::B => b.slice(s![rows.clone(), cols.clone()]),
                };
                let header = Header::Operand(OperandHeader {
                    job: job.clone(),
                    run: manifest.run.clone(),
                    block: *block,
                    dtype: plan.dtype,
                    rows: rows.len() as u32,
                    cols: cols.len() as u32,
                });
                // Straight into the message: no separate payload buffer of 14 MiB to copy.
                let mut body = message::encode_header(&header, data.len() * size_of::<T>());
                matrix::extend_le(data, &mut body);
                *bytes += body.len() as u64;
                // Every running worker's live queue takes blocks, so `mandatory` no longer
                // tells that the job's stream (the record late workers read) is missing: ask,
                // at most every STREAM_CHECK (a round trip per block would slow tiny tiles).
                // A 404 fails this try; the next one declares the job's queues again.
                if stream_checked.is_none_or(|t| t.elapsed() >= STREAM_CHECK) {
                    stream_checked = Some(std::time::Instant::now());
                    check_stream(check, topo, job).await?;
                }
                let props = persistent(kind::OPERAND, format!("{job}/{block}"));
                window
                    .publish(
                        &operands_exchange,
                        job,
                        &body,
                        props,
                        format!("block {block}"),
                    )
                    .await
                    .with_context(|| format!("publishing block {block} of job {job}"))?;
                info!(%job, %block, bytes = body.len(), "operand block published");
            }
            Item::Tasks(tiles) => {
                let tasks: Vec<TaskHeader> = tiles
                    .iter()
                    .map(|&tile| plan.task(job, &manifest.run, tile))
                    .collect();
                let first = tiles[0];
                let body = match (streamed, tasks.as_slice()) {
                    (false, [task]) => message::encode(
                        &Header::Task(task.clone()),
                        &[&matrix::task_payload(a, b, plan, first)],
                    ),
                    (true, [task]) => message::encode(&Header::TaskRef(task.clone()), &[]),
                    _ => {
                        let group = TaskGroup::of(&tasks).context("an empty task group")?;
                        message::encode(&Header::Tasks(group), &[])
                    }
                };
                *bytes += body.len() as u64;
                let tiles = Tiles(&tasks);
                let mut id = format!("{job}/{}/{}/{}", first.row, first.col, first.part);
                if tasks.len() > 1 {
                    id.push_str(&format!("+{}", tasks.len() - 1));
                }
                // When it was published, which a worker that came later compares with when its
                // live queue started: the task's blocks were published before the task, so
                // they will not come live and are read from the stream at once.
                let props = persistent(kind::TASK, id).with_timestamp(unix_ms() / 1000);
                window
                    .publish(&exchange, TASK_KEY, &body, props, format!("task {tiles}"))
                    .await
                    .with_context(|| format!("publishing task {tiles} of job {job}"))?;
                info!(%job, %tiles, bytes = body.len(), "task published");
            }
        }
    }
    if streamed {
        // Blocks are checked for at most every STREAM_CHECK: a stream deleted after the last
        // check would take blocks with it unnoticed. Once all is confirmed, look once more.
        window
            .flush()
            .await
            .context("waiting for the last confirms")?;
        check_stream(check, topo, job).await?;
    }
    Ok(())
}

/// Fails with [`StreamVanished`] when the job's operand stream is gone.
async fn check_stream(check: &lapin::Channel, topo: &topology::Topology, job: &str) -> Result<()> {
    let queue = topo.operands_queue(job);
    let exists = topology::queue_exists(check, &queue)
        .await
        .with_context(|| format!("checking that {queue} exists"))?;
    if !exists {
        return Err(StreamVanished(job.to_string()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::config::BrokerOptions;

    #[test]
    fn a_retired_job_is_not_brought_back_and_a_lost_stream_gets_every_block_again() {
        use JobQueues::*;
        assert_eq!(resume_after(There, 10, 100), Resuming::AsBefore);
        // All confirmed, and the collector already deleted the job's queues: it is finished.
        assert_eq!(resume_after(Retired, 100, 100), Resuming::Done);
        // Not all confirmed: someone deleted a running job's queues; it is declared again.
        assert_eq!(resume_after(Retired, 99, 100), Resuming::WithEveryBlock);
        assert_eq!(resume_after(StreamGone, 100, 100), Resuming::WithEveryBlock);
        assert_eq!(resume_after(StreamGone, 5, 100), Resuming::WithEveryBlock);
    }

    #[test]
    fn only_a_vanished_stream_or_an_unroutable_block_means_the_blocks_are_lost() {
        let unroutable = |exchange: &str| {
            anyhow::Error::new(gemmq::broker::PublishError::Unroutable {
                what: "something".into(),
                exchange: exchange.into(),
                code: 312,
                text: "NO_ROUTE".into(),
            })
            .context("publishing")
        };
        let topo = topology::Topology::new("t", std::time::Duration::from_secs(1));
        let operands = topo.operands_exchange();
        assert!(stream_lost(&unroutable(&operands), &operands));
        assert!(!stream_lost(&unroutable(&topo.tasks_exchange()), &operands));
        let vanished = anyhow::Error::new(StreamVanished("j".into())).context("publishing");
        assert!(stream_lost(&vanished, &operands));
        assert!(!stream_lost(
            &anyhow::anyhow!("connection reset"),
            &operands
        ));
    }

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
        refused("65", Operands::Stream, "64 tasks");
        refused("8", Operands::Inline, "--operands stream");
        for ok in ["auto", "1", "64"] {
            assert!(resolve(ok, Operands::Stream).is_ok(), "{ok}");
        }
        assert!(resolve("1", Operands::Inline).is_ok());
        assert!(
            resolve("auto", Operands::Inline).is_ok(),
            "auto never groups inline tasks"
        );
    }
}
