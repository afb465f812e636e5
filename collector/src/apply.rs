//! What the collector does with one message from a job's results queue: apply it to C once,
//! drop it as a duplicate, or reject it, and say which. No broker here: the decisions are
//! tested on their own below, and `collect` only moves messages and acks them.

use gemmq::assembly::{Applied, Assembly, AssemblyError};
use gemmq::message::{self, Header, Manifest, ResultHeader};
use tracing::{error, info, warn};

use crate::web::Live;

/// Applies one message to C: how many tiles of it were rejected (and dropped); duplicates and
/// applied tiles count 0. A disk error is returned: the message must not be acked.
pub(crate) fn apply(
    asm: &mut Assembly,
    manifest: &Manifest,
    data: &[u8],
    limit: u64,
    live: Option<&Live>,
) -> Result<u64, AssemblyError> {
    let frame = match message::decode(data, limit) {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "malformed message on the results queue dropped");
            return Ok(1);
        }
    };
    if frame.header.job() != manifest.job {
        warn!(job = %frame.header.job(), expected = %manifest.job, "message for another job on this job's results queue dropped");
        return Ok(1);
    }
    // A task left over from an earlier job under the same id (a duplicate still queued when
    // that job's queues were deleted) was computed from that job's inputs. An empty run is a
    // gemmq that named none: taken as before.
    let run = frame.header.run();
    if message::other_run(run, &manifest.run) {
        warn!(job = %manifest.job, %run, expected = %manifest.run, "message of another run of this job id (a task left over from an earlier job) dropped");
        return Ok(1);
    }
    match &frame.header {
        Header::TileResult(h) => apply_result(asm, h, frame.payload, live),
        Header::ResultBatch(batch) => {
            let mut rejected = 0;
            for (h, bytes) in batch.results(frame.payload) {
                rejected += apply_result(asm, &h, bytes, live)?;
            }
            Ok(rejected)
        }
        Header::Parked(n) => match asm.apply_parked(n) {
            Ok(Applied::Duplicate) => {
                info!(tile = %n.tile, "duplicate dropped (already assembled)");
                Ok(0)
            }
            Ok(Applied::Parked) => {
                if let Some(live) = live {
                    live.parked(n.tile);
                }
                error!(
                    tile = %n.tile, attempts = n.attempts, reason = %n.reason, worker = %n.worker,
                    "tile parked: it will not be computed"
                );
                Ok(0)
            }
            Ok(_) => Ok(0),
            Err(e) => rejected_or_fatal(e),
        },
        Header::Failed(n) => {
            asm.apply_failure(n);
            Ok(0)
        }
        Header::InlineTask(_)
        | Header::StreamedTask(_)
        | Header::TaskGroup(_)
        | Header::Operand(_)
        | Header::JobDone(_) => {
            warn!("a task, operand block or job notice on the results queue dropped");
            Ok(1)
        }
    }
}

fn apply_result(
    asm: &mut Assembly,
    h: &ResultHeader,
    bytes: &[u8],
    live: Option<&Live>,
) -> Result<u64, AssemblyError> {
    match asm.apply_result(h, bytes) {
        Ok(Applied::Duplicate) => {
            info!(tile = %h.tile, "duplicate dropped (already assembled)");
            Ok(0)
        }
        Ok(_) => {
            if let Some(live) = live {
                live.task(h.tile, &h.worker, h.attempt, h.recompute);
            }
            tracing::debug!(tile = %h.tile, worker = %h.worker, attempt = h.attempt, "result assembled");
            Ok(0)
        }
        Err(e) => rejected_or_fatal(e),
    }
}

/// A message the plan cannot take is dropped (counted as rejected); a disk error stops us.
fn rejected_or_fatal(e: AssemblyError) -> Result<u64, AssemblyError> {
    if e.is_bad_message() {
        warn!(error = %e, "result rejected");
        Ok(1)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::{BlockId, Inputs, Manifest, OperandHeader, Side};
    use gemmq::{DType, Plan, TileId};

    const LIMIT: u64 = 1 << 20;

    /// A 16×16 job of four 8×8 tiles, run "r1", assembled in a fresh checkpoint.
    fn job(dir: &std::path::Path) -> (Manifest, Assembly) {
        let plan = Plan::new(16, 4, 16, DType::F64, 8, LIMIT).unwrap();
        let asm = Assembly::open(&plan, "j", "r1", dir).unwrap();
        let manifest = Manifest {
            version: message::VERSION,
            job: "j".into(),
            plan,
            inputs: Inputs::Seed(1),
            created_ms: 0,
            run: "r1".into(),
            check: None,
        };
        (manifest, asm)
    }

    fn result(job: &str, run: &str, tile: TileId) -> Vec<u8> {
        let h = ResultHeader {
            job: job.into(),
            run: run.into(),
            tile,
            dtype: DType::F64,
            rows: 8,
            cols: 8,
            worker: "w1".into(),
            attempt: 1,
            compute_micros: 1,
            recompute: 0,
        };
        message::encode(&Header::TileResult(h), &[&[0u8; 8 * 8 * 8]])
    }

    fn tile(row: u32, col: u32) -> TileId {
        TileId { row, col, part: 0 }
    }

    #[test]
    fn a_result_is_applied_once_and_its_duplicate_is_dropped_without_rejection() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, mut asm) = job(dir.path());
        let msg = result("j", "r1", tile(0, 1));
        assert_eq!(apply(&mut asm, &manifest, &msg, LIMIT, None).unwrap(), 0);
        assert_eq!(asm.tasks_done(), 1);
        assert_eq!(apply(&mut asm, &manifest, &msg, LIMIT, None).unwrap(), 0);
        assert_eq!((asm.tasks_done(), asm.duplicates), (1, 1));
    }

    #[test]
    fn messages_that_do_not_belong_are_rejected_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, mut asm) = job(dir.path());
        let operand = message::encode(
            &Header::Operand(OperandHeader {
                job: "j".into(),
                run: "r1".into(),
                block: BlockId {
                    side: Side::A,
                    index: 0,
                    part: 0,
                },
                dtype: DType::F64,
                rows: 8,
                cols: 4,
            }),
            &[&[0u8; 8 * 4 * 8]],
        );
        let outside = manifest.plan.col_blocks();
        for (what, msg) in [
            ("garbage", b"not a gemmq message".to_vec()),
            ("another job", result("other", "r1", tile(0, 0))),
            ("another run of this job", result("j", "r0", tile(0, 0))),
            ("an operand block", operand),
            (
                "a tile outside the plan",
                result("j", "r1", tile(0, outside)),
            ),
        ] {
            assert_eq!(
                apply(&mut asm, &manifest, &msg, LIMIT, None).unwrap(),
                1,
                "{what} is rejected"
            );
        }
        assert_eq!((asm.tasks_done(), asm.duplicates), (0, 0));
    }

    #[test]
    fn a_result_without_a_run_is_taken_as_from_an_older_gemmq() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, mut asm) = job(dir.path());
        assert_eq!(
            apply(
                &mut asm,
                &manifest,
                &result("j", "", tile(1, 1)),
                LIMIT,
                None
            )
            .unwrap(),
            0
        );
        assert_eq!(asm.tasks_done(), 1);
    }
}
