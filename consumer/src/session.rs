//! One connection's worth of serving: open the channels, take tasks until told to stop or the
//! connection is lost, and on a stop hand back what is not finished.
//!
//! [`crate::run`] opens one session after another while the broker comes and goes.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use gemmq::broker::{Broker, BrokerError};
use gemmq::events::WorkerState;
use gemmq::shutdown::CancellationToken;
use gemmq::topology::Topology;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, info, warn};

use crate::task::handle;
use crate::{Ctx, Settings, Stats, Stop, heartbeat, operands, results};

/// What lasts across a worker's connections.
pub(crate) struct Worker<'a> {
    pub broker: &'a Broker,
    pub topo: &'a Topology,
    pub settings: &'a Settings,
    pub stats: &'a Arc<Stats>,
    pub shutdown: &'a CancellationToken,
    pub started: Instant,
}

/// Serves tasks on one connection until `shutdown` (then `Ok`) or until the connection is lost.
pub(crate) async fn serve(worker: &Worker<'_>) -> Result<(), Stop> {
    let Some(mut session) = Session::open(worker).await? else {
        return Ok(());
    };
    session.start_notices().await;
    let consumer = session.consume().await?;
    session.serve(consumer).await
}

/// What one connection holds.
struct Session {
    ctx: Arc<Ctx>,
    /// The channel tasks arrive on.
    tasks: Channel,
    beat: Arc<heartbeat::Heartbeat>,
    /// Background work that dies with the connection: heartbeats, the notice feed. A
    /// JoinSet aborts its tasks when dropped.
    background: JoinSet<()>,
    /// Tasks being handled.
    handlers: JoinSet<()>,
    tag: String,
}

/// The connection's channels: tasks (topology declared, prefetch set), results (with publisher
/// confirms) and heartbeats.
async fn channels(
    conn: &lapin::Connection,
    topo: &Topology,
    s: &Settings,
) -> Result<(Channel, Channel, Channel), Stop> {
    let tasks = conn
        .create_channel()
        .await
        .map_err(lost("opening a channel"))?;
    topo.declare(&tasks).await.map_err(|e| {
        if e.is_permanent() {
            Stop::Fatal(e.into())
        } else {
            Stop::Lost(e.into())
        }
    })?;
    // global = false: per-consumer prefetch. Global QoS is not implemented for quorum queues
    // and would close the connection.
    tasks
        .basic_qos(s.queue_size, BasicQosOptions { global: false })
        .await
        .map_err(lost("setting the prefetch"))?;
    let publisher = conn
        .create_channel()
        .await
        .map_err(lost("opening a channel"))?;
    publisher
        .confirm_select(Default::default())
        .await
        .map_err(lost("enabling publisher confirms"))?;
    let events = conn
        .create_channel()
        .await
        .map_err(lost("opening a channel"))?;
    Ok((tasks, publisher, events))
}

fn lost(what: &'static str) -> impl Fn(lapin::Error) -> Stop {
    move |e| Stop::Lost(anyhow::Error::new(e).context(what))
}

impl Session {
    /// Connects and sets up; `None` when told to stop before the broker answered.
    async fn open(worker: &Worker<'_>) -> Result<Option<Self>, Stop> {
        let Worker {
            broker,
            topo,
            settings: s,
            stats,
            shutdown,
            started,
        } = *worker;
        let conn = match broker.connection().await {
            Ok(conn) => conn,
            // Told to stop before the broker came back: nothing is held, nothing to hand back.
            Err(BrokerError::Interrupted { .. }) => return Ok(None),
            Err(e) => return Err(Stop::Fatal(e.into())),
        };
        let (tasks, publisher, events) = channels(&conn, topo, s).await?;
        let beat = Arc::new(heartbeat::Heartbeat::new(
            events,
            topo.clone(),
            s.clone(),
            stats.clone(),
            started,
        ));
        let mut background = JoinSet::new();
        background.spawn(beat.clone().tick());
        let ctx = Arc::new(Ctx {
            settings: s.clone(),
            topo: topo.clone(),
            tasks_queue: topo.tasks_queue(),
            results: results::Results::start(
                publisher.clone(),
                topo.clone(),
                s.broker.max_message_bytes,
                stats.clone(),
            ),
            publisher,
            stats: stats.clone(),
            compute: Semaphore::new(s.concurrency),
            fetch: Semaphore::new(s.concurrency + 1),
            shutdown: shutdown.clone(),
            conn,
            operands: operands::OperandBlocks::new(
                topo.clone(),
                s.broker.max_message_bytes,
                s.operand_cache,
                stats.clone(),
            ),
            lost: CancellationToken::new(),
        });
        Ok(Some(Session {
            ctx,
            tasks,
            beat,
            background,
            handlers: JoinSet::new(),
            tag: format!("gemmq-consumer:{}", s.worker_id),
        }))
    }

    /// The collectors' word that a job is done, so its cached blocks go at once; without it
    /// (logged) they go when the cache needs the room.
    async fn start_notices(&mut self) {
        let s = &self.ctx.settings;
        match self
            .ctx
            .operands
            .start_notices(
                &self.ctx.conn,
                &s.worker_id,
                &format!("{}:notices", self.tag),
            )
            .await
        {
            Ok(feed) => {
                self.background.spawn(feed.in_current_span());
            }
            Err(e) => {
                warn!(error = %e, "no notices of finished jobs; their blocks go when the cache needs the room")
            }
        }
    }

    /// Starts taking tasks.
    async fn consume(&self) -> Result<Consumer, Stop> {
        let queue = &self.ctx.tasks_queue;
        let consumer = self
            .tasks
            .basic_consume(
                queue.as_str().into(),
                self.tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lost("starting to consume"))?;
        Stats::bump(&self.ctx.stats.connections);
        info!(%queue, prefetch = self.ctx.settings.queue_size, "consuming tasks");
        Ok(consumer)
    }

    async fn serve(mut self, mut consumer: Consumer) -> Result<(), Stop> {
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => {
                    self.stop().await;
                    return Ok(());
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => {
                        self.handlers.spawn(handle(self.ctx.clone(), d).in_current_span());
                    }
                    Some(Err(e)) => return Err(lost("consuming")(e)),
                    None => return Err(Stop::Lost(anyhow::anyhow!("the broker cancelled the consumer"))),
                },
                Some(_) = self.handlers.join_next(), if !self.handlers.is_empty() => {}
                _ = self.ctx.lost.cancelled() => {
                    return Err(Stop::Lost(anyhow::anyhow!("the publishing channel closed")));
                }
            }
        }
    }

    /// Graceful stop: take nothing more, let the tasks being handled finish within the shutdown
    /// timeout, and close, which returns every task not acked to the queue.
    async fn stop(mut self) {
        let timeout = self.ctx.settings.shutdown_timeout;
        let _ = self
            .tasks
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        self.background.abort_all();
        self.beat.send(WorkerState::Stopping).await;
        let in_flight = self.handlers.len();
        let drain = async { while self.handlers.join_next().await.is_some() {} };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            warn!(
                ?timeout,
                "tasks still running at the shutdown timeout; returning them to the queue"
            );
            self.handlers.abort_all();
        }
        let _ = self.tasks.close(200, "worker shutting down".into()).await;
        let _ = self
            .ctx
            .publisher
            .close(200, "worker shutting down".into())
            .await;
        self.beat.send(WorkerState::Stopped).await;
        self.beat.close().await;
        info!(
            in_flight,
            "stopped consuming; unfinished tasks were returned to the queue"
        );
    }
}
