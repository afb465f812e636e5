//! Operand blocks from a job's stream, fetched once and cached.
//!
//! With streamed operands a task names its blocks — A's (row, part of k) and B's (part of k,
//! column) — instead of carrying them. Each block was published once to the job's operand
//! stream. A worker reads the stream front to back with one long-lived consumer, decoding and
//! caching the blocks it passes and remembering every block's offset; so a block reaches a
//! worker at most once, however many of its tasks need it. When the cache is over its budget the
//! least recently used block is dropped; needing it again costs one read at its known offset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use gemmq::matrix::{self, Matrix};
use gemmq::message::{self, BlockId, DType, Header};
use gemmq::topology::Topology;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Mutex as AsyncMutex;

/// How long a worker waits for a block to appear on the stream before it gives up on the task
/// (which is then retried): the producer publishes blocks before the tasks that name them.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Jobs whose readers a worker keeps open at once.
const MAX_JOBS: usize = 4;

/// Why a block could not be had.
#[derive(Debug)]
pub enum FetchError {
    /// The job's operand stream does not exist: the job is finished.
    JobGone,
    Other(String),
}

impl From<String> for FetchError {
    fn from(s: String) -> Self {
        FetchError::Other(s)
    }
}

/// The operand blocks of all jobs this worker serves, on one connection.
pub struct Operands {
    topo: Topology,
    limit: u64,
    budget: u64,
    jobs: Mutex<Vec<(String, Arc<JobOperands>)>>,
    /// Bytes cached over all jobs, held to the budget.
    total: Arc<AtomicU64>,
    /// Bytes of blocks received from the broker: for the heartbeat and the benchmark.
    pub fetched_bytes: AtomicU64,
}

struct JobOperands {
    job: String,
    reader: AsyncMutex<Option<Reader>>,
    cache: Mutex<Cache>,
}

struct Reader {
    ch: Channel,
    scan: Consumer,
    offsets: HashMap<BlockId, i64>,
}

/// One job's blocks. The budget is shared by every job's cache through `total`.
struct Cache {
    blocks: HashMap<BlockId, (Arc<Matrix>, u64)>,
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
    fn get(&mut self, id: &BlockId) -> Option<Arc<Matrix>> {
        self.clock += 1;
        let clock = self.clock;
        self.blocks.get_mut(id).map(|(m, used)| {
            *used = clock;
            m.clone()
        })
    }

    fn insert(&mut self, id: BlockId, m: Arc<Matrix>, budget: u64) {
        let size = bytes_of(&m);
        while self.total.load(Ordering::Relaxed) + size > budget && !self.blocks.is_empty() {
            let oldest = *self
                .blocks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id)
                .expect("the cache is not empty");
            if let Some((old, _)) = self.blocks.remove(&oldest) {
                self.bytes -= bytes_of(&old);
                self.total.fetch_sub(bytes_of(&old), Ordering::Relaxed);
            }
        }
        self.clock += 1;
        if let Some((old, _)) = self.blocks.insert(id, (m, self.clock)) {
            self.bytes -= bytes_of(&old);
            self.total.fetch_sub(bytes_of(&old), Ordering::Relaxed);
        }
        self.bytes += size;
        self.total.fetch_add(size, Ordering::Relaxed);
    }
}

fn bytes_of(m: &Matrix) -> u64 {
    let (r, c) = m.shape();
    (r * c * m.dtype().size()) as u64
}

impl Operands {
    pub fn new(topo: Topology, limit: u64, budget: u64) -> Self {
        Operands {
            topo,
            limit,
            budget,
            jobs: Mutex::new(Vec::new()),
            total: Arc::new(AtomicU64::new(0)),
            fetched_bytes: Default::default(),
        }
    }

    fn job(&self, job: &str) -> Arc<JobOperands> {
        let mut jobs = self.jobs.lock().expect("never poisoned");
        if let Some(pos) = jobs.iter().position(|(j, _)| j == job) {
            let entry = jobs.remove(pos);
            let found = entry.1.clone();
            jobs.push(entry);
            return found;
        }
        if jobs.len() >= MAX_JOBS {
            jobs.remove(0);
        }
        let j = Arc::new(JobOperands {
            job: job.to_string(),
            reader: AsyncMutex::new(None),
            cache: Mutex::new(Cache {
                blocks: HashMap::new(),
                bytes: 0,
                clock: 0,
                total: self.total.clone(),
            }),
        });
        jobs.push((job.to_string(), j.clone()));
        j
    }

