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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use gemmq::matrix::Block;
use gemmq::message::{self, BlockId, DType, Header, OperandHeader};
use gemmq::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{Notify, watch};

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
pub struct Operands {
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

/// The jobs with a cache, the most recently used last.
type Jobs = Mutex<Vec<(String, Arc<JobOperands>)>>;

/// One run of a job: its blocks and the background reader that fills them in.
struct JobOperands {
    job: String,
    /// Blocks cached for another run of the job (the same id used again after its queues were
    /// deleted) would be the wrong numbers under the right names: a new run gets a new entry.
    run: String,
    state: Mutex<State>,
    /// Bumped whenever the state changes (a block arrived, the reader stopped): waiters re-look.
    changed: watch::Sender<u64>,
    /// Tasks waiting for a block the reader has not reached: it reads on even with a full cache.
    wanted: AtomicUsize,
    demand: Arc<Notify>,
    /// The live queue brought a block of this job that the cache had no room for: waiting for
    /// the live queue cannot help, read the stream.
    live_missed: AtomicBool,
}

struct State {
    cache: Cache,
    /// Where every block seen so far is on the stream.
    offsets: HashMap<BlockId, i64>,
    /// Blocks that came on the live queue: one that is missing now was evicted, and will not
    /// come again live.
    seen_live: HashSet<BlockId>,
    reader: ReaderState,
}

enum ReaderState {
    Idle,
    Running(tokio::task::JoinHandle<()>),
    /// Stopped with this error; the next task to need a block reports it and starts it again.
    Failed(FetchError),
}

impl ReaderState {
    /// Running and not finished: a reader that ended without saying why (a panic) is restarted.
    fn is_running(&self) -> bool {
        matches!(self, ReaderState::Running(h) if !h.is_finished())
    }
}

/// A task waiting for a block the reader has not reached: while any do, the reader reads on even
/// with a full cache. Counted down on drop, so a task cancelled mid-wait stops counting.
struct Wanting<'a>(&'a JobOperands);

impl<'a> Wanting<'a> {
    fn new(j: &'a JobOperands) -> Self {
        j.wanted.fetch_add(1, Ordering::Relaxed);
        j.demand.notify_one();
        Wanting(j)
    }
}

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.wanted.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for JobOperands {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut()
            && let ReaderState::Running(h) = &st.reader
        {
            h.abort();
        }
    }
}

