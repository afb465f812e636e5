//! One run of a job as a worker knows it: its cached blocks, where each was found on the stream,
//! the reads in flight; and the registry of such jobs.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use gemmq::matrix::Block;
use gemmq::message::{self, BlockId, OperandHeader};
use tokio::sync::watch;

use super::cache::Cache;
use super::{MAX_JOBS, ReadCtx};

/// How far before a block's place a read in flight may start for the block to wait for it
/// rather than be read on its own.
const NEIGHBOURS: u64 = 8;

/// The jobs with a cache, the most recently used last.
pub(super) type Jobs = Mutex<Vec<(String, Arc<JobOperands>)>>;

/// One run of a job.
pub(super) struct JobOperands {
    pub(super) job: String,
    /// Blocks cached for another run of the job (the same id used again after its queues were
    /// deleted) would be the wrong numbers under the right names: a new run gets a new entry.
    pub(super) run: String,
    state: Mutex<State>,
    /// Bumped whenever a block is cached or a read ends: tasks waiting look again.
    pub(super) changed: watch::Sender<u64>,
    /// The front-to-back read of jobs with small blocks.
    pub(super) sweep: super::sweep::Sweep,
}

struct State {
    cache: Cache,
    /// Where every block read so far was found on the stream: one evicted since is read there.
    offsets: HashMap<BlockId, i64>,
    /// Blocks being read by some task, with the place on the stream each read starts from.
    reading: HashMap<BlockId, Option<u64>>,
}

/// What a task is to do about a block it needs.
pub(super) enum Claim {
    Cached(Arc<Block>),
    /// Another task is reading it: wait for that read.
    Wait,
    /// Read it (the caller now holds the read); `found_at` if it was read before and evicted.
    Read {
        found_at: Option<i64>,
    },
}

impl JobOperands {
    /// Looks for a block, and claims its read if it is neither cached nor coming: being read,
    /// or likely to come with a read that started a little before its place `at` (the broker
    /// sends the rest of a chunk with the block asked for, and blocks needed together were
    /// published together).
    pub(super) fn claim(&self, id: &BlockId, at: Option<u64>, small: bool) -> Claim {
        let mut st = self.state.lock().expect("never poisoned");
        if let Some(m) = st.cache.get(id) {
            return Claim::Cached(m);
        }
        // Large blocks are chunks of their own: no read brings one but its own.
        let near = |from: &Option<u64>| match (from, at) {
            (Some(from), Some(at)) => small && *from < at && at - from <= NEIGHBOURS,
            _ => false,
        };
        if st.reading.contains_key(id) || st.reading.values().any(near) {
            return Claim::Wait;
        }
        st.reading.insert(*id, at);
        Claim::Read {
            found_at: st.offsets.get(id).copied(),
        }
    }

    /// Puts a block read from the stream into the cache, remembering where it was found.
    pub(super) fn store(
        &self,
        ctx: &ReadCtx,
        h: &OperandHeader,
        body: Vec<u8>,
        start: usize,
        offset: Option<i64>,
    ) -> Result<Arc<Block>, String> {
        let (rows, cols) = (h.rows as usize, h.cols as usize);
        let m = Block::from_body(body, start, rows, cols, h.dtype)
            .map(Arc::new)
            .map_err(|e| format!("block {} of job {} is malformed: {e}", h.block, self.job))?;
        tracing::debug!(job = %self.job, block = %h.block, ?offset, "operand block read");
        let mut st = self.state.lock().expect("never poisoned");
        if let Some(o) = offset {
            st.offsets.insert(h.block, o);
        }
        st.cache.insert(h.block, m.clone(), ctx.budget);
        drop(st);
        self.changed.send_modify(|n| *n += 1);
        Ok(m)
    }

    /// Whether the block was read before (and may have been dropped from the cache since).
    pub(super) fn seen(&self, id: &BlockId) -> bool {
        self.state
            .lock()
            .expect("never poisoned")
            .offsets
            .contains_key(id)
    }

    /// The block, if it is cached.
    pub(super) fn cached(&self, id: &BlockId) -> Option<Arc<Block>> {
        self.state.lock().expect("never poisoned").cache.get(id)
    }

    fn cached_mib(&self) -> f64 {
        let bytes = self.state.lock().expect("never poisoned").cache.bytes;
        bytes as f64 / (1u64 << 20) as f64
    }
}

/// A read a task has claimed: released when it ends, however it ends (a task cancelled mid-read
/// too), and the tasks waiting for it look again.
pub(super) struct Reading<'a> {
    job: &'a JobOperands,
    id: BlockId,
}

impl<'a> Reading<'a> {
    pub(super) fn new(job: &'a JobOperands, id: BlockId) -> Self {
        Reading { job, id }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.job.state.lock() {
            st.reading.remove(&self.id);
        }
        self.job.changed.send_modify(|n| *n += 1);
    }
}

/// A job its collector said is done: its blocks go.
pub(super) fn forget_job(jobs: &Jobs, notice: &message::JobDone) {
    let job = notice.job.as_str();
    // A notice without a run (an older collector) is for whatever run is cached; a notice for
    // an earlier run leaves a later run of the same job id alone.
    let this_run = |j: &JobOperands| !message::other_run(&notice.run, &j.run);
    let mut jobs = jobs.lock().expect("never poisoned");
    if let Some(pos) = jobs.iter().position(|(name, j)| name == job && this_run(j)) {
        let (_, j) = jobs.remove(pos);
        let mib = j.cached_mib();
        tracing::info!(%job, cached_mib = %format!("{mib:.1}"), "job done; its cached operand blocks dropped");
    }
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
        tracing::info!(%job, old_run = %entry.1.run, %run, cached_mib = %format!("{:.1}", entry.1.cached_mib()), "job id used again; the blocks cached for its earlier run dropped");
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
            reading: HashMap::new(),
        }),
        changed: watch::Sender::new(0),
        sweep: Default::default(),
    });
    jobs.push((job.to_string(), j.clone()));
    j
}
