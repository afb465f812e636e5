//! The way back: results published with confirms, several to a message when they are ready
//! together.
//!
//! A handler hands its tile to [`Results::send`] and waits for the broker's confirm before it
//! acks its task — the same guarantee as publishing alone. One publisher task takes every
//! result queued while it waited for room in its window of unconfirmed messages and sends them
//! as one [`ResultBatch`] (group commit): with big tiles the queue is nearly always empty and
//! each result goes alone, as a plain `Result`; with thousands of tiny tiles the broker and the
//! collector see a fraction of the messages.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gemmq::broker::{InFlight, PublishError, persistent};
use gemmq::message::{self, BatchedTile, Header, Product, ResultBatch, ResultHeader, kind};
use gemmq::tiling::HEADER_BUDGET;
use gemmq::topology::Topology;
use lapin::Channel;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Stats;

/// Results up to this size are gathered (and never more than the message limit allows); a
/// bigger one goes alone.
const BATCH_BYTES: usize = 1 << 20;
/// The most tiles in one message: a whole group of tiny tiles (`tiling::MAX_GROUP`), so that
/// the broker and the collector see one result message per task message.
const BATCH_TILES: usize = gemmq::message::MAX_GROUP;
/// The largest header a batch of [`BATCH_TILES`] can have (at most ~150 bytes of JSON a tile:
/// 38 KiB for 256), more than the [`HEADER_BUDGET`] a single result keeps, so a batch's payload
/// leaves this much of the message size limit free instead.
const BATCH_HEADER_BYTES: u64 = BATCH_TILES as u64 * 160;
/// Batches awaiting their confirms at once. One at a time, a group of 64 tiny tiles waited for
/// three confirm round trips in a row (each a quorum-queue write) and the worker idled between
/// them; with several in flight they share one.
const IN_FLIGHT: usize = 8;

/// What became of a result.
#[derive(Debug)]
pub enum Sent {
    Confirmed,
    /// No queue took it: the job's results queue is gone (finished or deleted).
    Unroutable,
    /// Not confirmed: the task must be redone.
    Failed(String),
}

struct Pending {
    header: ResultHeader,
    product: Product,
    done: oneshot::Sender<Sent>,
}

/// The sending side, shared by the task handlers of one connection.
pub struct Results {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Results {
    /// Starts the publisher on `channel` (in confirm mode) for messages of at most
    /// `max_message_bytes`. It stops when `Results` is dropped.
    pub fn start(
        channel: Channel,
        topo: Topology,
        max_message_bytes: u64,
        stats: Arc<Stats>,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let room = max_message_bytes.saturating_sub(BATCH_HEADER_BYTES.max(HEADER_BUDGET));
        let max_bytes = BATCH_BYTES.min(usize::try_from(room).unwrap_or(usize::MAX));
        tokio::spawn(publish_loop(channel, topo, rx, max_bytes, stats));
        Results { queue }
    }

    /// Publishes the results of one task message (one tile, or a group's) and waits for the
    /// broker's confirms: what became of each, in order. Queued together, a group's results
    /// go in as few messages as the batch limits allow.
    pub async fn send(&self, results: Vec<(ResultHeader, Product)>) -> Vec<Sent> {
        let stopped = || Sent::Failed("the result publisher has stopped".into());
        let mut outcomes = Vec::with_capacity(results.len());
        for (header, product) in results {
            let (done, outcome) = oneshot::channel();
            let pending = Pending {
                header,
                product,
                done,
            };
            // A send error drops `done`, so its outcome reads as "stopped" below.
            let _ = self.queue.send(pending);
            outcomes.push(outcome);
        }
        let mut sent = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            sent.push(outcome.await.unwrap_or_else(|_| stopped()));
        }
        sent
    }
}

async fn publish_loop(
    ch: Channel,
    topo: Topology,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    max_bytes: usize,
    stats: Arc<Stats>,
) {
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Waiting for room first lets the results that arrive meanwhile join this batch.
        let room = Arc::clone(&window)
            .acquire_owned()
            .await
            .expect("the window is never closed");
        let mut batch = vec![first];
        let mut bytes = batch[0].product.len();
        while batch.len() < BATCH_TILES && bytes < max_bytes {
            let Ok(next) = rx.try_recv() else { break };
            let fits = next.header.job == batch[0].header.job
                && next.header.run == batch[0].header.run
                && next.header.dtype == batch[0].header.dtype
                && bytes + next.product.len() <= max_bytes;
            if !fits {
                carry = Some(next);
                break;
            }
            bytes += next.product.len();
            batch.push(next);
        }
        let sending = publish(&ch, &topo, &mut batch).await;
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let outcome = match sending {
                Ok(in_flight) => in_flight.confirmed().await,
                Err(e) => Err(e),
            };
            drop(room);
            tracing::debug!(
                tiles = batch.len(),
                bytes,
                confirmed = outcome.is_ok(),
                "results published"
            );
            if outcome.is_ok() {
                stats.result_messages.fetch_add(1, Ordering::Relaxed);
                stats
                    .results_published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            for p in batch {
                let sent = match &outcome {
                    Ok(()) => Sent::Confirmed,
                    Err(e) if e.is_unroutable() => Sent::Unroutable,
                    Err(e) => Sent::Failed(e.to_string()),
                };
                let _ = p.done.send(sent);
            }
        });
    }
}