/// One job's blocks. The budget is shared by every job's cache through `total`.
struct Cache {
    blocks: HashMap<BlockId, (Arc<Block>, u64)>,
    bytes: u64,
    clock: u64,
    total: Arc<AtomicU64>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Cache {
    fn get(&mut self, id: &BlockId) -> Option<Arc<Block>> {
        self.clock += 1;
        let clock = self.clock;
        self.blocks.get_mut(id).map(|(m, used)| {
            *used = clock;
            m.clone()
        })
    }

    fn remove(&mut self, id: &BlockId) {
        if let Some((old, _)) = self.blocks.remove(id) {
            self.bytes -= old.memory();
            self.total.fetch_sub(old.memory(), Ordering::Relaxed);
        }
    }

    /// Drops every block, giving their bytes back to the shared budget.
    fn clear(&mut self) {
        self.blocks.clear();
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }

    fn insert(&mut self, id: BlockId, m: Arc<Block>, budget: u64) {
        let size = m.memory();
        while self.total.load(Ordering::Relaxed) + size > budget && !self.blocks.is_empty() {
            let oldest = *self
                .blocks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id)
                .expect("the cache is not empty");
            if let Some((old, _)) = self.blocks.remove(&oldest) {
                self.bytes -= old.memory();
                self.total.fetch_sub(old.memory(), Ordering::Relaxed);
            }
        }
        self.clock += 1;
        if let Some((old, _)) = self.blocks.insert(id, (m, self.clock)) {
            self.bytes -= old.memory();
            self.total.fetch_sub(old.memory(), Ordering::Relaxed);
        }
        self.bytes += size;
        self.total.fetch_add(size, Ordering::Relaxed);
    }
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

impl Operands {
    pub fn new(topo: Topology, limit: u64, budget: u64, stats: Arc<crate::Stats>) -> Self {
        Operands {
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

    /// Declares this connection's live operand queue and starts consuming it. Returns the loop
    /// that puts its blocks into the caches, to be run for as long as the connection lives.
    pub async fn start_live(
        &self,
        conn: &Connection,
        worker: &str,
        tag: &str,
    ) -> Result<impl std::future::Future<Output = ()> + use<>, String> {
        let err = |e: &dyn std::fmt::Display| format!("starting the live operand queue: {e}");
        let ch = conn.create_channel().await.map_err(|e| err(&e))?;
        ch.basic_qos(LIVE_PREFETCH, BasicQosOptions { global: false })
            .await
            .map_err(|e| err(&e))?;
        let queue = self
            .topo
            .declare_live_operands(&ch, worker, self.read.budget)
            .await
            .map_err(|e| err(&e))?;
        let mut feed = ch
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&e))?;
        tracing::debug!(%queue, "consuming the live operand queue");
        let (ctx, jobs, live) = (self.read.clone(), self.jobs.clone(), self.live.clone());
        let done = self.done.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.live_since.store(now, Ordering::Relaxed);
        live.store(true, Ordering::Relaxed);
        Ok(async move {
            // Whatever ends the loop, tasks stop waiting for the live queue.
            struct Down(Arc<AtomicBool>, Arc<Jobs>);
            impl Drop for Down {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Relaxed);
                    if let Ok(jobs) = self.1.lock() {
                        for (_, j) in jobs.iter() {
                            j.changed.send_modify(|n| *n += 1);
                        }
                    }
                }
            }
            let _down = Down(live, jobs.clone());
            while let Some(Ok(d)) = feed.next().await {
                let acker = d.acker.clone();
                accept_live(&ctx, &jobs, &done, d);
                if acker.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
            }
            tracing::debug!("the live operand queue stopped; blocks come from the streams");
            let _ = ch.close(200, "live operand queue done".into()).await;
        })
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
            let (evicted_at, reading) = {
                let mut st = j.state.lock().expect("never poisoned");
                if let Some(m) = st.cache.get(&id) {
                    let fits = m.view().dtype() == dtype && m.view().shape() == shape;
                    if fits || st.offsets.contains_key(&id) {
                        // From the stream it is what the job has: a wrong one is the task's
                        // problem, reported by the caller.
                        return Ok(m);
                    }
                    tracing::warn!(%job, block = %id, "a cached block does not fit its task (stale: the job id was used again?); reading the stream");
                    st.cache.remove(&id);
                    stream_only = true;
                }
                if st.seen_live.contains(&id) {
                    // It came live and was evicted: it will not come live again.
                    stream_only = true;
                }
                if let ReaderState::Failed(e) = &st.reader {
                    let e = e.clone();
                    st.reader = ReaderState::Idle;
                    return Err(e);
                }
                (st.offsets.get(&id).copied(), st.reader.is_running())
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
                self.read
                    .stats
                    .operand_rereads
                    .fetch_add(1, Ordering::Relaxed);
                let (ch, mut scan) = self.open(conn, job, AMQPValue::LongLongInt(offset)).await?;
                let read = read_until(&self.read, &j, &mut scan, dtype, id);
                let got = tokio::time::timeout_at(deadline, read).await;
                close_quietly(ch, scan.tag());
                return match got {
                    Ok(read) => read,
                    Err(_) => Err(format!(
                        "block {id} did not come back from its offset {offset} within {BLOCK_TIMEOUT:?}"
                    )
                    .into()),
                };
            }
            self.ensure_reader(conn, &j, dtype).await?;
            let _wanting = Wanting::new(&j);
            let woke = tokio::time::timeout_at(deadline, changed.changed()).await;
            if woke.is_err() {
                return Err(format!("block {id} did not arrive within {BLOCK_TIMEOUT:?}").into());
            }
        }
    }

    /// Starts the job's background reader from the front of its stream, if it is not running.
    async fn ensure_reader(
        &self,
        conn: &Connection,
        j: &Arc<JobOperands>,
        dtype: DType,
    ) -> Result<(), FetchError> {
        if j.state.lock().expect("never poisoned").reader.is_running() {
            return Ok(());
        }
        let (ch, scan) = self
            .open(conn, &j.job, gemmq::topology::text("first"))
            .await?;
        let mut st = j.state.lock().expect("never poisoned");
        if st.reader.is_running() {
            // Another task started one meanwhile.
            drop(st);
            close_quietly(ch, scan.tag());
            return Ok(());
        }
        let ctx = self.read.clone();
        let weak = Arc::downgrade(j);
        st.reader = ReaderState::Running(tokio::spawn(async move {
            read_ahead(ctx, weak, ch, scan, dtype).await;
        }));
        Ok(())
    }

    /// Opens the job's stream at `offset`. A missing stream means the job is gone (finished or
    /// deleted) only when its results queue is gone too: a stream deleted under a running job
    /// is declared again by its producer, which publishes every block again, so its tasks are
    /// retried, not dropped.
    async fn open(
        &self,
        conn: &Connection,
        job: &str,
        offset: AMQPValue,
    ) -> Result<(Channel, Consumer), FetchError> {
        // For a few seconds after the broker restarts, a stream cannot be read ("home node ...
        // is down or inaccessible"), while workers that reconnect already have their tasks
        // back: try again for a while rather than spend one of each task's attempts on it.
        let start = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.open_once(conn, job, offset.clone()).await {
                Err(FetchError::Unavailable(e))
                    if start.elapsed() + pause < OPEN_PATIENCE && conn.status().connected() =>
                {
                    tracing::debug!(%job, error = %e, "the operand stream cannot be read yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    async fn open_once(
        &self,
        conn: &Connection,
        job: &str,
        offset: AMQPValue,
    ) -> Result<(Channel, Consumer), FetchError> {
        match self.open_stream(conn, job, offset).await {
            Err(FetchError::JobGone) => {
                let Ok(ch) = conn.create_channel().await else {
                    return Err(FetchError::Other(format!(
                        "the operand stream of job {job} is missing, and the broker cannot be asked whether the job is"
                    )));
                };
                let results = self.topo.results_queue(job);
                let found = gemmq::topology::queue_exists(&ch, &results).await;
                let _ = ch.close(200, "checked".into()).await;
                match found {
                    Ok(false) => Err(FetchError::JobGone),
                    _ => Err(FetchError::Unavailable(format!(
                        "the operand stream of running job {job} is missing (deleted?); its producer declares it again and publishes the blocks again"
                    ))),
                }
            }
            other => other,
        }
    }

    async fn open_stream(
        &self,
        conn: &Connection,
        job: &str,
        offset: AMQPValue,
    ) -> Result<(Channel, Consumer), FetchError> {
        let err = |e: lapin::Error| {
            let what = format!("reading the operand stream of job {job}: {e}");
            if gemmq::topology::is_queue_missing(&e) {
                FetchError::JobGone
            } else if gemmq::topology::is_refused(&e) {
                FetchError::Other(what)
            } else {
                FetchError::Unavailable(what)
            }
        };
        let ch = conn.create_channel().await.map_err(err)?;
        // Streams insist on a prefetch; two blocks in flight keep the pipe full.
        ch.basic_qos(2, BasicQosOptions { global: false })
            .await
            .map_err(err)?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), offset);
        let scan = ch
            .basic_consume(
                self.topo.operands_queue(job).as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(err)?;
        Ok((ch, scan))
    }
}

/// The background reader of one job: reads the stream in order into the cache, ahead of demand
/// while the cache has room. Holds the job only weakly while it waits on the broker, so a job
/// dropped by the worker (evicted, or its connection replaced) drops its cache and aborts this.
/// Ends when the stream fails or is deleted (the job finished): then the job's cache is emptied,
/// since nothing will ask for those blocks again.
async fn read_ahead(
    ctx: ReadCtx,
    job: std::sync::Weak<JobOperands>,
    ch: Channel,
    mut scan: Consumer,
    dtype: DType,
) {
    let tag = scan.tag();
    loop {
        {
            let Some(j) = job.upgrade() else { break };
            let full = ctx.total.load(Ordering::Relaxed) >= ctx.budget;
            if full && j.wanted.load(Ordering::Relaxed) == 0 {
                // Reading on would only evict blocks that may still be needed: wait for a task
                // to ask for one the reader has not reached.
                let demand = j.demand.clone();
                drop(j);
                demand.notified().await;
                continue;
            }
        }
        let delivery = next_delivery(&mut scan).await;
        let Some(j) = job.upgrade() else { break };
        let read = delivery.and_then(|d| accept(&ctx, &j, d, dtype, None));
        if let Err(e) = read {
            let mut st = j.state.lock().expect("never poisoned");
            st.reader = ReaderState::Failed(e);
            st.cache.clear();
            drop(st);
            j.changed.send_modify(|n| *n += 1);
            break;
        }
    }
    close_quietly(ch, tag);
}

async fn next_delivery(scan: &mut Consumer) -> Result<Delivery, FetchError> {
    match scan.next().await {
        None => Err(
            "the operand stream consumer was cancelled (is the job finished?)"
                .to_string()
                .into(),
        ),
        Some(Err(e)) => Err(format!("reading the operand stream: {e}").into()),
        Some(Ok(d)) => {
            // On a stream an ack is credit, not consumption: settle it at once, whatever it holds.
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            Ok(d)
        }
    }
}

/// Reads blocks from `scan` until `want` comes by (a one-off read from its offset).
async fn read_until(
    ctx: &ReadCtx,
    j: &JobOperands,
    scan: &mut Consumer,
    dtype: DType,
    want: BlockId,
) -> Result<Arc<Block>, FetchError> {
    loop {
        let d = next_delivery(scan).await?;
        if let Some((_, m)) = accept(ctx, j, d, dtype, Some(want))? {
            return Ok(m);
        }
    }
}

/// Decodes one delivery from the operand stream into the job's cache and wakes the waiters.
/// `None` for a message that is skipped: unreadable, another job's, or (with `want`) not it.
fn accept(
    ctx: &ReadCtx,
    j: &JobOperands,
    d: Delivery,
    dtype: DType,
    want: Option<BlockId>,
) -> Result<Option<(BlockId, Arc<Block>)>, FetchError> {
    let offset =
        d.properties
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get("x-stream-offset") {
                Some(AMQPValue::LongLongInt(o)) => Some(*o),
                _ => None,
            });
    ctx.stats
        .operand_bytes
        .fetch_add(d.data.len() as u64, Ordering::Relaxed);
    let Some((header, start)) = decode_frame(ctx, &j.job, &d.data, "operand stream") else {
        return Ok(None);
    };
    let Header::Operand(h) = header else {
        tracing::warn!(job = %j.job, "a message that is not a block on the operand stream skipped");
        return Ok(None);
    };
    if h.job == j.job && h.run != j.run && !h.run.is_empty() && !j.run.is_empty() {
        // Runs are derived from the job's inputs: the stream holds another job under this id,
        // and the task is left over from the earlier one. Its data is gone.
        return Err(FetchError::JobGone);
    }
    if h.job != j.job || h.run != j.run || h.dtype != dtype {
        tracing::warn!(job = %j.job, block = %h.block, "a block of another job, run or dtype skipped");
        return Ok(None);
    }
    if want.is_some_and(|w| w != h.block) {
        // A one-off read may start a little before its block (the stream's chunk).
        return Ok(None);
    }
    Ok(store(ctx, j, &h, d.data, start, offset).map(|m| (h.block, m)))
}

