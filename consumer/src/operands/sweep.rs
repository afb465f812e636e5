//! A job's sweep: its stream read front to back by one consumer, every block it brings cached,
//! for jobs whose blocks are small. A read of its own per block costs the broker a new stream
//! consumer (an offset lookup, a segment reader), more than sending a block of a few hundred KiB.
//!
//! The sweep reads what the task messages this worker holds need, not every block. Each held
//! message registers the places of its small blocks ([`super::HeldBlocks`]); where the next
//! block any of them needs is [`SKIP_BYTES`] or more ahead, the sweep consumes again from there,
//! skipping the blocks between (other workers' rectangles); when none of them needs anything
//! ahead, it reads on for [`SKIP_BYTES`] (the next message's blocks are usually published right
//! there) and then stops, until a task waits for a block again. A message dealt later that needs
//! a skipped block sends the sweep back for it ([`Sweep::rewind`]). On emulated hosts
//! (BENCHMARKS.md), 16,384 tiles of 16² on 16 workers: each received ~35 MiB of the job's 64
//! instead of all of it, and the job took ~1.8 s instead of ~3.2.
//!
//! A task whose small block is not cached waits for the sweep to bring it; one whose block the
//! sweep brought and the cache dropped (no room) reads it on its own, at its offset.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::StreamExt;
use gemmq::message::{BlockId, DType};
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use lapin::{Channel, Connection, Consumer};

use super::job::JobOperands;
use super::{FetchError, OperandBlocks, ReadCtx, close_quietly};

/// How many bytes of blocks no held task needs the sweep skips rather than reads (by consuming
/// again further on), and reads on at most when no held task needs anything ahead. A new stream
/// consumer makes the broker check the CRC of the stream's last chunk twice, and small blocks
/// published back to back share chunks of several MiB: on one host, skipping gaps of 4 MiB
/// (2 workers, 16,384 tiles of 16²) cost the broker more CPU than the 16 MiB a worker was spared.
pub(super) const SKIP_BYTES: u64 = 8 << 20;

/// The state of a job's sweep.
#[derive(Default)]
pub(super) struct Sweep {
    task: Mutex<SweepTask>,
    /// The offset after the last message the sweep took in, or the place it skipped or went
    /// back to.
    pub(super) next: AtomicI64,
    /// The small blocks the task messages held by this worker need, by their place on the
    /// stream (at the earliest): where the sweep goes next.
    needs: Mutex<BTreeMap<i64, Vec<Need>>>,
    /// The earliest place a task waits for a block the sweep skipped: the sweep goes back there.
    rewind: Mutex<Option<i64>>,
    /// Wakes the running sweep for a rewind.
    rewound: Arc<tokio::sync::Notify>,
}

/// A small block some held task messages need.
struct Need {
    id: BlockId,
    bytes: u64,
    holders: u32,
}

/// What the sweep does after a message.
#[derive(Debug, PartialEq)]
enum Ahead {
    Read,
    /// Consume again from this offset: nothing before it is needed.
    Skip(i64),
    Stop,
}

