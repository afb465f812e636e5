//! How C = A·B is cut into tasks.
//!
//! C (m×n) is cut into square tiles of `tile`×`tile` (smaller at the right and bottom edges when m
//! or n is not a multiple). The task for tile (i, j) carries block-row i of A and block-column j of
//! B. When those blocks would not fit in one message, k is split as well: the task for part p
//! carries only the p-th slice of k, and the collector sums the parts' partial products, once each.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::message::{BlockId, DType, Side, TileId};

/// Bytes kept free in every message for the frame prefix and JSON header.
pub const HEADER_BUDGET: u64 = 4096;
/// Largest matrix side gemmq accepts; far beyond what fits anywhere, small enough that products
/// of two sides cannot overflow.
pub const MAX_SIDE: u64 = 1 << 31;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TilingError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{name} = {value} is larger than the supported {MAX_SIDE}")]
    TooLarge { name: &'static str, value: u64 },
    #[error(
        "a {rows}x{cols} {dtype} result tile is {bytes} bytes, over the {limit}-byte message limit; use --tile {max_tile} or less, or raise --max-message-bytes"
    )]
    TileTooLarge {
        rows: u64,
        cols: u64,
        dtype: DType,
        bytes: u64,
        limit: u64,
        max_tile: u64,
    },
    #[error("inconsistent plan: {0}")]
    Inconsistent(String),
}

/// A setting that is a number, or `auto` to let gemmq pick one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOr {
    #[default]
    Auto,
    Fixed(u64),
}

/// The side of a tile: a number, or `auto` to pick one from the shapes and the message limit.
pub type TileSize = AutoOr;

/// Tasks per task message: a number, or `auto` to pick one from the work in a tile
/// ([`auto_group`]).
pub type GroupSize = AutoOr;

impl std::str::FromStr for AutoOr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AutoOr::Auto),
            n => n
                .parse()
                .map(AutoOr::Fixed)
                .map_err(|_| format!("{n:?} is neither a number nor \"auto\"")),
        }
    }
}

