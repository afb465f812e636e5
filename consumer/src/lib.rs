//! The consumer (the worker): takes tile tasks, multiplies, publishes results.
//!
//! * **Bounded queue.** `basic.qos(prefetch = queue size)` per consumer: the broker never has
//!   more than that many unacknowledged tasks out to this worker. This is the classic bounded
//!   worker queue, enforced by the broker, and what makes dispatch least-loaded: a full worker
//!   gets nothing more, so the next task goes to a worker with room.
//! * **Result before ack.** A task is acked only after its result is confirmed by the broker. A
//!   worker that dies at any point leaves the task unacked, and the broker hands it to another.
//! * **Retry through the broker.** A failed task is `nack(requeue = false)`: the broker
//!   dead-letters it to the retry queue, whose TTL returns it to the task queue after the retry
//!   delay. The attempt number comes from the broker's `x-death` record.
//! * **Parking.** After the last attempt, or at once for a task that can never succeed
//!   (malformed), the task is copied to the parking-lot queue with its reason in headers, the
//!   collector is told, and the task is acked.
//! * **Groups.** Tiny tiles arrive several to a message (see `gemmq::message::TaskGroup`): the
//!   group is fetched, computed, retried, parked and acked as one, and acked only once every one
//!   of its results is confirmed.
//! * **Graceful shutdown.** On SIGTERM the consumer stops taking tasks, lets the ones being
//!   computed finish (up to a timeout), returns the ones not started, and closes.

mod heartbeat;
pub mod memory;
mod operands;
mod results;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use gemmq::broker::{self, Broker, persistent, publish_confirmed};
use gemmq::config::{BrokerSettings, ConfigError, ConfigFile, DurationRange, Layered};
use gemmq::kernel::Threads;
use gemmq::matrix;
use gemmq::matrix::Block;
use gemmq::message::{
    self, BlockId, Header, ParkedNotice, ResultHeader, Side, TaskHeader, Tiles, Work, kind,
};
use gemmq::shutdown::CancellationToken;
use gemmq::topology::{self, Topology};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{BasicProperties, Channel};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{Instrument, error, info, info_span, warn};

/// How this worker behaves. Every flag also reads the environment variable shown and the
/// `[consumer]` section of the config file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsumerOptions {
    /// Tasks this worker may hold at once (its queue). This is the AMQP prefetch: the broker
    /// sends no more until one is acked. For tiles that take microseconds raise it to ~100, so
    /// the broker's few-millisecond confirm round trips overlap [default: 10]
    #[arg(long, env = "GEMMQ_QUEUE_SIZE")]
    pub queue_size: Option<u16>,
    /// Tasks computed at the same time [default: 1]
    #[arg(long, env = "GEMMQ_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Simulated failure probability per attempt, 0 to 1, like the flaky workers of the demo (config/demo.toml)
    /// [default: 0]
    #[arg(long, env = "GEMMQ_FAILURE_RATE")]
    pub failure_rate: Option<f64>,
    /// Simulated extra time per task: a duration (500ms) or a range (1s..3s) [default: 0]
    #[arg(long, env = "GEMMQ_DELAY")]
    pub delay: Option<DurationRange>,
    /// Attempts per task before it is parked [default: 5]
    #[arg(long, env = "GEMMQ_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// This worker's name in logs, results and the management UI [default: <host>-<pid>]
    #[arg(long, env = "GEMMQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// On SIGTERM, how long tasks being computed may take to finish before they are returned
    /// to the queue [default: 30s]
    #[arg(long, env = "GEMMQ_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    /// Interval between status heartbeats on the events exchange (`gemmq-collector status`
    /// shows them; a worker silent for 3 intervals is dropped from the view) [default: 2s]
    #[arg(long, env = "GEMMQ_HEARTBEAT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// Threads one multiplication may use. One suits a worker per core; raise it for a single
    /// worker on a many-core machine [default: 1]
    #[arg(long, env = "GEMMQ_THREADS")]
    pub threads: Option<usize>,
    /// Memory for the operand blocks of streamed jobs; beyond it the least recently used
    /// block is dropped and read again when needed [default: 1GiB]
    #[arg(long, env = "GEMMQ_OPERAND_CACHE", value_name = "SIZE")]
    pub operand_cache: Option<bytesize::ByteSize>,
}

