//! Every exchange, queue and queue argument gemmq uses, declared from this module only.
//!
//! ```text
//! {ns}.tasks   exchange (direct) ─"task"─▶ {ns}.tasks   quorum queue
//!                                           │ dead-letter (nack requeue=false, at-least-once)
//!                                           ▼
//! {ns}.retry   exchange (fanout) ────────▶ {ns}.retry   quorum queue, message TTL = retry delay
//!                                           │ dead-letter on expiry (at-least-once)
//!                                           └──────────▶ {ns}.tasks exchange, key "task" again
//! {ns}.parked                               quorum queue: tasks whose attempts ran out, with reasons
//! {ns}.jobs                                 quorum queue: one manifest per job, for collectors
//!                                           started without --job-id
//! {ns}.events  exchange (fanout): transient worker heartbeats, for whoever watches
//! {ns}.results exchange (direct) ─job id─▶ {ns}.job.<id>.results  stream: every result, failure
//!                                           and parked notice of the job, kept until the job
//!                                           is done, so a collector on any machine can read
//!                                           them all again
//!                                           {ns}.job.<id>.collector  exclusive: held by the
//!                                           collector assembling the job; others stand by
//!                                           {ns}.job.<id>.manifest quorum queue holding the
//!                                           job's manifest, read without being consumed
//! {ns}.operands exchange (topic) ─job id─▶ {ns}.job.<id>.operands stream: each block of A and B
//!                     │                      once; a worker reads the blocks its tasks need,
//!                     │                      each at its offset
//!                     └──"done.*"──▶ {ns}.notices.<worker>.<random>: one per worker (exclusive,
//!                                classic, bounded): collectors' word that a job is done
//! {ns}.job.<id>.cancelled                   classic, empty: the mark `gemmq-collector cancel`
//!                                           leaves, expired by the broker after a week
//! ```
//!
//! Declarations are idempotent, so every program declares everything it touches and start order
//! does not matter. RabbitMQ refuses a redeclaration whose arguments differ (406
//! PRECONDITION_FAILED); [`TopologyError::Mismatch`] turns that into advice.
//!
//! Why these arguments:
//! * Quorum queues replicate and survive broker restarts; they are always durable. Every queue
//!   a job needs is a quorum queue or a stream, so a cluster that loses a node (a minority of
//!   each queue's replicas) loses nothing a job needs. How many replicas each has is the
//!   broker's setting, not an argument here: RabbitMQ's equivalence check counts
//!   `x-quorum-initial-group-size` and `x-initial-cluster-size`, so adding them would make every
//!   existing deployment's shared queues refuse redeclaration (docs/OPERATIONS.md says how to
//!   set them). Only two kinds of queue are classic, neither needed by a running job: the
//!   workers' notice queues, each living and dying with its worker's connection, which declares
//!   a new one on whichever node it reconnects to; and the empty marks of cancelled jobs (one
//!   lost with its node only leaves a collector of the job unable to say it was cancelled).
//! * Quorum dead-lettering is at-most-once unless `x-dead-letter-strategy = at-least-once`, which
//!   the broker silently ignores unless `x-overflow = reject-publish` is set too. Both are set.
//! * `x-delivery-limit` bounds crash loops (a task that kills its worker is redelivered with
//!   requeue, not through the retry path): once reached the broker dead-letters it to the retry
//!   queue, where it counts as an attempt. RabbitMQ 4 defaults it to 20; we set it explicitly so
//!   3.x and 4.x behave the same.
//! * Operand blocks are read from the stream, each by the workers whose tasks need it: a worker
//!   opens a consumer at the block's offset with a prefetch of one and cancels it once the block
//!   is there. So the broker sends a block to a worker once (while the worker caches it), not to
//!   every worker: its egress grows with what the workers compute, not with how many there are.
//!   Each large block is followed by an empty `gemmq.chunk_end` message in a chunk of its own:
//!   the broker reads a consumer one chunk ahead, and checks the CRC32 of the stream's last chunk
//!   for every consumer that opens it; both should be small.
//!   (An earlier design copied every block to a live queue per worker, which saved the broker the
//!   stream's disk read and CRC32 check per read, at the cost of W × (|A| + |B|) sent for W
//!   workers; docs/ARCHITECTURE.md.)
//! * Results go to a stream, not a queue: reading does not remove them, so a collector whose disk
//!   is lost (or a standby on another machine) rebuilds C by reading the job's results from the
//!   start. It costs the broker's disk C's size until the job is done, when the collector
//!   deletes the stream. Streams have no single active consumer over AMQP 0.9.1, so which
//!   collector assembles is decided by an exclusive queue instead: the broker lets one
//!   connection declare it, and removes it when that connection goes.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use crate::config::ConfigError;

