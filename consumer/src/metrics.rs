//! The worker's metrics for Prometheus (`--metrics-addr`): the counters of [`Stats`] that the
//! task path already keeps, read at each scrape, and the histogram of compute time.
//!
//! Every name starts `gemmq_consumer_`; a worker is told apart by Prometheus's `instance` label
//! and by `gemmq_consumer_info{worker=…}`. Task counts are per tile task (a group message of 64
//! tiny tiles counts 64), as the collector's summary counts them; compute time is per message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use gemmq::metrics::{Figures, MetricsServer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::{Settings, Stats};

/// Seconds computing one task message: 100 µs to ~7 min in steps of 4.
#[derive(Debug, Clone)]
pub struct ComputeSeconds(pub Histogram);

impl Default for ComputeSeconds {
    fn default() -> Self {
        ComputeSeconds(Histogram::new(exponential_buckets(1e-4, 4.0, 12)))
    }
}

impl ComputeSeconds {
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Starts the endpoint; it stops when the returned server is dropped.
pub async fn serve(addr: SocketAddr, s: &Settings, stats: &Arc<Stats>) -> Result<MetricsServer> {
    Ok(MetricsServer::start(addr, registry(s, stats)).await?)
}

fn registry(s: &Settings, stats: &Arc<Stats>) -> Registry {
    let mut registry = Registry::with_prefix("gemmq_consumer");
    registry.register_with_unit(
        "compute",
        "Time computing one task message (a task, or a group of tiny tiles)",
        Unit::Seconds,
        stats.compute.0.clone(),
    );
    registry.register_collector(Box::new(Counters {
        stats: stats.clone(),
        worker: s.worker_id.clone(),
        queue_size: s.queue_size,
    }));
    registry
}

#[derive(Debug)]
struct Counters {
    stats: Arc<Stats>,
    worker: String,
    queue_size: u16,
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut f = Figures::new(&mut encoder);
        f.gauges(
            "info",
            "This worker: its id and gemmq's version",
            &[(
                [
                    ("worker", self.worker.as_str()),
                    ("version", env!("CARGO_PKG_VERSION")),
                ],
                1,
            )],
        )?;
        f.counter(
            "tasks_received",
            "Task messages received from the task queue",
            get(&s.received),
        )?;
        f.counter(
            "tasks_done",
            "Tasks computed whose results the broker confirmed",
            get(&s.done),
        )?;
        f.counter(
            "tasks_failed",
            "Task attempts that failed (simulated or real) and will be retried or parked",
            get(&s.failed),
        )?;
        f.counter(
            "tasks_retried",
            "Task messages sent to the retry queue",
            get(&s.retried),
        )?;
        f.counter(
            "tasks_parked",
            "Tasks parked: out of attempts, or malformed",
            get(&s.parked),
        )?;
        f.gauge(
            "tasks_held",
            "Task messages held now (delivered, not yet settled)",
            get(&s.held) as i64,
        )?;
        f.gauge(
            "queue_size",
            "Task messages this worker may hold at once (its prefetch)",
            i64::from(self.queue_size),
        )?;
        f.counter(
            "flops",
            "Floating-point operations of the tiles computed",
            get(&s.flops),
        )?;
        f.counter(
            "results_published",
            "Tile results the broker confirmed",
            get(&s.results_published),
        )?;
        f.counter(
            "result_messages",
            "Messages that carried those results (several tiles to a message)",
            get(&s.result_messages),
        )?;
        f.counter(
            "operand_bytes",
            "Bytes of operand blocks read from the jobs' streams",
            get(&s.operand_bytes),
        )?;
        f.counter(
            "operand_cache_hits",
            "Blocks a task found in memory: cached, read for another task, or brought by the sweep that reads a job's small blocks in one pass",
            get(&s.operand_hits),
        )?;
        f.counter(
            "operand_cache_misses",
            "Reads of one block from a job's stream",
            get(&s.operand_reads),
        )?;
        f.counter(
            "operand_rereads",
            "Of those, blocks read again after the cache had dropped them",
            get(&s.operand_rereads),
        )?;
        f.counter(
            "operand_sweeps",
            "Sweeps started of a job's stream front to back, for its blocks under 1 MiB",
            get(&s.operand_sweeps),
        )?;
        f.counter(
            "reconnects",
            "Connections to the broker after the first",
            get(&s.connections).saturating_sub(1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::config::{BrokerOptions, ConfigFile};

    fn settings() -> Settings {
        let broker = BrokerOptions::default().resolve().unwrap();
        let options = crate::ConsumerOptions {
            worker_id: Some("w-1".into()),
            queue_size: Some(7),
            ..Default::default()
        };
        Settings::resolve(options, &ConfigFile::default(), broker).unwrap()
    }

    #[test]
    fn every_figure_the_issue_names_is_exposed_with_its_value() {
        let stats = Arc::new(Stats::default());
        stats.done.store(12, Ordering::Relaxed);
        stats.failed.store(3, Ordering::Relaxed);
        stats.retried.store(3, Ordering::Relaxed);
        stats.parked.store(1, Ordering::Relaxed);
        stats.operand_bytes.store(4096, Ordering::Relaxed);
        stats.operand_hits.store(20, Ordering::Relaxed);
        stats.operand_reads.store(4, Ordering::Relaxed);
        stats.operand_sweeps.store(2, Ordering::Relaxed);
        stats.results_published.store(12, Ordering::Relaxed);
        stats.connections.store(3, Ordering::Relaxed);
        stats.compute.observe(std::time::Duration::from_millis(30));
        let text = gemmq::metrics::render(&registry(&settings(), &stats));
        for line in [
            "gemmq_consumer_info{worker=\"w-1\",version=\"",
            "gemmq_consumer_tasks_done_total 12\n",
            "gemmq_consumer_tasks_failed_total 3\n",
            "gemmq_consumer_tasks_retried_total 3\n",
            "gemmq_consumer_tasks_parked_total 1\n",
            "gemmq_consumer_queue_size 7\n",
            "gemmq_consumer_operand_bytes_total 4096\n",
            "gemmq_consumer_operand_cache_hits_total 20\n",
            "gemmq_consumer_operand_cache_misses_total 4\n",
            "gemmq_consumer_operand_sweeps_total 2\n",
            "gemmq_consumer_results_published_total 12\n",
            "gemmq_consumer_reconnects_total 2\n",
            "gemmq_consumer_compute_seconds_count 1\n",
            "gemmq_consumer_compute_seconds_bucket{le=\"0.0256\"} 0\n",
            "gemmq_consumer_compute_seconds_bucket{le=\"0.1024\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_worker_that_never_connected_reports_no_reconnects() {
        let text = gemmq::metrics::render(&registry(&settings(), &Arc::new(Stats::default())));
        assert!(
            text.contains("gemmq_consumer_reconnects_total 0\n"),
            "{text}"
        );
    }
}
