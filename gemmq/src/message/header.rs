//! Every kind of header a frame can carry, and the payload each one implies: decoding checks a
//! payload's length against these before anything is allocated.

use serde::{Deserialize, Serialize};

use super::{BlockId, DType, MessageError, TileId};

/// A finished job, announced by its collector on the operands exchange once the job's queues are
/// deleted: workers drop the blocks they cached for it. No payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDone {
    pub job: String,
    /// The run that is done ([`Manifest::run`](super::Manifest::run)): a later run under the same id keeps its blocks.
    #[serde(default)]
    pub run: String,
}

/// One block of A or B on the job's operand stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperandHeader {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)): a cached block of another run is not this one.
    #[serde(default)]
    pub run: String,
    pub block: BlockId,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
}

/// What a consumer needs to compute one tile: `A[row0.., k0..] · B[k0.., col0..]`.: `A[row0.., k0..] · B[k0.., col0..]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskHeader {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)), so that a worker never computes it with blocks it
    /// cached for an earlier job under the same id.
    #[serde(default)]
    pub run: String,
    pub tile: TileId,
    pub dtype: DType,
    /// Rows of the A block and of the C tile.
    pub rows: u32,
    /// Columns of the B block and of the C tile.
    pub cols: u32,
    /// Columns of the A block = rows of the B block (the slice of k).
    pub depth: u32,
    /// Where the task's A and B blocks are on the job's operand stream, at the earliest: their
    /// places in the order the producer publishes blocks, which are their offsets unless some
    /// were published twice (after a lost connection), which only moves a block further on.
    /// A worker reads just those messages. Absent for inline tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<[u64; 2]>,
    /// Nonzero for a task the collector published again because its tile failed verification:
    /// the round of recomputing, which the result carries back so that it may replace the
    /// wrong tile (first-result-wins would drop it). Absent on the wire when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recompute: u32,
}

/// Several streamed tasks of one job in one message: the unit of delivery, retry and
/// acknowledgement, while each tile still gets its own result. Tiny tiles travel this way
/// (like Celery's chunks): the broker spends ~0.25 ms of CPU on every message through a quorum
/// queue, ten times what a 16×16 tile costs to multiply. No payload: the blocks are on the
/// job's operand stream, as for a [`Header::StreamedTask`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskGroup {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)).
    #[serde(default)]
    pub run: String,
    pub dtype: DType,
    pub tasks: Vec<GroupedTask>,
}

/// One task of a [`TaskGroup`]: a [`TaskHeader`] without the fields the group shares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupedTask {
    pub tile: TileId,
    pub rows: u32,
    pub cols: u32,
    pub depth: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<[u64; 2]>,
}

/// The most tasks one [`TaskGroup`] may hold: ~70 bytes of JSON each keeps the header (~18 KiB)
/// within [`MAX_HEADER_BYTES`](super::MAX_HEADER_BYTES), and a group of tiny tiles' results go
/// back as one result batch. 256 (a rectangle of 16 × 16 tiles) rather than 64: the 16,384
/// tiles of 16² of a 2048³ job travel as 64 messages instead of 256, and the broker's, the
/// workers' and the collector's cost per message is shared four times as widely: ~17,500 →
/// ~21,000 tiles/s on 2 cores in one hour's alternating runs, not in every phase of the machine
/// (BENCHMARKS.md). Workers built before this park larger groups as malformed.
pub const MAX_GROUP: usize = 256;

impl TaskGroup {
    /// Groups streamed tasks of one job and run (the caller's to ensure).
    pub fn of(tasks: &[TaskHeader]) -> Option<TaskGroup> {
        let first = tasks.first()?;
        Some(TaskGroup {
            job: first.job.clone(),
            run: first.run.clone(),
            dtype: first.dtype,
            tasks: tasks
                .iter()
                .map(|t| GroupedTask {
                    tile: t.tile,
                    rows: t.rows,
                    cols: t.cols,
                    depth: t.depth,
                    at: t.at,
                })
                .collect(),
        })
    }