/// Routing key of tasks on the task exchange.
pub const TASK_KEY: &str = "task";
/// How many crash-loop redeliveries a task gets before the broker counts it as a failed attempt.
pub const DELIVERY_LIMIT: i64 = 10;
/// How often a job's manifest may be read (each read is a delivery and a requeue): never
/// reached in practice (a read a millisecond for three weeks).
pub const MANIFEST_READS: i64 = i32::MAX as i64;
/// The most notices a worker's notice queue holds before the oldest is dropped: a worker that
/// misses one drops that job's blocks when its cache needs the room.
pub const NOTICES_MAX: i64 = 1000;
/// How long the mark of a cancelled job outlives the cancel (unused; the broker then deletes
/// it): long enough for a collector started late for the job to be told, short enough that
/// the marks of cancelled ids do not pile up.
pub const CANCELLED_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "{what} {name} already exists with different arguments ({detail}). It was declared by another gemmq version or with another retry delay. Delete it (management UI, or `rabbitmqctl delete_queue {name}`) or use another --namespace"
    )]
    Mismatch {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error(
        "the broker refused to let this user declare {what} {name} ({detail}). gemmq declares its exchanges and queues itself: give the user configure, write and read permission on names starting with the namespace (e.g. `rabbitmqctl set_permissions -p <vhost> <user> '^<namespace>\\.' '^<namespace>\\.' '^<namespace>\\.'`), or use another user"
    )]
    Refused {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error("declaring {what} {name}: {source}")]
    Broker {
        what: &'static str,
        name: String,
        source: lapin::Error,
    },
}

impl TopologyError {
    /// Whether redeclaring cannot help (the arguments differ, or the user may not), as opposed to
    /// a lost connection or a queue that is still starting.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TopologyError::Mismatch { .. } | TopologyError::Refused { .. }
        )
    }
}

/// Checks that a namespace or job id is usable in queue names and readable in the UI.
pub fn check_name(what: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            what,
            format!("{name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'"),
        ))
    }
}

/// The names and arguments of one gemmq deployment on a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    ns: String,
    retry_delay: Duration,
}

