//! Is C really A·B? Freivalds' check, with a rounding bound instead of a guessed tolerance.
//!
//! Recomputing A·B to compare costs as much as the job; Freivalds' check costs three
//! matrix-vector products: for a random vector x, C·x must equal A·(B·x). A wrong, missing or
//! doubled tile changes C·x by far more than rounding can, for almost every x.
//!
//! The tolerance is derived, not tuned: a dot product of length k computed in a format with unit
//! roundoff u is off by at most about k·u·(|A|·|B|)ᵢⱼ, so row i of C·x may differ from A·(B·x) by
//! up to (k + n + 2)·u·(|A|·|B|·|x|)ᵢ; the check allows twice that, per row. Sums run in f64.
//!
//! When C fails, [`wrong_tiles`] says which tiles: the rows that failed narrow it to block rows,
//! and each tile (r, c) of those is checked on its own, C_rc·x_c against A_r·(B_c·x_c) with x_c
//! the slice of x over the tile's columns — one pass over B and over the suspect rows of A.

use ndarray::{Array1, ArrayView2};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::matrix::{Element, MatrixError, MatrixView};
use crate::message::Check;

/// Random vectors per check: a wrong C passes one with probability ~0 already; two guard
/// against an unlucky draw near the rounding bound.
pub const ROUNDS: u32 = 2;
/// Most rounds a manifest's check may carry.
pub const MAX_ROUNDS: u32 = 8;
/// Seed of the random vectors.
pub const VECTOR_SEED: u64 = 0x5eed;
/// Most values (rows of C × rounds) the producer sends with a job's manifest: ~512 KiB of
/// base64, well inside the manifest's limit. Taller jobs leave the expectation to the collector.
pub const MAX_CHECK_VALUES: usize = 24 * 1024;

/// The outcome of [`freivalds`].
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    pub rounds: u32,
    /// Largest |C·x − A·B·x|ᵢ over its allowed bound; ≤ 1 passes.
    pub worst_ratio: f64,
    /// The first row that failed, if any.
    pub worst_row: Option<usize>,
}

/// What C·x must be for each random x: computed before C exists, from A and B or from the seed
/// they were generated from (walking them row by row, never holding them).
#[derive(Debug, Clone)]
pub struct Expected {
    rounds: Vec<Round>,
    k: usize,
    dtype: crate::DType,
}

#[derive(Debug, Clone)]
struct Round {
    x: Array1<f64>,
    abx: Array1<f64>,
    bound: Array1<f64>,
}

fn vectors(n: usize, rounds: u32, seed: u64) -> Vec<Array1<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rounds)
        .map(|_| Array1::from_shape_simple_fn(n, || rng.random_range(-1.0..1.0)))
        .collect()
}

/// Expected values for A (m×k) and B (k×n) generated from `seed` (see [`crate::inputs`]).
pub fn expect_seeded(
    m: usize,
    k: usize,
    n: usize,
    dtype: crate::DType,
    seed: u64,
    rounds: u32,
    vseed: u64,
) -> Expected {
    let (a, b) = crate::inputs::Operand::seeded_pair(m, k, n, dtype, seed);
    expect_rows(&a, &b, rounds, vseed).expect("seeded matrices fit each other and are finite")
}

