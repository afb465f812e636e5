//! Carrying out what becomes of a task on the broker: results published and confirmed before
//! the ack, a retry through the retry queue, a copy in the parking lot, or the task handed back.

use gemmq::broker::{self, persistent, publish_confirmed};
use gemmq::message::{self, Header, ParkedNotice, Product, ResultHeader, TaskHeader, Tiles, kind};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tracing::{error, info, warn};

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::task::flops;
use crate::{Ctx, Stats, results};

/// A failed attempt: the collector is told, and the task goes to the retry queue
/// (`nack(requeue = false)` dead-letters it there; the broker records the attempt).
pub(crate) async fn retry(
    ctx: &Ctx,
    delivery: &Delivery,
    tasks: &[TaskHeader],
    attempt: u32,
    reason: &str,
) {
    let (job, tiles) = (&tasks[0].job, Tiles(tasks));
    warn!(
        %job, %tiles, attempt, max_attempts = ctx.settings.max_attempts,
        retry_in = ?ctx.topo.retry_delay(), %reason,
        "task failed; retrying through the retry queue"
    );
    notify_failure(ctx, &tasks[0], attempt, reason).await;
    release(ctx);
    match delivery
        .acker
        .nack(BasicNackOptions {
            requeue: false,
            multiple: false,
        })
        .await
    {
        Ok(_) => Stats::bump(&ctx.stats.retried),
        Err(e) => {
            warn!(%tiles, error = %e, "nack failed; the broker will redeliver the task")
        }
    }
}

/// Publishes each task's result, then acks the message: only once every result is confirmed.
pub(crate) async fn send_results(
    ctx: &Ctx,
    delivery: &Delivery,
    tasks: &[TaskHeader],
    attempt: u32,
    products: Vec<Product>,
    micros: u64,
) {
    let each = micros / tasks.len() as u64;
    let results = tasks
        .iter()
        .zip(products)
        .map(|(task, product)| {
            let header = ResultHeader {
                job: task.job.clone(),
                run: task.run.clone(),
                tile: task.tile,
                dtype: task.dtype,
                rows: task.rows,
                cols: task.cols,
                worker: ctx.settings.worker_id.clone(),
                attempt,
                compute_micros: each,
                recompute: task.recompute,
            };
            (header, product)
        })
        .collect();
    let sent = ctx.results.send(results).await;
    let (job, tiles) = (&tasks[0].job, Tiles(tasks));
    let failed = sent.iter().find_map(|s| match s {
        results::Sent::Failed(e) => Some(e),
        _ => None,
    });
    if let Some(e) = failed {
        // Not acked: the task comes back (now, or when the channel closes) and is redone; the
        // collector drops the results of it that did get through the second time.
        warn!(%job, %tiles, error = %e, "result not confirmed; returning the task to the queue");
        ctx.publisher_failed();
        requeue(ctx, delivery).await;
        return;
    }
    ack(ctx, delivery, &tiles).await;
    if sent.iter().any(|s| matches!(s, results::Sent::Unroutable)) {
        // No results queue: the job was finished and retired, or never announced.
        warn!(%job, %tiles, "job has no results queue (finished, cancelled or deleted); dropping its task");
        return;
    }
    ctx.stats
        .done
        .fetch_add(tasks.len() as u64, Ordering::Relaxed);
    let flops: u64 = tasks.iter().map(flops).sum();
    ctx.stats.flops.fetch_add(flops, Ordering::Relaxed);
    info!(%job, %tiles, attempt, ms = micros / 1000, "task done");
}

/// Tells the collector which worker failed, for its report. Not waited for: the report is not
/// worth slowing a retry.
pub(crate) async fn notify_failure(ctx: &Ctx, task: &TaskHeader, attempt: u32, reason: &str) {
    let notice = Header::Failed(message::FailureNotice {
        job: task.job.clone(),
        run: task.run.clone(),
        tile: task.tile,
        reason: reason.to_string(),
        attempt,
        worker: ctx.settings.worker_id.clone(),
    });
    let body = message::encode(&notice, &[]);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(kind::FAILED.into());
    let published = ctx
        .publisher
        .basic_publish(
            ctx.topo.results_exchange().as_str().into(),
            task.job.as_str().into(),
            Default::default(),
            &body,
            props,
        )
        .await;
    if let Ok(confirm) = published {
        // Await the confirm off the task path: a dropped one would be kept by lapin until the
        // channel closes.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), confirm).await;
        });
    }
}