/// The sweep's next step, at offset `next`, with the nearest block needed ahead (its place
/// and size) and the bytes read since a held task last needed anything ahead.
fn ahead(next: i64, need: Option<(i64, u64)>, idle_bytes: u64) -> Ahead {
    match need {
        Some((at, bytes)) if at > next && (at - next) as u64 * bytes >= SKIP_BYTES => {
            Ahead::Skip(at)
        }
        Some(_) => Ahead::Read,
        None if idle_bytes >= SKIP_BYTES => Ahead::Stop,
        None => Ahead::Read,
    }
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
    /// Whether the sweep has gone past offset `at`: what it brought there was cached (and
    /// maybe dropped since), or it skipped the place.
    pub(super) fn passed(&self, at: i64) -> bool {
        self.next.load(Ordering::Relaxed) > at
    }

    /// Registers a small block a held task message needs, at its place on the stream.
    pub(super) fn want(&self, at: i64, id: BlockId, bytes: u64) {
        let mut needs = self.needs.lock().expect("never poisoned");
        let here = needs.entry(at).or_default();
        match here.iter_mut().find(|n| n.id == id) {
            Some(n) => n.holders += 1,
            None => here.push(Need {
                id,
                bytes,
                holders: 1,
            }),
        }
    }

    /// Undoes one [`Sweep::want`].
    pub(super) fn unwant(&self, at: i64, id: BlockId) {
        let mut needs = self.needs.lock().expect("never poisoned");
        let Some(here) = needs.get_mut(&at) else {
            return;
        };
        if let Some(i) = here.iter().position(|n| n.id == id) {
            here[i].holders -= 1;
            if here[i].holders == 0 {
                here.swap_remove(i);
            }
        }
        if here.is_empty() {
            needs.remove(&at);
        }
    }

    /// The nearest place at or after `from` of a block some held task needs and the cache
    /// does not hold, with its size.
    fn first_need(&self, from: i64, j: &JobOperands) -> Option<(i64, u64)> {
        let needs = self.needs.lock().expect("never poisoned");
        needs.range(from..).find_map(|(at, here)| {
            here.iter()
                .find(|n| j.cached(&n.id).is_none())
                .map(|n| (*at, n.bytes))
        })
    }

    /// Sends the sweep back to `at` for a block it skipped that a task now waits for (a message
    /// dealt to this worker after the sweep had passed its blocks).
    pub(super) fn rewind(&self, at: i64) {
        let mut to = self.rewind.lock().expect("never poisoned");
        *to = Some(to.map_or(at, |t| t.min(at)));
        drop(to);
        self.rewound.notify_one();
    }

    /// Where the sweep is asked to go back to, once, if that is behind it; it is there now.
    fn take_rewind(&self) -> Option<i64> {
        let to = self.rewind.lock().expect("never poisoned").take()?;
        (self.next.fetch_min(to, Ordering::Relaxed) > to).then_some(to)
    }

    /// Moves the sweep to `at` (never back): the tasks that wait for blocks before it read
    /// them on their own. Returns where the sweep is.
    fn skip_to(&self, j: &JobOperands, at: i64) -> i64 {
        let was = self.next.fetch_max(at, Ordering::Relaxed);
        if at > was {
            tracing::debug!(job = %j.job, from = was, to = at, "sweep skipped blocks no held task needs");
            j.changed.send_modify(|n| *n += 1);
        }
        was.max(at)
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
    /// Starts the job's sweep where it stopped (the front of the stream at first), or at the
    /// first block a held task needs if that is far enough ahead; unless it runs.
    pub(super) async fn ensure_sweep(
        &self,
        conn: &Connection,
        j: &Arc<JobOperands>,
        dtype: DType,
    ) -> Result<(), FetchError> {
        let Some(start) = Start::claim(j) else {
            return Ok(());
        };
        j.sweep.take_rewind();
        let next = j.sweep.next.load(Ordering::Relaxed);
        let from = match ahead(next, j.sweep.first_need(next, j), 0) {
            Ahead::Skip(at) => j.sweep.skip_to(j, at),
            _ => next,
        };
        let offset = if from == 0 {
            gemmq::topology::text("first")
        } else {
            AMQPValue::LongLongInt(from)
        };
        let (ch, scan) = self.open(conn, &j.job, offset).await?;
        self.read
            .stats
            .operand_sweeps
            .fetch_add(1, Ordering::Relaxed);
        let (ctx, weak) = (self.read.clone(), Arc::downgrade(j));
        let reader = Reader {
            queue: self.topo.operands_queue(&j.job),
            ch,
            rewound: j.sweep.rewound.clone(),
            dtype,
        };
        start.running(tokio::spawn(sweep(ctx, weak, reader, scan)));
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

/// What the sweep reads with: the job's stream, the channel its consumer is on, and how it is
/// told to go back.
struct Reader {
    queue: String,
    ch: Channel,
    rewound: Arc<tokio::sync::Notify>,
    dtype: DType,
}

/// Reads the stream in order into the cache, skipping, going back and stopping as the held
/// tasks' needs say. Holds the job only weakly, so that a job the worker drops ends its sweep.
async fn sweep(ctx: ReadCtx, job: Weak<JobOperands>, r: Reader, mut scan: Consumer) {
    let (ch, dtype) = (&r.ch, r.dtype);
    let mut idle_bytes = 0;
    let error = loop {
        let next = tokio::select! {
            biased;
            _ = r.rewound.notified() => None,
            d = scan.next() => Some(d),
        };
        let Some(j) = job.upgrade() else {
            close_quietly(r.ch, scan.tag());
            return;
        };
        let delivery = match next {
            None => {
                let Some(to) = j.sweep.take_rewind() else {
                    continue;
                };
                tracing::debug!(job = %j.job, to, "sweep goes back for a block a task waits for");
                super::stream::drain(&ctx, &j, ch, &mut scan, dtype).await;
                match super::stream::consume(ch, &r.queue, AMQPValue::LongLongInt(to)).await {
                    Ok(s) => scan = s,
                    Err(e) => break unavailable(e),
                }
                continue;
            }
            Some(None) => {
                break FetchError::Other("the operand stream consumer was cancelled".into());
            }
            Some(Some(Err(e))) => break unavailable(e),
            Some(Some(Ok(d))) => d,
        };
        let (acker, bytes) = (delivery.acker.clone(), delivery.data.len() as u64);
        if let Err(e) = take_in(&ctx, &j, delivery, dtype) {
            break e;
        }
        let next = j.sweep.next.load(Ordering::Relaxed);
        let need = j.sweep.first_need(next, &j);
        idle_bytes = if need.is_some() {
            0
        } else {
            idle_bytes + bytes
        };
        match ahead(next, need, idle_bytes) {
            // On a stream an ack is credit, not consumption.
            Ahead::Read => drop(acker.ack(BasicAckOptions::default()).await),
            Ahead::Skip(at) => {
                super::stream::drain(&ctx, &j, ch, &mut scan, dtype).await;
                // The rest of the chunk may have brought blocks at and after `at`.
                let at = j.sweep.first_need(at, &j).map_or(at, |(n, _)| n);
                let from = j.sweep.skip_to(&j, at);
                match super::stream::consume(ch, &r.queue, AMQPValue::LongLongInt(from)).await {
                    Ok(s) => scan = s,
                    Err(e) => break unavailable(e),
                }
            }
            Ahead::Stop => {
                tracing::debug!(job = %j.job, next, "sweep stopped: no held task needs a block ahead");
                super::stream::drain(&ctx, &j, ch, &mut scan, dtype).await;
                *j.sweep.task.lock().expect("never poisoned") = SweepTask::Idle;
                j.changed.send_modify(|n| *n += 1);
                let _ = ch.close(200, "sweep stopped".into()).await;
                return;
            }
        }
    };
    if let Some(j) = job.upgrade() {
        *j.sweep.task.lock().expect("never poisoned") = SweepTask::Failed(error);
        j.changed.send_modify(|n| *n += 1);
    }
    close_quietly(r.ch, scan.tag());
}

fn unavailable(e: lapin::Error) -> FetchError {
    FetchError::Unavailable(format!("reading the operand stream: {e}"))
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
        // Never back here (only a rewind moves it back): a skip may have moved it past what a
        // consumer's first chunk holds.
        j.sweep.next.fetch_max(o + 1, Ordering::Relaxed);
    }
    // Waiters look again even when nothing was cached: the sweep may have passed their block.
    j.changed.send_modify(|n| *n += 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use gemmq::message::Side;

    use super::super::job::{Jobs, job_entry};
    use super::*;

    const KIB: u64 = 1024;

    #[test]
    fn the_sweep_reads_on_while_the_next_block_needed_is_near() {
        assert_eq!(ahead(10, Some((10, 256 * KIB)), 0), Ahead::Read);
        // 31 blocks of 256 KiB between: cheaper to read than a new stream consumer.
        assert_eq!(ahead(10, Some((41, 256 * KIB)), 0), Ahead::Read);
    }

    #[test]
    fn the_sweep_skips_to_a_block_needed_eight_mib_or_more_ahead() {
        assert_eq!(ahead(10, Some((42, 256 * KIB)), 0), Ahead::Skip(42));
        // As many blocks of 16 KiB are not worth a consumer.
        assert_eq!(ahead(10, Some((42, 16 * KIB)), 0), Ahead::Read);
    }

    #[test]
    fn with_nothing_needed_ahead_the_sweep_reads_on_for_eight_mib_then_stops() {
        assert_eq!(ahead(10, None, 0), Ahead::Read);
        assert_eq!(ahead(10, None, SKIP_BYTES - 1), Ahead::Read);
        assert_eq!(ahead(10, None, SKIP_BYTES), Ahead::Stop);
    }

    #[test]
    fn a_block_is_needed_until_every_message_naming_it_is_settled() {
        let jobs = Jobs::default();
        let j = job_entry(&jobs, &Arc::new(AtomicU64::new(0)), "job", "run");
        let a = BlockId {
            side: Side::A,
            index: 0,
            part: 0,
        };
        let b = BlockId { side: Side::B, ..a };
        j.sweep.want(5, a, 1000);
        j.sweep.want(5, a, 1000);
        j.sweep.want(9, b, 2000);
        assert_eq!(j.sweep.first_need(0, &j), Some((5, 1000)));
        assert_eq!(j.sweep.first_need(6, &j), Some((9, 2000)), "5 is behind");
        j.sweep.unwant(5, a);
        assert_eq!(
            j.sweep.first_need(0, &j),
            Some((5, 1000)),
            "one message still holds it"
        );
        j.sweep.unwant(5, a);
        assert_eq!(j.sweep.first_need(0, &j), Some((9, 2000)));
        j.sweep.unwant(9, b);
        assert_eq!(j.sweep.first_need(0, &j), None);
    }
}