gemmq::layered!(ConsumerOptions {
    queue_size,
    concurrency,
    failure_rate,
    delay,
    max_attempts,
    worker_id,
    shutdown_timeout,
    heartbeat,
    threads,
    operand_cache
});

#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub queue_size: u16,
    pub concurrency: usize,
    pub failure_rate: f64,
    pub delay: DurationRange,
    pub max_attempts: u32,
    pub worker_id: String,
    pub shutdown_timeout: Duration,
    pub heartbeat: Duration,
    pub operand_cache: u64,
    /// Threads per multiplication.
    pub threads: usize,
}

impl Settings {
    pub fn resolve(
        flags: ConsumerOptions,
        file: &ConfigFile,
        broker: BrokerSettings,
    ) -> Result<Self, ConfigError> {
        let o = flags.or(file.section("consumer")?);
        let s = Settings {
            broker,
            queue_size: o.queue_size.unwrap_or(10),
            concurrency: o.concurrency.unwrap_or(1),
            failure_rate: o.failure_rate.unwrap_or(0.0),
            delay: o.delay.unwrap_or_default(),
            max_attempts: o.max_attempts.unwrap_or(5),
            worker_id: o.worker_id.unwrap_or_else(broker::default_worker_id),
            shutdown_timeout: o.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
            heartbeat: o.heartbeat.unwrap_or(gemmq::events::DEFAULT_HEARTBEAT),
            operand_cache: o.operand_cache.map_or(1 << 30, |b| b.as_u64()),
            threads: o.threads.unwrap_or(1),
        };
        if !(1..=64).contains(&s.threads) {
            return Err(ConfigError::invalid("threads", "must be between 1 and 64"));
        }
        if s.heartbeat < Duration::from_millis(100) {
            return Err(ConfigError::invalid("heartbeat", "must be at least 100ms"));
        }
        if s.queue_size == 0 {
            return Err(ConfigError::invalid(
                "queue-size",
                "must be at least 1 (0 would mean unlimited prefetch)",
            ));
        }
        if s.concurrency == 0 || s.concurrency > s.queue_size as usize {
            return Err(ConfigError::invalid(
                "concurrency",
                format!(
                    "{} must be between 1 and the queue size ({})",
                    s.concurrency, s.queue_size
                ),
            ));
        }
        if !(0.0..=1.0).contains(&s.failure_rate) {
            return Err(ConfigError::invalid(
                "failure-rate",
                format!("{} is not between 0 and 1", s.failure_rate),
            ));
        }
        if s.max_attempts == 0 {
            return Err(ConfigError::invalid("max-attempts", "must be at least 1"));
        }
        let id_ok = !s.worker_id.is_empty()
            && s.worker_id.len() <= 128
            && s.worker_id.chars().all(|c| c.is_ascii_graphic());
        if !id_ok {
            return Err(ConfigError::invalid(
                "worker-id",
                "1 to 128 printable ASCII characters, no spaces",
            ));
        }
        Ok(s)
    }
}

/// Counters of one worker's life, returned when it stops.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    pub received: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub parked: AtomicU64,
    pub connections: AtomicU64,
    /// Deliveries held right now (received, not yet acked or nacked), and the most ever held:
    /// the prefetch bound as this worker saw it.
    pub held: AtomicU64,
    pub max_held: AtomicU64,
    /// Floating-point operations of the tiles computed, for the heartbeat's GFLOP/s.
    pub flops: AtomicU64,
    /// Messages that carried results: fewer than `done` when results were sent together.
    pub result_messages: AtomicU64,
    /// Bytes of operand blocks received (live or from streams), and blocks read again after the cache
    /// dropped them.
    pub operand_bytes: AtomicU64,
    pub operand_rereads: AtomicU64,
    /// Of `operand_bytes`, those that came on the live queue rather than from a stream.
    pub operand_live_bytes: AtomicU64,
    /// Waits for a block on the live queue that ran their whole grace (a few seconds) in vain:
    /// the block was published before this worker's live queue started, and its task's
    /// timestamp could not tell.
    pub live_waits: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves tasks until `shutdown` is cancelled, reconnecting when the broker goes away.
