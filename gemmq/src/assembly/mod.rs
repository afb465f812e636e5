//! Assembling C from results that arrive at least once, in any order, across collector crashes.
//!
//! RabbitMQ delivers at least once: a worker that dies after publishing its result but before
//! acking its task has that task redone, and its result arrives twice. So every result is keyed by
//! its [`TileId`] (block row, block column, part of k) and applied only the first time; later
//! copies are counted as duplicates and dropped.
//!
//! The state lives on disk, in a checkpoint directory, so a collector that is killed resumes
//! where it was and still applies every task once:
//!
//! * `C.npy` — C itself, memory-mapped. A whole tile is written by *assignment*, which is
//!   idempotent: writing it again after a crash changes nothing.
//! * `parts/` — for a k-split tile, each part's partial product in its own file (written to a
//!   temporary name, then renamed). Parts are *summed* only when all are there, and the sum is
//!   assigned to C: no addition is ever repeated, whatever the crash.
//! * `journal` — one line per applied task, completed tile and parked task, synced to disk by
//!   [`Assembly::commit`]. Results must be acked only after `commit`: a result that is not in the
//!   journal is still unacked, so the broker delivers it again after a crash.
//! * `lock` — held (flock) by the one collector working on this checkpoint; a second collector on
//!   the same directory waits for it, and takes over when the first one dies.
//!
//! A task whose attempts ran out arrives as a [`ParkedNotice`] instead: the job can then finish
//! (incomplete) instead of waiting forever. A result for a parked task still counts if it comes.
//!
//! A tile found wrong by verification is computed again ([`Assembly::recompute`]): results of
//! that recompute round — and only those — replace it, once per task, whatever else arrives.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};
use ndarray_npy::ViewNpyExt;
use serde::Serialize;

use crate::matrix::{Element, MatrixView, from_le, with_le};
use crate::message::{DType, FailureNotice, ParkedNotice, ResultHeader};
use crate::verify::RunningProduct;
use crate::{Plan, TileId};

#[derive(Debug, thiserror::Error)]
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
    #[error(
        "checkpoint {dir} belongs to a different job, plan or run (the job id used again for other inputs) that is not finished; move it away, or collect into another --out"
    )]
    Mismatch { dir: PathBuf },
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this job was already collected into {}", output.display())]
    AlreadyFinished { output: PathBuf },
    #[error("checkpoint {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "not enough disk space for C ({bytes} bytes) at {path}: free some, or collect into another --out"
    )]
    NoSpace { path: PathBuf, bytes: u64 },
}

impl AssemblyError {
    /// Whether the message was at fault (drop it) rather than the disk (stop).
    pub fn is_bad_message(&self) -> bool {
        matches!(
            self,
            AssemblyError::UnknownTile { .. } | AssemblyError::Shape { .. }
        )
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssemblyError + '_ {
    move |source| AssemblyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A tile of C is now complete.
    TileComplete,
    /// One part of a k-split tile was stored; others are still to come.
    Part,
    /// This task's result or notice was already applied; nothing changed.
    Duplicate,
    /// The task was recorded as parked.
    Parked,
}

/// Per-worker tally for the summary.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct WorkerTally {
    /// Tasks whose (first) result came from this worker.
    pub tasks: u64,
    /// Attempts that failed on this worker and were retried.
    pub failures: u64,
    pub compute_seconds: f64,
    /// Tiles from this worker that failed verification and were computed again.
    #[serde(default)]
    pub wrong_tiles: u64,
}

