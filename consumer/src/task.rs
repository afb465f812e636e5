//! One task message, from its delivery to what becomes of it: decoded, its blocks fetched, its
//! tiles multiplied, and the decision (`settlement`) that `settle.rs` carries out on the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gemmq::kernel::Threads;
use gemmq::matrix::{self, Block};
use gemmq::message::{self, BlockId, Product, Side, TaskHeader, Tiles, Work};
use gemmq::topology;
use lapin::message::Delivery;
use rand::RngExt;
use tracing::{info, warn};

use crate::settle::{ack, park, requeue, retry, send_results};
use crate::{Ctx, Stats, operands};

/// Why a task did not produce a result.
pub(crate) enum Failure {
    /// Its job's operand stream is gone: the job was finished (or deleted). Drop the task.
    JobGone,
    /// Worth another attempt.
    Transient(String),
    /// Will fail the same way every time: park at once.
    Permanent(String),
}

pub(crate) async fn handle(ctx: Arc<Ctx>, delivery: Delivery) {
    Stats::bump(&ctx.stats.received);
    let held = ctx.stats.held.fetch_add(1, Ordering::Relaxed) + 1;
    ctx.stats.max_held.fetch_max(held, Ordering::Relaxed);
    // Every way through settle acks or nacks the delivery once, which releases it.
    settle(&ctx, delivery).await;
}

/// Takes one delivery to its end: results published and acked, retried, or parked. A message
/// holds one task or, for tiny tiles, a group of them; a group is received, retried, parked
/// and acked as one, and each of its tiles has its own result.
async fn settle(ctx: &Arc<Ctx>, mut delivery: Delivery) {
    let attempt =
        topology::prior_attempts(&delivery.properties, &ctx.tasks_queue).saturating_add(1);
    let limit = ctx.settings.broker.max_message_bytes;
    // decode() has checked the job id too: it names queues and journal lines.
    let body_len = delivery.data.len();
    let decoded = message::decode(&delivery.data, limit)
        .and_then(|f| f.into_work())
        .map(|work| match work {
            // Inline tasks carry their blocks after the header; streamed ones name them.
            Work::Inline(task, payload) => (vec![task], Some(body_len - payload.len())),
            Work::Streamed(tasks) => (tasks, None),
        });
    let (tasks, inline_at) = match decoded {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("malformed task: {e}");
            return park(ctx, &delivery, &[], attempt, reason).await;
        }
    };
    // decode() refuses an empty group.
    let job = &tasks[0].job;
    let tiles = Tiles(&tasks);
    info!(%job, %tiles, attempt, "task received");
    if attempt > ctx.settings.max_attempts {
        // Only a task that kept killing its workers (and so was dead-lettered by the broker's
        // delivery limit, not by us) gets here: do not run it again.
        let reason = format!(
            "redelivered past the attempt limit ({} of {}): it crashed or stalled its workers",
            attempt, ctx.settings.max_attempts
        );
        return park(ctx, &delivery, &tasks, attempt, reason).await;
    }

    // The blocks this message needs are known to the job's sweep from now until it is settled.
    let wanted = match inline_at {
        Some(_) => Vec::new(),
        None => wanted_blocks(&tasks),
    };
    let _held = ctx.operands.hold(&wanted);
    // Fetching blocks overlaps with the computation of other tasks: do it before the permit.
    let blocks = match inline_at {
        Some(offset) => Ok(TaskBlocks::Inline(offset)),
        None => {
            let fetching = tokio::select! {
                p = ctx.fetch.acquire() => p.expect("the semaphore is never closed"),
                _ = ctx.shutdown.cancelled() => {
                    requeue(ctx, &delivery).await;
                    return;
                }
            };
            let blocks = fetch_blocks(ctx, &tasks, &wanted)
                .await
                .map(TaskBlocks::Blocks);
            drop(fetching);
            blocks
        }
    };
    let permit = tokio::select! {
        p = ctx.compute.acquire() => p.expect("the semaphore is never closed"),
        _ = ctx.shutdown.cancelled() => {
            // Not started: give it back now rather than make it wait for the channel to close.
            requeue(ctx, &delivery).await;
            return;
        }
    };
    let started = Instant::now();
    let outcome = match blocks {
        Ok(blocks) => {
            let data = std::mem::take(&mut delivery.data);
            let (outcome, data) = work(ctx, &tasks, data, blocks).await;
            delivery.data = data;
            outcome
        }
        Err(f) => Err(f),
    };
    drop(permit);

    let took = started.elapsed();
    ctx.stats.compute.observe(took);
    let micros = took.as_micros() as u64;
    if matches!(outcome, Err(Failure::Transient(_))) {
        Stats::bump(&ctx.stats.failed);
    }
    match settlement(outcome, attempt, ctx.settings.max_attempts) {
        Settlement::Done(products) => {
            send_results(ctx, &delivery, &tasks, attempt, products, micros).await
        }
        Settlement::Park(reason) => park(ctx, &delivery, &tasks, attempt, reason).await,
        Settlement::Drop => {
            warn!(%job, %tiles, "job has no operand stream (finished, cancelled or deleted), or its stream holds a later job under the same id; dropping its task");
            ack(ctx, &delivery, &tiles).await;
        }
        Settlement::Retry(reason) => retry(ctx, &delivery, &tasks, attempt, &reason).await,
    }
}