impl Topology {
    pub fn new(namespace: &str, retry_delay: Duration) -> Self {
        Topology {
            ns: namespace.to_string(),
            retry_delay,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.ns)
    }
    pub fn tasks_queue(&self) -> String {
        format!("{}.tasks", self.ns)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.ns)
    }
    pub fn retry_queue(&self) -> String {
        format!("{}.retry", self.ns)
    }
    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.ns)
    }
    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.ns)
    }
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.ns)
    }
    pub fn results_queue(&self, job: &str) -> String {
        format!("{}.job.{job}.results", self.ns)
    }
    /// The queue whose holder is the one collector assembling `job` (see [`Topology::claim_job`]).
    pub fn collector_queue(&self, job: &str) -> String {
        format!("{}.job.{job}.collector", self.ns)
    }
    pub fn manifest_queue(&self, job: &str) -> String {
        format!("{}.job.{job}.manifest", self.ns)
    }
    pub fn operands_queue(&self, job: &str) -> String {
        format!("{}.job.{job}.operands", self.ns)
    }
    /// Where producers publish operand blocks, with the job id as routing key.
    pub fn operands_exchange(&self) -> String {
        format!("{}.operands", self.ns)
    }

    /// Declares the shared part: task, retry, parking-lot and job-announcement queues.
    pub async fn declare(&self, ch: &Channel) -> Result<(), TopologyError> {
        exchange(ch, &self.tasks_exchange(), ExchangeKind::Direct).await?;
        exchange(ch, &self.retry_exchange(), ExchangeKind::Fanout).await?;
        exchange(ch, &self.results_exchange(), ExchangeKind::Direct).await?;
        exchange(ch, &self.events_exchange(), ExchangeKind::Fanout).await?;
        exchange(ch, &self.operands_exchange(), ExchangeKind::Topic).await?;

        let mut tasks = quorum_args();
        tasks.insert(
            "x-dead-letter-exchange".into(),
            text(&self.retry_exchange()),
        );
        tasks.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        queue(ch, &self.tasks_queue(), tasks).await?;
        bind(ch, &self.tasks_queue(), &self.tasks_exchange(), TASK_KEY).await?;

        let mut retry = quorum_args();
        retry.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(self.retry_delay.as_millis() as i64),
        );
        retry.insert(
            "x-dead-letter-exchange".into(),
            text(&self.tasks_exchange()),
        );
        queue(ch, &self.retry_queue(), retry).await?;
        bind(ch, &self.retry_queue(), &self.retry_exchange(), "").await?;

        queue(ch, &self.parked_queue(), plain_quorum()).await?;
        queue(ch, &self.jobs_queue(), plain_quorum()).await?;
        Ok(())
    }

    /// The workers consuming from the tasks queue now (declared: call after [`Self::declare`]).
    pub async fn task_consumers(&self, ch: &Channel) -> Result<u32, TopologyError> {
        let name = self.tasks_queue();
        ch.queue_declare(name.as_str().into(), passive(), FieldTable::default())
            .await
            .map(|q| q.consumer_count())
            .map_err(|e| map_err("queue", &name, e))
    }

    /// Declares only the events exchange: all a status watcher needs, whatever the retry delay.
    pub async fn declare_events(&self, ch: &Channel) -> Result<(), TopologyError> {
        exchange(ch, &self.events_exchange(), ExchangeKind::Fanout).await
    }

    /// Declares one job's results, manifest and operand queues.
    pub async fn declare_job(&self, ch: &Channel, job: &str) -> Result<(), TopologyError> {
        queue(ch, &self.results_queue(job), stream()).await?;
        bind(ch, &self.results_queue(job), &self.results_exchange(), job).await?;
        // Quorum, so that the manifest outlives any one node of a cluster. It is read by get and
        // reject-with-requeue, which counts as a delivery: the limit (RabbitMQ 4 defaults it to
        // 20, and then drops the message) is set out of reach.
        let mut manifest = plain_quorum();
        manifest.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(MANIFEST_READS),
        );
        queue(ch, &self.manifest_queue(job), manifest).await?;
        // A stream: read by many workers, each from wherever it likes, without consuming it.
        queue(ch, &self.operands_queue(job), stream()).await?;
        bind(
            ch,
            &self.operands_queue(job),
            &self.operands_exchange(),
            job,
        )
        .await?;
        Ok(())
    }

    /// The name of a worker's notice queue: in the namespace (so the permissions that cover
    /// gemmq's other names cover it), and unique even if two workers share an id.
    pub fn notices_queue(&self, worker: &str) -> String {
        format!("{}.notices.{worker}.{:08x}", self.ns, rand::random::<u32>())
    }

    /// The routing key, on the operands exchange, of the notice that a job is done. Job ids have
    /// no dots, so it never reaches a job's stream.
    pub fn done_key(job: &str) -> String {
        format!("done.{job}")
    }

    /// Declares a worker's notice queue, bound to every job's "done" notice, and returns its
    /// name. Exclusive and auto-deleted: it lives as long as the connection.
    pub async fn declare_notices(
        &self,
        ch: &Channel,
        worker: &str,
    ) -> Result<String, TopologyError> {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(NOTICES_MAX));
        args.insert("x-overflow".into(), text("drop-head"));
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let name = self.notices_queue(worker);
        ch.queue_declare(name.as_str().into(), opts, args)
            .await
            .map_err(|e| map_err("queue", &name, e))?;
        bind(ch, &name, &self.operands_exchange(), "done.*").await?;
        Ok(name)
    }

    /// Claims the assembly of `job` for this channel's connection: `true` if it is now ours
    /// (or was already), `false` if another collector's connection holds it — then the broker
    /// has closed `ch`. The claim ends when the connection does, so a collector that dies or
    /// loses its broker node frees it for one standing by.
    pub async fn claim_job(&self, ch: &Channel, job: &str) -> Result<bool, TopologyError> {
        let name = self.collector_queue(job);
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        match ch
            .queue_declare(name.as_str().into(), opts, FieldTable::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == RESOURCE_LOCKED) => {
                Ok(false)
            }
            Err(e) => Err(map_err("queue", &name, e)),
        }
    }

    /// The mark a cancelled job leaves ([`Topology::mark_cancelled`]).
    pub fn cancelled_queue(&self, job: &str) -> String {
        format!("{}.job.{job}.cancelled", self.ns)
    }

    /// Marks `job` cancelled, so that a collector started for it afterwards can say why there is
    /// nothing to collect instead of waiting for an announcement that will not come. The mark
    /// is an empty queue of its own: a tombstone no job needs, so a classic queue (on the node
    /// that took the cancel) rather than a replicated one, which the broker deletes after
    /// [`CANCELLED_KEPT`] unused. A producer announcing the job again removes it
    /// ([`crate::job::announce`]).
    pub async fn mark_cancelled(&self, ch: &Channel, job: &str) -> Result<(), TopologyError> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("classic"));
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(CANCELLED_KEPT.as_millis() as i64),
        );
        queue(ch, &self.cancelled_queue(job), args).await
    }

    /// Removes the mark of a cancelled `job`, if there is one (deleting a missing queue is no
    /// error in RabbitMQ).
    pub async fn clear_cancelled(&self, ch: &Channel, job: &str) -> Result<(), TopologyError> {
        let name = self.cancelled_queue(job);
        ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| map_err("queue", &name, e))
    }

    /// Whether `job` carries the mark of a cancel; in doubt (the broker did not answer), not.
    pub async fn is_cancelled(&self, conn: &lapin::Connection, job: &str) -> bool {
        queue_exists_on(conn, &self.cancelled_queue(job))
            .await
            .unwrap_or(false)
    }

    /// Whether `job`'s manifest queue is there: the job was announced and not finished or
    /// cancelled since (those delete it).
    pub async fn has_manifest_queue(
        &self,
        conn: &lapin::Connection,
        job: &str,
    ) -> Result<bool, lapin::Error> {
        queue_exists_on(conn, &self.manifest_queue(job)).await
    }

    /// A job's own queues: its results stream, manifest queue and operand stream.
    pub fn job_queues(&self, job: &str) -> [String; 3] {
        [
            self.results_queue(job),
            self.manifest_queue(job),
            self.operands_queue(job),
        ]
    }

    /// Removes a finished job's queues.
    pub async fn delete_job(&self, ch: &Channel, job: &str) -> Result<(), lapin::Error> {
        for q in self.job_queues(job) {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Removes the shared queues and exchanges (tests and `--purge`-style cleanup).
    pub async fn delete_shared(&self, ch: &Channel) -> Result<(), lapin::Error> {
        for q in [
            self.tasks_queue(),
            self.retry_queue(),
            self.parked_queue(),
            self.jobs_queue(),
        ] {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for e in [
            self.tasks_exchange(),
            self.retry_exchange(),
            self.results_exchange(),
            self.events_exchange(),
            self.operands_exchange(),
        ] {
            ch.exchange_delete(e.as_str().into(), Default::default())
                .await?;
        }
        Ok(())
    }
}

/// How many times the broker has already seen this task fail: the `count`s of its `x-death`
/// entries for the task queue with reason `rejected` (our nacks) or `delivery_limit` (crash
/// loops). `redelivered` cannot tell: a message that comes back through the retry queue is a
/// new delivery with `redelivered = false`.
pub fn prior_attempts(props: &BasicProperties, tasks_queue: &str) -> u32 {
    let Some(headers) = props.headers() else {
        return 0;
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return 0;
    };
    let mut total: u64 = 0;
    for death in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = death else {
            continue;
        };
        let t = t.inner();
        let is = |key: &str, want: &[&str]| match t.get(key) {
            Some(AMQPValue::LongString(s)) => want.iter().any(|w| s.as_bytes() == w.as_bytes()),
            Some(AMQPValue::ShortString(s)) => want.contains(&s.as_str()),
            _ => false,
        };
        if is("queue", &[tasks_queue]) && is("reason", &["rejected", "delivery_limit"]) {
            total += match t.get("count") {
                Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
                Some(AMQPValue::LongInt(n)) => (*n).max(0) as u64,
                Some(AMQPValue::LongUInt(n)) => *n as u64,
                _ => 1,
            };
        }
    }
    total.min(u32::MAX as u64) as u32
}

/// Whether the broker refused an operation because the queue does not exist — as opposed to a
/// queue that exists but whose process is not up yet. RabbitMQ answers both with 404 NOT_FOUND:
/// "no queue 'q' in vhost '/'" for the first, and, for a few seconds after it restarts, "home
/// node 'rabbit@host' of durable queue 'q' in vhost '/' is down or inaccessible" for the second.
/// Taking the second for the first would treat a live job as finished and drop its tasks.
pub fn is_queue_missing(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => {
            missing_queue_reply(p.get_id(), &p.get_message().to_string())
        }
        _ => false,
    }
}

