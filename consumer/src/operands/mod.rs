//! Operand blocks from a job's stream: each read when a task needs it, then cached.
//!
//! With streamed operands a task names its blocks — A's (row, part of k) and B's (part of k,
//! column) — and where they are on the job's operand stream. A worker that needs a block it has
//! not cached reads from the stream at the block's offset, with a prefetch of one. RabbitMQ sends
//! a stream a chunk at a time — the messages it wrote together — and the producer writes each
//! large block as a chunk of its own, so a read brings that block (and small ones, a few
//! neighbours, which are cached too). A large block is followed by an empty chunk end, which
//! readers pass: the broker reads one chunk past what it sends, and that should not be the
//! next block (docs/ARCHITECTURE.md). So the broker sends each worker only the blocks its own
//! tasks need, each once while the worker's cache holds it — not every block to every worker —
//! and the producer groups tasks into rectangles of tiles that share their blocks, so that the
//! tasks a worker takes need few of them (`gemmq::Plan::groups`).
//!
//! Tasks that need the same block share one read. A block evicted from the cache costs one read
//! at the offset it was found at. The place a task gives is a lower bound — a block published
//! twice (after the producer lost its connection) moves the later ones further on — so a read
//! goes forward from it until its block comes by.
//!
//! Blocks under 1 MiB are not worth a stream consumer each: for them a worker reads the job's
//! stream front to back once (`sweep`), as far as and where the task messages it holds need
//! ([`OperandBlocks::hold`]).
//!
//! Here: [`OperandBlocks::get`]. Then `job` (one run of a job: its cache, where its blocks were
//! found, the reads in flight; the registry of jobs), `cache` (least recently used out, under a
//! budget shared by all jobs), `stream` (reading a block at its offset), `sweep` (reading small
//! blocks front to back) and `notices` (the collectors' word that a job is done).

mod cache;
mod job;
mod notices;
mod stream;
mod sweep;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gemmq::matrix::Block;
use gemmq::message::{self, BlockId, DType, Header};
use gemmq::topology::Topology;
use lapin::options::BasicCancelOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;

use job::{Claim, JobOperands, Jobs, Reading, job_entry};

/// How long a worker waits for a block to come off the stream before it gives up on the task
/// (which is then retried): the producer publishes blocks before the tasks that name them.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Jobs a worker keeps blocks of at once; their memory is bounded by the cache budget, not by
/// this.
const MAX_JOBS: usize = 16;
/// Stream reads in flight at once: enough to overlap a group's blocks and the next task's with
/// the computation, few enough that the broker is not asked for a whole prefetch's worth at once.
const READS_IN_FLIGHT: usize = 4;
/// How long opening a job's stream is tried again (the broker may not serve it yet) before the
/// task fails and is retried through the retry queue.
const OPEN_PATIENCE: Duration = Duration::from_secs(5);

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
#[derive(Clone)]
pub struct Wanted<'a> {
    pub job: &'a str,
    pub run: &'a str,
    pub id: BlockId,
    pub dtype: DType,
    /// Where the task says the block is on the stream, at the earliest; without it (a producer
    /// that gives no places) the stream is read from its start.
    pub at: Option<u64>,
    /// Its size as the task's shape says.
    pub bytes: u64,
}

/// The small blocks a task message held by this worker names, registered with its job's sweep
/// until the message is settled (this is dropped): the sweep reads the blocks held messages
/// need and skips those none does.
pub struct HeldBlocks {
    job: Arc<JobOperands>,
    blocks: Vec<(i64, BlockId)>,
}

impl HeldBlocks {
    /// Registers `blocks` (place, block, size) with the job's sweep until this is dropped.
    fn register(
        job: Arc<JobOperands>,
        blocks: impl IntoIterator<Item = (i64, BlockId, u64)>,
    ) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|(at, id, bytes)| {
                job.sweep.want(at, id, bytes);
                (at, id)
            })
            .collect();
        HeldBlocks { job, blocks }
    }
}

impl Drop for HeldBlocks {
    fn drop(&mut self) {
        for (at, id) in &self.blocks {
            self.job.sweep.unwant(*at, *id);
        }
    }
}

/// Whether a block is small enough to come with the job's sweep (see `sweep`).
fn is_small(bytes: u64) -> bool {
    bytes < gemmq::tiling::LARGE_BLOCK_BYTES
}

/// The operand blocks of all jobs this worker serves, on one connection.
pub struct OperandBlocks {
    topo: Topology,
    jobs: Arc<Jobs>,
    /// What reading blocks needs.
    read: ReadCtx,
    /// Held while asking the broker whether a job whose stream is missing is gone, so that the
    /// tasks of a finished or cancelled job ask one at a time: asked at once, their throwaway
    /// channels (each closed by the broker's 404) were seen to take the worker's tasks channel
    /// down with them, and the worker reconnected over and over.
    gone_check: tokio::sync::Mutex<()>,
}

/// What reading blocks needs: the message limit, the cache budget and the bytes cached over all
/// jobs (held to the budget), the reads allowed in flight, and where blocks read are counted.
#[derive(Clone)]
struct ReadCtx {
    limit: u64,
    budget: u64,
    total: Arc<AtomicU64>,
    reads: Arc<Semaphore>,
    stats: Arc<crate::Stats>,
}