/// C under construction, with the bookkeeping that makes every task count once.
pub struct Assembly {
    plan: Plan,
    dir: PathBuf,
    /// Populates a fresh C's pages ahead of the results (a thread with a map of its own).
    _warming: Option<Warming>,
    map: MmapMut,
    /// Where C's numbers start in the mapped file (after the .npy header), checked once when
    /// the checkpoint is opened: parsing the header for every tile cost more than the tile.
    data_offset: usize,
    journal: File,
    pending: String,
    dirty: bool,
    _lock: File,
    received: HashSet<TileId>,
    parts_seen: HashMap<(u32, u32), u32>,
    complete: HashSet<(u32, u32)>,
    summed: Vec<(u32, u32)>,
    parked: BTreeMap<TileId, ParkedNotice>,
    /// Copies dropped since this collector started.
    pub duplicates: u64,
    /// Tasks by the attempt on which their (first applied) result was computed.
    pub attempts: BTreeMap<u32, u64>,
    pub workers: BTreeMap<String, WorkerTally>,
    /// Tasks found already applied in the checkpoint when it was opened.
    pub resumed: u64,
    /// C·x for verification, summed as tiles are written (see [`Assembly::track_product`]).
    running: Option<RunningProduct>,
    /// The last message of the results stream applied, and whether the journal says so yet.
    position: Option<StreamPosition>,
    position_written: bool,
    /// Who sent each task's result (an index into `senders`), to name the sender of a wrong
    /// tile. Indices, not names: a job may have a million tiles and a handful of workers.
    sent_by: HashMap<TileId, u32>,
    senders: Vec<String>,
    /// Tiles computed again after failing verification: the round their value is from.
    rounds: HashMap<(u32, u32), u32>,
    /// The last recompute round asked for each tile, whether or not it came (its task may
    /// have been parked): what bounds the recomputes of a tile.
    asked: HashMap<(u32, u32), u32>,
    /// Tiles being computed again, and the parts of the round that are in.
    recomputing: HashMap<(u32, u32), Recomputing>,
}

/// A tile being computed again: the round, and the parts (of k) of it applied so far.
#[derive(Debug, Default)]
struct Recomputing {
    round: u32,
    parts: HashSet<u32>,
}

const PLAN_FILE: &str = "plan.json";
const C_FILE: &str = "C.npy";
const JOURNAL: &str = "journal";
const LOCK: &str = "lock";
const PARTS: &str = "parts";
const DONE: &str = "done";