impl<'de> Deserialize<'de> for AutoOr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(AutoOr::Fixed(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for AutoOr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AutoOr::Auto => f.write_str("auto"),
            AutoOr::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// The tile side `auto` picks: as large as a result message allows, because inline every task
/// carries a whole block-row of A and block-column of B, so the bytes sent fall as 1/tile; but
/// small enough to leave at least 16 tiles to spread over the workers. With streamed operands a
/// tile whose blocks fit a message without splitting k is preferred: split, every tile comes back
/// as several partial products, and the collector has to store and add them. Multiples of 64 keep
/// the multiplication kernels on their fast paths.
pub fn auto_tile(
    m: u64,
    k: u64,
    n: u64,
    dtype: DType,
    max_message_bytes: u64,
    operands: Operands,
) -> u64 {
    let room = max_message_bytes.saturating_sub(HEADER_BUDGET);
    let size = dtype.size() as u64;
    let largest = ((room / size) as f64).sqrt() as u64 / 64 * 64;
    let spread = ((m as f64 * n as f64 / 16.0).sqrt() as u64).div_ceil(64) * 64;
    let mut tile = largest.min(spread);
    if operands == Operands::Stream {
        let unsplit = room / (k.max(1) * size) / 64 * 64;
        if unsplit >= 256.min(tile) {
            tile = tile.min(unsplit);
        }
    }
    tile.max(64).min(m.max(n))
}

/// The fewest task messages `auto` grouping leaves, as the auto tile size leaves 16 tiles: enough
/// to spread over the workers and to balance their load.
pub const GROUP_SPREAD: u64 = 16;

/// Task messages `auto` grouping leaves per worker consuming when the job is published, when that
/// is more than [`GROUP_SPREAD`]: two, so that every worker gets work and its rectangles still
/// share blocks (a worker receives about 2·√(tiles it computes) blocks; docs/ARCHITECTURE.md).
/// With a fixed spread of 16, a 17th worker got nothing to do.
pub const MESSAGES_PER_WORKER: u64 = 2;

/// Blocks whose numbers take this many bytes or more are large: the producer writes each to
/// the operand stream in a chunk of its own, followed by an empty chunk end, and a worker reads
/// each at its offset. Smaller ones share chunks (a round trip each would cost tiny tiles more
/// than the bytes a chunk's neighbours waste), and a worker reads them by sweeping the stream.
pub const LARGE_BLOCK_BYTES: u64 = 1 << 20;

/// The most tasks of `plan` one message may hold: a group's results must fit one message (so a
/// worker holds no more for a group than for one big task), and never more than
/// [`MAX_GROUP`](crate::message::MAX_GROUP).
pub fn max_group(plan: &Plan, max_message_bytes: u64) -> u64 {
    let (rows, cols) = (plan.tile.min(plan.m), plan.tile.min(plan.n));
    let result = (rows * cols * plan.dtype.size() as u64).max(1);
    (max_message_bytes.saturating_sub(HEADER_BUDGET) / result)
        .clamp(1, crate::message::MAX_GROUP as u64)
}

/// Tasks per message `auto` picks for `workers` workers (those consuming when the job is
/// published; 0 when not known): as many as still leave [`GROUP_SPREAD`] messages, or
/// [`MESSAGES_PER_WORKER`] per worker if that is more, within [`max_group`]. A message's tasks
/// are a rectangle of tiles ([`Plan::groups`]) that share their blocks, and a worker receives
/// only the blocks of the messages it takes: the larger the rectangles, the fewer blocks per
/// tile travel. Tiny tiles gain twice: the broker's cost per message (~0.25 ms of CPU through a
/// quorum queue) is shared by many tiles. One when operands are inline, since those tasks carry
/// their blocks.
pub fn auto_group(plan: &Plan, max_message_bytes: u64, workers: u64) -> u64 {
    if plan.operands == Operands::Inline {
        return 1;
    }
    let spread = GROUP_SPREAD.max(workers.saturating_mul(MESSAGES_PER_WORKER));
    (plan.tasks() / spread).clamp(1, max_group(plan, max_message_bytes))
}

/// How the blocks of A and B reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operands {
    /// Each task carries its blocks. Simple; every block travels once per task that needs it.
    Inline,
    /// Each block is published once to the job's operand stream; tasks name the blocks, and
    /// workers fetch and cache them, so a block reaches a worker at most once.
    #[default]
    Stream,
}

fn inline() -> Operands {
    Operands::Inline
}

impl std::str::FromStr for Operands {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inline" => Ok(Operands::Inline),
            "stream" => Ok(Operands::Stream),
            _ => Err(format!("{s:?}: use stream or inline")),
        }
    }
}

/// The tiling of one job; part of its manifest, so every program agrees on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub m: u64,
    pub k: u64,
    pub n: u64,
    pub dtype: DType,
    /// Side of a C tile (edge tiles are smaller).
    pub tile: u64,
    /// Boundaries of the slices of k: `[0, …, k]`; one slice when k is not split.
    pub k_splits: Vec<u64>,
    /// Absent in manifests written before operand streams existed, which were all inline.
    #[serde(default = "inline")]
    pub operands: Operands,
}

fn check_sides(m: u64, k: u64, n: u64, tile: u64) -> Result<(), TilingError> {
    for (name, value) in [("m", m), ("k", k), ("n", n), ("tile", tile)] {
        if value == 0 {
            return Err(TilingError::Zero(name));
        }
        if value > MAX_SIDE {
            return Err(TilingError::TooLarge { name, value });
        }
    }
    Ok(())
}

impl Plan {
    /// Plans C = A(m×k) · B(k×n) with tiles of `tile`, keeping every task and result message
    /// within `max_message_bytes`.
    pub fn new(
        m: u64,
        k: u64,
        n: u64,
        dtype: DType,
        tile: u64,
        max_message_bytes: u64,
    ) -> Result<Plan, TilingError> {
        Self::with_operands(m, k, n, dtype, tile, max_message_bytes, Operands::Inline)
    }

