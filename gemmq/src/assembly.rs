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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};
use ndarray_npy::{ViewMutNpyExt, ViewNpyExt};
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
}

/// C under construction, with the bookkeeping that makes every task count once.
pub struct Assembly {
    plan: Plan,
    dir: PathBuf,
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
        };
        asm.replay(&journal_path)?;
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
                }
                Record::Failed { worker } => {
                    self.workers.entry(worker).or_default().failures += 1;
                }
                Record::Parked(n) => {
                    if self.plan.contains(n.tile) && !self.received.contains(&n.tile) {
                        self.parked.insert(n.tile, n);
                    }
                }
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
        if self.received.contains(&tile) {
            self.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        if self.plan.parts() == 1 {
            self.assign(rows, cols, payload)?;
        } else {
            let path = self.part_path(tile);
            let tmp = path.with_extension("tmp");
            write_synced(&tmp, payload)?;
            fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        self.received.insert(tile);
        self.parked.remove(&tile);
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

    /// Makes everything applied so far durable: C's pages, then the journal. Ack after this.
    pub fn commit(&mut self) -> Result<(), AssemblyError> {
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
        // Only now, with the sum in C and the journal saying so, are a tile's parts garbage.
        for (row, col) in std::mem::take(&mut self.summed) {
            self.remove_parts(row, col);
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

/// Gives C's file its disk blocks now. C is written through a memory map, and a mapped write
/// that finds the disk full is a SIGBUS, not an error: better to learn it here, before any
/// result is taken. Filesystems without `fallocate` keep the sparse file.
#[cfg(target_os = "linux")]
fn reserve(f: &File, path: &Path) -> Result<(), AssemblyError> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().map_err(io(path))?.len();
    let Ok(signed) = libc::off_t::try_from(len) else {
        return Err(AssemblyError::NoSpace {
            path: path.to_path_buf(),
            bytes: len,
        });
    };
    // SAFETY: a plain syscall on an open file descriptor we own.
    match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, signed) } {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(AssemblyError::NoSpace {
            path: path.to_path_buf(),
            bytes: len,
        }),
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        code => Err(AssemblyError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(code),
        }),
    }
}

/// Checks the mapped .npy holds an m×n C-order matrix of the plan's type in this machine's byte
/// order, and returns where its numbers start.
fn c_data_offset(map: &mut [u8], plan: &Plan) -> Result<usize, String> {
    fn check<T: Element>(map: &mut [u8], shape: (usize, usize)) -> Result<usize, String> {
        let view = ArrayViewMut2::<T>::view_mut_npy(map).map_err(|e| e.to_string())?;
        if view.dim() != shape || !view.is_standard_layout() {
            return Err(format!(
                "C is {:?} in the checkpoint, the plan says {shape:?}",
                view.dim()
            ));
        }
        Ok(map.len() - shape.0 * shape.1 * size_of::<T>())
    }
    let shape = (plan.m as usize, plan.n as usize);
    match plan.dtype {
        DType::F32 => check::<f32>(map, shape),
        DType::F64 => check::<f64>(map, shape),
    }
}

/// Elsewhere C stays sparse (macOS has no `posix_fallocate`); gemmq's images run Linux.
#[cfg(not(target_os = "linux"))]
fn reserve(_: &File, _: &Path) -> Result<(), AssemblyError> {
    Ok(())
}

/// The checkpoint's lock: one collector at a time (a second one stands by).
fn lock(dir: &Path) -> Result<File, AssemblyError> {
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    lock.try_lock().map_err(|e| match e {
        fs::TryLockError::WouldBlock => AssemblyError::Io {
            path: lock_path.clone(),
            source: std::io::ErrorKind::WouldBlock.into(),
        },
        fs::TryLockError::Error(e) => AssemblyError::Io {
            path: lock_path.clone(),
            source: e,
        },
    })?;
    Ok(lock)
}

fn sync_dir(dir: &Path) -> Result<(), AssemblyError> {
    let parent = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent))
}