/// Expected values for A and B walked a row at a time, never held: O(m + k + n) memory, one
/// pass over each. Fails on a read error, or on a number that is not finite.
pub fn expect_rows(
    a: &crate::inputs::Operand,
    b: &crate::inputs::Operand,
    rounds: u32,
    vseed: u64,
) -> Result<Expected, MatrixError> {
    use crate::inputs::Operand;
    /// A vector and its absolute values (or the bound that goes with it).
    type WithAbs = (Array1<f64>, Array1<f64>);
    /// Each row of `o` dotted with each of `xs` (and the absolute values with `xabs`).
    fn pass<T: Element>(
        o: &Operand,
        name: &'static str,
        xs: &[WithAbs],
    ) -> Result<Vec<WithAbs>, MatrixError> {
        let (rows, cols) = o.shape();
        let mut out: Vec<_> = xs
            .iter()
            .map(|_| (Array1::zeros(rows), Array1::zeros(rows)))
            .collect();
        let mut row = vec![T::zero(); cols];
        for i in 0..rows {
            o.row(i, 0..cols, &mut row)?;
            for ((x, xabs), (y, yabs)) in xs.iter().zip(out.iter_mut()) {
                let (mut s, mut sa) = (0.0, 0.0);
                for ((&v, &xv), &xa) in row.iter().zip(x).zip(xabs) {
                    let v = v.to_f64();
                    s += v * xv;
                    sa += v.abs() * xa;
                }
                if !s.is_finite() || !sa.is_finite() {
                    return Err(MatrixError::NotFinite(name));
                }
                y[i] = s;
                yabs[i] = sa;
            }
        }
        Ok(out)
    }
    fn typed<T: Element>(
        a: &Operand,
        b: &Operand,
        xs: Vec<Array1<f64>>,
    ) -> Result<Vec<Round>, MatrixError> {
        let with_abs: Vec<_> = xs.iter().map(|x| (x.clone(), x.mapv(f64::abs))).collect();
        let bx = pass::<T>(b, "B", &with_abs)?;
        let abx = pass::<T>(a, "A", &bx)?;
        Ok(xs
            .into_iter()
            .zip(abx)
            .map(|(x, (abx, bound))| Round { x, abx, bound })
            .collect())
    }
    crate::matrix::check_conformable(a.describe(), b.describe())?;
    let ((_, k), (_, n)) = (a.shape(), b.shape());
    let xs = vectors(n, rounds, vseed);
    let rounds = match a.dtype() {
        crate::DType::F32 => typed::<f32>(a, b, xs)?,
        crate::DType::F64 => typed::<f64>(a, b, xs)?,
    };
    Ok(Expected {
        rounds,
        k,
        dtype: a.dtype(),
    })
}