    /// Each task as a single one.
    pub fn tasks(&self) -> impl Iterator<Item = TaskHeader> + '_ {
        self.tasks.iter().map(|t| TaskHeader {
            job: self.job.clone(),
            run: self.run.clone(),
            tile: t.tile,
            dtype: self.dtype,
            rows: t.rows,
            cols: t.cols,
            depth: t.depth,
            at: t.at,
            recompute: 0,
        })
    }
}

/// A computed tile (or a partial product when k is split).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultHeader {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)): the collector drops results of another run.
    #[serde(default)]
    pub run: String,
    pub tile: TileId,
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
    pub worker: String,
    /// 1 for the first try; read from the broker's x-death count.
    pub attempt: u32,
    pub compute_micros: u64,
    /// The task's [`TaskHeader::recompute`] round: nonzero for a tile computed again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recompute: u32,
}

/// Several computed tiles in one message: the results a worker had ready at the same moment.
///
/// Each task is still its own message, delivered, retried and acked on its own; only the way
/// back is shared. A small tile's result is a few kilobytes, and the broker's cost per message
/// (~0.1 ms of CPU through a quorum queue) would otherwise dominate it. The payload is the
/// tiles' bytes one after another, in `tiles` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultBatch {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)): the collector drops results of another run.
    #[serde(default)]
    pub run: String,
    pub dtype: DType,
    pub worker: String,
    pub tiles: Vec<BatchedTile>,
}

/// One tile of a [`ResultBatch`]: a [`ResultHeader`] without the fields the batch shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchedTile {
    pub tile: TileId,
    pub rows: u32,
    pub cols: u32,
    pub attempt: u32,
    pub compute_micros: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recompute: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ResultBatch {
    /// Each tile as a single result with its bytes. `payload` is the one `decode` checked
    /// against this header.
    pub fn results<'a>(
        &'a self,
        payload: &'a [u8],
    ) -> impl Iterator<Item = (ResultHeader, &'a [u8])> + 'a {
        let size = self.dtype.size();
        let mut rest = payload;
        self.tiles.iter().map(move |t| {
            let (bytes, tail) = rest.split_at(t.rows as usize * t.cols as usize * size);
            rest = tail;
            let h = ResultHeader {
                job: self.job.clone(),
                run: self.run.clone(),
                tile: t.tile,
                dtype: self.dtype,
                rows: t.rows,
                cols: t.cols,
                worker: self.worker.clone(),
                attempt: t.attempt,
                compute_micros: t.compute_micros,
                recompute: t.recompute,
            };
            (h, bytes)
        })
    }
}

/// Tells the collector that a tile will never come: its task was parked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkedNotice {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)): the collector drops results of another run.
    #[serde(default)]
    pub run: String,
    pub tile: TileId,
    pub reason: String,
    pub attempts: u32,
    pub worker: String,
}

/// Tells the collector that an attempt failed and the task will be retried, so the job's
/// report can say which worker failed how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureNotice {
    pub job: String,
    /// The job's run ([`Manifest::run`](super::Manifest::run)): the collector drops results of another run.
    #[serde(default)]
    pub run: String,
    pub tile: TileId,
    pub reason: String,
    pub attempt: u32,
    pub worker: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Header {
    /// A task that carries its blocks of A and B as its payload (`--operands inline`).
    #[serde(rename = "task")]
    InlineTask(TaskHeader),
    /// One tile's product.
    #[serde(rename = "result")]
    TileResult(ResultHeader),
    Parked(ParkedNotice),
    Failed(FailureNotice),
    /// A task whose blocks are on the job's operand stream: A's (tile.row, tile.part) and B's
    /// (tile.part, tile.col). No payload.
    #[serde(rename = "task_ref")]
    StreamedTask(TaskHeader),
    Operand(OperandHeader),
    /// Several tiles' products that were ready at the same moment.
    #[serde(rename = "results")]
    ResultBatch(ResultBatch),
    JobDone(JobDone),
    /// Several tasks like `StreamedTask`, delivered, retried and acknowledged together.
    #[serde(rename = "tasks")]
    TaskGroup(TaskGroup),
}

