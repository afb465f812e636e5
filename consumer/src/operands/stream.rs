//! Reading a block from a job's operand stream, at its offset.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use gemmq::matrix::Block;
use gemmq::message::{BlockId, DType, Header};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};

use super::job::JobOperands;
use super::{FetchError, OPEN_PATIENCE, OperandBlocks, ReadCtx, decode_frame};

impl OperandBlocks {
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
                let _one_at_a_time = self.gone_check.lock().await;
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
        let scan = consume(&ch, &self.topo.operands_queue(job), offset)
            .await
            .map_err(err)?;
        Ok((ch, scan))
    }
}

/// Consumes the operand stream `queue` on `ch` from `offset`.
pub(super) async fn consume(
    ch: &Channel,
    queue: &str,
    offset: AMQPValue,
) -> Result<Consumer, lapin::Error> {
    // Streams insist on a prefetch. One: the broker sends the chunk that holds the block asked
    // for (from the block on), and no more until a message is acked.
    ch.basic_qos(1, BasicQosOptions { global: false }).await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        args,
    )
    .await
}

/// How long, at most, the rest of a chunk takes to come in after the block asked for.
const DRAIN_PATIENCE: Duration = Duration::from_secs(2);

/// Reads from `scan` until block `want` comes by, caching it and every other block of the job
/// that comes with it. The first message is normally it: the read starts at the block's place.
/// A message that is not it is acked, which is the credit for the next one. The broker hands
/// out a stream a chunk at a time whatever the credit — the messages written together, often
/// several blocks published together — so once `want` is in, the consumer is cancelled and what
/// was already sent is taken in too: those blocks are cached, not thrown away.
pub(super) async fn read_until(
    ctx: &ReadCtx,
    j: &JobOperands,
    ch: &Channel,
    scan: &mut Consumer,
    dtype: DType,
    want: BlockId,
) -> Result<Arc<Block>, FetchError> {
    let found = loop {
        let d = match scan.next().await {
            None => {
                return Err(
                    "the operand stream consumer was cancelled (is the job finished?)"
                        .to_string()
                        .into(),
                );
            }
            Some(Err(e)) => return Err(format!("reading the operand stream: {e}").into()),
            Some(Ok(d)) => d,
        };
        let acker = d.acker.clone();
        if let Got::Wanted(m) = accept(ctx, j, d, dtype, want)? {
            break m;
        }
        // On a stream an ack is credit, not consumption.
        let _ = acker.ack(BasicAckOptions::default()).await;
    };
    drain(ctx, j, ch, scan, dtype).await;
    Ok(found)
}

/// Cancels `scan` and caches what the broker had already sent it (the rest of a chunk): those
/// blocks are cached, not thrown away.
pub(super) async fn drain(
    ctx: &ReadCtx,
    j: &JobOperands,
    ch: &Channel,
    scan: &mut Consumer,
    dtype: DType,
) {
    let drained = async {
        ch.basic_cancel(scan.tag(), BasicCancelOptions::default())
            .await
            .ok()?;
        // Everything sent before the cancel was confirmed is in; then the consumer ends.
        while let Some(Ok(d)) = scan.next().await {
            if let Some((_, Err(e))) = take_in(ctx, j, d, dtype).ok()?.block {
                tracing::warn!(job = %j.job, error = %e, "a malformed block on the operand stream skipped");
            }
        }
        Some(())
    };
    let _ = tokio::time::timeout(DRAIN_PATIENCE, drained).await;
}

/// What one delivery from the operand stream was.
enum Got {
    /// Block `want`, now cached.
    Wanted(Arc<Block>),
    /// A message passed on the way: another block of the job (cached as well), or one skipped
    /// (unreadable, another job's).
    Passed,
}

/// One delivery from the operand stream, taken in: where it was, and the block it held if that
/// was a block of this job (cached, or why it could not be).
pub(super) struct Taken {
    pub offset: Option<i64>,
    pub block: Option<(BlockId, Result<Arc<Block>, String>)>,
}

/// Takes one delivery from the operand stream into the job's cache: a block of this job's run
/// is cached; anything else is skipped (logged), except a block of another run of the job,
/// which means the task is left over from an earlier job.
pub(super) fn take_in(
    ctx: &ReadCtx,
    j: &JobOperands,
    d: Delivery,
    dtype: DType,
) -> Result<Taken, FetchError> {
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
    let skipped = Ok(Taken {
        offset,
        block: None,
    });
    if is_chunk_end(&d) {
        return skipped;
    }
    let Some((header, start)) = decode_frame(ctx, &j.job, &d.data, "operand stream") else {
        return skipped;
    };
    let Header::Operand(h) = header else {
        tracing::warn!(job = %j.job, "a message that is not a block on the operand stream skipped");
        return skipped;
    };
    if h.job == j.job && gemmq::message::other_run(&h.run, &j.run) {
        // Runs are derived from the job's inputs: the stream holds another job under this id,
        // and the task is left over from the earlier one. Its data is gone.
        return Err(FetchError::JobGone);
    }
    if h.job != j.job || h.run != j.run {
        tracing::warn!(job = %j.job, block = %h.block, "a block of another job or run skipped");
        return skipped;
    }
    if h.dtype != dtype {
        return Err(FetchError::Other(format!(
            "block {} of job {} is {}, the task {dtype}",
            h.block, j.job, h.dtype
        )));
    }
    let stored = j.store(ctx, &h, d.data, start, offset);
    Ok(Taken {
        offset,
        block: Some((h.block, stored)),
    })
}

/// The empty message that ends a large block's chunk (its read-ahead is what the broker reads
/// past the block; see gemmq::topology).
fn is_chunk_end(d: &Delivery) -> bool {
    d.properties
        .kind()
        .as_ref()
        .is_some_and(|k| k.as_str() == gemmq::message::kind::CHUNK_END)
}

/// One delivery taken in, for a read that wants block `want`.
fn accept(
    ctx: &ReadCtx,
    j: &JobOperands,
    d: Delivery,
    dtype: DType,
    want: BlockId,
) -> Result<Got, FetchError> {
    match take_in(ctx, j, d, dtype)?.block {
        Some((id, Ok(m))) if id == want => Ok(Got::Wanted(m)),
        Some((id, Err(e))) if id == want => Err(FetchError::Other(e)),
        Some((_, Err(e))) => {
            tracing::warn!(job = %j.job, error = %e, "a malformed block on the operand stream skipped");
            Ok(Got::Passed)
        }
        _ => Ok(Got::Passed),
    }
}
