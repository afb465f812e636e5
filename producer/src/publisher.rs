//! Publishing a prepared job until every message is confirmed, over as many tries as lost
//! connections, restarted brokers and vanished streams make necessary.
//!
//! Tasks are published in plan order and confirmed in order, so after a lost connection the
//! next try resumes at the first message not confirmed. Tasks published twice are harmless:
//! the collector keeps one result per tile.

use std::time::Instant;

use anyhow::{Context, Result};
use gemmq::broker::{Broker, ConfirmWindow};
use gemmq::job::{self, Announced};
use gemmq::message::Manifest;
use gemmq::tiling::Operands;
use gemmq::topology::Topology;
use tracing::{info, warn};

use crate::Settings;
use crate::order::Order;
use crate::prepare::Prepared;
use crate::resume::{Resuming, is_fatal, job_queues, resume_after, stream_lost};
use crate::send::{Out, Resume, publish_messages};

/// A job's publishing, carried from one try to the next.
pub(crate) struct Publisher<'a> {
    settings: &'a Settings,
    broker: Broker,
    topo: Topology,
    job: Prepared,
    order: Order,
    /// Messages confirmed, in publishing order: where the next try starts.
    pub confirmed: u64,
    pub bytes: u64,
    pub tries: u32,
    /// Set when the job's operand stream vanished: the blocks it held must go out again.
    blocks_lost: bool,
    pub announced: Option<Announced>,
}

impl<'a> Publisher<'a> {
    pub fn new(settings: &'a Settings, job: Prepared) -> Result<Self> {
        let broker = Broker::new(
            &settings.broker,
            &format!("gemmq-producer {}", settings.job_id),
        )?;
        Ok(Publisher {
            settings,
            broker,
            topo: settings.broker.topology(),
            order: Order::of(&job.manifest.plan, job.group),
            job,
            confirmed: 0,
            bytes: 0,
            tries: 0,
            blocks_lost: false,
            announced: None,
        })
    }

    pub fn into_manifest(self) -> Manifest {
        self.job.manifest
    }