/// What becomes of a task once it has been tried: the worker's one decision, made without a
/// broker so that it can be tested on its own.
#[derive(Debug, PartialEq)]
enum Settlement {
    /// Publish its results, then ack.
    Done(Vec<Product>),
    /// Park it with this reason (the collector is told), then ack.
    Park(String),
    /// Its job is gone: ack it and drop it.
    Drop,
    /// Nack it into the retry queue, which sends it back after the retry delay.
    Retry(String),
}

fn settlement(
    outcome: Result<Vec<Product>, Failure>,
    attempt: u32,
    max_attempts: u32,
) -> Settlement {
    match outcome {
        Ok(products) => Settlement::Done(products),
        Err(Failure::Permanent(reason)) => Settlement::Park(reason),
        Err(Failure::JobGone) => Settlement::Drop,
        Err(Failure::Transient(reason)) if attempt >= max_attempts => {
            Settlement::Park(format!("{reason} (attempt {attempt} of {max_attempts})"))
        }
        Err(Failure::Transient(reason)) => Settlement::Retry(reason),
    }
}

impl From<operands::FetchError> for Failure {
    fn from(e: operands::FetchError) -> Self {
        match e {
            operands::FetchError::JobGone => Failure::JobGone,
            operands::FetchError::Unavailable(reason) | operands::FetchError::Other(reason) => {
                Failure::Transient(reason)
            }
        }
    }
}

/// Where a task's blocks are.
enum TaskBlocks {
    /// In the task's own body, from this offset.
    Inline(usize),
    /// Fetched from the job's operand stream: the A and B blocks of each task, in order.
    Blocks(Vec<(Arc<Block>, Arc<Block>)>),
}

type BlockPair = (Arc<Block>, Arc<Block>);

/// The distinct A and B blocks a message's streamed tasks name (a group's tasks share them),
/// with where each is on the job's stream and its size.
fn wanted_blocks(tasks: &[TaskHeader]) -> Vec<operands::Wanted<'_>> {
    let mut wanted: Vec<operands::Wanted<'_>> = Vec::new();
    for task in tasks {
        let size = task.dtype.size() as u64;
        let (r, c, d) = (task.rows as u64, task.cols as u64, task.depth as u64);
        for ((id, at), bytes) in blocks_of(task)
            .into_iter()
            .zip([r * d * size, d * c * size])
        {
            if !wanted.iter().any(|w| w.id == id) {
                wanted.push(operands::Wanted {
                    job: &task.job,
                    run: &task.run,
                    id,
                    dtype: task.dtype,
                    at,
                    bytes,
                });
            }
        }
    }
    wanted
}

