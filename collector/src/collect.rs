//! Reading a job's results from the broker: one connection at a time, until every task has a
//! result or a parked notice, the idle timeout passes, or the collector is told to stop.
//!
//! The results are a stream, which keeps every message until the job is done: the checkpoint
//! records how far it has read ([`StreamPosition`]), and reading resumes there. A collector
//! with an empty checkpoint (a standby on another machine, or one whose disk was lost) reads
//! from the start and rebuilds C; first-result-wins makes a re-read exact. Only the collector
//! that holds the job's claim (an exclusive queue, see [`gemmq::topology::Topology::claim_job`])
//! reads; others stand by and take over when its connection goes.

use std::time::{Duration, Instant};

use crate::metrics::JobState;
use futures_util::{FutureExt, StreamExt};
use gemmq::assembly::{Assembly, StreamPosition};
use gemmq::broker::{Broker, PooledConnection};
use gemmq::message::Manifest;
use gemmq::shutdown::CancellationToken;
use gemmq::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tracing::{info, warn};

use crate::apply::apply;
use crate::progress::Progress;
use crate::{CollectedElsewhere, JobCancelled, Settings, retries};

/// How collecting on one connection ended, when it ended well.
enum Collected {
    Finished,
    Idle,
}

enum Stop {
    Interrupted,
    Fatal(anyhow::Error),
    Lost(anyhow::Error),
    /// Another collector holds the job's claim.
    StandingBy,
    /// The job's results stream is gone: the collector that finished the job removed it, or a
    /// cancel did.
    Retired,
    /// The stream is not the one the checkpoint's position was read from: read it from the
    /// start.
    Reread(String),
}

/// How long a resumed read may take to deliver the message the checkpoint ends at (it is in
/// the stream, so it comes at once) before the stream is taken for a new one and read from
/// the start.
const RESUME_CHECK: Duration = Duration::from_secs(10);

/// How often a standby collector asks for the job's claim.
const STANDBY_POLL: Duration = Duration::from_secs(1);

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
    /// The connection the job's claim and the results consumer are on, kept for the whole job:
    /// a claim belongs to a connection, and a pooled one could come back as another.
    pub conn: Option<PooledConnection>,
    /// Read the stream from its start next time, whatever the checkpoint says.
    pub from_start: bool,
    /// The live page's view of the job, with `--web`.
    pub live: Option<std::sync::Arc<crate::web::Live>>,
    /// What `--metrics-addr` serves.
    pub figures: std::sync::Arc<crate::metrics::JobFigures>,
}

/// Where a read of the results stream starts, and the message it must start with.
struct ReadFrom {
    offset: AMQPValue,
    expect: Option<StreamPosition>,
}

