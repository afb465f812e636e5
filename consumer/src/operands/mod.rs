//! Operand blocks from a job's stream, fetched once and cached.
//!
//! With streamed operands a task names its blocks — A's (row, part of k) and B's (part of k,
//! column) — instead of carrying them. Each block was published once to the job's operand
//! stream. A worker reads the stream front to back with one long-lived consumer per job, in the
//! background, decoding and caching the blocks it passes and remembering every block's offset;
//! so a block reaches a worker at most once, however many of its tasks need it. Tasks wait for
//! their blocks to appear in the cache, each woken as soon as its own are there (not in turn
//! behind tasks whose blocks lie further down the stream). The reader reads ahead while the
//! cache has room, and only on demand when it is full; then the least recently used block is
//! dropped, and needing it again costs one read at its known offset.
//!
//! That reader is the fallback. A running worker gets each block as it is published, on its own
//! live queue ([`gemmq::topology::Topology::declare_live_operands`]): the broker hands it over
//! from memory, where a stream read costs the broker a disk read and a CRC32 check of the chunk,
//! once per worker. So a task whose block is not cached first waits for the live queue (up to
//! [`LIVE_GRACE`]); the stream is read when that wait runs out (a worker that started after the
//! block was published, or whose connection was replaced), when the live queue dropped a block
//! the cache had no room for, or when the live queue is not up at all — and at once when the
//! task itself was published before the live queue started (its message's timestamp): its blocks
//! are older still. Once a job's stream reader runs, no task of that job waits for the live queue.
//!
//! Here: [`OperandBlocks::get`], which decides where a task's block comes from. Then `job` (one
//! run of a job: its cache, stream offsets, reader and waiters; the registry of jobs), `cache`
//! (least recently used out, under a budget shared by all jobs), `live` (the live queue) and
//! `stream` (the stream reader).

mod cache;
mod job;
mod live;
mod stream;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gemmq::matrix::Block;
use gemmq::message::{self, BlockId, DType, Header};
use gemmq::topology::Topology;
use lapin::options::BasicCancelOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Connection};

use job::{JobOperands, Jobs, Look, Wanting, job_entry};
use stream::read_until;

/// How long a worker waits for a block to appear on the stream before it gives up on the task
/// (which is then retried): the producer publishes blocks before the tasks that name them.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Jobs a worker keeps blocks (and stream readers) of at once; their memory is bounded by the
/// cache budget, not by this.
const MAX_JOBS: usize = 16;
/// How long a task waits for its block on the live queue before it reads the stream. The
/// producer publishes a block before the tasks that need it, so on a running worker the block
/// is at most one message transfer behind the task; this only delays workers that missed it.
pub const LIVE_GRACE: Duration = Duration::from_secs(3);
/// Blocks in flight on the live queue (the broker holds the rest, bounded by the queue's size).
const LIVE_PREFETCH: u16 = 2;
/// How long opening a job's stream is tried again (the broker may not serve it yet) before the
/// task fails and is retried through the retry queue.
const OPEN_PATIENCE: Duration = Duration::from_secs(5);
/// Finished jobs remembered, to drop their late tasks at once.
const MAX_DONE: usize = 64;

/// Why a block could not be had.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// The job's operand stream does not exist (the job is finished), or holds another run of
    /// the job id (the task is left over from an earlier job).
    JobGone,
    /// The broker cannot serve the job's stream for now (it is starting it after a restart, or
    /// the stream was deleted under a running job and its producer is declaring it again).
    Unavailable(String),
    Other(String),
}

impl From<String> for FetchError {
    fn from(s: String) -> Self {
        FetchError::Other(s)
    }
}

/// A block a task needs, and what is known of it.
pub struct Wanted<'a> {
    pub job: &'a str,
    pub run: &'a str,
    pub id: BlockId,
    pub dtype: DType,
    /// The shape the task expects.
    pub shape: (usize, usize),
    /// When the task was published (its message's timestamp, Unix seconds), if known.
    pub published: Option<u64>,
}

/// The operand blocks of all jobs this worker serves, on one connection.
pub struct OperandBlocks {
    topo: Topology,
    jobs: Arc<Jobs>,
    /// Jobs whose collector said they are done (the latest [`MAX_DONE`]): their tasks are
    /// dropped at once instead of waiting for blocks that will not come.
    done: Arc<Mutex<VecDeque<String>>>,
    /// What reading blocks needs, shared with the background readers.
    read: ReadCtx,
    /// Whether the live queue is being consumed: only then is a missing block waited for.
    live: Arc<AtomicBool>,
    /// When the live queue started being consumed (Unix seconds): blocks published before
    /// then never come on it.
    live_since: Arc<AtomicU64>,
}

/// What reading blocks needs: the message limit, the cache budget and the bytes cached over all
/// jobs (held to the budget), and where blocks read and re-read are counted.
#[derive(Clone)]
struct ReadCtx {
    limit: u64,
    budget: u64,
    total: Arc<AtomicU64>,
    stats: Arc<crate::Stats>,
}