impl Header {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Header::InlineTask(_) => "task",
            Header::TileResult(_) => "result",
            Header::Parked(_) => "parked",
            Header::Failed(_) => "failure notice",
            Header::StreamedTask(_) => "task reference",
            Header::Operand(_) => "operand block",
            Header::ResultBatch(_) => "result batch",
            Header::JobDone(_) => "job done",
            Header::TaskGroup(_) => "task group",
        }
    }

    /// The job the message belongs to, and its run (empty from a gemmq that named none).
    fn job_and_run(&self) -> (&str, &str) {
        let (job, run) = match self {
            Header::InlineTask(h) | Header::StreamedTask(h) => (&h.job, &h.run),
            Header::TileResult(h) => (&h.job, &h.run),
            Header::Parked(h) => (&h.job, &h.run),
            Header::Failed(h) => (&h.job, &h.run),
            Header::Operand(h) => (&h.job, &h.run),
            Header::ResultBatch(h) => (&h.job, &h.run),
            Header::JobDone(h) => (&h.job, &h.run),
            Header::TaskGroup(h) => (&h.job, &h.run),
        };
        (job, run)
    }

    pub fn job(&self) -> &str {
        self.job_and_run().0
    }

    /// The run of the job the message belongs to; empty from a gemmq that named none.
    pub fn run(&self) -> &str {
        self.job_and_run().1
    }

    /// Names end up in queue names, logs and the collector's journal: only plain ones pass.
    pub(super) fn check_names(&self) -> Result<(), MessageError> {
        let job_ok = |j: &str| {
            !j.is_empty()
                && j.len() <= 64
                && j.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let worker = match self {
            Header::TileResult(h) => Some(&h.worker),
            Header::Parked(h) => Some(&h.worker),
            Header::Failed(h) => Some(&h.worker),
            Header::ResultBatch(h) => Some(&h.worker),
            _ => None,
        };
        if !job_ok(self.job()) {
            return Err(MessageError::Header(format!(
                "job id {:?} is not 1-64 of A-Z a-z 0-9 - _",
                self.job()
            )));
        }
        if let Some(w) = worker
            && !(!w.is_empty() && w.len() <= 128 && w.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(MessageError::Header(format!(
                "worker id {w:?} is not 1-128 printable characters"
            )));
        }
        Ok(())
    }

    /// The payload length the header's dimensions imply, refusing sizes over `limit` before
    /// anything is multiplied out in memory.
    pub(super) fn payload_len(&self, limit: u64) -> Result<u64, MessageError> {
        match self {
            Header::InlineTask(h) => dense_len(h.rows, h.cols, Some(h.depth), h.dtype, limit),
            Header::TileResult(h) => dense_len(h.rows, h.cols, None, h.dtype, limit),
            Header::Operand(h) => dense_len(h.rows, h.cols, None, h.dtype, limit),
            Header::StreamedTask(h) => {
                check_task_ref(h.rows, h.cols, h.depth, h.dtype, limit)?;
                Ok(0)
            }
            Header::TaskGroup(g) => g.check(limit).map(|()| 0),
            Header::Parked(_) | Header::Failed(_) | Header::JobDone(_) => Ok(0),
            Header::ResultBatch(b) => b.payload_len(limit),
        }
    }
}

impl TaskGroup {
    /// 1 to [`MAX_GROUP`] sane tasks whose results fit one message together.
    fn check(&self, limit: u64) -> Result<(), MessageError> {
        if self.tasks.is_empty() || self.tasks.len() > MAX_GROUP {
            return Err(MessageError::Dimensions(
                format!("{} tasks", self.tasks.len()),
                format!("a task group holds 1 to {MAX_GROUP}"),
            ));
        }
        let mut results = 0u64;
        for t in &self.tasks {
            check_task_ref(t.rows, t.cols, t.depth, self.dtype, limit)?;
            results += t.rows as u64 * t.cols as u64 * self.dtype.size() as u64;
        }
        // What a worker holds for one group: its results fit one message, as one big
        // task's would (u32² × 8 × 64 fits in u64).
        if results > limit.saturating_sub(crate::tiling::HEADER_BUDGET) {
            return Err(MessageError::Dimensions(
                format!("{} tasks", self.tasks.len()),
                format!("their results would exceed {limit} bytes"),
            ));
        }
        Ok(())
    }
}

