//! Bytes a job sends through the broker.
//!
//! Into the broker, computed from the job's plan: what the producer publishes — with inline
//! operands one message per task carrying rows×depth + depth×cols elements; with streamed
//! operands every block of A and B once on the job's stream plus a header-only task per tile —
//! and one result per task of rows×cols elements. Headers are encoded here as the programs encode
//! them (result headers vary by a few bytes with the worker id and compute time). AMQP framing and
//! properties are not counted, nor retries and duplicates (a benchmark run should have none).
//!
//! Out of the broker to the workers, measured: the consumers' connections' `send_oct` in the
//! management API (AMQP framing included), which is where streamed operands cost — every
//! worker reads the stream.

use gemmq::Plan;
use gemmq::message::{self, Header, OperandHeader, ResultHeader, TaskGroup, TaskHeader};
use gemmq::tiling::Operands;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct BrokerBytes {
    /// How the figures were obtained.
    pub source: &'static str,
    pub operands: Operands,
    /// What the producer publishes: tasks, and with streamed operands the blocks of A and B.
    pub producer_bytes: u64,
    /// What the consumers publish: one result per task.
    pub result_bytes: u64,
    /// producer + results: every byte the broker takes in (and stores: all are persistent).
    pub total_bytes: u64,
    /// A + B + C once each: what any distribution of the work must move at least.
    pub minimum_bytes: u64,
    /// total / minimum.
    pub ratio_to_minimum: f64,
    /// MiB from the producer's `all tasks published and confirmed ... mib=` log line, a
    /// cross-check of `producer_bytes` (None when the line was not found).
    pub producer_log_mib: Option<f64>,
    /// Bytes the broker sent to all consumers (tasks, stream blocks, framing): the sum of their
    /// connections' `send_oct` from the management API, read after the job. None when the
    /// management API did not answer.
    pub consumers_received_bytes: Option<u64>,
    /// Bytes the consumers sent the broker (results, acks, framing): their `recv_oct`.
    pub consumers_sent_bytes: Option<u64>,
}

fn frame_len(h: &Header, payload: u64) -> u64 {
    message::encode(h, &[]).len() as u64 + payload
}

/// The bytes of `plan`'s job when the producer puts `group` tasks in a message.
pub fn from_plan(plan: &Plan, group: u64, job: &str, worker: &str) -> BrokerBytes {
    let size = plan.dtype.size() as u64;
    let (mut produced, mut results) = (0u64, 0u64);
    // Runs are always 16 hex digits: any one has the programs' header size.
    let run = gemmq::message::run_of(&[job.as_bytes()]);
    if plan.operands == Operands::Stream {
        for block in plan.operand_ids() {
            let (rows, cols) = plan.block_shape(block);
            let (rows, cols) = (rows.len(), cols.len());
            let h = Header::Operand(OperandHeader {
                job: job.into(),
                run: run.clone(),
                block,
                dtype: plan.dtype,
                rows: rows as u32,
                cols: cols as u32,
            });
            produced += frame_len(&h, plan.block_bytes(block));
        }
    }
    let tiles: Vec<_> = plan.task_ids().collect();
    for chunk in tiles.chunks(group.max(1) as usize) {
        let tasks: Vec<TaskHeader> = chunk.iter().map(|&t| plan.task(job, &run, t)).collect();
        produced += match (plan.operands, tasks.as_slice()) {
            (Operands::Inline, [task]) => {
                let (r, c, d) = (task.rows as u64, task.cols as u64, task.depth as u64);
                frame_len(&Header::InlineTask(task.clone()), (r * d + d * c) * size)
            }
            (_, [task]) => frame_len(&Header::StreamedTask(task.clone()), 0),
            _ => frame_len(
                &Header::TaskGroup(TaskGroup::of(&tasks).expect("chunks are never empty")),
                0,
            ),
        };
    }
    for tile in plan.task_ids() {
        let rows = plan.rows(tile.row).len() as u32;
        let cols = plan.cols(tile.col).len() as u32;
        let (r, c) = (rows as u64, cols as u64);
        let result = Header::TileResult(ResultHeader {
            job: job.into(),
            run: run.clone(),
            tile,
            dtype: plan.dtype,
            rows,
            cols,
            worker: worker.into(),
            attempt: 1,
            compute_micros: 12_345,
            recompute: 0,
        });
        results += frame_len(&result, r * c * size);
    }
    let minimum = (plan.m * plan.k + plan.k * plan.n + plan.m * plan.n) * size;
    BrokerBytes {
        source: "into the broker: from the plan (headers encoded as the programs do; result headers ±a few bytes); to the workers: management API send_oct",
        operands: plan.operands,
        producer_bytes: produced,
        result_bytes: results,
        total_bytes: produced + results,
        minimum_bytes: minimum,
        ratio_to_minimum: (produced + results) as f64 / minimum as f64,
        producer_log_mib: None,
        consumers_received_bytes: None,
        consumers_sent_bytes: None,
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

    fn plan(n: u64, dtype: DType, tile: u64, operands: Operands) -> Plan {
        Plan::with_operands(n, n, n, dtype, tile, 16 << 20, operands).unwrap()
    }

    #[test]
    fn one_tile_without_split_moves_a_b_and_c_once_plus_headers() {
        for op in [Operands::Inline, Operands::Stream] {
            let b = from_plan(&plan(64, DType::F64, 64, op), 1, "j", "w");
            assert_eq!(b.minimum_bytes, 3 * 64 * 64 * 8);
            assert!(b.total_bytes > b.minimum_bytes && b.total_bytes < b.minimum_bytes + 2048);
        }
    }

    #[test]
    fn inline_tasks_resend_blocks_and_streamed_ones_do_not() {
        // 4×4 tiles: inline, every block-row of A goes to 4 tasks, every block-column of B to 4.
        let inline = from_plan(&plan(256, DType::F32, 64, Operands::Inline), 1, "j", "w");
        let elems = 256 * 256;
        assert!(inline.producer_bytes >= (4 * elems + 4 * elems) * 4);
        assert!(inline.ratio_to_minimum > 3.0);
        let stream = from_plan(&plan(256, DType::F32, 64, Operands::Stream), 1, "j", "w");
        assert!(stream.producer_bytes >= 2 * elems * 4);
        assert!(stream.ratio_to_minimum < 1.1, "{stream:?}");
    }

    #[test]
    fn grouped_tasks_take_fewer_bytes_than_one_message_each() {
        let plan = plan(256, DType::F64, 16, Operands::Stream);
        let single = from_plan(&plan, 1, "j", "w");
        let grouped = from_plan(&plan, 16, "j", "w");
        assert!(
            grouped.producer_bytes < single.producer_bytes,
            "{grouped:?}"
        );
        assert_eq!(grouped.result_bytes, single.result_bytes);
    }

    #[test]
    fn log_fields_are_read_from_tracing_lines() {
        let line = "2026-01-01T00:00:00Z  INFO all tasks published and confirmed job=x tasks=16 mib=128.5 seconds=0.7";
        assert_eq!(log_field(line, "mib"), Some(128.5));
        assert_eq!(log_field(line, "tasks"), Some(16.0));
        assert_eq!(log_field(line, "nope"), None);
    }
}
