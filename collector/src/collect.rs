//! Taking a job's results off the broker: one connection at a time, until every task has a
//! result or a parked notice, the idle timeout passes, or the collector is told to stop. Each
//! batch is committed to the checkpoint before it is acked, so a crash loses nothing the broker
//! does not still hold.

use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use gemmq::assembly::Assembly;
use gemmq::broker::Broker;
use gemmq::message::Manifest;
use gemmq::shutdown::CancellationToken;
use gemmq::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tracing::{info, warn};

use crate::apply::apply;
use crate::progress::Progress;
use crate::{Settings, retries};

/// How collecting on one connection ended, when it ended well.
enum Collected {
    Finished,
    Idle,
}

enum Stop {
    Interrupted,
    Fatal(anyhow::Error),
    Lost(anyhow::Error),
}

/// Results taken from the stream before a commit and one `ack(multiple)`: amortises the fsync.
const BATCH: usize = 256;

fn lost(what: &'static str) -> impl Fn(lapin::Error) -> Stop {
    move |e| Stop::Lost(anyhow::Error::new(e).context(what))
}

/// A job being collected, across connections.
pub(crate) struct Collection<'a> {
    pub broker: &'a Broker,
    pub topo: &'a Topology,
    pub settings: &'a Settings,
    pub manifest: &'a Manifest,
    pub asm: Assembly,
    pub progress: Progress,
    /// Messages dropped because they do not belong to the job (see [`crate::apply`]).
    pub rejected: u64,
    /// The job's announcement, taken from the jobs queue and not yet acked (collectors
    /// without `--job-id`): acked once the results queue is ours.
    pub announcement: Option<(Delivery, Channel)>,
    pub shutdown: &'a CancellationToken,
}

impl Collection<'_> {
    /// Collects until every task has a result or a parked notice, or the idle timeout passes,
    /// reconnecting whenever the broker is lost. An interruption (SIGTERM) is an error that
    /// says how to resume.
    pub async fn until_done(&mut self) -> anyhow::Result<()> {
        let total = self.manifest.plan.tasks();
        while !self.asm.is_finished() {
            match self.on_one_connection().await {
                Ok(Collected::Finished) => break,
                Ok(Collected::Idle) => {
                    warn!("no results within the idle timeout; reporting what is missing");
                    break;
                }
                Err(Stop::Interrupted) => {
                    self.progress.finish();
                    anyhow::bail!(
                        "interrupted with {} of {total} tasks collected; they are checkpointed in {}: run the collector again with --job-id {} to resume",
                        self.asm.tasks_done(),
                        self.asm.dir().display(),
                        self.manifest.job
                    );
                }
                Err(Stop::Fatal(e)) => return Err(e),
                Err(Stop::Lost(e)) => {
                    warn!(error = %format!("{e:#}"), "lost the broker; reconnecting (unacked results will be delivered again)");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.progress.finish();
        Ok(())
    }

    /// Consumes the job's results on one connection until the job is finished, the connection
    /// is lost, or the idle timeout passes.
    async fn on_one_connection(&mut self) -> Result<Collected, Stop> {
        let (ch, tag, mut results) = self.subscribe().await?;
        self.take_announcement().await;
        let plan = &self.manifest.plan;
        info!(
            job = %self.manifest.job, m = plan.m, k = plan.k, n = plan.n, dtype = %plan.dtype,
            tasks = plan.tasks(), queue = %self.topo.results_queue(&self.manifest.job), "collecting"
        );
        let mut last_result = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        while !self.asm.is_finished() {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = ch.close(200, "collector shutting down".into()).await;
                    return Err(Stop::Interrupted);
                }
                _ = tick.tick() => {
                    let idle = last_result.elapsed();
                    if self.settings.idle_timeout.is_some_and(|limit| idle >= limit) {
                        let _ = ch.close(200, "collector idle".into()).await;
                        return Ok(Collected::Idle);
                    }
                    if idle >= Duration::from_secs(30) {
                        warn!(idle_s = idle.as_secs(), done = self.asm.tasks_done(), total = plan.tasks(),
                            "waiting for results: are consumers running?");
                    }
                }
                delivery = results.next() => {
                    let first = match delivery {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => return Err(lost("receiving results")(e)),
                        None => return Err(Stop::Lost(anyhow::anyhow!("the broker cancelled the results consumer"))),
                    };
                    last_result = Instant::now();
                    self.batch(first, &mut results).await?;
                }
            }
        }
        let _ = ch
            .basic_cancel(tag.as_str().into(), Default::default())
            .await;
        let _ = ch.close(200, "job collected".into()).await;
        Ok(Collected::Finished)
    }

    /// A channel consuming the job's results queue, with the collector's prefetch.
    async fn subscribe(&self) -> Result<(Channel, String, Consumer), Stop> {
        let permanent_or_lost = |permanent: bool, e: anyhow::Error| {
            if permanent {
                Stop::Fatal(e)
            } else {
                Stop::Lost(e)
            }
        };
        let ch = self
            .broker
            .channel()
            .await
            .map_err(|e| permanent_or_lost(e.is_permanent(), e.into()))?;
        let topology_failed =
            |e: gemmq::topology::TopologyError| permanent_or_lost(e.is_permanent(), e.into());
        self.topo.declare(&ch).await.map_err(topology_failed)?;
        // Only what it consumes: it has the manifest already (and a job announced by a gemmq
        // before 5 December 2026 has a classic manifest queue, out of reach while its node is
        // down: NOT_FOUND from every other node of a cluster).
        self.topo
            .declare_results(&ch, &self.manifest.job)
            .await
            .map_err(topology_failed)?;
        ch.basic_qos(self.settings.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(lost("setting the prefetch"))?;
        let tag = format!("gemmq-collector:{}", self.settings.collector_id);
        let queue = self.topo.results_queue(&self.manifest.job);
        let results = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lost("consuming the job's results"))?;
        Ok((ch, tag, results))
    }

    /// The job is ours now. The announcement's channel had to stay open until here: closing it
    /// would have handed the announcement to the next collector.
    async fn take_announcement(&mut self) {
        let Some((d, jobs_ch)) = self.announcement.take() else {
            return;
        };
        match d.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            _ => {
                warn!(job = %self.manifest.job, "the job's announcement went back to the jobs queue; another collector may stand by for this job")
            }
        }
        let _ = jobs_ch.close(200, "job taken".into()).await;
    }

    /// Applies `first` and whatever else has already arrived, commits once for all of it, then
    /// acks them all with one `ack(multiple)`.
    async fn batch(&mut self, first: Delivery, results: &mut Consumer) -> Result<(), Stop> {
        let limit = self.settings.broker.max_message_bytes;
        let mut last = first;
        self.rejected += apply(&mut self.asm, self.manifest, &last.data, limit)
            .map_err(|e| Stop::Fatal(e.into()))?;
        let mut taken = 1;
        while taken < BATCH && !self.asm.is_finished() {
            match results.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    self.rejected += apply(&mut self.asm, self.manifest, &d.data, limit)
                        .map_err(|e| Stop::Fatal(e.into()))?;
                    last = d;
                    taken += 1;
                }
                _ => break,
            }
        }
        self.asm
            .commit()
            .map_err(|e| Stop::Fatal(anyhow::Error::new(e).context("saving the checkpoint")))?;
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(lost("acking results"))?;
        self.progress.update(
            self.asm.tasks_done(),
            retries(&self.asm.attempts),
            self.asm.parked().count() as u64,
        );
        Ok(())
    }
}