pub async fn run(s: &Settings, shutdown: CancellationToken) -> Result<Arc<Stats>> {
    let broker = Broker::new(&s.broker, &format!("gemmq-consumer {}", s.worker_id))?
        .with_shutdown(shutdown.clone());
    let topo = s.broker.topology();
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let span = info_span!("consumer", worker = %s.worker_id);
    info!(
        parent: &span,
        queue_size = s.queue_size, concurrency = s.concurrency, failure_rate = s.failure_rate,
        delay = %s.delay, max_attempts = s.max_attempts, broker = %s.broker.redacted_url(),
        "worker starting"
    );
    let worker = session::Worker {
        broker: &broker,
        topo: &topo,
        settings: s,
        stats: &stats,
        shutdown: &shutdown,
        started,
    };
    loop {
        match session::serve(&worker).instrument(span.clone()).await {
            Ok(()) => break,
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Lost(e)) if !shutdown.is_cancelled() => {
                warn!(parent: &span, error = %format!("{e:#}"), "lost the broker; reconnecting (unacked tasks return to the queue)");
                // The pool backs off while the broker is down; this keeps a channel that fails
                // right after connecting from spinning.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(Stop::Lost(_)) => break,
        }
    }
    info!(
        parent: &span,
        done = stats.done.load(Ordering::Relaxed),
        failed = stats.failed.load(Ordering::Relaxed),
        parked = stats.parked.load(Ordering::Relaxed),
        operand_mib = stats.operand_bytes.load(Ordering::Relaxed) >> 20,
        operand_live_mib = stats.operand_live_bytes.load(Ordering::Relaxed) >> 20,
        operand_rereads = stats.operand_rereads.load(Ordering::Relaxed),
        live_waits = stats.live_waits.load(Ordering::Relaxed),
        "worker stopped"
    );
    Ok(stats)
}

enum Stop {
    /// Cannot go on: unreachable broker, wrong topology.
    Fatal(anyhow::Error),
    /// The connection or channel died: reconnect.
    Lost(anyhow::Error),
}

/// What every task handler shares.
struct Ctx {
    settings: Settings,
    topo: Topology,
    tasks_queue: String,
    publisher: Channel,
    results: results::Results,
    stats: Arc<Stats>,
    compute: Semaphore,
    shutdown: CancellationToken,
    conn: deadpool_lapin::Object,
    operands: operands::OperandBlocks,
    /// Cancelled when publishing finds the publisher channel dead: the connection is then
    /// rebuilt, instead of every task failing the same way in a loop.
    lost: CancellationToken,
}

impl Ctx {
    fn publisher_failed(&self) {
        if !self.publisher.status().connected() {
            self.lost.cancel();
        }
    }
}

/// Why a task did not produce a result.
enum Failure {
    /// Its job's operand stream is gone: the job was finished (or deleted). Drop the task.
    JobGone,
    /// Worth another attempt.
    Transient(String),
    /// Will fail the same way every time: park at once.
    Permanent(String),
}

async fn handle(ctx: Arc<Ctx>, delivery: Delivery) {
    Stats::bump(&ctx.stats.received);
    let held = ctx.stats.held.fetch_add(1, Ordering::Relaxed) + 1;
    ctx.stats.max_held.fetch_max(held, Ordering::Relaxed);
    settle(&ctx, delivery).await;
    ctx.stats.held.fetch_sub(1, Ordering::Relaxed);
}