    /// Like [`Plan::new`], for operands carried as `operands` says: inline, a task carries an A
    /// and a B block and must fit a message; streamed, each block on its own must.
    pub fn with_operands(
        m: u64,
        k: u64,
        n: u64,
        dtype: DType,
        tile: u64,
        max_message_bytes: u64,
        operands: Operands,
    ) -> Result<Plan, TilingError> {
        check_sides(m, k, n, tile)?;
        let size = dtype.size() as u64;
        let room = max_message_bytes.saturating_sub(HEADER_BUDGET);
        let (rows, cols) = (tile.min(m), tile.min(n));
        let bytes = rows * cols * size;
        if bytes > room {
            return Err(TilingError::TileTooLarge {
                rows,
                cols,
                dtype,
                bytes,
                limit: max_message_bytes,
                max_tile: ((room / size) as f64).sqrt().floor() as u64,
            });
        }
        // Inline, a task carries rows×kc of A and kc×cols of B; streamed, one block at a time.
        let per_unit_depth = match operands {
            Operands::Inline => rows + cols,
            Operands::Stream => rows.max(cols),
        };
        let max_depth = (room / (per_unit_depth * size)).max(1);
        let parts = k.div_ceil(max_depth);
        let k_splits = (0..=parts).map(|p| p * k / parts).collect();
        Ok(Plan {
            m,
            k,
            n,
            dtype,
            tile,
            k_splits,
            operands,
        })
    }

    /// Checks a plan that came over the wire before anything is sized from it.
    pub fn check(&self) -> Result<(), TilingError> {
        check_sides(self.m, self.k, self.n, self.tile)?;
        let s = &self.k_splits;
        let ok = s.len() >= 2
            && s.len() as u64 <= self.k + 1
            && s.first() == Some(&0)
            && s.last() == Some(&self.k)
            && s.windows(2).all(|w| w[0] < w[1]);
        if !ok {
            return Err(TilingError::Inconsistent(format!(
                "k_splits must rise strictly from 0 to k = {}",
                self.k
            )));
        }
        Ok(())
    }

    pub fn row_blocks(&self) -> u32 {
        self.m.div_ceil(self.tile) as u32
    }

    pub fn col_blocks(&self) -> u32 {
        self.n.div_ceil(self.tile) as u32
    }

    pub fn parts(&self) -> u32 {
        (self.k_splits.len() - 1) as u32
    }

    /// Number of C tiles.
    pub fn tiles(&self) -> u64 {
        self.row_blocks() as u64 * self.col_blocks() as u64
    }

    /// Number of tasks: tiles × parts of k.
    pub fn tasks(&self) -> u64 {
        self.tiles() * self.parts() as u64
    }

    pub fn rows(&self, block: u32) -> Range<usize> {
        let start = block as u64 * self.tile;
        start as usize..(start + self.tile).min(self.m) as usize
    }

    pub fn cols(&self, block: u32) -> Range<usize> {
        let start = block as u64 * self.tile;
        start as usize..(start + self.tile).min(self.n) as usize
    }

    /// The rows and columns of its operand that `block` holds.
    pub fn block_shape(&self, block: BlockId) -> (Range<usize>, Range<usize>) {
        match block.side {
            Side::A => (self.rows(block.index), self.depth(block.part)),
            Side::B => (self.depth(block.part), self.cols(block.index)),
        }
    }

    /// The bytes of `block`'s numbers.
    pub fn block_bytes(&self, block: BlockId) -> u64 {
        let (rows, cols) = self.block_shape(block);
        (rows.len() * cols.len() * self.dtype.size()) as u64
    }

    pub fn depth(&self, part: u32) -> Range<usize> {
        let p = part as usize;
        self.k_splits[p] as usize..self.k_splits[p + 1] as usize
    }

    /// The task that computes `tile` of this plan's job `job`, run `run`.
    pub fn task(&self, job: &str, run: &str, tile: TileId) -> crate::message::TaskHeader {
        crate::message::TaskHeader {
            job: job.to_string(),
            run: run.to_string(),
            tile,
            dtype: self.dtype,
            rows: self.rows(tile.row).len() as u32,
            cols: self.cols(tile.col).len() as u32,
            depth: self.depth(tile.part).len() as u32,
            at: None,
            recompute: 0,
        }
    }

    /// Whether `id` names a task of this plan.
    pub fn contains(&self, id: TileId) -> bool {
        id.row < self.row_blocks() && id.col < self.col_blocks() && id.part < self.parts()
    }

