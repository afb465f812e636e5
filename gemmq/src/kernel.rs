//! The multiplication kernel: one place where C's tiles are actually computed.
//!
//! gemmq multiplies with the [`gemm`] crate (the kernel behind `faer` and `candle`), not with
//! ndarray's `dot` (matrixmultiply). gemm picks its micro-kernel at run time from what the CPU
//! offers, AVX-512 included; matrixmultiply stops at AVX2/FMA. Measured on the 2-core AVX-512
//! Xeon these figures come from (BENCHMARKS.md), f64 at 4096: 1 thread 70 GFLOP/s against
//! matrixmultiply's 26, 2 threads 125–136 against 58–61. On an AVX2-only CPU the two are close.
//! Either way the product is the same up to rounding, and gemmq's verification bound (k·ε per
//! dot product) holds for any summation order.
//!
//! More than one thread runs on gemm's rayon pool. A worker uses the machine's cores by default
//! (`--threads`, consumer crate): alone on a machine it needs them, and where workers share one,
//! the last one busy at a job's end takes the cores the others left idle.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::matrix::Element;

/// How many threads one multiplication may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Exactly this many (1: on the calling thread, no pool).
    Exactly(usize),
    /// As many as the machine has cores.
    All,
}

impl Threads {
    fn parallelism(self) -> gemm::Parallelism {
        match self {
            Threads::Exactly(0 | 1) => gemm::Parallelism::None,
            Threads::Exactly(n) => gemm::Parallelism::Rayon(n),
            // 0: rayon's own thread count, one per core.
            Threads::All => gemm::Parallelism::Rayon(0),
        }
    }
}

/// A·B. The caller checked that A's columns equal B's rows.
///
/// # Panics
/// If they differ (a bug in the caller: every path from the network checks shapes first).
pub fn matmul<T: Element>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    threads: Threads,
) -> Array2<T> {
    let mut c = Array2::<T>::zeros((a.nrows(), b.ncols()));
    matmul_into(a, b, c.view_mut(), threads);
    c
}

/// c = A·B, overwriting `c` (never read): for writing a product straight where it goes.
///
/// # Panics
/// If A's columns differ from B's rows, or `c` is not A's rows × B's columns (bugs in the
/// caller, as for [`matmul`]).
pub fn matmul_into<T: Element>(
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    mut c: ArrayViewMut2<'_, T>,
    threads: Threads,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert_eq!(
        k, k2,
        "matmul of {m}x{k} by {k2}x{n}: inner dimensions differ"
    );
    assert_eq!(
        c.dim(),
        (m, n),
        "the product of {m}x{k} by {k2}x{n} is {m}x{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(T::zero());
        return;
    }
    let (sa, sb, sc) = (a.strides(), b.strides(), c.strides());
    let (c_rs, c_cs) = (sc[0], sc[1]);
    // SAFETY: every pointer comes from a live ndarray view of the stated shape, and the strides
    // (in elements, as gemm takes them) are that view's own, so gemm reads and writes only
    // inside them; `c` is a mutable view, so neither `a` nor `b` aliases it. With
    // `read_dst = false` gemm writes c = 1·(a·b), ignoring alpha and c's old contents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            false,
            a.as_ptr(),
            sa[1],
            sa[0],
            b.as_ptr(),
            sb[1],
            sb[0],
            T::zero(),
            T::one(),
            false,
            false,
            false,
            threads.parallelism(),
        );
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, s};

    use super::*;

    fn numbers<T: Element>(rows: usize, cols: usize, salt: usize) -> Array2<T> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            T::from_f64(((i * 31 + j * 17 + salt) % 23) as f64 / 7.0 - 1.5)
        })
    }

    fn agrees_with_ndarray<T: Element>(
        a: ArrayView2<'_, T>,
        b: ArrayView2<'_, T>,
        threads: Threads,
    ) {
        let want = a.dot(&b);
        let got = matmul(a, b, threads);
        assert_eq!(got.dim(), want.dim());
        let bound = a.dim().1 as f64 * T::EPSILON * 64.0;
        for (g, w) in got.iter().zip(want.iter()) {
            assert!(
                (g.to_f64() - w.to_f64()).abs() <= bound * w.to_f64().abs().max(1.0),
                "{g:?} vs {w:?}"
            );
        }
    }

    #[test]
    fn the_product_is_ndarrays_up_to_rounding_for_ragged_shapes_and_both_types() {
        for (m, k, n) in [(1, 1, 1), (7, 13, 5), (64, 64, 64), (130, 257, 99)] {
            let (a, b) = (numbers::<f64>(m, k, 1), numbers::<f64>(k, n, 2));
            agrees_with_ndarray(a.view(), b.view(), Threads::Exactly(1));
            let (a, b) = (numbers::<f32>(m, k, 3), numbers::<f32>(k, n, 4));
            agrees_with_ndarray(a.view(), b.view(), Threads::Exactly(1));
        }
    }

    #[test]
    fn strided_views_and_several_threads_give_the_same_product() {
        let (a, b) = (numbers::<f64>(200, 300, 5), numbers::<f64>(300, 180, 6));
        // Blocks cut out of larger matrices, and a transposed one: strides other than (cols, 1).
        let (sa, sb) = (a.slice(s![10..150, 20..270]), b.slice(s![20..270, 5..170]));
        agrees_with_ndarray(sa, sb, Threads::Exactly(1));
        agrees_with_ndarray(sa, sb, Threads::Exactly(2));
        let bt = numbers::<f64>(165, 250, 7);
        agrees_with_ndarray(sa, bt.t(), Threads::All);
    }

    #[test]
    fn a_product_written_into_a_view_overwrites_what_was_there() {
        let (a, b) = (numbers::<f64>(70, 90, 8), numbers::<f64>(90, 50, 9));
        let mut c = Array2::from_elem((70, 50), f64::NAN);
        matmul_into(a.view(), b.view(), c.view_mut(), Threads::Exactly(2));
        assert_eq!(c, matmul(a.view(), b.view(), Threads::Exactly(2)));
        let (a, b) = (numbers::<f64>(2, 0, 1), numbers::<f64>(0, 3, 2));
        let mut c = Array2::from_elem((2, 3), f64::NAN);
        matmul_into(a.view(), b.view(), c.view_mut(), Threads::All);
        assert_eq!(c, Array2::<f64>::zeros((2, 3)), "an empty sum is zero");
    }

    #[test]
    fn an_empty_side_gives_an_empty_or_zero_product() {
        let (a, b) = (numbers::<f64>(0, 4, 1), numbers::<f64>(4, 3, 2));
        assert_eq!(matmul(a.view(), b.view(), Threads::All).dim(), (0, 3));
        let (a, b) = (numbers::<f64>(2, 0, 1), numbers::<f64>(0, 3, 2));
        assert_eq!(
            matmul(a.view(), b.view(), Threads::All),
            Array2::<f64>::zeros((2, 3))
        );
    }
}
