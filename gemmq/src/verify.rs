//! Is C really A·B? Freivalds' check, with a rounding bound instead of a guessed tolerance.
//!
//! Recomputing A·B to compare costs as much as the job; Freivalds' check costs three
//! matrix-vector products: for a random vector x, C·x must equal A·(B·x). A wrong, missing or
//! doubled tile changes C·x by far more than rounding can, for almost every x.
//!
//! The tolerance is derived, not tuned: a dot product of length k computed in a format with unit
//! roundoff u is off by at most about k·u·(|A|·|B|)ᵢⱼ, so row i of C·x may differ from A·(B·x) by
//! up to (k + n + 2)·u·(|A|·|B|·|x|)ᵢ; the check allows twice that, per row. Sums run in f64.

use ndarray::{Array1, ArrayView2};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::matrix::{Element, MatrixError, MatrixView};

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

/// Expected values for A (m×k) and B (k×n) generated from `seed` by [`crate::matrix::generate`]:
/// O(m + k + n) memory, one pass over each.
pub fn expect_seeded(
    m: usize,
    k: usize,
    n: usize,
    dtype: crate::DType,
    seed: u64,
    rounds: u32,
    vseed: u64,
) -> Expected {
    fn typed<T: Element>(
        m: usize,
        k: usize,
        n: usize,
        seed: u64,
        xs: Vec<Array1<f64>>,
    ) -> Vec<Round> {
        let (sa, sb) = crate::matrix::operand_seeds(seed);
        // B·x and |B|·|x|, a row of B at a time.
        let mut g = crate::matrix::SeededRows::new(sb);
        let mut bx: Vec<(Array1<f64>, Array1<f64>)> = xs
            .iter()
            .map(|_| (Array1::zeros(k), Array1::zeros(k)))
            .collect();
        let mut row = vec![0.0f64; n];
        for i in 0..k {
            for v in row.iter_mut() {
                *v = g.draw::<T>().to_f64();
            }
            for (x, (y, yabs)) in xs.iter().zip(bx.iter_mut()) {
                let (mut s, mut sa) = (0.0, 0.0);
                for (&b, &xv) in row.iter().zip(x) {
                    s += b * xv;
                    sa += b.abs() * xv.abs();
                }
                y[i] = s;
                yabs[i] = sa;
            }
        }
        // A·(B·x) and |A|·(|B|·|x|), a row of A at a time.
        let mut g = crate::matrix::SeededRows::new(sa);
        let mut out: Vec<Round> = xs
            .into_iter()
            .map(|x| Round {
                x,
                abx: Array1::zeros(m),
                bound: Array1::zeros(m),
            })
            .collect();
        let mut row = vec![0.0f64; k];
        for i in 0..m {
            for v in row.iter_mut() {
                *v = g.draw::<T>().to_f64();
            }
            for (r, (y, yabs)) in out.iter_mut().zip(&bx) {
                let (mut s, mut sa) = (0.0, 0.0);
                for ((&a, &yv), &ya) in row.iter().zip(y).zip(yabs) {
                    s += a * yv;
                    sa += a.abs() * ya;
                }
                r.abx[i] = s;
                r.bound[i] = sa;
            }
        }
        out
    }
    let xs = vectors(n, rounds, vseed);
    let rounds = match dtype {
        crate::DType::F32 => typed::<f32>(m, k, n, seed, xs),
        crate::DType::F64 => typed::<f64>(m, k, n, seed, xs),
    };
    Expected { rounds, k, dtype }
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
        xs.into_iter()
            .map(|x| {
                let xabs = x.mapv(f64::abs);
                let (bx, bxabs) = matvec(b, &x, &xabs);
                let (abx, bound) = matvec(a, &bx, &bxabs);
                Round { x, abx, bound }
            })
            .collect()
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
    /// Checks C against the expectation: one pass over C per round.
    pub fn check(&self, c: MatrixView<'_>) -> Verdict {
        fn typed<T: Element>(e: &Expected, c: ArrayView2<'_, T>) -> Verdict {
            let n = c.ncols();
            let gamma = 2.0 * (e.k + n + 2) as f64 * T::EPSILON;
            let (mut worst_ratio, mut worst_row) = (0.0f64, None);
            let mut passed = true;
            for r in &e.rounds {
                if r.x.len() != n || r.abx.len() != c.nrows() {
                    return Verdict {
                        passed: false,
                        rounds: 0,
                        worst_ratio: f64::INFINITY,
                        worst_row: None,
                    };
                }
                let xabs = r.x.mapv(f64::abs);
                let (cx, _) = matvec(c, &r.x, &xabs);
                for i in 0..c.nrows() {
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
                rounds: e.rounds.len() as u32,
                worst_ratio,
                worst_row,
            }
        }
        match (c, self.dtype) {
            (MatrixView::F32(c), crate::DType::F32) => typed(self, c),
            (MatrixView::F64(c), crate::DType::F64) => typed(self, c),
            _ => Verdict {
                passed: false,
                rounds: 0,
                worst_ratio: f64::INFINITY,
                worst_row: None,
            },
        }
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
}
