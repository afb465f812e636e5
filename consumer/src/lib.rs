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
//!
//! Read in this order: [`run`] here (reconnecting), `session` (one connection), `task` (one task
//! message: its blocks from `operands`, the multiplication, the decision), `settle` (carrying
//! the decision out on the broker), `results` (results published with confirms, several to a
//! message).

mod heartbeat;
pub mod memory;
mod metrics;
mod operands;
mod results;
mod session;
mod settle;
mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use gemmq::broker::{self, Broker};
use gemmq::config::{BrokerSettings, ConfigError, ConfigFile, DurationRange, Layered};
use gemmq::shutdown::CancellationToken;
use gemmq::topology::Topology;
use lapin::Channel;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span, warn};

/// How this worker behaves. Every flag also reads the environment variable shown and the
/// `[consumer]` section of the config file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsumerOptions {
    /// Task messages this worker may hold at once (its queue): each is one task or a group of
    /// them (`--group` on the producer). This is the AMQP prefetch: the broker sends no more
    /// until one is acked. When a job has fewer messages than the workers' queues hold, the
    /// broker deals them all out at once, in turn. For one tile a message and tiles that take
    /// microseconds raise it to ~100, so the broker's few-millisecond confirm round trips
    /// overlap [default: 10]
    #[arg(long, env = "GEMMQ_QUEUE_SIZE")]
    pub queue_size: Option<u16>,
    /// Tasks computed at the same time [default: 1]
    #[arg(long, env = "GEMMQ_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Simulated failure probability per attempt, 0 to 1, like the flaky workers of the demo (config/demo.toml)
    /// [default: 0]
    #[arg(long, env = "GEMMQ_FAILURE_RATE")]
    pub failure_rate: Option<f64>,
    /// Probability that a computed tile is made wrong on purpose before it is sent, 0 to 1: a
    /// worker with bad memory, to watch the collector find the tile, name this worker and have
    /// the tile computed again [default: 0]
    #[arg(long, env = "GEMMQ_CORRUPT_RATE")]
    pub corrupt_rate: Option<f64>,
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
    /// Threads one multiplication may use [default: the machine's cores / --concurrency]. A
    /// worker alone on its machine uses every core; workers that share one share its cores,
    /// and the one still busy at a job's end takes those the others left idle
    #[arg(long, env = "GEMMQ_THREADS")]
    pub threads: Option<usize>,
    /// Memory for the operand blocks of streamed jobs; beyond it the least recently used
    /// block is dropped and read again when needed [default: 1GiB]
    #[arg(long, env = "GEMMQ_OPERAND_CACHE", value_name = "SIZE")]
    pub operand_cache: Option<bytesize::ByteSize>,
    /// For measuring scale on one machine only: instead of multiplying, sleep as long as a
    /// machine doing this many GFLOP/s would take, and send a tile of zeros. Every byte still
    /// travels as in a real job, but C is wrong: run the collector with --verify false
    /// [default: off, multiply]
    #[arg(long, env = "GEMMQ_MODELLED_GFLOPS", value_name = "GFLOPS")]
    pub modelled_gflops: Option<f64>,
    /// Serve Prometheus metrics on this address (GET /metrics), e.g. 127.0.0.1:9100: tasks
    /// done, failed, retried and parked, compute time, operand bytes and cache hits, results
    /// published, reconnects [default: off]
    #[arg(long, env = "GEMMQ_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

gemmq::layered!(ConsumerOptions {
    queue_size,
    concurrency,
    failure_rate,
    corrupt_rate,
    delay,
    max_attempts,
    worker_id,
    shutdown_timeout,
    heartbeat,
    threads,
    operand_cache,
    modelled_gflops,
    metrics_addr
});

#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub queue_size: u16,
    pub concurrency: usize,
    pub failure_rate: f64,
    pub corrupt_rate: f64,
    pub delay: DurationRange,
    pub max_attempts: u32,
    pub worker_id: String,
    pub shutdown_timeout: Duration,
    pub heartbeat: Duration,
    pub operand_cache: u64,
    /// Threads per multiplication.
    pub threads: usize,
    /// `--modelled-gflops`: sleep instead of multiplying (benchmarks of scale only).
    pub modelled_gflops: Option<f64>,
    /// `--metrics-addr`: where Prometheus scrapes this worker.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The machine's cores over the tasks a worker computes at once. Not one thread: the tasks