impl OperandBlocks {
    pub fn new(topo: Topology, limit: u64, budget: u64, stats: Arc<crate::Stats>) -> Self {
        OperandBlocks {
            topo,
            jobs: Arc::new(std::sync::Mutex::new(Vec::new())),
            read: ReadCtx {
                limit,
                budget,
                total: Arc::new(AtomicU64::new(0)),
                reads: Arc::new(Semaphore::new(READS_IN_FLIGHT)),
                stats,
            },
            gone_check: Default::default(),
        }
    }

    /// Registers the blocks a task message this worker has received names (all of one job
    /// run), for as long as the returned value lives: held from the message's delivery to its
    /// settling, so that the job's sweep knows what is needed ahead of the tasks fetching now.
    pub fn hold(&self, wanted: &[Wanted<'_>]) -> Option<HeldBlocks> {
        let first = wanted.first()?;
        let job = job_entry(&self.jobs, &self.read.total, first.job, first.run);
        let small = wanted
            .iter()
            .filter(|w| is_small(w.bytes))
            .filter_map(|w| Some((i64::try_from(w.at?).ok()?, w.id, w.bytes)));
        Some(HeldBlocks::register(job, small))
    }

    /// The block of this run of the job: from the cache, from a read another task has started,
    /// or read now from the job's stream.
    pub async fn get(&self, conn: &Connection, want: Wanted<'_>) -> Result<Arc<Block>, FetchError> {
        let j = job_entry(&self.jobs, &self.read.total, want.job, want.run);
        let deadline = tokio::time::Instant::now() + BLOCK_TIMEOUT;
        // Small blocks share their stream chunks with their neighbours: a read brings the next few.
        let small = is_small(want.bytes);
        if let Some(at) = want.at.and_then(|a| i64::try_from(a).ok())
            && small
        {
            // Needed while waited for, whether or not the task's message is held.
            let _waiting = HeldBlocks::register(j.clone(), [(at, want.id, want.bytes)]);
            let mut rewound = false;
            // Small blocks come with the job's sweep, unless it has passed them.
            loop {
                let mut changed = j.changed.subscribe();
                if let Some(m) = j.cached(&want.id) {
                    self.read.stats.operand_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                if let Some(e) = j.sweep.failed() {
                    return Err(e);
                }
                if j.sweep.passed(at) {
                    // Cached and dropped since (no room), or a place that was only a lower
                    // bound (the block was published again further on): read it on its own.
                    if rewound || j.seen(&want.id) {
                        break;
                    }
                    // Skipped: no held message needed it then.
                    j.sweep.rewind(at);
                    rewound = true;
                }
                self.ensure_sweep(conn, &j, want.dtype).await?;
                if tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
                {
                    return Err(timed_out(want.id));
                }
            }
        }
        loop {
            // Subscribed before looking, so that a read that ends in between is not missed.
            let mut changed = j.changed.subscribe();
            let from = match j.claim(&want.id, want.at, small) {
                Claim::Cached(m) => {
                    self.read.stats.operand_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(m);
                }
                Claim::Wait => {
                    if tokio::time::timeout_at(deadline, changed.changed())
                        .await
                        .is_err()
                    {
                        return Err(timed_out(want.id));
                    }
                    continue;
                }
                Claim::Read { found_at } => found_at,
            };
            let _reading = Reading::new(&j, want.id);
            if from.is_some() {
                self.read
                    .stats
                    .operand_rereads
                    .fetch_add(1, Ordering::Relaxed);
            }
            // Where it was found before, unless the task's place is earlier: a stream declared
            // again holds every block again, from the start.
            let hint = want.at.and_then(|a| i64::try_from(a).ok());
            let at = match (from, hint) {
                (Some(f), Some(h)) => Some(f.min(h)),
                (f, h) => f.or(h),
            };
            let read = self.read_block(conn, &j, want.id, want.dtype, at);
            return match tokio::time::timeout_at(deadline, read).await {
                Ok(got) => got,
                Err(_) => Err(timed_out(want.id)),
            };
        }
    }

    /// Reads one block from the job's stream, starting at `at` (the start without it), into
    /// the job's cache.
    async fn read_block(
        &self,
        conn: &Connection,
        j: &JobOperands,
        id: BlockId,
        dtype: DType,
        at: Option<i64>,
    ) -> Result<Arc<Block>, FetchError> {
        let _permit = self.read.reads.acquire().await.expect("never closed");
        self.read
            .stats
            .operand_reads
            .fetch_add(1, Ordering::Relaxed);
        let offset = at.map_or(gemmq::topology::text("first"), AMQPValue::LongLongInt);
        let (ch, mut scan) = self.open(conn, &j.job, offset).await?;
        let got = stream::read_until(&self.read, j, &ch, &mut scan, dtype, id).await;
        close_quietly(ch, scan.tag());
        got
    }
}

fn timed_out(id: BlockId) -> FetchError {
    FetchError::Other(format!(
        "block {id} did not come off the job's stream within {BLOCK_TIMEOUT:?}"
    ))
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

/// Cancels a stream consumer and closes its channel, in the background.
fn close_quietly(ch: Channel, tag: lapin::types::ShortString) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
        let _ = ch.close(200, "done with the block".into()).await;
    });
}