impl OperandBlocks {
    pub fn new(topo: Topology, limit: u64, budget: u64, stats: Arc<crate::Stats>) -> Self {
        OperandBlocks {
            topo,
            jobs: Arc::new(Mutex::new(Vec::new())),
            done: Arc::new(Mutex::new(VecDeque::new())),
            read: ReadCtx {
                limit,
                budget,
                total: Arc::new(AtomicU64::new(0)),
                stats,
            },
            live: Arc::new(AtomicBool::new(false)),
            live_since: Arc::new(AtomicU64::new(0)),
        }
    }

    fn job(&self, job: &str, run: &str) -> Arc<JobOperands> {
        job_entry(&self.jobs, &self.read.total, job, run)
    }

    /// The block of this run of the job, from the cache, or once the live queue or the stream
    /// reader has brought it. `shape` is what the task expects: a cached block that came live
    /// with another shape or dtype is stale (from a producer that names no run) and is read from
    /// the stream instead.
    pub async fn get(&self, conn: &Connection, want: Wanted<'_>) -> Result<Arc<Block>, FetchError> {
        let Wanted {
            job,
            run,
            id,
            dtype,
            shape,
            published,
        } = want;
        // A job said to be done has nothing more coming live; its stream tells whether it is
        // gone (the task is dropped) or back (the same job id published again). A task published
        // well before the live queue started names blocks published before it too: they will
        // not come live (a second of margin for the timestamps' rounding and clock skew).
        let live_since = self.live_since.load(Ordering::Relaxed);
        let before_live = published.is_some_and(|p| p.saturating_add(1) < live_since);
        let mut stream_only = before_live
            || self
                .done
                .lock()
                .expect("never poisoned")
                .iter()
                .any(|d| d == job);
        let j = self.job(job, run);
        let start = tokio::time::Instant::now();
        let deadline = start + BLOCK_TIMEOUT;
        let mut changed = j.changed.subscribe();
        let mut waited_live = false;
        loop {
            // What to do, decided under the lock; the awaits come after it is released.
            let (evicted_at, reading) = match j.look(&id, dtype, shape, &mut stream_only)? {
                Look::Cached(m) => return Ok(m),
                Look::Missing {
                    evicted_at,
                    reading,
                } => (evicted_at, reading),
            };
            let live_may_bring_it = !reading
                && !stream_only
                && self.live.load(Ordering::Relaxed)
                && !j.live_missed.load(Ordering::Relaxed);
            if evicted_at.is_none() && live_may_bring_it && start.elapsed() < LIVE_GRACE {
                let until = (start + LIVE_GRACE).min(deadline);
                let _ = tokio::time::timeout_at(until, changed.changed()).await;
                waited_live = true;
                continue;
            }
            if std::mem::take(&mut waited_live) && start.elapsed() >= LIVE_GRACE {
                self.read.stats.live_waits.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(offset) = evicted_at {
                // Seen before, evicted since: read just that one.
                return self.reread(conn, &j, id, dtype, offset, deadline).await;
            }
            self.ensure_reader(conn, &j, dtype).await?;
            let _wanting = Wanting::new(&j);
            let woke = tokio::time::timeout_at(deadline, changed.changed()).await;
            if woke.is_err() {
                return Err(format!("block {id} did not arrive within {BLOCK_TIMEOUT:?}").into());
            }
        }
    }

    /// A block this worker had, evicted since: read just that one at its offset.
    async fn reread(
        &self,
        conn: &Connection,
        j: &JobOperands,
        id: BlockId,
        dtype: DType,
        offset: i64,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Block>, FetchError> {
        self.read
            .stats
            .operand_rereads
            .fetch_add(1, Ordering::Relaxed);
        let (ch, mut scan) = self
            .open(conn, &j.job, AMQPValue::LongLongInt(offset))
            .await?;
        let read = read_until(&self.read, j, &mut scan, dtype, id);
        let got = tokio::time::timeout_at(deadline, read).await;
        close_quietly(ch, scan.tag());
        match got {
            Ok(read) => read,
            Err(_) => Err(format!(
                "block {id} did not come back from its offset {offset} within {BLOCK_TIMEOUT:?}"
            )
            .into()),
        }
    }
}

/// The header of a message and where its payload starts; `None` (logged) if it is unreadable.
fn decode_frame(ctx: &ReadCtx, job: &str, body: &[u8], source: &str) -> Option<(Header, usize)> {
    match message::decode(body, ctx.limit) {
        // The payload is the body's tail: keep the body and view the numbers in it.
        Ok(f) => Some((f.header, body.len() - f.payload.len())),
        Err(e) => {
            tracing::warn!(%job, error = %e, "unreadable message on the {source} skipped");
            None
        }
    }
}

fn close_quietly(ch: Channel, tag: lapin::types::ShortString) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
        let _ = ch.close(200, "done with the job".into()).await;
    });
}
