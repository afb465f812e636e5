//! A job's sweep: its stream read front to back once, every block cached, for jobs whose blocks
//! are small. A read of its own per block costs the broker a new stream consumer (an offset
//! lookup, a segment reader), more than sending a block of a few hundred KiB; and the tiles of
//! such jobs are tiny, so a worker's tasks need most of the blocks anyway.
//!
//! A task whose small block is not cached waits for the sweep to bring it; one whose block the
//! sweep has passed (the cache had no room to keep it) reads it on its own, at its offset.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use gemmq::message::DType;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Connection, Consumer};

use super::job::JobOperands;
use super::{FetchError, OperandBlocks, ReadCtx, close_quietly};

/// The state of a job's sweep.
#[derive(Default)]
pub(super) struct Sweep {
    task: Mutex<SweepTask>,
    /// The offset after the last message the sweep took in.
    pub(super) next: AtomicI64,
}

#[derive(Default)]
enum SweepTask {
    #[default]
    Idle,
    /// A task is opening the stream consumer: the others wait for its blocks rather than open
    /// their own (each would cost the broker a reader and the chunks sent before its cancel).
    Starting,
    Running(tokio::task::JoinHandle<()>),
    /// Stopped with this error: the next task to wait reports it, and may start it again.
    Failed(FetchError),
}

impl Sweep {
    /// Whether the sweep has gone past offset `at` (so what it brought there was cached, and
    /// maybe dropped since).
    pub(super) fn passed(&self, at: i64) -> bool {
        self.next.load(Ordering::Relaxed) > at
    }

    /// The error the sweep stopped with, once.
    pub(super) fn failed(&self) -> Option<FetchError> {
        let mut task = self.task.lock().expect("never poisoned");
        match std::mem::take(&mut *task) {
            SweepTask::Failed(e) => Some(e),
            other => {
                *task = other;
                None
            }
        }
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        if let Ok(task) = self.task.get_mut()
            && let SweepTask::Running(h) = task
        {
            h.abort();
        }
    }
}

impl OperandBlocks {
    /// Starts the job's sweep from the front of its stream, unless it runs.
    pub(super) async fn ensure_sweep(
        &self,
        conn: &Connection,
        j: &Arc<JobOperands>,
        dtype: DType,
    ) -> Result<(), FetchError> {
        let Some(start) = Start::claim(j) else {
            return Ok(());
        };
        let (ch, scan) = self
            .open(conn, &j.job, gemmq::topology::text("first"))
            .await?;
        self.read
            .stats
            .operand_sweeps
            .fetch_add(1, Ordering::Relaxed);
        let (ctx, weak) = (self.read.clone(), Arc::downgrade(j));
        start.running(tokio::spawn(sweep(ctx, weak, ch, scan, dtype)));
        Ok(())
    }
}

/// A start of the sweep under way. Dropped before the sweep runs (the stream could not be
/// opened, or the task starting it was cancelled), it gives the start back: the tasks waiting
/// for the sweep are woken and one of them tries again.
struct Start<'a>(&'a JobOperands);

impl<'a> Start<'a> {
    /// The start of the job's sweep, unless it runs or another task is starting it.
    fn claim(j: &'a JobOperands) -> Option<Self> {
        let mut task = j.sweep.task.lock().expect("never poisoned");
        match &*task {
            SweepTask::Starting => None,
            SweepTask::Running(h) if !h.is_finished() => None,
            _ => {
                *task = SweepTask::Starting;
                Some(Start(j))
            }
        }
    }

    fn running(self, sweep: tokio::task::JoinHandle<()>) {
        *self.0.sweep.task.lock().expect("never poisoned") = SweepTask::Running(sweep);
        // Started: nothing to give back.
        std::mem::forget(self);
    }
}

impl Drop for Start<'_> {
    fn drop(&mut self) {
        let mut task = self.0.sweep.task.lock().expect("never poisoned");
        if matches!(&*task, SweepTask::Starting) {
            *task = SweepTask::Idle;
        }
        drop(task);
        self.0.changed.send_modify(|n| *n += 1);
    }
}

/// Reads the stream in order into the cache. Holds the job only weakly, so that a job the
/// worker drops ends its sweep.
async fn sweep(
    ctx: ReadCtx,
    job: Weak<JobOperands>,
    ch: Channel,
    mut scan: Consumer,
    dtype: DType,
) {
    let tag = scan.tag();
    let error = loop {
        let delivery = match scan.next().await {
            None => break FetchError::Other("the operand stream consumer was cancelled".into()),
            Some(Err(e)) => {
                break FetchError::Unavailable(format!("reading the operand stream: {e}"));
            }
            Some(Ok(d)) => d,
        };
        let Some(j) = job.upgrade() else {
            close_quietly(ch, tag);
            return;
        };
        let acker = delivery.acker.clone();
        if let Err(e) = take_in(&ctx, &j, delivery, dtype) {
            break e;
        }
        // On a stream an ack is credit, not consumption.
        let _ = acker.ack(BasicAckOptions::default()).await;
    };
    if let Some(j) = job.upgrade() {
        *j.sweep.task.lock().expect("never poisoned") = SweepTask::Failed(error);
        j.changed.send_modify(|n| *n += 1);
    }
    close_quietly(ch, tag);
}

/// Caches one block the sweep came by, and moves the sweep on past it.
fn take_in(
    ctx: &ReadCtx,
    j: &JobOperands,
    d: lapin::message::Delivery,
    dtype: DType,
) -> Result<(), FetchError> {
    let taken = super::stream::take_in(ctx, j, d, dtype)?;
    if let Some((_, Err(e))) = &taken.block {
        tracing::warn!(job = %j.job, error = %e, "a malformed block on the operand stream skipped");
    }
    if let Some(o) = taken.offset {
        j.sweep.next.store(o + 1, Ordering::Relaxed);
    }
    // Waiters look again even when nothing was cached: the sweep may have passed their block.
    j.changed.send_modify(|n| *n += 1);
    Ok(())
}
