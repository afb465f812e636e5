//! One run of a job as a worker knows it: its cached blocks, where each block is on the stream,
//! the background reader, and the tasks waiting; and the registry of such jobs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gemmq::matrix::Block;
use gemmq::message::{self, BlockId, OperandHeader};
use tokio::sync::{Notify, watch};

use super::cache::Cache;
use super::{FetchError, MAX_DONE, MAX_JOBS, ReadCtx};

/// The jobs with a cache, the most recently used last.
pub(super) type Jobs = Mutex<Vec<(String, Arc<JobOperands>)>>;

/// One run of a job: its blocks and the background reader that fills them in.
pub(super) struct JobOperands {
    pub(super) job: String,
    /// Blocks cached for another run of the job (the same id used again after its queues were
    /// deleted) would be the wrong numbers under the right names: a new run gets a new entry.
    pub(super) run: String,
    pub(super) state: Mutex<State>,
    /// Bumped whenever the state changes (a block arrived, the reader stopped): waiters re-look.
    pub(super) changed: watch::Sender<u64>,
    /// Tasks waiting for a block the reader has not reached: it reads on even with a full cache.
    pub(super) wanted: AtomicUsize,
    pub(super) demand: Arc<Notify>,
    /// The live queue brought a block of this job that the cache had no room for: waiting for
    /// the live queue cannot help, read the stream.
    pub(super) live_missed: AtomicBool,
}

pub(super) struct State {
    pub(super) cache: Cache,
    /// Where every block seen so far is on the stream.
    pub(super) offsets: HashMap<BlockId, i64>,
    /// Blocks that came on the live queue: one that is missing now was evicted, and will not
    /// come again live.
    pub(super) seen_live: HashSet<BlockId>,
    pub(super) reader: ReaderState,
}

pub(super) enum ReaderState {
    Idle,
    Running(tokio::task::JoinHandle<()>),
    /// Stopped with this error; the next task to need a block reports it and starts it again.
    Failed(FetchError),
}

impl ReaderState {
    /// Running and not finished: a reader that ended without saying why (a panic) is restarted.
    pub(super) fn is_running(&self) -> bool {
        matches!(self, ReaderState::Running(h) if !h.is_finished())
    }
}

/// What the job's state says of a wanted block.
pub(super) enum Look {
    Cached(Arc<Block>),
    Missing {
        /// Where it is on the stream, if it was seen there and evicted since.
        evicted_at: Option<i64>,
        /// Whether the job's stream reader is running.
        reading: bool,
    },
}

impl JobOperands {
    /// Looks for a block under the lock. A cached block that does not fit the task's `dtype`
    /// and `shape` came live from an earlier run (a producer that names no run) and is dropped;
    /// that, or a block that came live and was evicted, sets `stream_only`: it will not come live
    /// again. A failed reader's error is returned once, and the reader may be started again.
    pub(super) fn look(
        &self,
        id: &BlockId,
        dtype: message::DType,
        shape: (usize, usize),
        stream_only: &mut bool,
    ) -> Result<Look, FetchError> {
        let mut st = self.state.lock().expect("never poisoned");
        if let Some(m) = st.cache.get(id) {
            let fits = m.view().dtype() == dtype && m.view().shape() == shape;
            if fits || st.offsets.contains_key(id) {
                // From the stream it is what the job has: a wrong one is the task's problem,
                // reported by the caller.
                return Ok(Look::Cached(m));
            }
            tracing::warn!(job = %self.job, block = %id, "a cached block does not fit its task (stale: the job id was used again?); reading the stream");
            st.cache.remove(id);
            *stream_only = true;
        }
        if st.seen_live.contains(id) {
            // It came live and was evicted: it will not come live again.
            *stream_only = true;
        }
        if let ReaderState::Failed(e) = &st.reader {
            let e = e.clone();
            st.reader = ReaderState::Idle;
            return Err(e);
        }
        Ok(Look::Missing {
            evicted_at: st.offsets.get(id).copied(),
            reading: st.reader.is_running(),
        })
    }
}

/// A task waiting for a block the reader has not reached: while any do, the reader reads on even
/// with a full cache. Counted down on drop, so a task cancelled mid-wait stops counting.
pub(super) struct Wanting<'a>(&'a JobOperands);

impl<'a> Wanting<'a> {
    pub(super) fn new(j: &'a JobOperands) -> Self {
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

/// A job its collector said is done: its blocks go, its waiting tasks stop waiting for the live
/// queue, and later tasks of it skip that wait (the stream then says whether it is gone).
pub(super) fn forget_job(jobs: &Jobs, done: &Mutex<VecDeque<String>>, notice: &message::JobDone) {
    let job = notice.job.as_str();
    // A notice without a run (an older collector) is for whatever run is cached.
    let this_run = |j: &JobOperands| !message::other_run(&notice.run, &j.run);
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
pub(super) fn store(
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
pub(super) fn job_entry(
    jobs: &Jobs,
    total: &Arc<AtomicU64>,
    job: &str,
    run: &str,
) -> Arc<JobOperands> {
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
            cache: Cache::new(total.clone()),
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