/// A block from the live queue: cached if there is room (made by dropping the caches of other,
/// less recently used jobs first); otherwise its job reads the stream for it.
fn accept_live(ctx: &ReadCtx, jobs: &Jobs, done: &Mutex<VecDeque<String>>, d: Delivery) {
    let Some((header, start)) = decode_frame(ctx, "?", &d.data, "live operand queue") else {
        return;
    };
    let h = match header {
        Header::Operand(h) => h,
        // The collector's word that a job is done (decode checked the job id).
        Header::JobDone(notice) => return forget_job(jobs, done, &notice),
        _ => {
            tracing::warn!(
                "a message that is neither a block nor a job notice on the live operand queue skipped"
            );
            return;
        }
    };
    ctx.stats
        .operand_bytes
        .fetch_add(d.data.len() as u64, Ordering::Relaxed);
    ctx.stats
        .operand_live_bytes
        .fetch_add(d.data.len() as u64, Ordering::Relaxed);
    // Blocks of a job once said to be done: the same job id published again.
    done.lock().expect("never poisoned").retain(|d| *d != h.job);
    let j = job_entry(jobs, &ctx.total, &h.job, &h.run);
    let size = d.data.len() as u64;
    let fits = || ctx.total.load(Ordering::Relaxed) + size <= ctx.budget;
    if !fits() {
        let others: Vec<Arc<JobOperands>> = {
            let jobs = jobs.lock().expect("never poisoned");
            jobs.iter()
                .filter(|(name, _)| *name != h.job)
                .map(|(_, o)| o.clone())
                .collect()
        };
        for other in others {
            if fits() {
                break;
            }
            other.state.lock().expect("never poisoned").cache.clear();
        }
    }
    if !fits() {
        j.live_missed.store(true, Ordering::Relaxed);
        j.changed.send_modify(|n| *n += 1);
        tracing::debug!(job = %h.job, block = %h.block, "no room for a live block; the stream will be read");
        return;
    }
    store(ctx, &j, &h, d.data, start, None);
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

/// A job its collector said is done: its blocks go, its waiting tasks stop waiting for the live
/// queue, and later tasks of it skip that wait (the stream then says whether it is gone).
fn forget_job(jobs: &Jobs, done: &Mutex<VecDeque<String>>, notice: &message::JobDone) {
    let job = notice.job.as_str();
    // A notice without a run (an older collector) is for whatever run is cached.
    let this_run = |j: &JobOperands| notice.run.is_empty() || j.run == notice.run;
    let mut jobs = jobs.lock().expect("never poisoned");
    if jobs.iter().any(|(name, j)| name == job && !this_run(j)) {
        // An earlier run of a job id that is running again here: the running one is not done.
        return;
    }
    {
        let mut finished = done.lock().expect("never poisoned");
        if !finished.iter().any(|d| d == job) {
            if finished.len() >= MAX_DONE {
                finished.pop_front();
            }
            finished.push_back(job.to_string());
        }
    }
    if let Some(pos) = jobs.iter().position(|(name, j)| name == job && this_run(j)) {
        let (_, j) = jobs.remove(pos);
        let mib = {
            let mut st = j.state.lock().expect("never poisoned");
            let mib = st.cache.bytes as f64 / (1u64 << 20) as f64;
            st.cache.clear();
            mib
        };
        j.live_missed.store(true, Ordering::Relaxed);
        j.changed.send_modify(|n| *n += 1);
        tracing::info!(%job, cached_mib = %format!("{mib:.1}"), "job done; its cached operand blocks dropped");
    }
}

/// Puts a decoded block into its job's cache (remembering its stream offset, if it came from
/// the stream) and wakes the tasks waiting for blocks.
fn store(
    ctx: &ReadCtx,
    j: &JobOperands,
    h: &OperandHeader,
    body: Vec<u8>,
    start: usize,
    offset: Option<i64>,
) -> Option<Arc<Block>> {
    let (rows, cols) = (h.rows as usize, h.cols as usize);
    let m = match Block::from_body(body, start, rows, cols, h.dtype) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::warn!(job = %j.job, block = %h.block, error = %e, "a malformed operand block skipped");
            return None;
        }
    };
    tracing::debug!(job = %j.job, block = %h.block, live = offset.is_none(), "operand block received");
    {
        let mut st = j.state.lock().expect("never poisoned");
        match offset {
            Some(o) => st.offsets.insert(h.block, o).map(|_| ()),
            None => st.seen_live.insert(h.block).then_some(()),
        };
        st.cache.insert(h.block, m.clone(), ctx.budget);
    }
    j.changed.send_modify(|n| *n += 1);
    Some(m)
}

