//! Reading a job's operand stream: the background reader that fills a job's cache from the
//! front, and one-off reads of an evicted block at its known offset.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use gemmq::matrix::Block;
use gemmq::message::{BlockId, DType, Header};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};

use super::job::{JobOperands, ReaderState, store};
use super::{FetchError, OPEN_PATIENCE, OperandBlocks, ReadCtx, close_quietly, decode_frame};

impl OperandBlocks {
    /// Starts the job's background reader from the front of its stream, if it is not running.
    pub(super) async fn ensure_reader(
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
    pub(super) async fn open(
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
pub(super) async fn read_ahead(
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

pub(super) async fn next_delivery(scan: &mut Consumer) -> Result<Delivery, FetchError> {
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
pub(super) async fn read_until(
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
pub(super) fn accept(
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
    if h.job == j.job && gemmq::message::other_run(&h.run, &j.run) {
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
