//! The worker's live operand queue: every block as it is published, straight from the broker's
//! memory, and the collectors' word that a job is done.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use gemmq::message::Header;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::job::{JobOperands, Jobs, forget_job, job_entry, store};
use super::{LIVE_PREFETCH, OperandBlocks, ReadCtx, decode_frame};

impl OperandBlocks {
    /// Declares this connection's live operand queue and starts consuming it. Returns the loop
    /// that puts its blocks into the caches, to be run for as long as the connection lives.
    pub async fn start_live(
        &self,
        conn: &Connection,
        worker: &str,
        tag: &str,
    ) -> Result<impl std::future::Future<Output = ()> + use<>, String> {
        let err = |e: &dyn std::fmt::Display| format!("starting the live operand queue: {e}");
        let ch = conn.create_channel().await.map_err(|e| err(&e))?;
        ch.basic_qos(LIVE_PREFETCH, BasicQosOptions { global: false })
            .await
            .map_err(|e| err(&e))?;
        let queue = self
            .topo
            .declare_live_operands(&ch, worker, self.read.budget)
            .await
            .map_err(|e| err(&e))?;
        let mut feed = ch
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&e))?;
        tracing::debug!(%queue, "consuming the live operand queue");
        let (ctx, jobs, live) = (self.read.clone(), self.jobs.clone(), self.live.clone());
        let done = self.done.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.live_since.store(now, Ordering::Relaxed);
        live.store(true, Ordering::Relaxed);
        Ok(async move {
            // Whatever ends the loop, tasks stop waiting for the live queue.
            struct Down(Arc<AtomicBool>, Arc<Jobs>);
            impl Drop for Down {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Relaxed);
                    if let Ok(jobs) = self.1.lock() {
                        for (_, j) in jobs.iter() {
                            j.changed.send_modify(|n| *n += 1);
                        }
                    }
                }
            }
            let _down = Down(live, jobs.clone());
            while let Some(Ok(d)) = feed.next().await {
                let acker = d.acker.clone();
                accept_live(&ctx, &jobs, &done, d);
                if acker.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
            }
            tracing::debug!("the live operand queue stopped; blocks come from the streams");
            let _ = ch.close(200, "live operand queue done".into()).await;
        })
    }
}

/// A block from the live queue: cached if there is room (made by dropping the caches of other,
/// less recently used jobs first); otherwise its job reads the stream for it.
pub(super) fn accept_live(ctx: &ReadCtx, jobs: &Jobs, done: &Mutex<VecDeque<String>>, d: Delivery) {
    let Some((header, start)) = decode_frame(ctx, "?", &d.data, "live operand queue") else {
        return;
    };
    let h = match header {
        Header::Operand(h) => h,
        // The collector's word that a job is done (decode checked the job id).
        Header::JobDone(notice) => return forget_job(jobs, done, &notice),
        _ => {
            tracing::warn!(
                "a message that is neither a block nor a job notice on the live operand queue skipped"
            );
            return;
        }
    };
    ctx.stats
        .operand_bytes
        .fetch_add(d.data.len() as u64, Ordering::Relaxed);
    ctx.stats
        .operand_live_bytes
        .fetch_add(d.data.len() as u64, Ordering::Relaxed);
    // Blocks of a job once said to be done: the same job id published again.
    done.lock().expect("never poisoned").retain(|d| *d != h.job);
    let j = job_entry(jobs, &ctx.total, &h.job, &h.run);
    let size = d.data.len() as u64;
    let fits = || ctx.total.load(Ordering::Relaxed) + size <= ctx.budget;
    if !fits() {
        let others: Vec<Arc<JobOperands>> = {
            let jobs = jobs.lock().expect("never poisoned");
            jobs.iter()
                .filter(|(name, _)| *name != h.job)
                .map(|(_, o)| o.clone())
                .collect()
        };
        for other in others {
            if fits() {
                break;
            }
            other.state.lock().expect("never poisoned").cache.clear();
        }
    }
    if !fits() {
        j.live_missed.store(true, Ordering::Relaxed);
        j.changed.send_modify(|n| *n += 1);
        tracing::debug!(job = %h.job, block = %h.block, "no room for a live block; the stream will be read");
        return;
    }
    store(ctx, &j, &h, d.data, start, None);
}