/// One message for the batch: body, message id, AMQP type, and what it is for error messages.
/// A result alone is framed where its product lies; a batch's products are copied into one
/// message (they are small: a batch holds at most [`BATCH_BYTES`]).
fn encode_batch(batch: &mut [Pending]) -> (Cow<'_, [u8]>, String, &'static str, String) {
    if let [one] = batch {
        let t = one.header.tile;
        let id = format!("{}/{}/{}/{}", one.header.job, t.row, t.col, t.part);
        let header = Header::TileResult(one.header.clone());
        let body = Cow::Borrowed(one.product.frame(&header));
        return (body, id, kind::RESULT, format!("the result of {t}"));
    }
    let first = &batch[0].header;
    let t = first.tile;
    let payload: Vec<&[u8]> = batch.iter().map(|p| p.product.bytes()).collect();
    let tiles = batch
        .iter()
        .map(|p| BatchedTile {
            tile: p.header.tile,
            rows: p.header.rows,
            cols: p.header.cols,
            attempt: p.header.attempt,
            compute_micros: p.header.compute_micros,
            recompute: p.header.recompute,
        })
        .collect();
    let header = Header::ResultBatch(ResultBatch {
        job: first.job.clone(),
        run: first.run.clone(),
        dtype: first.dtype,
        worker: first.worker.clone(),
        tiles,
    });
    let more = batch.len() - 1;
    let id = format!("{}/{}/{}/{}+{more}", first.job, t.row, t.col, t.part);
    let body = Cow::Owned(message::encode(&header, &payload));
    (
        body,
        id,
        kind::RESULTS,
        format!("the results of {t} and {more} more"),
    )
}

async fn publish(
    ch: &Channel,
    topo: &Topology,
    batch: &mut [Pending],
) -> Result<InFlight, PublishError> {
    let job = batch[0].header.job.clone();
    let (body, id, kind, what) = encode_batch(batch);
    InFlight::publish(
        ch,
        &topo.results_exchange(),
        &job,
        &body,
        persistent(kind, id),
        what,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::TileId;
    use gemmq::message::DType;

    fn pending(row: u32, bytes: usize) -> Pending {
        let header = ResultHeader {
            // The longest names there can be, and large numbers: the worst case for the header.
            job: "j".repeat(64),
            run: "f".repeat(16),
            tile: TileId {
                row,
                col: u32::MAX,
                part: u32::MAX,
            },
            dtype: DType::F64,
            rows: u32::MAX,
            cols: u32::MAX,
            worker: "w".repeat(128),
            attempt: u32::MAX,
            compute_micros: u64::MAX,
            recompute: 0,
        };
        let (done, _) = oneshot::channel();
        Pending {
            header,
            product: Product::zeroed(bytes),
            done,
        }
    }

    #[test]
    fn a_full_batch_leaves_its_header_within_the_room_kept_for_it() {
        let mut batch: Vec<_> = (0..BATCH_TILES as u32).map(|r| pending(r, 8)).collect();
        let (body, _, kind, _) = encode_batch(&mut batch);
        assert_eq!(kind, kind::RESULTS);
        let payload = 8 * BATCH_TILES as u64;
        let header = body.len() as u64 - payload;
        assert!(header <= BATCH_HEADER_BYTES, "header of {header} bytes");
        assert!(
            header <= message::MAX_HEADER_BYTES as u64,
            "the collector refuses a header of {header} bytes"
        );
    }

    #[test]
    fn a_single_result_keeps_its_header_within_the_budget_of_every_message() {
        let mut alone = [pending(7, 8)];
        let (body, _, _, _) = encode_batch(&mut alone);
        assert!(body.len() as u64 - 8 <= HEADER_BUDGET);
    }

    #[test]
    fn a_result_alone_goes_as_a_plain_result() {
        let mut alone = [pending(3, 16)];
        let numbers = alone[0].product.bytes().as_ptr();
        let (body, id, kind, _) = encode_batch(&mut alone);
        assert_eq!(kind, kind::RESULT);
        assert!(
            matches!(body, Cow::Borrowed(b) if b[b.len() - 16..].as_ptr() == numbers),
            "even the largest result header is framed in front of the product, not copied"
        );
        assert!(id.ends_with("/3/4294967295/4294967295"));
        let frame = message::decode(&body, u64::MAX / 2).map(|f| f.header);
        // Its dimensions are absurd on purpose (decode refuses them); only the kind matters.
        assert!(!matches!(frame, Ok(Header::ResultBatch(_))));
    }
}