/// Expected values for A and B in hand.
pub fn expect(
    a: MatrixView<'_>,
    b: MatrixView<'_>,
    rounds: u32,
    vseed: u64,
) -> Result<Expected, MatrixError> {
    fn typed<T: Element>(
        a: ArrayView2<'_, T>,
        b: ArrayView2<'_, T>,
        xs: Vec<Array1<f64>>,
    ) -> Vec<Round> {
        let round = |x: Array1<f64>| {
            let xabs = x.mapv(f64::abs);
            let (bx, bxabs) = matvec(b, &x, &xabs);
            let (abx, bound) = matvec(a, &bx, &bxabs);
            Round { x, abx, bound }
        };
        // One thread per round: each is two passes over memory, and they share nothing.
        std::thread::scope(|scope| {
            let handles: Vec<_> = xs
                .into_iter()
                .map(|x| scope.spawn(move || round(x)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a verification round panicked"))
                .collect()
        })
    }
    let (k, n) = match b {
        MatrixView::F32(b) => b.dim(),
        MatrixView::F64(b) => b.dim(),
    };
    let xs = vectors(n, rounds, vseed);
    let rounds = match (a, b) {
        (MatrixView::F32(a), MatrixView::F32(b)) => typed(a, b, xs),
        (MatrixView::F64(a), MatrixView::F64(b)) => typed(a, b, xs),
        _ => return Err(MatrixError::Mixed(a.dtype(), b.dtype())),
    };
    Ok(Expected {
        rounds,
        k,
        dtype: a.dtype(),
    })
}

impl Expected {
    /// The expectation as a manifest carries it; `seed` is the one it was computed with.
    pub fn to_check(&self, seed: u64) -> Check {
        let b64 = |v: &Array1<f64>| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            BASE64.encode(bytes)
        };
        Check {
            seed,
            abx: self.rounds.iter().map(|r| b64(&r.abx)).collect(),
            bound: self.rounds.iter().map(|r| b64(&r.bound)).collect(),
        }
    }

    /// The expectation a manifest carries, for C of m×n from a k-long product; refused (with
    /// why) unless it is whole and finite.
    pub fn from_check(
        check: &Check,
        m: usize,
        k: usize,
        n: usize,
        dtype: crate::DType,
    ) -> Result<Expected, String> {
        let rounds = check.abx.len();
        if rounds == 0 || rounds > MAX_ROUNDS as usize || check.bound.len() != rounds {
            return Err(format!(
                "{rounds} rounds of A·B·x and {} of bounds",
                check.bound.len()
            ));
        }
        let decode = |what: &str, text: &str| -> Result<Array1<f64>, String> {
            let bytes = BASE64
                .decode(text)
                .map_err(|e| format!("{what} is not base64: {e}"))?;
            if bytes.len() != m * 8 {
                return Err(format!("{what} has {} bytes, not {m} f64", bytes.len()));
            }
            let v: Array1<f64> = bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect();
            if v.iter().all(|x| x.is_finite()) {
                Ok(v)
            } else {
                Err(format!("{what} holds a value that is not finite"))
            }
        };
        let xs = vectors(n, rounds as u32, check.seed);
        let mut out = Vec::with_capacity(rounds);
        for (x, (abx, bound)) in xs.into_iter().zip(check.abx.iter().zip(&check.bound)) {
            let (abx, bound) = (decode("A·B·x", abx)?, decode("its bound", bound)?);
            // |A·(B·x)| ≤ |A|·(|B|·|x|) holds in floating point too (rounding is monotonic). A
            // negative bound would let any C pass; a value over its bound means the two are not
            // from the same A and B.
            if let Some(i) = (0..m).find(|&i| !(bound[i] >= 0.0 && abx[i].abs() <= bound[i])) {
                return Err(format!(
                    "row {i}: A·B·x = {} is not within its bound {}",
                    abx[i], bound[i]
                ));
            }
            out.push(Round { x, abx, bound });
        }
        Ok(Expected {
            rounds: out,
            k,
            dtype,
        })
    }

    /// Checks C against the expectation: one pass over C per round.
    pub fn check(&self, c: MatrixView<'_>) -> Verdict {
        fn typed<T: Element>(e: &Expected, c: ArrayView2<'_, T>) -> Verdict {
            if e.rounds.iter().any(|r| r.x.len() != c.ncols()) {
                return Verdict::unusable();
            }
            let cxs: Vec<Array1<f64>> = e
                .rounds
                .iter()
                .map(|r| matvec(c, &r.x, &r.x.mapv(f64::abs)).0)
                .collect();
            e.judge(&cxs, c.ncols())
        }
        match (c, self.dtype) {
            (MatrixView::F32(c), crate::DType::F32) => typed(self, c),
            (MatrixView::F64(c), crate::DType::F64) => typed(self, c),
            _ => Verdict::unusable(),
        }
    }

    /// Checks C·x summed tile by tile as C was written ([`RunningProduct`]): no pass over C.
    /// `None` if it was summed for other vectors than these.
    pub fn check_running(&self, r: &RunningProduct) -> Option<Verdict> {
        let same = r.xs.len() == self.rounds.len()
            && r.xs
                .iter()
                .zip(&self.rounds)
                .all(|(x, round)| *x == round.x);
        same.then(|| self.judge(&r.cx, r.n))
    }

    /// The rows of C that fail the check in any round: where its wrong tiles are.
    pub fn failing_rows(&self, c: MatrixView<'_>) -> Vec<usize> {
        fn typed<T: Element>(e: &Expected, c: ArrayView2<'_, T>) -> Vec<usize> {
            let gamma = gamma(e.dtype, e.k, c.ncols());
            let mut rows = std::collections::BTreeSet::new();
            for r in &e.rounds {
                if r.x.len() != c.ncols() || r.abx.len() != c.nrows() {
                    return (0..c.nrows()).collect();
                }
                let cx = matvec(c, &r.x, &r.x.mapv(f64::abs)).0;
                for i in 0..cx.len() {
                    let diff = (cx[i] - r.abx[i]).abs();
                    if diff.is_nan() || diff > gamma * r.bound[i] + f64::MIN_POSITIVE {
                        rows.insert(i);
                    }
                }
            }
            rows.into_iter().collect()
        }
        match c {
            MatrixView::F32(c) => typed(self, c),
            MatrixView::F64(c) => typed(self, c),
        }
    }

    /// Compares C·x, per round, with A·(B·x) within the rounding bound.
    fn judge(&self, cxs: &[Array1<f64>], n: usize) -> Verdict {
        let gamma = gamma(self.dtype, self.k, n);
        let (mut worst_ratio, mut worst_row) = (0.0f64, None);
        let mut passed = true;
        for (r, cx) in self.rounds.iter().zip(cxs) {
            if r.abx.len() != cx.len() {
                return Verdict::unusable();
            }
            for i in 0..cx.len() {
                let diff = (cx[i] - r.abx[i]).abs();
                let allowed = gamma * r.bound[i] + f64::MIN_POSITIVE;
                let ratio = if diff.is_nan() {
                    f64::INFINITY
                } else {
                    diff / allowed
                };
                if ratio > 1.0 {
                    passed = false;
                    if worst_row.is_none() {
                        worst_row = Some(i);
                    }
                }
                worst_ratio = worst_ratio.max(ratio);
            }
        }
        Verdict {
            passed,
            rounds: self.rounds.len() as u32,
            worst_ratio,
            worst_row,
        }
    }
}

/// The relative error a product of depth k summed into n columns may have from rounding, doubled.
fn gamma(dtype: crate::DType, k: usize, n: usize) -> f64 {
    let eps = match dtype {
        crate::DType::F32 => <f32 as Element>::EPSILON,
        crate::DType::F64 => <f64 as Element>::EPSILON,
    };
    2.0 * (k + n + 2) as f64 * eps
}

/// Most numbers (k × block columns) of B·x per block column held at once: 64 MiB of f64 and
/// their bounds; more block columns take more passes over B.
const MAX_BX_VALUES: usize = 4 << 20;

/// The tiles of C that are wrong, (block row, block column), among the block rows holding
/// `rows` (from [`Expected::failing_rows`]): each checked on its own against A and B, read a
/// row at a time. A k-split tile is named once, whichever part is wrong.
pub fn wrong_tiles(
    a: &crate::inputs::Operand,
    b: &crate::inputs::Operand,
    c: MatrixView<'_>,
    plan: &crate::Plan,
    rows: &[usize],
    rounds: u32,
    vseed: u64,
) -> Result<Vec<(u32, u32)>, MatrixError> {
    fn typed<T: Element>(
        a: &crate::inputs::Operand,
        b: &crate::inputs::Operand,
        c: ArrayView2<'_, T>,
        plan: &crate::Plan,
        block_rows: &[u32],
        xs: &[Array1<f64>],
    ) -> Result<Vec<(u32, u32)>, MatrixError> {
        let (k, n) = b.shape();
        let gamma = gamma(plan.dtype, k, n);
        let col_blocks: Vec<u32> = (0..plan.col_blocks()).collect();
        let chunk = (MAX_BX_VALUES / k.max(1)).max(1);
        let mut wrong = std::collections::BTreeSet::new();
        let (mut brow, mut arow) = (vec![T::zero(); n], vec![T::zero(); k]);
        for x in xs {
            for cols in col_blocks.chunks(chunk) {
                // B_c·x_c for each block column c of the chunk, a k-vector each, and its bound.
                let mut bx = vec![(0.0f64, 0.0f64); k * cols.len()];
                for i in 0..k {
                    b.row(i, 0..n, &mut brow)?;
                    for (ci, &cb) in cols.iter().enumerate() {
                        let (mut s, mut sa) = (0.0, 0.0);
                        for j in plan.cols(cb) {
                            let v = brow[j].to_f64();
                            s += v * x[j];
                            sa += v.abs() * x[j].abs();
                        }
                        bx[i * cols.len() + ci] = (s, sa);
                    }
                }
                for &rb in block_rows {
                    for i in plan.rows(rb) {
                        a.row(i, 0..k, &mut arow)?;
                        for (ci, &cb) in cols.iter().enumerate() {
                            let (mut want, mut bound) = (0.0, 0.0);
                            for (kk, &v) in arow.iter().enumerate() {
                                let (s, sa) = bx[kk * cols.len() + ci];
                                let v = v.to_f64();
                                want += v * s;
                                bound += v.abs() * sa;
                            }
                            let got: f64 = plan.cols(cb).map(|j| c[[i, j]].to_f64() * x[j]).sum();
                            let diff = (got - want).abs();
                            if diff.is_nan() || diff > gamma * bound + f64::MIN_POSITIVE {
                                wrong.insert((rb, cb));
                            }
                        }
                    }
                }
            }
        }
        Ok(wrong.into_iter().collect())
    }
    crate::matrix::check_conformable(a.describe(), b.describe())?;
    let mut block_rows: Vec<u32> = rows
        .iter()
        .map(|&i| (i as u64 / plan.tile.max(1)) as u32)
        .filter(|&r| r < plan.row_blocks())
        .collect();
    block_rows.dedup();
    let xs = vectors(plan.n as usize, rounds, vseed);
    match c {
        MatrixView::F32(c) => typed(a, b, c, plan, &block_rows, &xs),
        MatrixView::F64(c) => typed(a, b, c, plan, &block_rows, &xs),
    }
}

impl Verdict {
    /// The expectation does not fit this C: a failure, not a pass.
    fn unusable() -> Verdict {
        Verdict {
            passed: false,
            rounds: 0,
            worst_ratio: f64::INFINITY,
            worst_row: None,
        }
    }
}

/// C·x for the check's random vectors, summed tile by tile as the collector writes C. Checking
/// C by reading it again after its last tile was the whole tail of a job; this moves that work
/// to where each tile is already in cache, spread over the job.
#[derive(Debug, Clone)]
pub struct RunningProduct {
    xs: Vec<Array1<f64>>,
    cx: Vec<Array1<f64>>,
    n: usize,
    tiles: u64,
}

impl RunningProduct {
    /// For C of m×n and the vectors `rounds` and `seed` draw (as [`expect`] and the manifest's
    /// [`Check`] do).
    pub fn new(m: usize, n: usize, rounds: u32, seed: u64) -> Self {
        let xs = vectors(n, rounds, seed);
        let cx = xs.iter().map(|_| Array1::zeros(m)).collect();
        RunningProduct {
            xs,
            cx,
            n,
            tiles: 0,
        }
    }

    /// Adds a tile of C whose top-left corner is (row0, col0). Each tile must be added once.
    pub fn add<T: Element>(&mut self, row0: usize, col0: usize, tile: ArrayView2<'_, T>) {
        for (x, cx) in self.xs.iter().zip(&mut self.cx) {
            let x = x.slice(ndarray::s![col0..col0 + tile.ncols()]);
            for (i, row) in tile.rows().into_iter().enumerate() {
                let mut s = 0.0;
                for (&v, &xv) in row.iter().zip(x.iter()) {
                    s += v.to_f64() * xv;
                }
                cx[row0 + i] += s;
            }
        }
        self.tiles += 1;
    }

    /// Tiles added so far.
    pub fn tiles(&self) -> u64 {
        self.tiles
    }
}

/// Runs `rounds` independent Freivalds checks of `c` against `a`·`b`.
pub fn freivalds(
    a: MatrixView<'_>,
    b: MatrixView<'_>,
    c: MatrixView<'_>,
    rounds: u32,
    seed: u64,
) -> Result<Verdict, MatrixError> {
    Ok(expect(a, b, rounds, seed)?.check(c))
}

/// y = M·x and |M|·|x|, summed in f64.
fn matvec<T: Element>(
    m: ArrayView2<'_, T>,
    x: &Array1<f64>,
    xabs: &Array1<f64>,
) -> (Array1<f64>, Array1<f64>) {
    let mut y = Array1::zeros(m.nrows());
    let mut yabs = Array1::zeros(m.nrows());
    for (i, row) in m.rows().into_iter().enumerate() {
        let (mut s, mut sa) = (0.0, 0.0);
        for ((&v, &xv), &xa) in row.iter().zip(x).zip(xabs) {
            let v = v.to_f64();
            s += v * xv;
            sa += v.abs() * xa;
        }
        y[i] = s;
        yabs[i] = sa;
    }
    (y, yabs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::matrix::{Matrix, generate};

    #[test]
    fn the_true_product_passes_in_both_precisions() {
        for dtype in [DType::F32, DType::F64] {
            let (a, b) = generate(70, 300, 50, dtype, 3);
            let c = a.dot(&b).unwrap();
            let v = freivalds(a.view(), b.view(), c.view(), 2, 1).unwrap();
            assert!(v.passed, "{dtype}: {v:?}");
        }
    }

    #[test]
    fn the_expectation_walked_from_the_seed_equals_the_one_from_the_matrices() {
        for dtype in [DType::F32, DType::F64] {
            let (a, b) = generate(33, 70, 21, dtype, 9);
            let c = a.dot(&b).unwrap();
            let seeded = expect_seeded(33, 70, 21, dtype, 9, 2, 4);
            let held = expect(a.view(), b.view(), 2, 4).unwrap();
            for (s, h) in seeded.rounds.iter().zip(&held.rounds) {
                assert_eq!(s.x, h.x);
                assert!((&s.abx - &h.abx).iter().all(|d| d.abs() < 1e-12));
            }
            assert!(seeded.check(c.view()).passed, "{dtype}");
            let Matrix::F64(mut wrong) = generate(33, 70, 21, DType::F64, 9)
                .0
                .dot(&generate(33, 70, 21, DType::F64, 9).1)
                .unwrap()
            else {
                unreachable!()
            };
            wrong[(5, 5)] += 1e-3;
            if dtype == DType::F64 {
                assert!(!seeded.check(MatrixView::F64(wrong.view())).passed);
            }
        }
    }

    #[test]
    fn one_wrong_element_or_a_doubled_tile_fails() {
        let (a, b) = generate(40, 30, 20, DType::F64, 3);
        let Matrix::F64(mut c) = a.dot(&b).unwrap() else {
            unreachable!()
        };
        c[(17, 3)] += 1e-6;
        let v = freivalds(a.view(), b.view(), MatrixView::F64(c.view()), 2, 1).unwrap();
        assert!(!v.passed && v.worst_row == Some(17), "{v:?}");

        let Matrix::F64(mut doubled) = a.dot(&b).unwrap() else {
            unreachable!()
        };
        doubled
            .slice_mut(ndarray::s![0..8, 0..8])
            .mapv_inplace(|v| 2.0 * v);
        assert!(
            !freivalds(a.view(), b.view(), MatrixView::F64(doubled.view()), 1, 9)
                .unwrap()
                .passed
        );
    }

    #[test]
    fn the_expectation_travels_in_a_manifest_exactly_and_a_damaged_one_is_refused() {
        let (a, b) = generate(30, 20, 10, DType::F64, 5);
        let c = a.dot(&b).unwrap();
        let sent = expect(a.view(), b.view(), ROUNDS, VECTOR_SEED).unwrap();
        let json = serde_json::to_string(&sent.to_check(VECTOR_SEED)).unwrap();
        let check: Check = serde_json::from_str(&json).unwrap();
        let got = Expected::from_check(&check, 30, 20, 10, DType::F64).unwrap();
        for (s, g) in sent.rounds.iter().zip(&got.rounds) {
            assert_eq!((&s.x, &s.abx, &s.bound), (&g.x, &g.abx, &g.bound));
        }
        assert!(got.check(c.view()).passed);

        let mut short = check.clone();
        short.abx[0] = BASE64.encode([0u8; 8]);
        assert!(Expected::from_check(&short, 30, 20, 10, DType::F64).is_err());
        let mut nan = check.clone();
        nan.bound[1] = BASE64.encode(f64::NAN.to_le_bytes().repeat(30));
        assert!(Expected::from_check(&nan, 30, 20, 10, DType::F64).is_err());
        let mut lopsided = check.clone();
        lopsided.bound.pop();
        assert!(Expected::from_check(&lopsided, 30, 20, 10, DType::F64).is_err());
        // A negative bound would let any C pass: refused.
        let mut negative = check;
        negative.bound[0] = BASE64.encode((-1.0f64).to_le_bytes().repeat(30));
        assert!(Expected::from_check(&negative, 30, 20, 10, DType::F64).is_err());
    }

    #[test]
    fn c_summed_tile_by_tile_in_any_order_checks_like_c_read_whole() {
        let (a, b) = generate(37, 25, 29, DType::F64, 11);
        let Matrix::F64(c) = a.dot(&b).unwrap() else {
            unreachable!()
        };
        let e = expect(a.view(), b.view(), ROUNDS, VECTOR_SEED).unwrap();
        let tiles = [(16, 0), (0, 16), (32, 16), (16, 16), (0, 0), (32, 0)];
        let mut running = RunningProduct::new(37, 29, ROUNDS, VECTOR_SEED);
        for (r, col) in tiles {
            let tile = c.slice(ndarray::s![r..(r + 16).min(37), col..(col + 16).min(29)]);
            running.add(r, col, tile);
        }
        assert_eq!(running.tiles(), 6);
        let v = e.check_running(&running).unwrap();
        assert!(v.passed, "{v:?}");
        assert!((v.worst_ratio - e.check(MatrixView::F64(c.view())).worst_ratio).abs() < 1e-3);

        // A tile added twice is C with that tile doubled: it fails.
        running.add(16, 16, c.slice(ndarray::s![16..32, 16..29]));
        assert!(!e.check_running(&running).unwrap().passed);
        // Summed for other vectors: not comparable.
        let other = RunningProduct::new(37, 29, ROUNDS, VECTOR_SEED + 1);
        assert!(e.check_running(&other).is_none());
    }

    #[test]
    fn the_wrong_tiles_are_named_and_only_they_in_both_precisions_and_with_k_split() {
        for (dtype, limit) in [
            (DType::F32, 1 << 20),
            (DType::F64, 1 << 20),
            (DType::F64, 3000),
        ] {
            let (m, k, n) = (40, 90, 33);
            let plan =
                crate::Plan::new(m, k, n, dtype, 8, crate::tiling::HEADER_BUDGET + limit).unwrap();
            let (a, b) =
                crate::inputs::Operand::seeded_pair(m as usize, k as usize, n as usize, dtype, 5);
            let c = a.to_matrix().unwrap().dot(&b.to_matrix().unwrap()).unwrap();
            let e = expect_seeded(
                m as usize,
                k as usize,
                n as usize,
                dtype,
                5,
                ROUNDS,
                VECTOR_SEED,
            );
            assert!(
                e.failing_rows(c.view()).is_empty(),
                "{dtype}: a right C fails no row"
            );
            // Tile (1, 2) off by a quarter in one number; tile (4, 0) (the short last block row)
            // all zeros.
            let mut wrong = c.clone();
            match &mut wrong {
                Matrix::F32(w) => {
                    w[[9, 17]] += 0.25;
                    w.slice_mut(ndarray::s![32.., 0..8]).fill(0.0);
                }
                Matrix::F64(w) => {
                    w[[9, 17]] += 0.25;
                    w.slice_mut(ndarray::s![32.., 0..8]).fill(0.0);
                }
            }
            let rows = e.failing_rows(wrong.view());
            assert!(
                rows.contains(&9) && rows.iter().all(|&r| r == 9 || r >= 32),
                "{rows:?}"
            );
            let tiles = wrong_tiles(&a, &b, wrong.view(), &plan, &rows, ROUNDS, 77).unwrap();
            assert_eq!(tiles, [(1, 2), (4, 0)], "{dtype}, {} parts", plan.parts());
        }
    }
}
