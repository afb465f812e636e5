//! The worker's heartbeat: its status on the events exchange every interval and on each change
//! of state, read from the same counters the task path updates (so it costs the task path
//! nothing but a few relaxed atomic adds).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gemmq::events::{self, WorkerState, WorkerStatus};
use gemmq::topology::Topology;
use lapin::Channel;

use crate::{Settings, Stats};

pub struct Heartbeat {
    ch: Channel,
    topo: Topology,
    settings: Settings,
    stats: Arc<Stats>,
    started: Instant,
    last: Mutex<(Instant, u64)>,
    host: String,
}

impl Heartbeat {
    pub fn new(
        ch: Channel,
        topo: Topology,
        settings: Settings,
        stats: Arc<Stats>,
        started: Instant,
    ) -> Self {
        Heartbeat {
            ch,
            topo,
            settings,
            stats,
            started,
            last: Mutex::new((Instant::now(), 0)),
            host: gethostname(),
        }
    }

    fn status(&self, state: WorkerState) -> WorkerStatus {
        let s = &self.stats;
        let flops = s.flops.load(Ordering::Relaxed);
        let gflops = {
            let mut last = self
                .last
                .lock()
                .expect("the heartbeat lock is never poisoned");
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            let g = flops.saturating_sub(last.1) as f64 / dt / 1e9;
            *last = (Instant::now(), flops);
            g
        };
        WorkerStatus {
            worker: self.settings.worker_id.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            state,
            queue_size: self.settings.queue_size,
            concurrency: self.settings.concurrency,
            in_flight: s.held.load(Ordering::Relaxed),
            done: s.done.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            retried: s.retried.load(Ordering::Relaxed),
            parked: s.parked.load(Ordering::Relaxed),
            gflops,
            operand_mib: s.operand_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
            operand_rereads: s.operand_rereads.load(Ordering::Relaxed),
            uptime_s: self.started.elapsed().as_secs_f64(),
            heartbeat_ms: self.settings.heartbeat.as_millis() as u64,
            sent_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Publishes the status now; a failure only costs this one heartbeat.
    pub async fn send(&self, state: WorkerState) {
        if let Err(e) = events::publish(&self.ch, &self.topo, &self.status(state)).await {
            tracing::debug!(error = %e, "heartbeat not sent");
        }
    }

    /// Closes the events channel, flushing what was sent.
    pub async fn close(&self) {
        let _ = self.ch.close(200, "worker stopped".into()).await;
    }

    /// Sends `Running` every interval, forever: run it in a task that is aborted with the
    /// connection.
    pub async fn tick(self: Arc<Self>) {
        let mut every =
            tokio::time::interval(self.settings.heartbeat.max(Duration::from_millis(100)));
        loop {
            every.tick().await;
            self.send(WorkerState::Running).await;
        }
    }
}

fn gethostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