/// Takes one delivery to its end: results published and acked, retried, or parked. A message
/// holds one task or, for tiny tiles, a group of them; a group is received, retried, parked
/// and acked as one, and each of its tiles has its own result.
async fn settle(ctx: &Arc<Ctx>, mut delivery: Delivery) {
    let attempt =
        topology::prior_attempts(&delivery.properties, &ctx.tasks_queue).saturating_add(1);
    let limit = ctx.settings.broker.max_message_bytes;
    // decode() has checked the job id too: it names queues and journal lines.
    let body_len = delivery.data.len();
    let decoded = message::decode(&delivery.data, limit)
        .and_then(|f| f.into_work())
        .map(|work| match work {
            // Inline tasks carry their blocks after the header; streamed ones name them.
            Work::Inline(task, payload) => (vec![task], Some(body_len - payload.len())),
            Work::Streamed(tasks) => (tasks, None),
        });
    let (tasks, inline_at) = match decoded {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("malformed task: {e}");
            return park(ctx, &delivery, &[], attempt, reason).await;
        }
    };
    // decode() refuses an empty group.
    let job = &tasks[0].job;
    let tiles = Tiles(&tasks);
    info!(%job, %tiles, attempt, "task received");
    if attempt > ctx.settings.max_attempts {
        // Only a task that kept killing its workers (and so was dead-lettered by the broker's
        // delivery limit, not by us) gets here: do not run it again.
        let reason = format!(
            "redelivered past the attempt limit ({} of {}): it crashed or stalled its workers",
            attempt, ctx.settings.max_attempts
        );
        return park(ctx, &delivery, &tasks, attempt, reason).await;
    }

    // Fetching blocks overlaps with the computation of other tasks: do it before the permit.
    let blocks = match inline_at {
        Some(offset) => Ok(TaskBlocks::Inline(offset)),
        None => {
            let published = delivery.properties.timestamp().as_ref().copied();
            fetch_blocks(ctx, &tasks, published)
                .await
                .map(TaskBlocks::Blocks)
        }
    };
    let permit = tokio::select! {
        p = ctx.compute.acquire() => p.expect("the semaphore is never closed"),
        _ = ctx.shutdown.cancelled() => {
            // Not started: give it back now rather than make it wait for the channel to close.
            requeue(&delivery).await;
            return;
        }
    };
    let started = Instant::now();
    let outcome = match blocks {
        Ok(blocks) => {
            let data = std::mem::take(&mut delivery.data);
            let (outcome, data) = work(ctx, &tasks, data, blocks).await;
            delivery.data = data;
            outcome
        }
        Err(f) => Err(f),
    };
    drop(permit);

    let micros = started.elapsed().as_micros() as u64;
    if matches!(outcome, Err(Failure::Transient(_))) {
        Stats::bump(&ctx.stats.failed);
    }
    match settlement(outcome, attempt, ctx.settings.max_attempts) {
        Settlement::Done(products) => {
            send_results(ctx, &delivery, &tasks, attempt, products, micros).await
        }
        Settlement::Park(reason) => park(ctx, &delivery, &tasks, attempt, reason).await,
        Settlement::Drop => {
            warn!(%job, %tiles, "job has no operand stream (finished or deleted), or its stream holds a later job under the same id; dropping its task");
            ack(&delivery, &tiles).await;
        }
        Settlement::Retry(reason) => retry(ctx, &delivery, &tasks, attempt, &reason).await,
    }
}

/// What becomes of a task once it has been tried: the worker's one decision, made without a
/// broker so that it can be tested on its own.
#[derive(Debug, PartialEq)]
enum Settlement {
    /// Publish its results, then ack.
    Done(Vec<Vec<u8>>),
    /// Park it with this reason (the collector is told), then ack.
    Park(String),
    /// Its job is gone: ack it and drop it.
    Drop,
    /// Nack it into the retry queue, which sends it back after the retry delay.
    Retry(String),
}

fn settlement(
    outcome: Result<Vec<Vec<u8>>, Failure>,
    attempt: u32,
    max_attempts: u32,
) -> Settlement {
    match outcome {
        Ok(products) => Settlement::Done(products),
        Err(Failure::Permanent(reason)) => Settlement::Park(reason),
        Err(Failure::JobGone) => Settlement::Drop,
        Err(Failure::Transient(reason)) if attempt >= max_attempts => {
            Settlement::Park(format!("{reason} (attempt {attempt} of {max_attempts})"))
        }
        Err(Failure::Transient(reason)) => Settlement::Retry(reason),
    }
}