/// of a job are handed out when they are published, up to each worker's queue size, so at a
/// job's end one worker often computes alone; with one thread it left the other cores idle
/// (4096³ on 2 cores, 2 workers: 2.30× the in-process reference with one thread, 2.15× with
/// two; BENCHMARKS.md). When every worker is busy the kernel's threads share the cores and
/// measured no slower. gemm multiplies a small tile on one thread whatever this says.
fn default_threads(concurrency: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / concurrency.max(1)).clamp(1, 64)
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
            corrupt_rate: o.corrupt_rate.unwrap_or(0.0),
            delay: o.delay.unwrap_or_default(),
            max_attempts: o.max_attempts.unwrap_or(5),
            worker_id: o.worker_id.unwrap_or_else(broker::default_worker_id),
            shutdown_timeout: o.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
            heartbeat: o.heartbeat.unwrap_or(gemmq::events::DEFAULT_HEARTBEAT),
            operand_cache: o.operand_cache.map_or(1 << 30, |b| b.as_u64()),
            threads: o
                .threads
                .unwrap_or_else(|| default_threads(o.concurrency.unwrap_or(1))),
            modelled_gflops: o.modelled_gflops,
            metrics_addr: o.metrics_addr,
        };
        if s.modelled_gflops
            .is_some_and(|g| !(g.is_finite() && g > 0.0))
        {
            return Err(ConfigError::invalid(
                "modelled-gflops",
                "must be a positive number of GFLOP/s",
            ));
        }
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
        for (name, rate) in [
            ("failure-rate", s.failure_rate),
            ("corrupt-rate", s.corrupt_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::invalid(
                    name,
                    format!("{rate} is not between 0 and 1"),
                ));
            }
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

/// Counters of one worker's life, returned when it stops. The heartbeat and the metrics
/// endpoint read them.
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
    /// Bytes of operand blocks received from the job streams, the reads that brought them, and
    /// of those the reads of blocks the cache had dropped.
    pub operand_bytes: AtomicU64,
    pub operand_reads: AtomicU64,
    pub operand_rereads: AtomicU64,
    /// Sweeps started: a job's operand stream read front to back, for its small blocks. One
    /// per job, unless a sweep failed (the broker restarted) or stopped with nothing its held
    /// messages needed ahead and was started again.
    pub operand_sweeps: AtomicU64,
    /// Blocks a task found in the cache (or being read for another task) rather than read.
    pub operand_hits: AtomicU64,
    /// Tiles whose results the broker confirmed (`result_messages` carried them).
    pub results_published: AtomicU64,
    /// Seconds computing each task message.
    #[serde(skip)]
    pub compute: metrics::ComputeSeconds,
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
    let _metrics = match s.metrics_addr {
        Some(addr) => Some(
            metrics::serve(addr, s, &stats)
                .instrument(span.clone())
                .await?,
        ),
        None => None,
    };
    info!(
        parent: &span,
        queue_size = s.queue_size, concurrency = s.concurrency, failure_rate = s.failure_rate, corrupt_rate = s.corrupt_rate,
        delay = %s.delay, max_attempts = s.max_attempts, threads = s.threads, broker = %s.broker.redacted_url(),
        "worker starting"
    );
    if let Some(g) = s.modelled_gflops {
        warn!(
            parent: &span, gflops = g,
            "modelled compute: tiles are not multiplied but slept for and sent as zeros; C will be wrong"
        );
    }
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
        operand_reads = stats.operand_reads.load(Ordering::Relaxed),
        operand_rereads = stats.operand_rereads.load(Ordering::Relaxed),
        operand_sweeps = stats.operand_sweeps.load(Ordering::Relaxed),
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
    /// Messages fetching their blocks at once, in the order they came: one more than those
    /// computed at once. The next message's blocks arrive while one is computed, and the first
    /// message's blocks do not share the link with the whole prefetch's (on a slow link, every
    /// fetch at once made the first tile wait for nearly all of them).
    fetch: Semaphore,
    shutdown: CancellationToken,
    conn: gemmq::broker::PooledConnection,
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

#[cfg(test)]
mod tests {
    use super::default_threads;

    #[test]
    fn by_default_a_worker_multiplies_on_the_cores_its_concurrent_tasks_leave_it() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_threads(1), cores.min(64));
        assert_eq!(default_threads(2), (cores / 2).clamp(1, 64));
        assert_eq!(default_threads(cores * 4), 1, "never fewer than one thread");
    }
}