/// Cuts a journal back to its last complete line: a crash mid-write leaves a torn one, which
/// was never synced (so never acked) and must not glue itself to the next record.
fn truncate_torn_tail(path: &Path) -> Result<(), AssemblyError> {
    let Ok(bytes) = fs::read(path) else {
        return Ok(());
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(keep as u64).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssemblyError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// One journal line: `T row col part attempt micros worker`, `C row col`, or
/// `P row col part attempts worker reason…`.
enum Record {
    Task {
        tile: TileId,
        attempt: u32,
        micros: u64,
        worker: String,
    },
    Complete {
        row: u32,
        col: u32,
    },
    Parked(ParkedNotice),
    Failed {
        worker: String,
    },
}

impl Record {
    fn to_line(&self) -> String {
        match self {
            Record::Task {
                tile,
                attempt,
                micros,
                worker,
            } => {
                format!(
                    "T {} {} {} {attempt} {micros} {worker}\n",
                    tile.row, tile.col, tile.part
                )
            }
            Record::Complete { row, col } => format!("C {row} {col}\n"),
            Record::Failed { worker } => format!("F {worker}\n"),
            Record::Parked(n) => format!(
                "P {} {} {} {} {} {}\n",
                n.tile.row,
                n.tile.col,
                n.tile.part,
                n.attempts,
                n.worker,
                n.reason.replace('\n', " ")
            ),
        }
    }

    fn parse(line: &str) -> Option<Record> {
        let mut f = line.splitn(7, ' ');
        let kind = f.next()?;
        let mut num = || f.next()?.parse::<u64>().ok();
        match kind {
            "T" => {
                let tile = TileId {
                    row: num()? as u32,
                    col: num()? as u32,
                    part: num()? as u32,
                };
                let (attempt, micros) = (num()? as u32, num()?);
                let worker = f.next()?.to_string();
                Some(Record::Task {
                    tile,
                    attempt,
                    micros,
                    worker,
                })
            }
            "F" => Some(Record::Failed {
                worker: f.next()?.to_string(),
            }),
            "C" => Some(Record::Complete {
                row: num()? as u32,
                col: num()? as u32,
            }),
            "P" => {
                let tile = TileId {
                    row: num()? as u32,
                    col: num()? as u32,
                    part: num()? as u32,
                };
                let attempts = num()? as u32;
                let worker = f.next()?.to_string();
                let reason = f.next().unwrap_or("").to_string();
                Some(Record::Parked(ParkedNotice {
                    job: String::new(),
                    run: String::new(),
                    tile,
                    reason,
                    attempts,
                    worker,
                }))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::{Matrix, compute_tile, generate, task_payload};

    fn results(plan: &Plan, a: &Array2<f64>, b: &Array2<f64>) -> Vec<(ResultHeader, Vec<u8>)> {
        plan.task_ids()
            .map(|tile| {
                let task = plan.task("j", "", tile);
                let bytes = compute_tile(
                    &task,
                    &task_payload(a, b, plan, tile),
                    crate::kernel::Threads::Exactly(1),
                )
                .unwrap();
                let h = ResultHeader {
                    job: "j".into(),
                    run: String::new(),
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

    /// Tiles of 8 with a message limit so small that k is split into several parts.
    fn split_plan(m: u64, k: u64, n: u64) -> Plan {
        Plan::new(m, k, n, DType::F64, 8, crate::tiling::HEADER_BUDGET + 2048).unwrap()
    }

    fn inputs(m: usize, k: usize, n: usize) -> (Array2<f64>, Array2<f64>) {
        let (Matrix::F64(a), Matrix::F64(b)) = generate(m, k, n, DType::F64, 5) else {
            unreachable!()
        };
        (a, b)
    }

    fn max_error(asm: &Assembly, want: &Array2<f64>) -> f64 {
        asm.with_c(|c| {
            let MatrixView::F64(c) = c else {
                unreachable!()
            };
            (&c - want).iter().fold(0.0f64, |m, d| m.max(d.abs()))
        })
        .unwrap()
    }

    #[test]
    fn every_result_twice_in_reverse_order_still_gives_c_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = inputs(20, 90, 13);
        let plan = split_plan(20, 90, 13);
        assert!(plan.parts() > 1);
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        let rs = results(&plan, &a, &b);
        for (h, p) in rs.iter().rev().chain(rs.iter()) {
            asm.apply_result(h, p).unwrap();
        }
        asm.commit().unwrap();
        assert!(asm.is_complete() && asm.is_finished());
        assert_eq!(asm.duplicates, plan.tasks());
        assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
    }

    #[test]
    fn c_x_summed_as_tiles_are_written_counts_each_tile_once_and_only_from_a_fresh_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = inputs(20, 90, 13);
        let plan = split_plan(20, 90, 13);
        let (av, bv) = (MatrixView::F64(a.view()), MatrixView::F64(b.view()));
        let expected = crate::verify::expect(av, bv, 2, 7).unwrap();
        let rs = results(&plan, &a, &b);
        {
            let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
            assert!(asm.track_product(2, 7));
            // Every result twice, k-split parts included: each tile is summed once.
            for (h, p) in rs.iter().rev().chain(rs.iter()) {
                asm.apply_result(h, p).unwrap();
            }
            asm.commit().unwrap();
            let running = asm.running_product().expect("every tile was written here");
            let v = expected.check_running(running).unwrap();
            assert!(v.passed, "{v:?}");
        }
        // Reopened, its tiles were written by an earlier run: nothing to sum from.
        let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
        assert!(!asm.track_product(2, 7));
        assert!(asm.running_product().is_none());
    }

    #[test]
    fn a_collector_that_dies_resumes_from_its_checkpoint_without_doubling_a_part() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = inputs(24, 90, 16);
        let plan = split_plan(24, 90, 16);
        let rs = results(&plan, &a, &b);
        let half = rs.len() / 2;
        {
            let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
            for (h, p) in &rs[..half] {
                asm.apply_result(h, p).unwrap();
            }
            asm.commit().unwrap();
            // Applied after the last commit: never acked, so it will be delivered again.
            asm.apply_result(&rs[half].0, &rs[half].1).unwrap();
            // The process dies here: no commit, no finish.
        }
        let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
        assert_eq!(asm.resumed, half as u64);
        // The broker redelivers what was not acked — and, being at-least-once, maybe more.
        for (h, p) in &rs[half - 3..] {
            asm.apply_result(h, p).unwrap();
        }
        asm.commit().unwrap();
        assert!(asm.is_complete());
        assert_eq!(asm.duplicates, 3);
        assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
        let out = dir.path().join("C-final.npy");
        asm.finish(&out).unwrap();
        assert!(out.exists());
    }

    #[test]
    fn a_torn_journal_line_from_a_crash_is_cut_off_and_never_glued_to_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = inputs(16, 8, 16);
        let plan = Plan::new(16, 8, 16, DType::F64, 8, 16 << 20).unwrap();
        let rs = results(&plan, &a, &b);
        {
            let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
            asm.apply_result(&rs[0].0, &rs[0].1).unwrap();
            asm.commit().unwrap();
        }
        // Half a record, as a crash mid-write leaves it.
        let mut j = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL))
            .unwrap();
        j.write_all(b"T 1 1 0 1 5 wor").unwrap();
        drop(j);
        {
            let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
            assert_eq!(asm.resumed, 1);
            asm.apply_result(&rs[1].0, &rs[1].1).unwrap();
            asm.commit().unwrap();
        }
        let asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        assert_eq!(asm.resumed, 2, "the record after the torn one survived");
        assert_eq!(asm.tiles_complete(), 2);
    }

    /// An 8×8 job of run r1 collected in full into `ck`, its C written to `out`.
    fn finished_r1(ck: &Path, out: &Path) -> Plan {
        let (a, b) = inputs(8, 8, 8);
        let plan = Plan::new(8, 8, 8, DType::F64, 8, 16 << 20).unwrap();
        let mut asm = Assembly::open(&plan, "j", "r1", ck).unwrap();
        for (h, p) in results(&plan, &a, &b) {
            asm.apply_result(&h, &p).unwrap();
        }
        asm.finish(out).unwrap();
        plan
    }

    #[test]
    fn a_finished_checkpoint_says_so_instead_of_starting_over() {
        let dir = tempfile::tempdir().unwrap();
        let (ck, out) = (dir.path().join("ck"), dir.path().join("C.npy"));
        let plan = finished_r1(&ck, &out);
        match Assembly::open(&plan, "j", "r1", &ck) {
            Err(AssemblyError::AlreadyFinished { output }) => assert_eq!(output, out),
            other => panic!("{:?}", other.err()),
        }
        assert!(out.exists());
    }

    #[test]
    fn a_finished_checkpoint_of_an_earlier_run_is_started_over_for_the_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let plan = finished_r1(&ck, &dir.path().join("C.npy"));

        // The same job id and plan, other inputs: a new run, collected afresh.
        let asm = Assembly::open(&plan, "j", "r2", &ck).expect("a fresh checkpoint");
        assert_eq!(asm.resumed, 0);
        drop(asm);
        // ... and once it is under way, it is resumed, not taken for the finished r1.
        assert!(Assembly::open(&plan, "j", "r2", &ck).is_ok());
    }

    #[test]
    fn a_checkpoint_written_before_runs_existed_is_resumed_by_any_run_of_its_plan() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        drop(Assembly::open(&plan, "j", "", dir.path()).unwrap());
        let legacy = serde_json::json!({ "job": "j", "plan": plan });
        fs::write(dir.path().join(PLAN_FILE), legacy.to_string()).unwrap();
        let asm = Assembly::open(&plan, "j", "r1", dir.path());
        assert!(asm.is_ok(), "{:?}", asm.err());
    }

    #[test]
    fn a_second_collector_on_the_same_checkpoint_waits_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        let first = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        let err = Assembly::open(&plan, "j", "r1", dir.path()).err().unwrap();
        assert!(Assembly::is_locked(&err), "{err}");
        drop(first);
        assert!(Assembly::open(&plan, "j", "r1", dir.path()).is_ok());
        let other = Plan::new(8, 8, 9, DType::F64, 4, 16 << 20).unwrap();
        assert!(matches!(
            Assembly::open(&other, "j", "r1", dir.path()),
            Err(AssemblyError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_parked_task_finishes_the_job_incomplete_until_its_result_comes() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        let (a, b) = inputs(8, 8, 8);
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        let rs = results(&plan, &a, &b);
        for (h, p) in &rs[1..] {
            asm.apply_result(h, p).unwrap();
        }
        let notice = ParkedNotice {
            job: "j".into(),
            run: String::new(),
            tile: rs[0].0.tile,
            reason: "boom: twice".into(),
            attempts: 3,
            worker: "w".into(),
        };
        assert_eq!(asm.apply_parked(&notice).unwrap(), Applied::Parked);
        assert_eq!(asm.apply_parked(&notice).unwrap(), Applied::Duplicate);
        asm.commit().unwrap();
        assert!(asm.is_finished() && !asm.is_complete());
        drop(asm);
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        assert_eq!(
            asm.parked().next().map(|p| p.reason.as_str()),
            Some("boom: twice")
        );
        assert_eq!(
            asm.apply_result(&rs[0].0, &rs[0].1).unwrap(),
            Applied::TileComplete
        );
        assert!(asm.is_complete() && asm.parked().next().is_none());
    }

    #[test]
    fn results_that_do_not_fit_the_plan_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        let mut h = ResultHeader {
            job: "j".into(),
            run: String::new(),
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
