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

/// Runs `rounds` independent Freivalds checks of `c` against `a`·`b`.
pub fn freivalds(
    a: MatrixView<'_>,
    b: MatrixView<'_>,
    c: MatrixView<'_>,
    rounds: u32,
    seed: u64,
) -> Result<Verdict, MatrixError> {
    match (a, b, c) {
        (MatrixView::F32(a), MatrixView::F32(b), MatrixView::F32(c)) => {
            Ok(typed(a, b, c, rounds, seed))
        }
        (MatrixView::F64(a), MatrixView::F64(b), MatrixView::F64(c)) => {
            Ok(typed(a, b, c, rounds, seed))
        }
        _ => Err(MatrixError::Mixed(a.dtype(), c.dtype())),
    }
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

fn typed<T: Element>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    c: ArrayView2<'_, T>,
    rounds: u32,
    seed: u64,
) -> Verdict {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    if b.nrows() != k || c.dim() != (m, n) {
        return Verdict {
            passed: false,
            rounds: 0,
            worst_ratio: f64::INFINITY,
            worst_row: None,
        };
    }
    let gamma = 2.0 * (k + n + 2) as f64 * T::EPSILON;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut worst_ratio: f64 = 0.0;
    let mut worst_row = None;
    for _ in 0..rounds {
        let x = Array1::from_shape_simple_fn(n, || rng.random_range(-1.0..1.0));
        let xabs = x.mapv(f64::abs);
        let (cx, _) = matvec(c, &x, &xabs);
        let (bx, bxabs) = matvec(b, &x, &xabs);
        let (abx, bound) = matvec(a, &bx, &bxabs);
        for i in 0..m {
            let diff = (cx[i] - abx[i]).abs();
            let allowed = gamma * bound[i] + f64::MIN_POSITIVE;
            let ratio = if diff.is_nan() {
                f64::INFINITY
            } else {
                diff / allowed
            };
            if ratio > worst_ratio {
                worst_ratio = ratio;
                if ratio > 1.0 && worst_row.is_none() {
                    worst_row = Some(i);
                }
            }
        }
    }
    Verdict {
        passed: worst_ratio <= 1.0,
        rounds,
        worst_ratio,
        worst_row,
    }
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
