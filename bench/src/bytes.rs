//! Bytes a job sends through the broker, computed from its plan.
//!
//! Every task is one message: a frame prefix, its JSON header and rows×depth + depth×cols
//! elements; every result is a prefix, a header and rows×cols elements. Task headers are encoded
//! here exactly as the producer encodes them; result headers vary by a few bytes with the worker
//! id and the compute time, so they are encoded with a representative one. AMQP framing and
//! message properties are not counted; neither are retries or duplicates (the summary counts
//! those, and a benchmark run should have none).

use gemmq::Plan;
use gemmq::message::{self, Header, ResultHeader, TaskHeader};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct BrokerBytes {
    /// How the figures were obtained.
    pub source: &'static str,
    pub task_bytes: u64,
    pub result_bytes: u64,
    pub total_bytes: u64,
    /// A + B + C once each: what any distribution of the work must move at least.
    pub minimum_bytes: u64,
    /// total / minimum.
    pub ratio_to_minimum: f64,
    /// Task MiB from the producer's `all tasks published and confirmed ... mib=` log line, as a
    /// cross-check of `task_bytes` (None when the line was not found).
    pub producer_log_task_mib: Option<f64>,
}

pub fn from_plan(plan: &Plan, job: &str, worker: &str) -> BrokerBytes {
    let size = plan.dtype.size() as u64;
    let (mut tasks, mut results) = (0u64, 0u64);
    for tile in plan.task_ids() {
        let rows = plan.rows(tile.row).len() as u32;
        let cols = plan.cols(tile.col).len() as u32;
        let depth = plan.depth(tile.part).len() as u32;
        let task = Header::Task(TaskHeader {
            job: job.into(),
            tile,
            dtype: plan.dtype,
            rows,
            cols,
            depth,
        });
        let (r, c, d) = (rows as u64, cols as u64, depth as u64);
        tasks += message::encode(&task, &[]).len() as u64 + (r * d + d * c) * size;
        let result = Header::Result(ResultHeader {
            job: job.into(),
            tile,
            dtype: plan.dtype,
            rows,
            cols,
            worker: worker.into(),
            attempt: 1,
            compute_micros: 12_345,
        });
        results += message::encode(&result, &[]).len() as u64 + r * c * size;
    }
    let minimum = (plan.m * plan.k + plan.k * plan.n + plan.m * plan.n) * size;
    BrokerBytes {
        source: "plan (task headers exact, result headers ±a few bytes each)",
        task_bytes: tasks,
        result_bytes: results,
        total_bytes: tasks + results,
        minimum_bytes: minimum,
        ratio_to_minimum: (tasks + results) as f64 / minimum as f64,
        producer_log_task_mib: None,
    }
}

/// The value of `key=` in a `tracing` log line.
pub fn log_field(line: &str, key: &str) -> Option<f64> {
    let needle = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&needle))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::DType;

    #[test]
    fn one_tile_without_split_moves_a_b_and_c_once_plus_headers() {
        let plan = Plan::new(64, 64, 64, DType::F64, 64, 16 << 20).unwrap();
        let b = from_plan(&plan, "j", "w");
        assert_eq!(b.minimum_bytes, 3 * 64 * 64 * 8);
        assert!(b.total_bytes > b.minimum_bytes && b.total_bytes < b.minimum_bytes + 1024);
    }

    #[test]
    fn tiles_resend_blocks_of_a_and_b() {
        // 4×4 tiles: every block-row of A goes to 4 tasks, every block-column of B to 4.
        let plan = Plan::new(256, 256, 256, DType::F32, 64, 16 << 20).unwrap();
        let b = from_plan(&plan, "j", "w");
        let elems = 256 * 256;
        assert!(b.task_bytes >= (4 * elems + 4 * elems) * 4);
        assert!(b.ratio_to_minimum > 3.0);
    }

    #[test]
    fn log_fields_are_read_from_tracing_lines() {
        let line = "2026-01-01T00:00:00Z  INFO all tasks published and confirmed job=x tasks=16 mib=128.5 seconds=0.7";
        assert_eq!(log_field(line, "mib"), Some(128.5));
        assert_eq!(log_field(line, "tasks"), Some(16.0));
        assert_eq!(log_field(line, "nope"), None);
    }
}