/// The entry of this run of the job, made if it is new (dropping the least recently used job
/// beyond MAX_JOBS, and any other run of the same job).
fn job_entry(jobs: &Jobs, total: &Arc<AtomicU64>, job: &str, run: &str) -> Arc<JobOperands> {
    let mut jobs = jobs.lock().expect("never poisoned");
    if let Some(pos) = jobs.iter().position(|(j, _)| j == job) {
        let entry = jobs.remove(pos);
        if entry.1.run == run {
            let found = entry.1.clone();
            jobs.push(entry);
            return found;
        }
        let cached = entry.1.state.lock().expect("never poisoned").cache.bytes;
        tracing::info!(%job, old_run = %entry.1.run, %run, cached_mib = %format!("{:.1}", cached as f64 / (1u64 << 20) as f64), "job id used again; the blocks cached for its earlier run dropped");
        // Tasks of the old run still waiting hold it; wake them to look again.
        entry.1.live_missed.store(true, Ordering::Relaxed);
        entry.1.changed.send_modify(|n| *n += 1);
    }
    if jobs.len() >= MAX_JOBS {
        jobs.remove(0);
    }
    let j = Arc::new(JobOperands {
        job: job.to_string(),
        run: run.to_string(),
        state: Mutex::new(State {
            cache: Cache {
                blocks: HashMap::new(),
                bytes: 0,
                clock: 0,
                total: total.clone(),
            },
            offsets: HashMap::new(),
            seen_live: HashSet::new(),
            reader: ReaderState::Idle,
        }),
        changed: watch::Sender::new(0),
        wanted: AtomicUsize::new(0),
        demand: Arc::new(Notify::new()),
        live_missed: AtomicBool::new(false),
    });
    jobs.push((job.to_string(), j.clone()));
    j
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

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::Side;

    fn block(n: usize) -> Arc<Block> {
        Arc::new(Block::from_body(vec![0; n * n * 8], 0, n, n, DType::F64).unwrap())
    }

    #[test]
    fn the_budget_holds_across_jobs_and_the_least_recently_used_block_goes_first() {
        let total = Arc::new(AtomicU64::new(0));
        let new = || Cache {
            blocks: HashMap::new(),
            bytes: 0,
            clock: 0,
            total: total.clone(),
        };
        let (mut one, mut two) = (new(), new());
        let id = |index| BlockId {
            side: Side::A,
            index,
            part: 0,
        };
        let budget = 3 * 8 * 8 * 8; // three 8x8 f64 blocks
        one.insert(id(0), block(8), budget);
        one.insert(id(1), block(8), budget);
        two.insert(id(0), block(8), budget);
        assert!(one.get(&id(0)).is_some()); // 0 is now more recent than 1
        one.insert(id(2), block(8), budget);
        assert!(
            one.get(&id(1)).is_none(),
            "the least recently used block was dropped"
        );
        assert!(one.get(&id(0)).is_some() && one.get(&id(2)).is_some());
        assert_eq!(total.load(Ordering::Relaxed), budget);
        drop(two);
        assert_eq!(total.load(Ordering::Relaxed), 2 * 8 * 8 * 8);
    }
}