impl ResultBatch {
    /// The tiles' bytes one after another: each tile non-empty, all within the limit.
    fn payload_len(&self, limit: u64) -> Result<u64, MessageError> {
        if self.tiles.is_empty() {
            return Err(MessageError::Dimensions(
                "0 tiles".into(),
                "a result batch holds at least one tile".into(),
            ));
        }
        let size = self.dtype.size() as u64;
        let mut total = 0u64;
        for t in &self.tiles {
            if t.rows == 0 || t.cols == 0 {
                return Err(MessageError::Dimensions(
                    format!("{}x{} ({})", t.rows, t.cols, t.tile),
                    "a dimension is zero".into(),
                ));
            }
            // u32 × u32 fits in u64; × the element size and the sum might not.
            total = (t.rows as u64 * t.cols as u64)
                .checked_mul(size)
                .and_then(|b| b.checked_add(total))
                .unwrap_or(u64::MAX);
            if total > limit {
                return Err(MessageError::Dimensions(
                    format!("{} tiles", self.tiles.len()),
                    format!("their results would exceed {limit} bytes"),
                ));
            }
        }
        Ok(total)
    }
}

/// A frame whose payload is one dense block (or, for an inline task, its two): `rows`×`cols`,
/// or with `depth` the blocks `rows`×`depth` and `depth`×`cols`.
fn dense_len(
    rows: u32,
    cols: u32,
    depth: Option<u32>,
    dtype: DType,
    limit: u64,
) -> Result<u64, MessageError> {
    let desc = match depth {
        Some(d) => format!("{rows}x{d} · {d}x{cols}"),
        None => format!("{rows}x{cols}"),
    };
    let (r, c, d, size) = (
        rows as u64,
        cols as u64,
        depth.unwrap_or(1) as u64,
        dtype.size() as u64,
    );
    if r == 0 || c == 0 || d == 0 {
        return Err(MessageError::Dimensions(desc, "a dimension is zero".into()));
    }
    // u32 × u32 fits in u64; the sums and the × element size might not.
    let output = (r * c).checked_mul(size);
    let inputs = (r * d).checked_add(d * c).and_then(|e| e.checked_mul(size));
    // A task's result must fit a message with its header, or publishing it would fail.
    let output_limit = if depth.is_some() {
        limit.saturating_sub(crate::tiling::HEADER_BUDGET)
    } else {
        limit
    };
    match (output, inputs) {
        (Some(o), Some(i)) if o <= output_limit && i <= limit => {
            Ok(if depth.is_some() { i } else { o })
        }
        _ => Err(MessageError::Dimensions(
            desc,
            format!("the blocks or the {rows}x{cols} result would exceed {limit} bytes"),
        )),
    }
}

/// A task whose blocks are on the operand stream has no payload; they are checked when they are
/// read. The tile it asks for must still be sane and its result must fit a message.
fn check_task_ref(
    rows: u32,
    cols: u32,
    depth: u32,
    dtype: DType,
    limit: u64,
) -> Result<(), MessageError> {
    if rows == 0 || cols == 0 || depth == 0 {
        return Err(MessageError::Dimensions(
            format!("{rows}x{depth} · {depth}x{cols}"),
            "a dimension is zero".into(),
        ));
    }
    let result_bytes = rows as u64 * cols as u64 * dtype.size() as u64;
    if result_bytes > limit.saturating_sub(crate::tiling::HEADER_BUDGET) {
        return Err(MessageError::Dimensions(
            format!("{rows}x{cols}"),
            format!("the result would exceed {limit} bytes"),
        ));
    }
    Ok(())
}