    /// Every task, row-major over tiles with the parts of one tile together, so the collector
    /// can finish tiles early.
    pub fn task_ids(&self) -> impl Iterator<Item = TileId> + '_ {
        (0..self.row_blocks()).flat_map(move |row| {
            (0..self.col_blocks())
                .flat_map(move |col| (0..self.parts()).map(move |part| TileId { row, col, part }))
        })
    }

    /// Every operand block once, in the order the tasks first need them: a worker reading
    /// the operand stream from the start can begin its first task after two blocks, not after
    /// the whole of A.
    pub fn operand_ids(&self) -> Vec<crate::message::BlockId> {
        use crate::message::{BlockId, Side};
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for t in self.task_ids() {
            for id in [
                BlockId {
                    side: Side::A,
                    index: t.row,
                    part: t.part,
                },
                BlockId {
                    side: Side::B,
                    index: t.col,
                    part: t.part,
                },
            ] {
                if seen.insert(id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The shape of a group of `n` tasks, in tiles (rows, columns): as square as the grid allows,
    /// so that its tiles share as many blocks as possible — a group of r × c tiles needs r blocks
    /// of A and c of B, where n tiles of one row would need 1 and n.
    pub fn group_shape(&self, n: u64) -> (u32, u32) {
        let n = n.max(1);
        let (grid_rows, grid_cols) = (u64::from(self.row_blocks()), u64::from(self.col_blocks()));
        let rows = ((n as f64).sqrt() as u64).clamp(1, grid_rows);
        let cols = (n / rows).clamp(1, grid_cols);
        let rows = (n / cols).clamp(1, grid_rows);
        (rows as u32, cols as u32)
    }

    /// Every task, in groups of at most `n` that travel as one message: rectangles of
    /// [`group_shape`](Self::group_shape) tiles (smaller at the grid's edges), one group per
    /// slice of k, row-major over the rectangles with the parts of one rectangle together.
    pub fn groups(&self, n: u64) -> Vec<Vec<TileId>> {
        let (h, w) = self.group_shape(n);
        let mut groups = Vec::new();
        for row0 in (0..self.row_blocks()).step_by(h as usize) {
            for col0 in (0..self.col_blocks()).step_by(w as usize) {
                for part in 0..self.parts() {
                    let rows = row0..(row0 + h).min(self.row_blocks());
                    let group = rows
                        .flat_map(|row| {
                            (col0..(col0 + w).min(self.col_blocks())).map(move |col| TileId {
                                row,
                                col,
                                part,
                            })
                        })
                        .collect();
                    groups.push(group);
                }
            }
        }
        groups
    }

    /// Floating-point operations of the whole product.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MAX_GROUP;

    const MIB16: u64 = 16 << 20;

    #[test]
    fn a_blocks_bytes_are_those_of_its_numbers_at_the_ragged_edges_too() {
        let plan = Plan::new(100, 60, 70, DType::F32, 64, MIB16).unwrap();
        let block = |side, index| BlockId {
            side,
            index,
            part: 0,
        };
        assert_eq!(plan.block_bytes(block(Side::A, 0)), 64 * 60 * 4);
        assert_eq!(plan.block_bytes(block(Side::A, 1)), 36 * 60 * 4);
        assert_eq!(plan.block_bytes(block(Side::B, 1)), 60 * 6 * 4);
    }

    #[test]
    fn auto_groups_leave_sixteen_messages_and_never_more_than_a_group_may_hold() {
        let stream = |n, tile| {
            Plan::with_operands(n, n, n, DType::F64, tile, MIB16, Operands::Stream).unwrap()
        };
        // 64 tiles: 16 messages of 4.
        assert_eq!(auto_group(&stream(2048, 256), MIB16, 0), 4);
        assert_eq!(auto_group(&stream(512, 8), MIB16, 0), MAX_GROUP as u64);
        // 16 tiles: one to a message.
        assert_eq!(auto_group(&stream(4096, 1024), MIB16, 0), 1);
        for n in [256, 1024, 2048, 4096] {
            let auto = auto_tile(n, n, n, DType::F64, MIB16, Operands::Stream);
            let p = stream(n, auto);
            let messages = p.groups(auto_group(&p, MIB16, 2)).len() as u64;
            assert!(
                messages >= GROUP_SPREAD,
                "{n}: {messages} messages, fewer than the 16 tiles auto leaves"
            );
        }
        let inline = Plan::new(1024, 1024, 1024, DType::F64, 16, MIB16).unwrap();
        assert_eq!(
            auto_group(&inline, MIB16, 0),
            1,
            "inline tasks carry blocks: one to a message"
        );
        // A group's results fit one message: 448² f64 results are 1.6 MB, 10 to 16 MiB.
        assert_eq!(max_group(&stream(4096, 448), MIB16), 10);
        assert_eq!(max_group(&stream(1024, 16), HEADER_BUDGET + 2048 * 4), 4);
    }

    #[test]
    fn auto_groups_leave_every_worker_two_messages_once_they_are_more_than_eight() {
        let stream = |n, tile| {
            Plan::with_operands(n, n, n, DType::F64, tile, MIB16, Operands::Stream).unwrap()
        };
        // 16,384 tiles of 16²: 64 messages of 256 for up to 32 workers, then two or more each
        // (128 a message for 64 workers: rectangles of 11 × 11, 144 of them).
        let tiny = stream(2048, 16);
        for (workers, group, messages) in
            [(0, 256, 64), (2, 256, 64), (32, 256, 64), (64, 128, 144)]
        {
            let g = auto_group(&tiny, MIB16, workers);
            assert_eq!(
                (g, tiny.groups(g).len()),
                (group, messages),
                "{workers} workers"
            );
        }
        // 64 tiles of 256: 16 messages of 4 up to 8 workers; 12 workers get 32 messages of
        // 1 × 2 tiles, 64 or more one tile each.
        let plan = stream(2048, 256);
        assert_eq!(auto_group(&plan, MIB16, 8), 4);
        assert_eq!(plan.groups(auto_group(&plan, MIB16, 12)).len(), 32);
        assert_eq!(auto_group(&plan, MIB16, 64), 1);
        assert_eq!(auto_group(&plan, MIB16, u64::MAX), 1, "no overflow");
        for workers in [9, 16, 20, 31] {
            let messages = plan.groups(auto_group(&plan, MIB16, workers)).len() as u64;
            assert!(
                messages >= 2 * workers,
                "{workers} workers: {messages} messages"
            );
        }
    }

    #[test]
    fn a_group_is_a_rectangle_of_tiles_that_share_their_blocks() {
        let p = Plan::with_operands(96, 40, 96, DType::F64, 8, MIB16, Operands::Stream).unwrap();
        assert_eq!(p.group_shape(4), (2, 2));
        assert_eq!(p.group_shape(10), (3, 3), "at most 10, as square as can be");
        assert_eq!(p.group_shape(64), (8, 8));
        let narrow =
            Plan::with_operands(96, 40, 24, DType::F64, 8, MIB16, Operands::Stream).unwrap();
        assert_eq!(
            narrow.group_shape(64),
            (12, 3),
            "no wider than the grid's 3 columns"
        );
        assert_eq!(p.group_shape(1), (1, 1));
        let groups = p.groups(4);
        assert_eq!(groups.len(), 36, "12 × 12 tiles in 2 × 2 rectangles");
        for g in &groups {
            let rows: std::collections::BTreeSet<_> = g.iter().map(|t| t.row).collect();
            let cols: std::collections::BTreeSet<_> = g.iter().map(|t| t.col).collect();
            assert_eq!((rows.len(), cols.len(), g.len()), (2, 2, 4), "{g:?}");
        }
        // Row-major over rectangles: the first two share their rows of A.
        assert_eq!(
            groups[0][0],
            TileId {
                row: 0,
                col: 0,
                part: 0
            }
        );
        assert_eq!(
            groups[1][0],
            TileId {
                row: 0,
                col: 2,
                part: 0
            }
        );
    }

    #[test]
    fn groups_cover_every_task_once_with_ragged_edges_and_split_k() {
        // 5 × 4 tiles, k split in parts: 3 × 3 rectangles leave ragged ones at the edges.
        let p = Plan::with_operands(
            300,
            200,
            250,
            DType::F64,
            64,
            HEADER_BUDGET + 64 * 1024,
            Operands::Stream,
        )
        .unwrap();
        assert!(p.parts() > 1, "{p:?}");
        let groups = p.groups(9);
        let mut all: Vec<TileId> = groups.iter().flatten().copied().collect();
        all.sort();
        let mut expected: Vec<TileId> = p.task_ids().collect();
        expected.sort();
        assert_eq!(all, expected);
        for g in &groups {
            assert!(g.len() <= 9);
            assert!(
                g.iter().all(|t| t.part == g[0].part),
                "one slice of k a group: {g:?}"
            );
        }
    }

    #[test]
    fn edge_tiles_cover_shapes_that_are_not_multiples_of_the_tile() {
        let p = Plan::new(300, 200, 250, DType::F64, 64, MIB16).unwrap();
        assert_eq!((p.row_blocks(), p.col_blocks(), p.parts()), (5, 4, 1));
        assert_eq!(p.rows(4), 256..300);
        assert_eq!(p.cols(3), 192..250);
        assert_eq!(p.task_ids().count() as u64, p.tasks());
        let covered: usize = (0..p.row_blocks()).map(|b| p.rows(b).len()).sum();
        assert_eq!(covered, 300);
    }

    #[test]
    fn k_is_split_when_the_blocks_do_not_fit_in_a_message() {
        // 32 rows + 32 cols of f64 = 512 bytes per unit of depth; 16 KiB room → 24 deep at most.
        let p = Plan::new(64, 200, 64, DType::F64, 32, HEADER_BUDGET + 16 * 1024).unwrap();
        assert!(p.parts() > 1, "{p:?}");
        for part in 0..p.parts() {
            let d = p.depth(part).len() as u64;
            assert!((32 + 32) * d * 8 <= 16 * 1024);
        }
        assert_eq!(p.k_splits.last(), Some(&200));
        p.check().unwrap();
    }

    #[test]
    fn a_result_tile_that_cannot_fit_names_the_largest_tile_that_would() {
        let err = Plan::new(4096, 10, 4096, DType::F64, 2048, MIB16).unwrap_err();
        let TilingError::TileTooLarge { max_tile, .. } = err else {
            panic!("{err}")
        };
        assert!(Plan::new(4096, 10, 4096, DType::F64, max_tile, MIB16).is_ok());
        assert!(err.to_string().contains("--tile"));
    }

    #[test]
    fn auto_tiles_are_as_large_as_a_message_allows_but_leave_work_to_spread() {
        let inline = Operands::Inline;
        assert_eq!(auto_tile(4096, 4096, 4096, DType::F64, MIB16, inline), 1024);
        assert_eq!(auto_tile(1024, 1024, 1024, DType::F64, MIB16, inline), 256);
        // Streamed, a 448x4096 f64 block still fits 16 MiB: k need not be split.
        let t = auto_tile(4096, 4096, 4096, DType::F64, MIB16, Operands::Stream);
        assert_eq!(t, 448);
        assert_eq!(
            Plan::with_operands(4096, 4096, 4096, DType::F64, t, MIB16, Operands::Stream)
                .unwrap()
                .parts(),
            1
        );
        assert_eq!(
            auto_tile(65536, 100, 65536, DType::F64, MIB16, inline),
            1408,
            "capped by the result message"
        );
        assert_eq!(auto_tile(10, 3, 7, DType::F32, MIB16, Operands::Stream), 10);
        assert!(Plan::new(65536, 100, 65536, DType::F64, 1408, MIB16).is_ok());
        assert_eq!("auto".parse::<TileSize>(), Ok(TileSize::Auto));
        assert_eq!("128".parse::<TileSize>(), Ok(TileSize::Fixed(128)));
    }

    #[test]
    fn every_operand_block_is_listed_once_before_the_first_task_that_needs_it() {
        let p =
            Plan::with_operands(300, 200, 250, DType::F64, 64, 64 << 10, Operands::Stream).unwrap();
        let ids = p.operand_ids();
        assert_eq!(
            ids.len() as u32,
            (p.row_blocks() + p.col_blocks()) * p.parts()
        );
        assert_eq!(
            ids.len(),
            ids.iter().collect::<std::collections::HashSet<_>>().len()
        );
        let first = p.task_ids().next().unwrap();
        assert_eq!((ids[0].index, ids[1].index), (first.row, first.col));
    }

    #[test]
    fn zero_and_absurd_sizes_are_refused() {
        assert_eq!(
            Plan::new(0, 1, 1, DType::F64, 8, MIB16),
            Err(TilingError::Zero("m"))
        );
        assert!(Plan::new(1, 1 << 40, 1, DType::F64, 8, MIB16).is_err());
        let mut p = Plan::new(8, 8, 8, DType::F32, 8, MIB16).unwrap();
        p.k_splits = vec![0, 5, 3, 8];
        assert!(p.check().is_err());
    }
}