    /// Tries until everything is confirmed. Tries in a row that confirm nothing new wait
    /// longer each time and eventually give up: a broker that accepts connections but cannot
    /// take the job's queues yet (for seconds after it restarts) must be waited for, not
    /// hammered ten times in a few milliseconds.
    pub async fn run(&mut self) -> Result<()> {
        let (mut pauses, mut failures, mut confirmed_before) =
            (gemmq::broker::retry_pauses(), 0u32, 0u64);
        loop {
            self.tries += 1;
            let e = match self.try_once().await {
                Ok(()) => return Ok(()),
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => e,
            };
            if self.confirmed > confirmed_before {
                pauses = gemmq::broker::retry_pauses();
                failures = 0;
            }
            confirmed_before = self.confirmed;
            failures += 1;
            let Some(pause) = pauses.next() else {
                return Err(e.context(format!("giving up after {failures} tries without progress")));
            };
            warn!(
                error = %format!("{e:#}"), confirmed = self.confirmed, messages = self.order.items.len(), retry_in = ?pause,
                "publishing interrupted; reconnecting to publish the unconfirmed messages again"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// One try: connect, declare, announce, publish from the first unconfirmed message.
    async fn try_once(&mut self) -> Result<()> {
        let ch = self
            .broker
            .confirm_channel()
            .await
            .context("connecting to RabbitMQ")?;
        self.topo.declare(&ch).await?;
        if self.job.group_is_auto && self.job.workers.is_none() && self.confirmed == 0 {
            self.fit_group_to_workers(&ch).await;
        }
        if self.confirmed > 0
            && self.job.manifest.plan.operands == Operands::Stream
            && self.resuming().await? == Resuming::Done
        {
            return Ok(());
        }
        // A new job has no manifest to look for (job::announce). The pooled connection goes
        // back before publishing, so the checker's channel is on the same one.
        let found = {
            let conn = self
                .broker
                .connection()
                .await
                .context("connecting to RabbitMQ")?;
            self.topo
                .has_manifest_queue(&conn, &self.job.manifest.job)
                .await
                .map_err(job::JobError::from)?
        };
        let before = if found {
            job::ManifestQueue::Present
        } else {
            job::ManifestQueue::Absent
        };
        let first = job::announce(&ch, &self.topo, &mut self.job.manifest, before).await?;
        if self.announced.is_none() {
            self.announced = Some(first);
            log_announced(&self.job, self.messages(), first);
        }
        let mut window = ConfirmWindow::new(ch.clone(), self.settings.confirm_window);
        // Its own channel: on the publishing one, each check would wait behind every block
        // still in flight, draining the pipeline.
        let checker = self
            .broker
            .channel()
            .await
            .context("connecting to RabbitMQ")?;
        // Published again first, when the stream was lost: not counted as progress.
        let again = if self.blocks_lost {
            self.order.items[..self.confirmed as usize]
                .iter()
                .filter(|i| i.on_stream())
                .count() as u64
        } else {
            0
        };
        let r = self.publish(&mut window, &checker).await;
        let r = match r {
            Ok(()) => window
                .flush()
                .await
                .context("waiting for the last confirms"),
            Err(e) => Err(e),
        };
        // Confirms come in publishing order: the blocks published again come first.
        if window.confirmed() >= again {
            self.blocks_lost = false;
        }
        self.confirmed += window.confirmed().saturating_sub(again);
        // The stream may be there again by the next try (a collector that reconnects
        // declares the job's queues), but empty: what failed this one says it was lost.
        if r.as_ref()
            .is_err_and(|e| stream_lost(e, &self.topo.operands_exchange()))
        {
            self.blocks_lost = true;
        }
        let _ = checker.close(200, "done".into()).await;
        let _ = ch.close(200, "done".into()).await;
        r
    }

    /// `auto` grouping leaves two messages per worker consuming now, when they are more than
    /// eight (`gemmq::tiling::auto_group`): once, before the first message, so that every try
    /// publishes the same messages. Workers that start later share what is left.
    async fn fit_group_to_workers(&mut self, ch: &lapin::Channel) {
        let workers = match self.topo.task_consumers(ch).await {
            Ok(n) => n,
            Err(e) => {
                // The queue was declared on this channel just now: if even so it cannot be
                // counted, the try fails on its next step and the count is tried again.
                warn!(error = %e, "the workers consuming could not be counted");
                return;
            }
        };
        let max_bytes = self.settings.broker.max_message_bytes;
        if self.job.fit_group_to(workers, max_bytes) {
            self.order = Order::of(&self.job.manifest.plan, self.job.group);
        }
    }

    /// Task messages, in the grouping this job is published with.
    pub fn messages(&self) -> u64 {
        self.order.task_messages()
    }

    /// After an interrupted try, before the job's queues are declared again: a stream that is
    /// gone took the blocks published so far with it, and they go out again; unless the job
    /// was finished and retired meanwhile (a collector deletes its queues as soon as it has
    /// every tile): declaring them again would bring it back.
    async fn resuming(&mut self) -> Result<Resuming> {
        let job = &self.job.manifest.job;
        let queues = job_queues(&self.broker, &self.topo, job).await?;
        let resuming = resume_after(queues, self.confirmed, self.order.items.len() as u64);
        match resuming {
            Resuming::AsBefore => {}
            Resuming::Done => {
                info!(%job, "the job was finished and retired while its last confirms came in; nothing left to publish");
            }
            Resuming::WithEveryBlock => {
                warn!(%job, "the job's operand stream is gone; declaring it again and publishing every block again");
                self.blocks_lost = true;
            }
        }
        Ok(resuming)
    }

    async fn publish(
        &mut self,
        window: &mut ConfirmWindow,
        checker: &lapin::Channel,
    ) -> Result<()> {
        let out = Out {
            window,
            checker,
            bytes: &mut self.bytes,
        };
        let from = Resume {
            skip: self.confirmed,
            blocks_again: self.blocks_lost,
        };
        let (topo, manifest, order) = (&self.topo, &self.job.manifest, &self.order);
        let (a, b) = (&self.job.a, &self.job.b);
        publish_messages(out, topo, manifest, a, b, order, from).await
    }

    /// Logs what it took, once everything is confirmed.
    pub fn log_done(&self, started: Instant) {
        let p = &self.job.manifest.plan;
        let secs = started.elapsed().as_secs_f64();
        let mib = self.bytes as f64 / (1 << 20) as f64;
        info!(
            job = %self.job.manifest.job,
            tasks = p.tasks(),
            messages = self.messages(),
            mib,
            seconds = secs,
            mib_per_s = mib / secs.max(1e-9),
            tries = self.tries,
            "all tasks published and confirmed"
        );
    }
}

fn log_announced(job: &Prepared, messages: u64, announced: Announced) {
    let (manifest, group) = (&job.manifest, job.group);
    let p = &manifest.plan;
    // The workers `auto` grouping counted; left out when the group was given.
    let workers = job.workers;
    match announced {
        Announced::New => info!(
            job = %manifest.job, run = %manifest.run, m = p.m, k = p.k, n = p.n, dtype = %p.dtype, tile = p.tile,
            tiles = p.tiles(), k_parts = p.parts(), tasks = p.tasks(), group, messages, workers,
            "job announced"
        ),
        Announced::AlreadyThere => info!(
            job = %manifest.job, run = %manifest.run,
            "job already announced with the same plan; publishing its tasks again (the collector keeps one result per tile)"
        ),
    }
}