/// Whether the broker refused the operation to this user (403 ACCESS_REFUSED): asking again
/// will not help.
pub fn is_access_refused(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 403)
}

/// Whether the broker refused the operation for good: 403 ACCESS_REFUSED, or 406
/// PRECONDITION_FAILED (the queue exists with other arguments). Asking again will not help.
///
/// Not a stream without a running replica on the node asked: RabbitMQ answers a consumer that
/// way (406 too) while the stream's members restart after a node of the cluster is lost, and
/// the same consumer opened a moment later, or on another node, reads on.
pub fn is_refused(e: &lapin::Error) -> bool {
    is_access_refused(e)
        || matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
            if p.get_id() == 406 && !no_local_replica_reply(&p.get_message().to_string()))
}

/// RabbitMQ 3.x says "queue 'q' does not a have a replica on the local node", 3.13 and 4.x
/// "stream queue 'q' in vhost '/' does not have a running replica on the local node".
fn no_local_replica_reply(text: &str) -> bool {
    text.contains("replica on the local node")
}

fn missing_queue_reply(code: u16, text: &str) -> bool {
    code == 404 && text.contains("no queue")
}

/// A string header value, as RabbitMQ writes them.
pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Reads a string header, however it was encoded.
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), text("quorum"));
    t.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    t.insert("x-overflow".into(), text("reject-publish"));
    t
}