impl Assembly {
    /// Opens the checkpoint in `dir` for `plan` of `job`'s `run` ([`crate::Manifest::run`]),
    /// creating it or resuming it. A checkpoint of a finished earlier run of the same job id is
    /// started over (the job id was used again for other inputs); one of another job or plan
    /// still in progress is refused. Fails with `WouldBlock` (as [`AssemblyError::Io`]) when
    /// another collector holds it: see [`Assembly::is_locked`].
    pub fn open(plan: &Plan, job: &str, run: &str, dir: &Path) -> Result<Self, AssemblyError> {
        fs::create_dir_all(dir.join(PARTS)).map_err(io(dir))?;
        let lock = lock(dir)?;
        let c_path = dir.join(C_FILE);
        if !Self::resumable(plan, job, run, dir)? {
            Self::start_over(plan, job, run, dir)?;
        }
        let c_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&c_path)
            .map_err(io(&c_path))?;
        // Fresh or resumed (a resumed C may still be sparse where no tile has landed yet).
        reserve(&c_file, &c_path)?;
        // SAFETY: the file is ours (we hold the lock), and it is not truncated while mapped.
        let mut map = unsafe { MmapMut::map_mut(&c_file) }.map_err(io(&c_path))?;
        let journal_path = dir.join(JOURNAL);
        truncate_torn_tail(&journal_path)?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(io(&journal_path))?;
        let data_offset =
            c_data_offset(&mut map, plan).map_err(|message| AssemblyError::Corrupt {
                path: c_path.clone(),
                message,
            })?;
        let mut asm = Assembly {
            plan: plan.clone(),
            dir: dir.to_path_buf(),
            _warming: None,
            map,
            data_offset,
            journal,
            pending: String::new(),
            dirty: false,
            _lock: lock,
            received: HashSet::new(),
            parts_seen: HashMap::new(),
            complete: HashSet::new(),
            summed: Vec::new(),
            parked: BTreeMap::new(),
            duplicates: 0,
            attempts: BTreeMap::new(),
            workers: BTreeMap::new(),
            resumed: 0,
            running: None,
            position: None,
            position_written: true,
            sent_by: HashMap::new(),
            senders: Vec::new(),
            rounds: HashMap::new(),
            asked: HashMap::new(),
            recomputing: HashMap::new(),
        };
        asm.replay(&journal_path)?;
        if asm.received.is_empty() && asm.parked.is_empty() {
            let data = asm.data_offset as u64..asm.map.len() as u64;
            asm._warming = Some(Warming::start(&c_file, data));
        }
        Ok(asm)
    }

    /// Whether the checkpoint in `dir` is this run's and can be resumed; `false` when there is
    /// none, or a finished one of another run or plan. A finished one of this run is
    /// [`AssemblyError::AlreadyFinished`]; an unfinished one of another is a mismatch.
    fn resumable(plan: &Plan, job: &str, run: &str, dir: &Path) -> Result<bool, AssemblyError> {
        let c_path = dir.join(C_FILE);
        let legacy = serde_json::json!({ "job": job, "plan": plan });
        let identity = serde_json::json!({ "job": job, "plan": plan, "run": run });
        let plan_path = dir.join(PLAN_FILE);
        let existing: Option<serde_json::Value> = fs::read(&plan_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // Checkpoints written before runs existed name none: they match any run of their plan.
        let same = existing
            .as_ref()
            .is_some_and(|e| *e == identity || (e.get("run").is_none() && *e == legacy));
        if same && dir.join(DONE).exists() {
            // Finished, by us before a crash or by a collector we stood by for.
            let dest = PathBuf::from(fs::read_to_string(dir.join(DONE)).map_err(io(dir))?);
            if c_path.exists() {
                fs::rename(&c_path, &dest).map_err(io(&dest))?;
            }
            return Err(AssemblyError::AlreadyFinished { output: dest });
        }
        match existing {
            Some(_) if same && c_path.exists() => Ok(true),
            Some(_) if c_path.exists() => Err(AssemblyError::Mismatch {
                dir: dir.to_path_buf(),
            }),
            _ => Ok(false),
        }
    }

    /// A fresh checkpoint (the first, or after a finished one of another run or plan, whose C
    /// was moved to its output): the old identity and "done" mark go first, then C, the new
    /// identity last, so a crash in between just starts over.
    fn start_over(plan: &Plan, job: &str, run: &str, dir: &Path) -> Result<(), AssemblyError> {
        let identity = serde_json::json!({ "job": job, "plan": plan, "run": run });
        let (plan_path, c_path) = (dir.join(PLAN_FILE), dir.join(C_FILE));
        for old in [PLAN_FILE, DONE] {
            match fs::remove_file(dir.join(old)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(dir)(e));
                }
                _ => {}
            }
        }
        sync_dir(dir)?;
        let f = File::create(&c_path).map_err(io(&c_path))?;
        let shape = (plan.m as usize, plan.n as usize);
        let zeroed = match plan.dtype {
            DType::F32 => ndarray_npy::write_zeroed_npy::<f32, _>(&f, shape),
            DType::F64 => ndarray_npy::write_zeroed_npy::<f64, _>(&f, shape),
        };
        zeroed.map_err(|e| AssemblyError::Corrupt {
            path: c_path.clone(),
            message: e.to_string(),
        })?;
        f.sync_all().map_err(io(&c_path))?;
        let _ = fs::remove_file(dir.join(JOURNAL));
        write_synced(&plan_path, identity.to_string().as_bytes())?;
        sync_dir(dir)?;
        Ok(())
    }

    /// Whether an error from [`Assembly::open`] means another collector holds the checkpoint.
    pub fn is_locked(e: &AssemblyError) -> bool {
        matches!(e, AssemblyError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
    }

    fn replay(&mut self, path: &Path) -> Result<(), AssemblyError> {
        let file = File::open(path).map_err(io(path))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(io(path))?;
            // A torn last line (crash mid-write) was never synced, so never acked: skip it.
            let Some(record) = Record::parse(&line) else {
                continue;
            };
            match record {
                Record::Task {
                    tile,
                    attempt,
                    micros,
                    worker,
                } => {
                    if self.plan.contains(tile) && self.received.insert(tile) {
                        self.note_sender(tile, &worker);
                        self.parked.remove(&tile);
                        self.count(attempt, &worker, micros);
                        *self.parts_seen.entry((tile.row, tile.col)).or_default() += 1;
                        if self.plan.parts() == 1 {
                            // C's pages were synced before this line was written.
                            self.complete.insert((tile.row, tile.col));
                        }
                        self.resumed += 1;
                    }
                }
                Record::Complete { row, col } => {
                    self.complete.insert((row, col));
                    // The sum of a recomputed k-split tile reached C.
                    if self
                        .recomputing
                        .get(&(row, col))
                        .is_some_and(|r| r.parts.len() as u32 == self.plan.parts())
                    {
                        let done = self.recomputing.remove(&(row, col));
                        self.rounds.insert((row, col), done.map_or(0, |r| r.round));
                    }
                }
                Record::Recompute { row, col, round } => {
                    self.asked.insert((row, col), round);
                    self.recomputing.insert(
                        (row, col),
                        Recomputing {
                            round,
                            parts: HashSet::new(),
                        },
                    );
                }
                Record::Recomputed {
                    tile,
                    round,
                    worker,
                } => {
                    if self.plan.contains(tile) {
                        self.note_sender(tile, &worker);
                        let key = (tile.row, tile.col);
                        if self.plan.parts() == 1 {
                            // C's pages were synced before this line was written.
                            self.recomputing.remove(&key);
                            self.rounds.insert(key, round);
                        } else {
                            let r = self.recomputing.entry(key).or_default();
                            r.round = round;
                            r.parts.insert(tile.part);
                        }
                    }
                }
                Record::Failed { worker } => {
                    self.workers.entry(worker).or_default().failures += 1;
                }
                Record::Parked(n) => {
                    // A recompute whose task was parked is given up.
                    self.recomputing.remove(&(n.tile.row, n.tile.col));
                    if self.plan.contains(n.tile) && !self.received.contains(&n.tile) {
                        self.parked.insert(n.tile, n);
                    }
                }
                Record::Position(p) => self.position = Some(p),
            }
        }
        // Tiles whose parts were all in but whose sum may not have reached C: sum again.
        let pending: Vec<(u32, u32)> = if self.plan.parts() == 1 {
            Vec::new()
        } else {
            self.parts_seen
                .iter()
                .filter(|(rc, n)| **n == self.plan.parts() && !self.complete.contains(*rc))
                .map(|(rc, _)| *rc)
                .collect()
        };
        for (row, col) in pending {
            self.complete_split_tile(row, col)?;
        }
        // Recomputed k-split tiles whose parts were all in but whose sum may not have reached C.
        let resum: Vec<(u32, u32)> = self
            .recomputing
            .iter()
            .filter(|(_, r)| r.parts.len() as u32 == self.plan.parts())
            .map(|(rc, _)| *rc)
            .collect();
        for (row, col) in resum {
            let round = self.recomputing.remove(&(row, col)).map_or(0, |r| r.round);
            self.complete_split_tile(row, col)?;
            self.rounds.insert((row, col), round);
        }
        if !self.rounds.is_empty() {
            // Recomputed tiles replaced what a running product would have summed.
            self.running = None;
        }
        if self.plan.parts() > 1 {
            self.summed.extend(self.complete.iter().copied());
        }
        self.commit()
    }

    fn count(&mut self, attempt: u32, worker: &str, micros: u64) {
        *self.attempts.entry(attempt).or_default() += 1;
        let w = self.workers.entry(worker.to_string()).or_default();
        w.tasks += 1;
        w.compute_seconds += micros as f64 / 1e6;
    }

    /// Applies a result whose payload length was checked against its header by `decode`.
    /// Durable only after [`Assembly::commit`].
    pub fn apply_result(
        &mut self,
        h: &ResultHeader,
        payload: &[u8],
    ) -> Result<Applied, AssemblyError> {
        let tile = h.tile;
        let (rows, cols) = self.check_shape(h)?;
        if h.recompute > 0 {
            return self.apply_recomputed(h, payload);
        }
        if self.received.contains(&tile) {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        self.store(tile, rows, cols, payload)?;
        self.received.insert(tile);
        self.parked.remove(&tile);
        self.note_sender(tile, &h.worker);
        self.count(h.attempt, &h.worker, h.compute_micros);
        self.pending.push_str(
            &Record::Task {
                tile,
                attempt: h.attempt,
                micros: h.compute_micros,
                worker: h.worker.clone(),
            }
            .to_line(),
        );
        let seen = self.parts_seen.entry((tile.row, tile.col)).or_default();
        *seen += 1;
        if *seen < self.plan.parts() {
            return Ok(Applied::Part);
        }
        if self.plan.parts() > 1 {
            self.complete_split_tile(tile.row, tile.col)?;
        } else {
            self.complete.insert((tile.row, tile.col));
            self.pending.push_str(
                &Record::Complete {
                    row: tile.row,
                    col: tile.col,
                }
                .to_line(),
            );
        }
        Ok(Applied::TileComplete)
    }

    /// The tile's rows and columns of C, once `h` is known to fit them.
    fn check_shape(&self, h: &ResultHeader) -> Result<(Range<usize>, Range<usize>), AssemblyError> {
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
        Ok((rows, cols))
    }

    /// A result of a recompute round: replaces the tile (its part) if that round is the one
    /// asked for and the part is not in yet; a duplicate otherwise, like any result sent twice
    /// — or sent for a round nobody asked for.
    fn apply_recomputed(
        &mut self,
        h: &ResultHeader,
        payload: &[u8],
    ) -> Result<Applied, AssemblyError> {
        let (tile, key) = (h.tile, (h.tile.row, h.tile.col));
        let wanted = self
            .recomputing
            .get(&key)
            .is_some_and(|r| r.round == h.recompute && !r.parts.contains(&tile.part));
        if !wanted {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        let (rows, cols) = (self.plan.rows(tile.row), self.plan.cols(tile.col));
        self.store(tile, rows, cols, payload)?;
        self.note_sender(tile, &h.worker);
        self.pending.push_str(
            &Record::Recomputed {
                tile,
                round: h.recompute,
                worker: h.worker.clone(),
            }
            .to_line(),
        );
        let r = self.recomputing.get_mut(&key).expect("checked above");
        r.parts.insert(tile.part);
        if (r.parts.len() as u32) < self.plan.parts() {
            return Ok(Applied::Part);
        }
        self.recomputing.remove(&key);
        self.rounds.insert(key, h.recompute);
        if self.plan.parts() > 1 {
            self.complete_split_tile(tile.row, tile.col)?;
        }
        // The running product summed the wrong tile: C is read again to verify.
        self.running = None;
        Ok(Applied::TileComplete)
    }

    /// A task's result on disk: assigned to C (a whole tile), or its part of k in a file of
    /// its own (written aside, then renamed), summed once all are in.
    fn store(
        &mut self,
        tile: TileId,
        rows: Range<usize>,
        cols: Range<usize>,
        payload: &[u8],
    ) -> Result<(), AssemblyError> {
        if self.plan.parts() == 1 {
            return self.assign(rows, cols, payload);
        }
        let path = self.part_path(tile);
        let tmp = path.with_extension("tmp");
        write_synced(&tmp, payload)?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    fn note_sender(&mut self, tile: TileId, worker: &str) {
        let i = match self.senders.iter().position(|w| w == worker) {
            Some(i) => i,
            None => {
                self.senders.push(worker.to_string());
                self.senders.len() - 1
            }
        };
        self.sent_by.insert(tile, i as u32);
    }

    /// Who sent the value C holds for tile (row, col): one name per part of k, each once.
    pub fn senders_of(&self, row: u32, col: u32) -> Vec<String> {
        let mut names: Vec<String> = (0..self.plan.parts())
            .filter_map(|part| self.sent_by.get(&TileId { row, col, part }))
            .map(|&i| self.senders[i as usize].clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The recompute round tile (row, col)'s value is from (0: as first computed).
    pub fn round_of(&self, row: u32, col: u32) -> u32 {
        self.rounds.get(&(row, col)).copied().unwrap_or(0)
    }

    /// How many times tile (row, col) has been asked to be computed again, whether or not the
    /// results came.
    pub fn recomputes(&self, row: u32, col: u32) -> u32 {
        let asked = self.asked.get(&(row, col)).copied().unwrap_or(0);
        asked.max(self.round_of(row, col))
    }

    /// Asks for tile (row, col) to be computed again: from now on the results of the next
    /// round, and only those, replace it. Returns that round; durable with the next commit.
    pub fn recompute(&mut self, row: u32, col: u32) -> u32 {
        let round = self.recomputes(row, col) + 1;
        self.asked.insert((row, col), round);
        self.recomputing.insert(
            (row, col),
            Recomputing {
                round,
                parts: HashSet::new(),
            },
        );
        self.pending
            .push_str(&Record::Recompute { row, col, round }.to_line());
        round
    }

    /// Tiles being computed again whose results are not all in.
    pub fn recomputing(&self) -> usize {
        self.recomputing.len()
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
        let key = (notice.tile.row, notice.tile.col);
        if self.recomputing.remove(&key).is_some() {
            // Its recompute ran out of attempts: the tile stays as it is, and verification
            // says whether that is good enough.
            self.pending
                .push_str(&Record::Parked(notice.clone()).to_line());
            return Ok(Applied::Parked);
        }
        if self.received.contains(&notice.tile) || self.parked.contains_key(&notice.tile) {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        self.parked.insert(notice.tile, notice.clone());
        self.pending
            .push_str(&Record::Parked(notice.clone()).to_line());
        Ok(Applied::Parked)
    }

    /// Counts a failed attempt against its worker (for the report; it changes nothing in C).
    pub fn apply_failure(&mut self, n: &FailureNotice) {
        self.workers.entry(n.worker.clone()).or_default().failures += 1;
        self.pending.push_str(
            &Record::Failed {
                worker: n.worker.clone(),
            }
            .to_line(),
        );
    }

    /// The last message of the job's results stream that this checkpoint holds (see
    /// [`position`]); `None` before the first, or in a checkpoint written before results were a
    /// stream.
    pub fn position(&self) -> Option<StreamPosition> {
        self.position
    }

    /// Records that everything in the results stream through `p` has been applied; durable
    /// with the next [`Assembly::commit`], together with what was applied.
    pub fn read_through(&mut self, p: StreamPosition) {
        self.position = Some(p);
        self.position_written = false;
    }

    /// Makes everything applied so far durable: C's pages, then the journal. Ack after this.
    pub fn commit(&mut self) -> Result<(), AssemblyError> {
        if !self.position_written
            && let Some(p) = self.position
        {
            self.pending.push_str(&Record::Position(p).to_line());
            self.position_written = true;
        }
        if self.dirty {
            self.map.flush().map_err(io(&self.dir.join(C_FILE)))?;
            self.dirty = false;
        }
        if !self.pending.is_empty() {
            if self.plan.parts() > 1 {
                // The renames of part files must be durable before the journal names them.
                sync_dir(&self.dir.join(PARTS))?;
            }
            let path = self.dir.join(JOURNAL);
            self.journal
                .write_all(self.pending.as_bytes())
                .map_err(io(&path))?;
            self.journal.sync_data().map_err(io(&path))?;
            self.pending.clear();
        }
        // Only now, with the sum in C and the journal saying so, are a tile's parts garbage —
        // unless the tile is being computed again, and they are its new parts.
        for (row, col) in std::mem::take(&mut self.summed) {
            if !self.recomputing.contains_key(&(row, col)) {
                self.remove_parts(row, col);
            }
        }
        Ok(())
    }

    fn assign(
        &mut self,
        rows: Range<usize>,
        cols: Range<usize>,
        payload: &[u8],
    ) -> Result<(), AssemblyError> {
        fn typed<T: Element>(
            data: &mut [u8],
            shape: (usize, usize),
            rows: Range<usize>,
            cols: Range<usize>,
            payload: &[u8],
            running: Option<&mut RunningProduct>,
        ) -> Result<(), String> {
            let numbers = bytemuck::try_cast_slice_mut::<u8, T>(data).map_err(|e| e.to_string())?;
            let mut c = ArrayViewMut2::from_shape(shape, numbers).map_err(|e| e.to_string())?;
            let (r0, c0, h, w) = (rows.start, cols.start, rows.len(), cols.len());
            // The tile straight from the message body when it is aligned: no copy of its own.
            with_le::<T, _>(payload, h, w, |block| {
                if let Some(r) = running {
                    r.add(r0, c0, block);
                }
                c.slice_mut(s![rows, cols]).assign(&block);
            });
            Ok(())
        }
        let shape = (self.plan.m as usize, self.plan.n as usize);
        let data = &mut self.map[self.data_offset..];
        let running = self.running.as_mut();
        let r = match self.plan.dtype {
            DType::F32 => typed::<f32>(data, shape, rows, cols, payload, running),
            DType::F64 => typed::<f64>(data, shape, rows, cols, payload, running),
        };
        self.dirty = true;
        r.map_err(|message| AssemblyError::Corrupt {
            path: self.dir.join(C_FILE),
            message,
        })
    }

    /// Sums a k-split tile's stored parts and assigns the sum to C.
    fn complete_split_tile(&mut self, row: u32, col: u32) -> Result<(), AssemblyError> {
        fn sum<T: Element>(
            paths: &[PathBuf],
            rows: usize,
            cols: usize,
        ) -> Result<Vec<u8>, AssemblyError> {
            let mut acc = Array2::<T>::zeros((rows, cols));
            for p in paths {
                let bytes = fs::read(p).map_err(io(p))?;
                if bytes.len() != rows * cols * size_of::<T>() {
                    return Err(AssemblyError::Corrupt {
                        path: p.clone(),
                        message: "wrong size".into(),
                    });
                }
                acc = acc + from_le::<T>(&bytes, rows, cols);
            }
            let mut out = Vec::new();
            crate::matrix::extend_le(acc.view(), &mut out);
            Ok(out)
        }
        let (rows, cols) = (self.plan.rows(row), self.plan.cols(col));
        let paths: Vec<PathBuf> = (0..self.plan.parts())
            .map(|part| self.part_path(TileId { row, col, part }))
            .collect();
        let bytes = match self.plan.dtype {
            DType::F32 => sum::<f32>(&paths, rows.len(), cols.len())?,
            DType::F64 => sum::<f64>(&paths, rows.len(), cols.len())?,
        };
        self.assign(rows, cols, &bytes)?;
        self.complete.insert((row, col));
        self.summed.push((row, col));
        self.pending
            .push_str(&Record::Complete { row, col }.to_line());
        Ok(())
    }

    fn remove_parts(&self, row: u32, col: u32) {
        for part in 0..self.plan.parts() {
            let _ = fs::remove_file(self.part_path(TileId { row, col, part }));
        }
    }

    fn part_path(&self, t: TileId) -> PathBuf {
        self.dir
            .join(PARTS)
            .join(format!("{}-{}-{}.bin", t.row, t.col, t.part))
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tasks whose results have been applied.
    pub fn tasks_done(&self) -> u64 {
        self.received.len() as u64
    }

    pub fn tiles_complete(&self) -> u64 {
        self.complete.len() as u64
    }

    pub fn parked(&self) -> impl Iterator<Item = &ParkedNotice> {
        self.parked.values()
    }

    /// Every task has either its result or a parked notice: waiting longer will not help.
    pub fn is_finished(&self) -> bool {
        self.received.len() as u64 + self.parked.len() as u64 >= self.plan.tasks()
            && self.recomputing.is_empty()
    }

    /// Every tile of C is there.
    pub fn is_complete(&self) -> bool {
        self.complete.len() as u64 == self.plan.tiles()
    }

    /// Sums C·x for the check's vectors as each tile is written from now on, so verifying C
    /// at the end needs no pass over it. Only from the first tile: `false` (and nothing tracked)
    /// when the checkpoint already holds tiles, which this process did not see written.
    pub fn track_product(&mut self, rounds: u32, seed: u64) -> bool {
        if !self.complete.is_empty() {
            return false;
        }
        let (m, n) = (self.plan.m as usize, self.plan.n as usize);
        self.running = Some(RunningProduct::new(m, n, rounds, seed));
        true
    }

    /// C·x summed over every tile, once C is complete and every tile was seen written.
    pub fn running_product(&self) -> Option<&RunningProduct> {
        self.running
            .as_ref()
            .filter(|r| r.tiles() == self.plan.tiles() && self.is_complete())
    }

    /// Calls `f` with C as it stands.
    pub fn with_c<R>(&self, f: impl FnOnce(MatrixView<'_>) -> R) -> Result<R, AssemblyError> {
        let path = self.dir.join(C_FILE);
        let bad = |e: ndarray_npy::ViewNpyError| AssemblyError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        };
        Ok(match self.plan.dtype {
            DType::F32 => f(MatrixView::F32(
                ArrayView2::<f32>::view_npy(&self.map).map_err(bad)?,
            )),
            DType::F64 => f(MatrixView::F64(
                ArrayView2::<f64>::view_npy(&self.map).map_err(bad)?,
            )),
        })
    }

    /// Commits, moves C to `dest`, and marks the checkpoint finished — while still holding its
    /// lock, so a collector standing by finds the job done instead of starting it over.
    pub fn finish(mut self, dest: &Path) -> Result<(), AssemblyError> {
        self.commit()?;
        write_synced(&self.dir.join(DONE), dest.to_string_lossy().as_bytes())?;
        sync_dir(&self.dir)?;
        fs::rename(self.dir.join(C_FILE), dest).map_err(io(dest))?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent)?;
        }
        // Only the marker and the plan stay: the rest is garbage now.
        let _ = fs::remove_file(self.dir.join(JOURNAL));
        let _ = fs::remove_dir_all(self.dir.join(PARTS));
        Ok(())
    }
}

mod files;
mod journal;
pub mod position;
mod warm;

use files::{c_data_offset, lock, reserve, sync_dir, truncate_torn_tail, write_synced};
use journal::Record;
pub use position::StreamPosition;
use warm::Warming;
#[cfg(test)]
mod tests;
