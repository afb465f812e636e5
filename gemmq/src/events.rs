//! Worker status events: small JSON heartbeats that anyone may watch and nobody has to.
//!
//! Each consumer publishes a [`WorkerStatus`] to the `{ns}.events` fanout exchange every heartbeat
//! interval and whenever its state changes. The messages are transient and unconfirmed, so they
//! never slow the task path; an exchange with no queue bound drops them, so they never pile up.
//! A watcher binds its own exclusive, auto-deleted queue with a short message TTL and a length
//! cap, and forgets a worker that misses [`EXPIRE_AFTER`] heartbeats: a killed worker drops out of
//! the view within that time, a worker that stops cleanly at once.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use serde::{Deserialize, Serialize};

use crate::topology::Topology;

/// Heartbeats a watcher may miss before it forgets a worker.
pub const EXPIRE_AFTER: u32 = 3;
/// The default interval between heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Running,
    /// Finishing or returning its tasks after SIGTERM.
    Stopping,
    Stopped,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker: String,
    pub host: String,
    pub pid: u32,
    pub state: WorkerState,
    /// The prefetch: tasks this worker may hold.
    pub queue_size: u16,
    pub concurrency: usize,
    /// Tasks held now (received, not yet settled).
    pub in_flight: u64,
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    pub parked: u64,
    /// Multiplication speed over the last interval.
    pub gflops: f64,
    /// Operand blocks read from jobs' streams, in MiB, and how many were read again after the
    /// cache dropped them (many re-reads: raise `--operand-cache`). Absent from older workers.
    #[serde(default)]
    pub operand_mib: f64,
    #[serde(default)]
    pub operand_rereads: u64,
    pub uptime_s: f64,
    /// The interval this worker promises, so watchers know when it is overdue.
    pub heartbeat_ms: u64,
    /// Milliseconds since the Unix epoch when this was sent.
    pub sent_ms: u64,
}

impl WorkerStatus {
    /// Whether a watcher should still show this worker at `now_ms`.
    pub fn is_alive(&self, now_ms: u64) -> bool {
        self.state != WorkerState::Stopped
            && now_ms.saturating_sub(self.sent_ms)
                <= self.heartbeat_ms.max(100) * EXPIRE_AFTER as u64
    }
}

/// Publishes a status without waiting for anything.
pub async fn publish(
    ch: &Channel,
    topo: &Topology,
    status: &WorkerStatus,
) -> Result<(), lapin::Error> {
    let body = serde_json::to_vec(status).expect("a status is plain data");
    let props = BasicProperties::default()
        .with_delivery_mode(1)
        .with_content_type("application/json".into())
        .with_type("gemmq.worker-status".into())
        // Old news is useless: a status nobody reads within a few heartbeats expires.
        .with_expiration(
            (status.heartbeat_ms * EXPIRE_AFTER as u64)
                .to_string()
                .into(),
        );
    ch.basic_publish(
        topo.events_exchange().as_str().into(),
        "".into(),
        BasicPublishOptions::default(),
        &body,
        props,
    )
    .await
    .map(|_| ())
}

/// Subscribes to the events with a private queue that goes away with the channel.
pub async fn subscribe(ch: &Channel, topo: &Topology) -> Result<Consumer, lapin::Error> {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(10_000));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(10_000));
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        topo.events_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.basic_consume(
        q.name().clone(),
        "gemmq-status".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// Parses a status, ignoring anything that is not one.
pub fn parse(body: &[u8]) -> Option<WorkerStatus> {
    if body.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_from_a_worker_without_operand_figures_still_reads() {
        let older = r#"{"worker":"w1","host":"h","pid":7,"state":"running","queue_size":10,
            "concurrency":1,"in_flight":2,"done":5,"failed":0,"retried":0,"parked":0,
            "gflops":1.5,"uptime_s":3.0,"heartbeat_ms":2000,"sent_ms":1}"#;
        let status: WorkerStatus = serde_json::from_str(older).expect("older heartbeats read");
        assert_eq!((status.done, status.operand_rereads), (5, 0));
        assert_eq!(status.operand_mib, 0.0);
    }
}