impl Collection<'_> {
    /// Collects until every task has a result or a parked notice, or the idle timeout passes,
    /// reconnecting whenever the broker is lost. An interruption (SIGTERM) is an error that
    /// says how to resume.
    pub async fn until_done(&mut self) -> anyhow::Result<()> {
        let total = self.manifest.plan.tasks();
        let mut stood_by = false;
        while !self.asm.is_finished() {
            match self.on_one_connection().await {
                Err(Stop::StandingBy) => {
                    self.figures.set_state(JobState::StandingBy);
                    if !stood_by {
                        info!(job = %self.manifest.job, claim = %self.topo.collector_queue(&self.manifest.job),
                            "standing by: another collector is assembling this job; taking over if it stops");
                        stood_by = true;
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("interrupted while standing by"),
                        _ = tokio::time::sleep(STANDBY_POLL) => {}
                    }
                }
                Err(Stop::Retired) => {
                    self.progress.finish();
                    let job = self.manifest.job.clone();
                    if crate::was_cancelled(self.broker, self.topo, &job).await {
                        return Err(JobCancelled { job }.into());
                    }
                    return Err(CollectedElsewhere { job }.into());
                }
                Err(Stop::Reread(why)) => {
                    warn!(job = %self.manifest.job, reason = %why, "reading the job's results again from the start of the stream (results already applied count as duplicates)");
                    self.from_start = true;
                }
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
        let (ch, tag, mut results, from) = self.subscribe().await?;
        self.take_announcement().await;
        let plan = &self.manifest.plan;
        info!(
            job = %self.manifest.job, m = plan.m, k = plan.k, n = plan.n, dtype = %plan.dtype,
            tasks = plan.tasks(), stream = %self.topo.results_queue(&self.manifest.job),
            from = %describe(&from.offset), "collecting"
        );
        let mut expect = from.expect;
        let subscribed = Instant::now();
        let mut last_result = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        while !self.asm.is_finished() {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = ch.close(200, "collector shutting down".into()).await;
                    return Err(Stop::Interrupted);
                }
                _ = tick.tick() => {
                    if expect.is_some() && subscribed.elapsed() >= RESUME_CHECK {
                        let _ = ch.close(200, "rereading".into()).await;
                        return Err(Stop::Reread(format!(
                            "the message the checkpoint ends at did not come within {RESUME_CHECK:?}"
                        )));
                    }
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
                    if let Some(held) = expect {
                        let offset = stream_offset(&first)?;
                        // The broker may start a little before the offset asked for.
                        if offset < held.offset || held.is(offset, &first.data) {
                            if offset == held.offset {
                                expect = None;
                            }
                            first.acker.ack(BasicAckOptions::default()).await.map_err(lost("acking results"))?;
                            continue;
                        }
                        let _ = ch.close(200, "rereading".into()).await;
                        return Err(Stop::Reread(format!(
                            "the stream's message at offset {offset} is not the one the checkpoint ends at (offset {}): the stream was declared anew",
                            held.offset
                        )));
                    }
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

    /// A channel reading the job's results stream from where the checkpoint ends, once the
    /// job's claim is ours.
    async fn subscribe(&mut self) -> Result<(Channel, String, Consumer, ReadFrom), Stop> {
        let permanent_or_lost = |permanent: bool, e: anyhow::Error| {
            if permanent {
                Stop::Fatal(e)
            } else {
                Stop::Lost(e)
            }
        };
        let conn = match self.conn.take() {
            Some(c) if c.status().connected() => c,
            _ => self
                .broker
                .connection()
                .await
                .map_err(|e| permanent_or_lost(e.is_permanent(), e.into()))?,
        };
        let ch = conn
            .create_channel()
            .await
            .map_err(lost("opening a channel"))?;
        self.conn = Some(conn);
        let topology_failed =
            |e: gemmq::topology::TopologyError| permanent_or_lost(e.is_permanent(), e.into());
        self.topo.declare(&ch).await.map_err(topology_failed)?;
        let job = &self.manifest.job;
        if !self
            .topo
            .claim_job(&ch, job)
            .await
            .map_err(topology_failed)?
        {
            return Err(Stop::StandingBy);
        }
        // Only asked, never declared: a stream declared here after the job was finished and
        // removed would be waited on forever.
        let stream = self.topo.results_queue(job);
        match gemmq::topology::queue_exists(&ch, &stream).await {
            Ok(true) => {}
            Ok(false) => return Err(Stop::Retired),
            Err(e) => return Err(lost("looking for the job's results stream")(e)),
        }
        ch.basic_qos(self.settings.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(lost("setting the prefetch"))?;
        let from = self.read_from();
        // Once read from the start, the checkpoint's position is this stream's again.
        self.from_start = false;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), from.offset.clone());
        let tag = format!("gemmq-collector:{}", self.settings.collector_id);
        let results = ch
            .basic_consume(
                stream.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| {
                if gemmq::topology::is_refused(&e) {
                    Stop::Fatal(anyhow::Error::new(e).context(format!(
                        "cannot read {stream} as a stream: a job announced by an earlier gemmq (before 5 December 2026, afternoon) has a quorum results queue; collect it with that version"
                    )))
                } else {
                    lost("reading the job's results")(e)
                }
            })?;
        Ok((ch, tag, results, from))
    }

    fn read_from(&self) -> ReadFrom {
        match self.asm.position().filter(|_| !self.from_start) {
            Some(p) => ReadFrom {
                offset: AMQPValue::LongLongInt(p.offset as i64),
                expect: Some(p),
            },
            None => ReadFrom {
                offset: gemmq::topology::text("first"),
                expect: None,
            },
        }
    }

    /// The job's claim, taken out of the collection to be held while C is finished.
    pub fn keep_claim(&mut self) -> Claim {
        Claim {
            conn: self.conn.take(),
            queue: self.topo.collector_queue(&self.manifest.job),
        }
    }

    pub async fn release(&mut self) {
        self.keep_claim().release().await;
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

    /// Applies one message to C (not yet committed), counting what it rejected.
    fn apply(&mut self, data: &[u8]) -> Result<(), Stop> {
        let limit = self.settings.broker.max_message_bytes;
        self.rejected += apply(
            &mut self.asm,
            self.manifest,
            data,
            limit,
            self.live.as_deref(),
        )
        .map_err(|e| Stop::Fatal(e.into()))?;
        Ok(())
    }

    /// Applies `first` and whatever else has already arrived, commits once for all of it, then
    /// acks them all with one `ack(multiple)`.
    async fn batch(&mut self, first: Delivery, results: &mut Consumer) -> Result<(), Stop> {
        let mut last = first;
        self.apply(&last.data)?;
        let mut taken = 1;
        while taken < BATCH && !self.asm.is_finished() {
            match results.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    self.apply(&d.data)?;
                    last = d;
                    taken += 1;
                }
                _ => break,
            }
        }
        self.asm
            .read_through(StreamPosition::of(stream_offset(&last)?, &last.data));
        self.asm
            .commit()
            .map_err(|e| Stop::Fatal(anyhow::Error::new(e).context("saving the checkpoint")))?;
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(lost("acking results"))?;
        self.figures.claimed();
        self.figures.update(&self.asm, self.rejected);
        self.progress.update(
            self.asm.tasks_done(),
            retries(&self.asm.attempts),
            self.asm.parked().count() as u64,
        );
        Ok(())
    }
}

/// The offset the broker gave a message read from a stream.
fn stream_offset(d: &Delivery) -> Result<u64, Stop> {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset"))
    {
        Some(AMQPValue::LongLongInt(o)) if *o >= 0 => Ok(*o as u64),
        _ => Err(Stop::Fatal(anyhow::anyhow!(
            "a result came without its stream offset: the job's results queue is not a stream"
        ))),
    }
}

fn describe(offset: &AMQPValue) -> String {
    match offset {
        AMQPValue::LongLongInt(o) => format!("offset {o}"),
        _ => "the start".into(),
    }
}

/// The claim on a job (its exclusive queue), held by the connection it was declared on.
pub(crate) struct Claim {
    conn: Option<PooledConnection>,
    queue: String,
}

impl Claim {
    /// The claim on `queue` that `conn` declared.
    pub(crate) fn held(conn: PooledConnection, queue: String) -> Claim {
        Claim {
            conn: Some(conn),
            queue,
        }
    }

    /// Gives up the claim, so that a collector standing by need not wait for this process to
    /// end (the claim goes with the connection anyway).
    pub async fn release(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(self.queue.as_str().into(), Default::default())
                .await;
            let _ = ch.close(200, "released".into()).await;
        }
    }
}