    /// The block, from the cache or the stream.
    pub async fn get(
        &self,
        conn: &Connection,
        job: &str,
        id: BlockId,
        dtype: DType,
    ) -> Result<Arc<Matrix>, FetchError> {
        let j = self.job(job);
        if let Some(m) = j.cache.lock().expect("never poisoned").get(&id) {
            return Ok(m);
        }
        // One reader per job: tasks that need blocks wait for each other, and a block read for
        // one of them is there for the others.
        let mut reader = j.reader.lock().await;
        if let Some(m) = j.cache.lock().expect("never poisoned").get(&id) {
            return Ok(m);
        }
        if reader.is_none() {
            *reader = Some(self.open(conn, job, gemmq::topology::text("first")).await?);
        }
        let r = reader.as_mut().expect("just opened");
        if let Some(&offset) = r.offsets.get(&id) {
            // Seen before, evicted since: read just that one.
            let mut one = self.open(conn, job, AMQPValue::LongLongInt(offset)).await?;
            let (got, m) = self.next_block(&j, &mut one, dtype).await?;
            let _ = one.ch.close(200, "block read".into()).await;
            return if got == id {
                Ok(m)
            } else {
                Err(format!("block {id} not at its offset {offset}").into())
            };
        }
        loop {
            let (got, m) = self.next_block(&j, r, dtype).await?;
            if got == id {
                return Ok(m);
            }
        }
    }

    async fn open(
        &self,
        conn: &Connection,
        job: &str,
        offset: AMQPValue,
    ) -> Result<Reader, FetchError> {
        let err = |e: lapin::Error| match e.kind() {
            lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404 => FetchError::JobGone,
            _ => FetchError::Other(format!("reading the operand stream of job {job}: {e}")),
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
        Ok(Reader {
            ch,
            scan,
            offsets: HashMap::new(),
        })
    }

    /// Reads the next block on `r`, caches it, and returns it.
    async fn next_block(
        &self,
        j: &JobOperands,
        r: &mut Reader,
        dtype: DType,
    ) -> Result<(BlockId, Arc<Matrix>), String> {
        loop {
            let d = match tokio::time::timeout(BLOCK_TIMEOUT, r.scan.next()).await {
                Err(_) => return Err(format!("no operand block arrived within {BLOCK_TIMEOUT:?}")),
                Ok(None) => return Err("the operand stream consumer was cancelled".into()),
                Ok(Some(Err(e))) => return Err(format!("reading the operand stream: {e}")),
                Ok(Some(Ok(d))) => d,
            };
            let offset = d.properties.headers().as_ref().and_then(|h| {
                match h.inner().get("x-stream-offset") {
                    Some(AMQPValue::LongLongInt(o)) => Some(*o),
                    _ => None,
                }
            });
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            self.fetched_bytes
                .fetch_add(d.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let frame = match message::decode(&d.data, self.limit) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(job = %j.job, error = %e, "unreadable block on the operand stream skipped");
                    continue;
                }
            };
            let Header::Operand(h) = frame.header else {
                tracing::warn!(job = %j.job, "a message that is not a block on the operand stream skipped");
                continue;
            };
            if h.job != j.job || h.dtype != dtype {
                tracing::warn!(job = %j.job, block = %h.block, "a block of another job or dtype skipped");
                continue;
            }
            let (rows, cols) = (h.rows as usize, h.cols as usize);
            let m = Arc::new(match dtype {
                DType::F32 => Matrix::F32(matrix::from_le(frame.payload, rows, cols)),
                DType::F64 => Matrix::F64(matrix::from_le(frame.payload, rows, cols)),
            });
            if let Some(o) = offset {
                r.offsets.insert(h.block, o);
            }
            j.cache
                .lock()
                .expect("never poisoned")
                .insert(h.block, m.clone(), self.budget);
            return Ok((h.block, m));
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let (ch, tag) = (self.ch.clone(), self.scan.tag());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
            let _ = ch.close(200, "done with the job".into()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::Side;
    use ndarray::Array2;

    fn block(n: usize) -> Arc<Matrix> {
        Arc::new(Matrix::F64(Array2::zeros((n, n))))
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