/// Copies the task to the parking lot with its reason, tells the collector, then acks.
pub(crate) async fn park(
    ctx: &Ctx,
    delivery: &Delivery,
    tasks: &[TaskHeader],
    attempts: u32,
    reason: String,
) {
    let worker = &ctx.settings.worker_id;
    let tiles = Tiles(tasks);
    let mut headers = vec![
        ("x-gemmq-reason", reason.clone()),
        ("x-gemmq-worker", worker.clone()),
    ];
    if let Some(t) = tasks.first() {
        headers.push(("x-gemmq-job", t.job.clone()));
        headers.push(("x-gemmq-tile", tiles.to_string()));
    }
    let props = broker::with_headers(delivery.properties.clone(), &headers);
    let props = broker::with_int_header(props, "x-gemmq-attempts", attempts as i64);
    let parked = publish_confirmed(
        &ctx.publisher,
        "",
        &ctx.topo.parked_queue(),
        &delivery.data,
        props,
        "a parked task",
    )
    .await;
    if let Err(e) = parked {
        warn!(error = %e, %reason, "could not park the task; returning it to the queue");
        ctx.publisher_failed();
        requeue(ctx, delivery).await;
        return;
    }
    // One notice per tile: the collector counts tiles, whatever message carried them.
    for t in tasks {
        let notice = Header::Parked(ParkedNotice {
            job: t.job.clone(),
            run: t.run.clone(),
            tile: t.tile,
            reason: reason.clone(),
            attempts,
            worker: worker.clone(),
        });
        let body = message::encode(&notice, &[]);
        let id = format!(
            "{}/{}/{}/{}/parked",
            t.job, t.tile.row, t.tile.col, t.tile.part
        );
        let told = publish_confirmed(
            &ctx.publisher,
            &ctx.topo.results_exchange(),
            &t.job,
            &body,
            persistent(kind::PARKED, id),
            "a parked notice",
        )
        .await;
        match told {
            Ok(()) => {}
            // No results queue: nobody is waiting for this job any more.
            Err(e) if e.is_unroutable() => break,
            Err(e) => {
                // Acking now would leave the collector waiting for this tile forever. Hand the
                // task back: it is parked again (one more copy in the parking lot) and the
                // notice retried.
                warn!(job = %t.job, tile = %t.tile, error = %e, "could not tell the collector about the parked task; returning it to the queue");
                ctx.publisher_failed();
                requeue(ctx, delivery).await;
                return;
            }
        }
    }
    ack(ctx, delivery, &tiles).await;
    Stats::bump(&ctx.stats.parked);
    match tasks.first() {
        Some(t) => {
            error!(job = %t.job, %tiles, attempts, %reason, queue = %ctx.topo.parked_queue(), "task parked")
        }
        None => {
            error!(attempts, %reason, queue = %ctx.topo.parked_queue(), "unreadable task parked")
        }
    }
}

/// This delivery stops counting as held: called just before it is acked or nacked, since the
/// broker may send the next one as soon as it has the answer — counted after, the two would
/// overlap and the worker seem to hold one more than its queue size.
fn release(ctx: &Ctx) {
    ctx.stats.held.fetch_sub(1, Ordering::Relaxed);
}

/// Hands a task back to the queue now (it is redelivered, to this worker or another).
pub(crate) async fn requeue(ctx: &Ctx, delivery: &Delivery) {
    release(ctx);
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await;
}

pub(crate) async fn ack(ctx: &Ctx, delivery: &Delivery, tiles: &Tiles<'_>) {
    release(ctx);
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        // The channel died after the result was confirmed: the task will be redone and its
        // result arrive twice, which the collector handles.
        warn!(%tiles, error = %e, "ack failed; the task will be redelivered");
    }
}
