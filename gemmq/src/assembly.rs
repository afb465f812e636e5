//! Assembling C from results that arrive at least once, in any order.
//!
//! RabbitMQ delivers at least once: a worker that dies after publishing its result but before
//! acking its task has that task redone, and its result arrives twice. So every result is keyed by
//! its [`TileId`] (block row, block column, part of k) and applied only the first time; later
//! copies are counted as duplicates and dropped. Parts of a k-split tile are added into C, each
//! once, and the tile is complete when all its parts have arrived.
//!
//! A task whose attempts ran out arrives as a [`ParkedNotice`] instead: the job can then finish
//! (incomplete) instead of waiting forever. A result for a parked task still counts if it comes.

use std::collections::{BTreeMap, HashMap, HashSet};

use ndarray::{Array2, s};
use serde::Serialize;

use crate::matrix::{Element, Matrix, from_le};
use crate::message::{DType, ParkedNotice, ResultHeader};
use crate::{Plan, TileId};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AssemblyError {
    #[error("result for {tile} is outside the job's {rows}x{cols} grid of tiles")]
    UnknownTile { tile: TileId, rows: u32, cols: u32 },
    #[error(
        "result for {tile} is {got_rows}x{got_cols} {got_dtype} but the plan says {rows}x{cols} {dtype}"
    )]
    Shape {
        tile: TileId,
        got_rows: u32,
        got_cols: u32,
        got_dtype: DType,
        rows: usize,
        cols: usize,
        dtype: DType,
    },
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A tile of C is now complete.
    TileComplete,
    /// One part of a k-split tile was added; others are still to come.
    Part,
    /// This task's result or notice was already applied; nothing changed.
    Duplicate,
    /// The task was recorded as parked.
    Parked,
}

/// Per-worker tally for the summary.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WorkerTally {
    pub tasks: u64,
    pub compute_seconds: f64,
}

/// C under construction, with the bookkeeping that makes every task count once.
pub struct Assembly {
    plan: Plan,
    c: Matrix,
    received: HashSet<TileId>,
    parts_seen: HashMap<(u32, u32), u32>,
    complete_tiles: u64,
    parked: BTreeMap<TileId, ParkedNotice>,
    pub duplicates: u64,
    /// Tasks by the attempt on which their (first applied) result was computed.
    pub attempts: BTreeMap<u32, u64>,
    pub workers: BTreeMap<String, WorkerTally>,
}

impl Assembly {
    /// Allocates C (m×n zeros): the caller has checked that it may.
    pub fn new(plan: &Plan) -> Self {
        let (m, n) = (plan.m as usize, plan.n as usize);
        let c = match plan.dtype {
            DType::F32 => Matrix::F32(Array2::zeros((m, n))),
            DType::F64 => Matrix::F64(Array2::zeros((m, n))),
        };
        Assembly {
            plan: plan.clone(),
            c,
            received: HashSet::new(),
            parts_seen: HashMap::new(),
            complete_tiles: 0,
            parked: BTreeMap::new(),
            duplicates: 0,
            attempts: BTreeMap::new(),
            workers: BTreeMap::new(),
        }
    }