fn stream() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), text("stream"));
    t
}

/// AMQP's reply code for a queue that another connection declared exclusive.
const RESOURCE_LOCKED: u16 = 405;

fn plain_quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), text("quorum"));
    t
}

fn map_err(what: &'static str, name: &str, e: lapin::Error) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
        let (name, detail) = (name.to_string(), amqp.get_message().to_string());
        match amqp.get_id() {
            406 => return TopologyError::Mismatch { what, name, detail },
            403 => return TopologyError::Refused { what, name, detail },
            _ => {}
        }
    }
    TopologyError::Broker {
        what,
        name: name.to_string(),
        source: e,
    }
}

/// Whether `queue` exists, asked without declaring it (a passive declare). The broker answers a
/// missing queue with a 404 ([`is_queue_missing`]), which closes the channel it was asked on:
/// use one that may go. Other errors (the connection, a queue still starting) are errors.
pub async fn queue_exists(ch: &Channel, queue: &str) -> Result<bool, lapin::Error> {
    match ch
        .queue_declare(queue.into(), passive(), FieldTable::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_queue_missing(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`queue_exists`], asked on a channel of its own on `conn`, closed afterwards (the broker closes
/// it itself when the queue is missing).
pub async fn queue_exists_on(conn: &lapin::Connection, queue: &str) -> Result<bool, lapin::Error> {
    let ch = conn.create_channel().await?;
    let found = queue_exists(&ch, queue).await?;
    if found {
        let _ = ch.close(200, "checked".into()).await;
    }
    Ok(found)
}

/// A declare that only asks: it fails (closing the channel) if the queue is not there.
fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), TopologyError> {
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(ShortString::from(name), kind, opts, FieldTable::default())
        .await
        .map_err(|e| map_err("exchange", name, e))
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), TopologyError> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| map_err("queue", name, e))
}