/// A failed attempt: the collector is told, and the task goes to the retry queue
/// (`nack(requeue = false)` dead-letters it there; the broker records the attempt).
async fn retry(ctx: &Ctx, delivery: &Delivery, tasks: &[TaskHeader], attempt: u32, reason: &str) {
    let (job, tiles) = (&tasks[0].job, Tiles(tasks));
    warn!(
        %job, %tiles, attempt, max_attempts = ctx.settings.max_attempts,
        retry_in = ?ctx.topo.retry_delay(), %reason,
        "task failed; retrying through the retry queue"
    );
    notify_failure(ctx, &tasks[0], attempt, reason).await;
    match delivery
        .acker
        .nack(BasicNackOptions {
            requeue: false,
            multiple: false,
        })
        .await
    {
        Ok(_) => Stats::bump(&ctx.stats.retried),
        Err(e) => {
            warn!(%tiles, error = %e, "nack failed; the broker will redeliver the task")
        }
    }
}

impl From<operands::FetchError> for Failure {
    fn from(e: operands::FetchError) -> Self {
        match e {
            operands::FetchError::JobGone => Failure::JobGone,
            operands::FetchError::Unavailable(reason) | operands::FetchError::Other(reason) => {
                Failure::Transient(reason)
            }
        }
    }
}

/// Where a task's blocks are.
enum TaskBlocks {
    /// In the task's own body, from this offset.
    Inline(usize),
    /// Fetched from the job's operand stream: the A and B blocks of each task, in order.
    Blocks(Vec<(Arc<Block>, Arc<Block>)>),
}

type BlockPair = (Arc<Block>, Arc<Block>);

/// The A and B blocks each streamed task names, checked against the task's shape. The tasks of
/// a group share most of their blocks; the cache holds them.
/// `published`: the task message's timestamp (seconds), if its producer set one.
async fn fetch_blocks(
    ctx: &Ctx,
    tasks: &[TaskHeader],
    published: Option<u64>,
) -> Result<Vec<BlockPair>, Failure> {
    let mut pairs = Vec::with_capacity(tasks.len());
    for task in tasks {
        pairs.push(fetch_pair(ctx, task, published).await?);
    }
    Ok(pairs)
}

async fn fetch_pair(
    ctx: &Ctx,
    task: &TaskHeader,
    published: Option<u64>,
) -> Result<BlockPair, Failure> {
    let t = task.tile;
    let a_id = BlockId {
        side: Side::A,
        index: t.row,
        part: t.part,
    };
    let b_id = BlockId {
        side: Side::B,
        index: t.col,
        part: t.part,
    };
    let (r, c, d) = (task.rows as usize, task.cols as usize, task.depth as usize);
    let get = |id, shape| {
        ctx.operands.get(
            &ctx.conn,
            operands::Wanted {
                job: &task.job,
                run: &task.run,
                id,
                dtype: task.dtype,
                shape,
                published,
            },
        )
    };
    let a = get(a_id, (r, d)).await.map_err(Failure::from)?;
    let b = get(b_id, (d, c)).await.map_err(Failure::from)?;
    let (a_shape, b_shape) = (a.view().shape(), b.view().shape());
    if a_shape != (r, d) || b_shape != (d, c) {
        return Err(Failure::Permanent(format!(
            "the task {t} is {r}x{d} · {d}x{c} but its blocks are {a_shape:?} and {b_shape:?}"
        )));
    }
    Ok((a, b))
}

/// Tiles up to this many flops (~20 µs of work) are multiplied on the async thread.
const TINY_FLOPS: u64 = 1 << 20;

fn flops(task: &TaskHeader) -> u64 {
    2 * task.rows as u64 * task.cols as u64 * task.depth as u64
}