    /// Applies a result whose payload length was checked against its header by `decode`.
    pub fn apply_result(
        &mut self,
        h: &ResultHeader,
        payload: &[u8],
    ) -> Result<Applied, AssemblyError> {
        let tile = h.tile;
        if !self.plan.contains(tile) {
            return Err(AssemblyError::UnknownTile {
                tile,
                rows: self.plan.row_blocks(),
                cols: self.plan.col_blocks(),
            });
        }
        let (rows, cols) = (self.plan.rows(tile.row), self.plan.cols(tile.col));
        if h.rows as usize != rows.len()
            || h.cols as usize != cols.len()
            || h.dtype != self.plan.dtype
        {
            return Err(AssemblyError::Shape {
                tile,
                got_rows: h.rows,
                got_cols: h.cols,
                got_dtype: h.dtype,
                rows: rows.len(),
                cols: cols.len(),
                dtype: self.plan.dtype,
            });
        }
        if !self.received.insert(tile) {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        self.parked.remove(&tile);
        fn add<T: Element>(
            c: &mut Array2<T>,
            rows: std::ops::Range<usize>,
            cols: std::ops::Range<usize>,
            payload: &[u8],
        ) {
            let block = from_le::<T>(payload, rows.len(), cols.len());
            let mut region = c.slice_mut(s![rows, cols]);
            region.zip_mut_with(&block, |c, &p| *c = *c + p);
        }
        match &mut self.c {
            Matrix::F32(c) => add(c, rows, cols, payload),
            Matrix::F64(c) => add(c, rows, cols, payload),
        }
        *self.attempts.entry(h.attempt).or_default() += 1;
        let w = self.workers.entry(h.worker.clone()).or_default();
        w.tasks += 1;
        w.compute_seconds += h.compute_micros as f64 / 1e6;

        let seen = self.parts_seen.entry((tile.row, tile.col)).or_default();
        *seen += 1;
        if *seen == self.plan.parts() {
            self.parts_seen.remove(&(tile.row, tile.col));
            self.complete_tiles += 1;
            Ok(Applied::TileComplete)
        } else {
            Ok(Applied::Part)
        }
    }

    /// Records that a task will not be computed.
    pub fn apply_parked(&mut self, notice: &ParkedNotice) -> Result<Applied, AssemblyError> {
        if !self.plan.contains(notice.tile) {
            return Err(AssemblyError::UnknownTile {
                tile: notice.tile,
                rows: self.plan.row_blocks(),
                cols: self.plan.col_blocks(),
            });
        }
        if self.received.contains(&notice.tile) || self.parked.contains_key(&notice.tile) {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        self.parked.insert(notice.tile, notice.clone());
        Ok(Applied::Parked)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Tasks whose results have been applied.
    pub fn tasks_done(&self) -> u64 {
        self.received.len() as u64
    }

    pub fn tiles_complete(&self) -> u64 {
        self.complete_tiles
    }

    pub fn parked(&self) -> impl Iterator<Item = &ParkedNotice> {
        self.parked.values()
    }

    /// Every task has either its result or a parked notice: waiting longer will not help.
    pub fn is_finished(&self) -> bool {
        self.received.len() as u64 + self.parked.len() as u64 >= self.plan.tasks()
    }

    /// Every tile of C is there.
    pub fn is_complete(&self) -> bool {
        self.complete_tiles == self.plan.tiles()
    }

    pub fn matrix(&self) -> &Matrix {
        &self.c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::{compute_tile, generate, task_payload};
    use crate::message::TaskHeader;

    fn results(plan: &Plan, a: &Array2<f64>, b: &Array2<f64>) -> Vec<(ResultHeader, Vec<u8>)> {
        plan.task_ids()
            .map(|tile| {
                let task = TaskHeader {
                    job: "j".into(),
                    tile,
                    dtype: DType::F64,
                    rows: plan.rows(tile.row).len() as u32,
                    cols: plan.cols(tile.col).len() as u32,
                    depth: plan.depth(tile.part).len() as u32,
                };
                let bytes = compute_tile(&task, &task_payload(a, b, plan, tile)).unwrap();
                let h = ResultHeader {
                    job: "j".into(),
                    tile,
                    dtype: DType::F64,
                    rows: task.rows,
                    cols: task.cols,
                    worker: "w".into(),
                    attempt: 1,
                    compute_micros: 1,
                };
                (h, bytes)
            })
            .collect()
    }

    #[test]
    fn every_result_twice_in_reverse_order_still_gives_c_once() {
        let (Matrix::F64(a), Matrix::F64(b)) = generate(20, 90, 13, DType::F64, 5) else {
            unreachable!()
        };
        // A tiny message limit splits k into several parts.
        let plan = Plan::new(
            20,
            90,
            13,
            DType::F64,
            8,
            crate::tiling::HEADER_BUDGET + 2048,
        )
        .unwrap();
        assert!(plan.parts() > 1);
        let mut asm = Assembly::new(&plan);
        let rs = results(&plan, &a, &b);
        for (h, p) in rs.iter().rev().chain(rs.iter()) {
            asm.apply_result(h, p).unwrap();
        }
        assert!(asm.is_complete() && asm.is_finished());
        assert_eq!(asm.duplicates, plan.tasks());
        let Matrix::F64(c) = asm.matrix() else {
            unreachable!()
        };
        let want = a.dot(&b);
        let worst = (c - &want).iter().fold(0.0f64, |m, d| m.max(d.abs()));
        assert!(worst < 1e-12, "{worst}");
    }

    #[test]
    fn a_parked_task_finishes_the_job_incomplete_until_its_result_comes() {
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        let (Matrix::F64(a), Matrix::F64(b)) = generate(8, 8, 8, DType::F64, 5) else {
            unreachable!()
        };
        let mut asm = Assembly::new(&plan);
        let rs = results(&plan, &a, &b);
        for (h, p) in &rs[1..] {
            asm.apply_result(h, p).unwrap();
        }
        let notice = ParkedNotice {
            job: "j".into(),
            tile: rs[0].0.tile,
            reason: "boom".into(),
            attempts: 3,
            worker: "w".into(),
        };
        assert_eq!(asm.apply_parked(&notice), Ok(Applied::Parked));
        assert_eq!(asm.apply_parked(&notice), Ok(Applied::Duplicate));
        assert!(asm.is_finished() && !asm.is_complete());
        assert_eq!(
            asm.apply_result(&rs[0].0, &rs[0].1),
            Ok(Applied::TileComplete)
        );
        assert!(asm.is_complete() && asm.parked().next().is_none());
    }

    #[test]
    fn results_that_do_not_fit_the_plan_are_refused() {
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        let mut asm = Assembly::new(&plan);
        let mut h = ResultHeader {
            job: "j".into(),
            tile: TileId {
                row: 5,
                col: 0,
                part: 0,
            },
            dtype: DType::F64,
            rows: 4,
            cols: 4,
            worker: "w".into(),
            attempt: 1,
            compute_micros: 0,
        };
        assert!(matches!(
            asm.apply_result(&h, &[0; 128]),
            Err(AssemblyError::UnknownTile { .. })
        ));
        h.tile.row = 0;
        h.rows = 3;
        assert!(matches!(
            asm.apply_result(&h, &[0; 96]),
            Err(AssemblyError::Shape { .. })
        ));
        assert_eq!(asm.tasks_done(), 0);
    }
}