async fn bind(ch: &Channel, q: &str, ex: &str, key: &str) -> Result<(), TopologyError> {
    ch.queue_bind(
        q.into(),
        ex.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| map_err("binding of queue", q, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn death(queue: &str, reason: &str, count: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), text(queue));
        t.insert("reason".into(), text(reason));
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn attempts_come_from_the_task_queues_rejections_in_x_death() {
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                death("ns.tasks", "rejected", 2),
                death("ns.retry", "expired", 2),
                death("ns.tasks", "delivery_limit", 1),
                death("other.tasks", "rejected", 5),
            ])),
        );
        let props = BasicProperties::default().with_headers(h);
        assert_eq!(prior_attempts(&props, "ns.tasks"), 3);
        assert_eq!(prior_attempts(&BasicProperties::default(), "ns.tasks"), 0);
    }

    #[test]
    fn names_are_restricted_to_what_reads_well_in_queue_names() {
        assert!(check_name("job-id", "job-2026_11").is_ok());
        for bad in ["", "a.b", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name("job-id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_queue_that_is_not_there_counts_as_missing_not_one_whose_node_is_starting() {
        assert!(missing_queue_reply(
            404,
            "NOT_FOUND - no queue 'ns.job.j.operands' in vhost '/'"
        ));
        assert!(!missing_queue_reply(
            404,
            "NOT_FOUND - home node 'rabbit@localhost' of durable queue 'ns.job.j.operands' in vhost '/' is down or inaccessible"
        ));
        assert!(!missing_queue_reply(406, "PRECONDITION_FAILED - no queue"));
    }

    fn reply(code: u16, text: &str) -> lapin::Error {
        let e = lapin::protocol::AMQPError::from_id(code, text.into()).expect("a reply code");
        lapin::ErrorKind::ProtocolError(e).into()
    }

    #[test]
    fn a_stream_whose_replica_is_restarting_is_asked_again_not_refused_for_good() {
        assert!(is_refused(&reply(
            403,
            "ACCESS_REFUSED - access to queue 'q' refused"
        )));
        assert!(is_refused(&reply(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/'"
        )));
        // RabbitMQ 4, right after the node that led the stream was lost.
        assert!(!is_refused(&reply(
            406,
            "PRECONDITION_FAILED - stream queue 'ns.job.j.results' in vhost '/' does not have a running replica on the local node"
        )));
        assert!(!is_refused(&reply(
            406,
            "PRECONDITION_FAILED - queue 'ns.job.j.results' in vhost '/' does not a have a replica on the local node"
        )));
        assert!(!is_refused(&reply(
            404,
            "NOT_FOUND - no queue 'q' in vhost '/'"
        )));
    }
}