/// Simulated delay and failure (once per message: a group fails as one), then the
/// multiplications on the blocking pool. Returns each task's product, and the body so the
/// caller can still park it.
async fn work(
    ctx: &Ctx,
    tasks: &[TaskHeader],
    data: Vec<u8>,
    blocks: TaskBlocks,
) -> (Result<Vec<Vec<u8>>, Failure>, Vec<u8>) {
    let (delay, fail) = {
        let mut rng = rand::rng();
        let d = &ctx.settings.delay;
        let delay = if d.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(rng.random_range(d.min.as_secs_f64()..=d.max.as_secs_f64()))
        };
        (delay, rng.random_bool(ctx.settings.failure_rate))
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return (
            Err(Failure::Transient(
                "simulated failure (--failure-rate)".into(),
            )),
            data,
        );
    }
    let total: u64 = tasks.iter().map(flops).sum();
    let first = tasks[0].clone();
    let threads = Threads::Exactly(ctx.settings.threads);
    let compute = move || {
        let r = match blocks {
            TaskBlocks::Inline(offset) => matrix::compute_tile(&first, &data[offset..], threads)
                .map(|product| vec![product])
                .map_err(|e| Failure::Permanent(format!("malformed task: {e}"))),
            TaskBlocks::Blocks(pairs) => pairs
                .iter()
                .map(|(a, b)| matrix::multiply_blocks(a.view(), b.view(), threads))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::Permanent(format!("cannot multiply the blocks: {e}"))),
        };
        (r, data)
    };
    // A tiny tile is cheaper to multiply than to hand to another thread.
    if total <= TINY_FLOPS {
        return compute();
    }
    let joined = tokio::task::spawn_blocking(compute).await;
    match joined {
        Ok((r, data)) => (r, data),
        // The multiplication panicked: a bug, not bad luck. The body went with the thread.
        Err(e) => (
            Err(Failure::Transient(format!("computation failed: {e}"))),
            Vec::new(),
        ),
    }
}

/// Publishes each task's result, then acks the message: only once every result is confirmed.
async fn send_results(
    ctx: &Ctx,
    delivery: &Delivery,
    tasks: &[TaskHeader],
    attempt: u32,
    products: Vec<Vec<u8>>,
    micros: u64,
) {
    let each = micros / tasks.len() as u64;
    let results = tasks
        .iter()
        .zip(products)
        .map(|(task, bytes)| {
            let header = ResultHeader {
                job: task.job.clone(),
                run: task.run.clone(),
                tile: task.tile,
                dtype: task.dtype,
                rows: task.rows,
                cols: task.cols,
                worker: ctx.settings.worker_id.clone(),
                attempt,
                compute_micros: each,
            };
            (header, bytes)
        })
        .collect();
    let sent = ctx.results.send(results).await;
    let (job, tiles) = (&tasks[0].job, Tiles(tasks));
    let failed = sent.iter().find_map(|s| match s {
        results::Sent::Failed(e) => Some(e),
        _ => None,
    });
    if let Some(e) = failed {
        // Not acked: the task comes back (now, or when the channel closes) and is redone; the
        // collector drops the results of it that did get through the second time.
        warn!(%job, %tiles, error = %e, "result not confirmed; returning the task to the queue");
        ctx.publisher_failed();
        requeue(delivery).await;
        return;
    }
    ack(delivery, &tiles).await;
    if sent.iter().any(|s| matches!(s, results::Sent::Unroutable)) {
        // No results queue: the job was finished and retired, or never announced.
        warn!(%job, %tiles, "job has no results queue (finished or deleted); dropping its task");
        return;
    }
    ctx.stats
        .done
        .fetch_add(tasks.len() as u64, Ordering::Relaxed);
    let flops: u64 = tasks.iter().map(flops).sum();
    ctx.stats.flops.fetch_add(flops, Ordering::Relaxed);
    info!(%job, %tiles, attempt, ms = micros / 1000, "task done");
}

/// Tells the collector which worker failed, for its report. Not waited for: the report is not
/// worth slowing a retry.
async fn notify_failure(ctx: &Ctx, task: &TaskHeader, attempt: u32, reason: &str) {
    let notice = Header::Failed(message::FailureNotice {
        job: task.job.clone(),
        run: task.run.clone(),
        tile: task.tile,
        reason: reason.to_string(),
        attempt,
        worker: ctx.settings.worker_id.clone(),
    });
    let body = message::encode(&notice, &[]);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(kind::FAILED.into());
    let published = ctx
        .publisher
        .basic_publish(
            ctx.topo.results_exchange().as_str().into(),
            task.job.as_str().into(),
            Default::default(),
            &body,
            props,
        )
        .await;
    if let Ok(confirm) = published {
        // Await the confirm off the task path: a dropped one would be kept by lapin until the
        // channel closes.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), confirm).await;
        });
    }
}