/// The blocks each streamed task names (`wanted`: each distinct one once), all fetched at once,
/// checked against the task's shape.
async fn fetch_blocks(
    ctx: &Ctx,
    tasks: &[TaskHeader],
    wanted: &[operands::Wanted<'_>],
) -> Result<Vec<BlockPair>, Failure> {
    let fetched = futures_util::future::try_join_all(
        wanted
            .iter()
            .map(|w| ctx.operands.get(&ctx.conn, w.clone())),
    )
    .await
    .map_err(Failure::from)?;
    let block = |id: BlockId| {
        let i = wanted.iter().position(|w| w.id == id).expect("wanted");
        fetched[i].clone()
    };
    tasks
        .iter()
        .map(|task| {
            let [(a_id, _), (b_id, _)] = blocks_of(task);
            check_shapes(task, block(a_id), block(b_id))
        })
        .collect()
}

/// A task's A and B blocks, with where the task says they are on the stream.
fn blocks_of(task: &TaskHeader) -> [(BlockId, Option<u64>); 2] {
    let t = task.tile;
    let at = |i: usize| task.at.map(|at| at[i]);
    [
        (
            BlockId {
                side: Side::A,
                index: t.row,
                part: t.part,
            },
            at(0),
        ),
        (
            BlockId {
                side: Side::B,
                index: t.col,
                part: t.part,
            },
            at(1),
        ),
    ]
}

fn check_shapes(task: &TaskHeader, a: Arc<Block>, b: Arc<Block>) -> Result<BlockPair, Failure> {
    let (r, c, d) = (task.rows as usize, task.cols as usize, task.depth as usize);
    let (a_shape, b_shape) = (a.view().shape(), b.view().shape());
    if a_shape != (r, d) || b_shape != (d, c) {
        let t = task.tile;
        return Err(Failure::Permanent(format!(
            "the task {t} is {r}x{d} · {d}x{c} but its blocks are {a_shape:?} and {b_shape:?}"
        )));
    }
    Ok((a, b))
}

/// Tiles up to this many flops (~20 µs of work) are multiplied on the async thread.
const TINY_FLOPS: u64 = 1 << 20;

pub(crate) fn flops(task: &TaskHeader) -> u64 {
    2 * task.rows as u64 * task.cols as u64 * task.depth as u64
}

/// Simulated delay and failure (once per message: a group fails as one), then the
/// multiplications on the blocking pool. Returns each task's product, and the body so the
/// caller can still park it.
async fn work(
    ctx: &Ctx,
    tasks: &[TaskHeader],
    data: Vec<u8>,
    blocks: TaskBlocks,
) -> (Result<Vec<Product>, Failure>, Vec<u8>) {
    let (delay, fail) = {
        let mut rng = rand::rng();
        let d = &ctx.settings.delay;
        let delay = if d.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(rng.random_range(d.min.as_secs_f64()..=d.max.as_secs_f64()))
        };
        (delay, rng.random_bool(ctx.settings.failure_rate))
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return (
            Err(Failure::Transient(
                "simulated failure (--failure-rate)".into(),
            )),
            data,
        );
    }
    let total: u64 = tasks.iter().map(flops).sum();
    if let Some(gflops) = ctx.settings.modelled_gflops {
        tokio::time::sleep(Duration::from_secs_f64(total as f64 / (gflops * 1e9))).await;
        let zeros = tasks
            .iter()
            .map(|t| Product::zeroed(t.rows as usize * t.cols as usize * t.dtype.size()))
            .collect();
        return (Ok(zeros), data);
    }
    let first = tasks[0].clone();
    let threads = Threads::Exactly(ctx.settings.threads);
    let compute = move || {
        let r = match blocks {
            TaskBlocks::Inline(offset) => matrix::compute_tile(&first, &data[offset..], threads)
                .map(|product| vec![product])
                .map_err(|e| Failure::Permanent(format!("malformed task: {e}"))),
            TaskBlocks::Blocks(pairs) => pairs
                .iter()
                .map(|(a, b)| matrix::multiply_blocks(a.view(), b.view(), threads))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::Permanent(format!("cannot multiply the blocks: {e}"))),
        };
        (r, data)
    };
    // A tiny tile is cheaper to multiply than to hand to another thread.
    let (r, data) = if total <= TINY_FLOPS {
        compute()
    } else {
        match tokio::task::spawn_blocking(compute).await {
            Ok(done) => done,
            // The multiplication panicked: a bug, not bad luck. The body went with the thread.
            Err(e) => (
                Err(Failure::Transient(format!("computation failed: {e}"))),
                Vec::new(),
            ),
        }
    };
    (r.map(|products| corrupt(ctx, tasks, products)), data)
}

/// With `--corrupt-rate`, makes some products wrong on purpose (the first number doubled, plus
/// one): a worker with bad memory, for seeing the collector find and heal the tiles.
fn corrupt(ctx: &Ctx, tasks: &[TaskHeader], mut products: Vec<Product>) -> Vec<Product> {
    let rate = ctx.settings.corrupt_rate;
    if rate <= 0.0 {
        return products;
    }
    let mut rng = rand::rng();
    for (task, product) in tasks.iter().zip(&mut products) {
        if !rng.random_bool(rate) {
            continue;
        }
        match task.dtype {
            gemmq::DType::F32 => {
                if let Some(b) = product.bytes_mut().get_mut(..4) {
                    let v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                    b.copy_from_slice(&(v * 2.0 + 1.0).to_le_bytes());
                }
            }
            gemmq::DType::F64 => {
                if let Some(b) = product.bytes_mut().get_mut(..8) {
                    let v = f64::from_le_bytes(b.try_into().expect("8 bytes"));
                    b.copy_from_slice(&(v * 2.0 + 1.0).to_le_bytes());
                }
            }
        }
        tracing::warn!(job = %task.job, tile = %task.tile, "tile made wrong on purpose (--corrupt-rate)");
    }
    products
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_computed_task_publishes_its_results() {
        let products = vec![Product::from_bytes(&[1, 2, 3])];
        assert_eq!(
            settlement(Ok(products.clone()), 1, 5),
            Settlement::Done(products)
        );
    }

    #[test]
    fn a_transient_failure_is_retried_until_the_last_attempt_then_parked() {
        let failed = || Err(Failure::Transient("simulated failure".into()));
        for attempt in 1..5 {
            assert_eq!(
                settlement(failed(), attempt, 5),
                Settlement::Retry("simulated failure".into()),
                "attempt {attempt}"
            );
        }
        assert_eq!(
            settlement(failed(), 5, 5),
            Settlement::Park("simulated failure (attempt 5 of 5)".into())
        );
    }

    #[test]
    fn a_permanent_failure_is_parked_at_once_and_a_gone_job_dropped() {
        assert_eq!(
            settlement(Err(Failure::Permanent("malformed task".into())), 1, 5),
            Settlement::Park("malformed task".into())
        );
        assert_eq!(settlement(Err(Failure::JobGone), 1, 5), Settlement::Drop);
    }
}