/// Copies the task to the parking lot with its reason, tells the collector, then acks.
async fn park(ctx: &Ctx, delivery: &Delivery, tasks: &[TaskHeader], attempts: u32, reason: String) {
    let worker = &ctx.settings.worker_id;
    let tiles = Tiles(tasks);
    let mut headers = vec![
        ("x-gemmq-reason", reason.clone()),
        ("x-gemmq-worker", worker.clone()),
    ];
    if let Some(t) = tasks.first() {
        headers.push(("x-gemmq-job", t.job.clone()));
        headers.push(("x-gemmq-tile", tiles.to_string()));
    }
    let props = broker::with_headers(delivery.properties.clone(), &headers);
    let props = broker::with_int_header(props, "x-gemmq-attempts", attempts as i64);
    let parked = publish_confirmed(
        &ctx.publisher,
        "",
        &ctx.topo.parked_queue(),
        &delivery.data,
        props,
        "a parked task",
    )
    .await;
    if let Err(e) = parked {
        warn!(error = %e, %reason, "could not park the task; returning it to the queue");
        ctx.publisher_failed();
        requeue(delivery).await;
        return;
    }
    // One notice per tile: the collector counts tiles, whatever message carried them.
    for t in tasks {
        let notice = Header::Parked(ParkedNotice {
            job: t.job.clone(),
            run: t.run.clone(),
            tile: t.tile,
            reason: reason.clone(),
            attempts,
            worker: worker.clone(),
        });
        let body = message::encode(&notice, &[]);
        let id = format!(
            "{}/{}/{}/{}/parked",
            t.job, t.tile.row, t.tile.col, t.tile.part
        );
        let told = publish_confirmed(
            &ctx.publisher,
            &ctx.topo.results_exchange(),
            &t.job,
            &body,
            persistent(kind::PARKED, id),
            "a parked notice",
        )
        .await;
        match told {
            Ok(()) => {}
            // No results queue: nobody is waiting for this job any more.
            Err(e) if e.is_unroutable() => break,
            Err(e) => {
                // Acking now would leave the collector waiting for this tile forever. Hand the
                // task back: it is parked again (one more copy in the parking lot) and the
                // notice retried.
                warn!(job = %t.job, tile = %t.tile, error = %e, "could not tell the collector about the parked task; returning it to the queue");
                ctx.publisher_failed();
                requeue(delivery).await;
                return;
            }
        }
    }
    ack(delivery, &tiles).await;
    Stats::bump(&ctx.stats.parked);
    match tasks.first() {
        Some(t) => {
            error!(job = %t.job, %tiles, attempts, %reason, queue = %ctx.topo.parked_queue(), "task parked")
        }
        None => {
            error!(attempts, %reason, queue = %ctx.topo.parked_queue(), "unreadable task parked")
        }
    }
}

/// Hands a task back to the queue now (it is redelivered, to this worker or another).
async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}

async fn ack(delivery: &Delivery, tiles: &Tiles<'_>) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel died after the result was confirmed: the task will be redone and its
        // result arrive twice, which the collector handles.
        warn!(%tiles, error = %e, "ack failed; the task will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_computed_task_publishes_its_results() {
        let products = vec![vec![1u8, 2, 3]];
        assert_eq!(
            settlement(Ok(products.clone()), 1, 5),
            Settlement::Done(products)
        );
    }

    #[test]
    fn a_transient_failure_is_retried_until_the_last_attempt_then_parked() {
        let failed = || Err(Failure::Transient("simulated failure".into()));
        for attempt in 1..5 {
            assert_eq!(
                settlement(failed(), attempt, 5),
                Settlement::Retry("simulated failure".into()),
                "attempt {attempt}"
            );
        }
        assert_eq!(
            settlement(failed(), 5, 5),
            Settlement::Park("simulated failure (attempt 5 of 5)".into())
        );
    }

    #[test]
    fn a_permanent_failure_is_parked_at_once_and_a_gone_job_dropped() {
        assert_eq!(
            settlement(Err(Failure::Permanent("malformed task".into())), 1, 5),
            Settlement::Park("malformed task".into())
        );
        assert_eq!(settlement(Err(Failure::JobGone), 1, 5), Settlement::Drop);
    }
}
