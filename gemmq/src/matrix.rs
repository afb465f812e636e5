//! Matrices: making them from a seed, reading and writing .npy, and the bytes of blocks.
//!
//! gemmq works in f32 or f64; [`Element`] is what both share, and [`Matrix`] is a matrix of either
//! whose type is known only at run time (it comes from a flag or a file).

use std::path::Path;

use ndarray::{Array2, ArrayView2, ArrayViewMut2, LinalgScalar, s};

use crate::kernel::{self, Threads};
use crate::message::{DType, MessageError, Product, TaskHeader};

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error(
        "inner dimensions differ: A is {a_rows}x{a_cols} but B is {b_rows}x{b_cols}; A's columns must equal B's rows"
    )]
    Shapes {
        a_rows: usize,
        a_cols: usize,
        b_rows: usize,
        b_cols: usize,
    },
    #[error("A is {0} but B is {1}; both must have the same dtype")]
    Mixed(DType, DType),
    #[error("a {rows}x{cols} {dtype} block needs {expected} bytes, got {got}")]
    Length {
        rows: usize,
        cols: usize,
        dtype: DType,
        expected: u64,
        got: u64,
    },
    #[error(
        "{0} holds NaN or infinite values; gemmq multiplies finite matrices only (IEEE NaN/Inf propagate across whole tiles and make C unverifiable)"
    )]
    NotFinite(&'static str),
}

/// A number type gemmq multiplies: f32 or f64.
pub trait Element:
    LinalgScalar
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + ndarray_npy::WritableElement
    + ndarray_npy::ReadableElement
    + ndarray_npy::ViewElement
    + ndarray_npy::ViewMutElement
    + bytemuck::Pod
    + 'static
{
    const DTYPE: DType;
    fn from_le_slice(bytes: &[u8]) -> Self;
    fn extend_le(self, out: &mut Vec<u8>);
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// Unit roundoff: half the distance from 1.0 to the next number.
    const EPSILON: f64;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            const EPSILON: f64 = <$t>::EPSILON as f64 / 2.0;
            #[inline]
            fn from_le_slice(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("caller passes size_of bytes"))
            }
            #[inline]
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);

/// A matrix of f32 or f64.
#[derive(Debug, Clone, PartialEq)]
pub enum Matrix {
    F32(Array2<f32>),
    F64(Array2<f64>),
}

/// A borrowed f32 or f64 matrix (a view of a [`Matrix`], or of a memory-mapped .npy file).
#[derive(Debug, Clone, Copy)]
pub enum MatrixView<'a> {
    F32(ArrayView2<'a, f32>),
    F64(ArrayView2<'a, f64>),
}

impl MatrixView<'_> {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            MatrixView::F32(v) => v.dim(),
            MatrixView::F64(v) => v.dim(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            MatrixView::F32(_) => DType::F32,
            MatrixView::F64(_) => DType::F64,
        }
    }

    pub fn to_owned(&self) -> Matrix {
        match self {
            MatrixView::F32(v) => Matrix::F32(v.to_owned()),
            MatrixView::F64(v) => Matrix::F64(v.to_owned()),
        }
    }
}

/// Calls `$body` with `$m` bound to the typed array inside a [`Matrix`].
#[macro_export]
macro_rules! with_matrix {
    ($matrix:expr, $m:ident => $body:expr) => {
        match $matrix {
            $crate::matrix::Matrix::F32($m) => $body,
            $crate::matrix::Matrix::F64($m) => $body,
        }
    };
}

impl Matrix {
    pub fn dtype(&self) -> DType {
        match self {
            Matrix::F32(_) => DType::F32,
            Matrix::F64(_) => DType::F64,
        }
    }

    pub fn view(&self) -> MatrixView<'_> {
        match self {
            Matrix::F32(m) => MatrixView::F32(m.view()),
            Matrix::F64(m) => MatrixView::F64(m.view()),
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        with_matrix!(self, m => m.dim())
    }

    pub fn is_finite(&self) -> bool {
        match self {
            Matrix::F32(m) => m.iter().all(|v| v.is_finite()),
            Matrix::F64(m) => m.iter().all(|v| v.is_finite()),
        }
    }

    /// Reads a 2-D f32 or f64 .npy file.
    pub fn read_npy(path: &Path) -> Result<Matrix, MatrixError> {
        let err = |e: &dyn std::fmt::Display| MatrixError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        match ndarray_npy::read_npy::<_, Array2<f64>>(path) {
            Ok(m) => Ok(Matrix::F64(m)),
            Err(ndarray_npy::ReadNpyError::WrongDescriptor(_)) => {
                ndarray_npy::read_npy::<_, Array2<f32>>(path)
                    .map(Matrix::F32)
                    .map_err(|e| match e {
                        ndarray_npy::ReadNpyError::WrongDescriptor(d) => err(&format!(
                            "unsupported array type {d}; gemmq reads 2-D float32 or float64 arrays"
                        )),
                        e => err(&e),
                    })
            }
            Err(e) => Err(err(&e)),
        }
    }

    pub fn write_npy(&self, path: &Path) -> Result<(), MatrixError> {
        let r = with_matrix!(self, m => ndarray_npy::write_npy(path, m));
        r.map_err(|e| MatrixError::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// A·B computed here, in one process: the reference that gemmq's answer is checked against.
    pub fn dot(&self, b: &Matrix) -> Result<Matrix, MatrixError> {
        if self.shape().1 != b.shape().0 {
            let ((a_rows, a_cols), (b_rows, b_cols)) = (self.shape(), b.shape());
            return Err(MatrixError::Shapes {
                a_rows,
                a_cols,
                b_rows,
                b_cols,
            });
        }
        match (self, b) {
            (Matrix::F32(a), Matrix::F32(b)) => Ok(Matrix::F32(kernel::matmul(
                a.view(),
                b.view(),
                Threads::All,
            ))),
            (Matrix::F64(a), Matrix::F64(b)) => Ok(Matrix::F64(kernel::matmul(
                a.view(),
                b.view(),
                Threads::All,
            ))),
            _ => Err(MatrixError::Mixed(self.dtype(), b.dtype())),
        }
    }
}

/// Checks that A·B is defined for A and B of these shapes and dtypes: the same dtype, A's columns
/// B's rows, nothing empty.
pub fn check_conformable(
    (a_rows, a_cols, a_dtype): (usize, usize, DType),
    (b_rows, b_cols, b_dtype): (usize, usize, DType),
) -> Result<(), MatrixError> {
    if a_dtype != b_dtype {
        return Err(MatrixError::Mixed(a_dtype, b_dtype));
    }
    if a_cols != b_rows || a_rows == 0 || a_cols == 0 || b_cols == 0 {
        return Err(MatrixError::Shapes {
            a_rows,
            a_cols,
            b_rows,
            b_cols,
        });
    }
    Ok(())
}

/// Checks that A·B is defined and that neither holds NaN or infinity.
pub fn check_operands(a: &Matrix, b: &Matrix) -> Result<(), MatrixError> {
    let ((a_rows, a_cols), (b_rows, b_cols)) = (a.shape(), b.shape());
    check_conformable((a_rows, a_cols, a.dtype()), (b_rows, b_cols, b.dtype()))?;
    if !a.is_finite() {
        return Err(MatrixError::NotFinite("A"));
    }
    if !b.is_finite() {
        return Err(MatrixError::NotFinite("B"));
    }
    Ok(())
}

/// The job's A (m×k) and B (k×n) made from `seed` (see [`crate::inputs`]), whole, in memory: for
/// tests and for checking small jobs. The producer makes them a block at a time.
pub fn generate(m: usize, k: usize, n: usize, dtype: DType, seed: u64) -> (Matrix, Matrix) {
    let (a, b) = crate::inputs::Operand::seeded_pair(m, k, n, dtype, seed);
    let whole = |o: crate::inputs::Operand| o.to_matrix().expect("a seeded matrix is made whole");
    (whole(a), whole(b))
}

/// The seeds of A's and B's streams: two from one, the odd/even split keeps them apart.
pub fn operand_seeds(seed: u64) -> (u64, u64) {
    (seed.wrapping_mul(2), seed.wrapping_mul(2).wrapping_add(1))
}

/// Appends a (possibly strided) block as row-major little-endian bytes.
pub fn extend_le<T: Element>(block: ArrayView2<'_, T>, out: &mut Vec<u8>) {
    out.reserve(block.len() * size_of::<T>());
    for row in block.rows() {
        match row.as_slice() {
            // A contiguous row on a little-endian machine is already its bytes: one copy.
            Some(slice) if cfg!(target_endian = "little") => {
                out.extend_from_slice(bytemuck::cast_slice(slice));
            }
            _ => {
                for &v in row {
                    v.extend_le(out);
                }
            }
        }
    }
}

/// Calls `f` with a row-major little-endian block: viewed where it lies when it can be (a
/// little-endian machine and aligned bytes), decoded into an array otherwise. `bytes.len()` must
/// be rows × cols × size.
pub fn with_le<T: Element, R>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    f: impl FnOnce(ArrayView2<'_, T>) -> R,
) -> R {
    if cfg!(target_endian = "little")
        && let Ok(numbers) = bytemuck::try_cast_slice::<u8, T>(bytes)
        && let Ok(view) = ArrayView2::from_shape((rows, cols), numbers)
    {
        return f(view);
    }
    f(from_le(bytes, rows, cols).view())
}

/// Reads a row-major little-endian block; `bytes.len()` must be rows × cols × size.
pub fn from_le<T: Element>(bytes: &[u8], rows: usize, cols: usize) -> Array2<T> {
    let data: Vec<T> = bytes
        .chunks_exact(size_of::<T>())
        .map(T::from_le_slice)
        .collect();
    Array2::from_shape_vec((rows, cols), data).expect("caller checked the length")
}

/// The payload of the task for `id` of `plan`: A's block then B's block.
pub fn task_payload<T: Element>(
    a: &Array2<T>,
    b: &Array2<T>,
    plan: &crate::Plan,
    id: crate::TileId,
) -> Vec<u8> {
    let (rows, cols, depth) = (plan.rows(id.row), plan.cols(id.col), plan.depth(id.part));
    let mut out = Vec::new();
    extend_le(a.slice(s![rows, depth.clone()]), &mut out);
    extend_le(b.slice(s![depth, cols]), &mut out);
    out
}

/// Multiplies two blocks into a [`Product`]: its little-endian bytes, made where its result
/// message will be.
pub fn multiply_blocks(
    a: MatrixView<'_>,
    b: MatrixView<'_>,
    threads: Threads,
) -> Result<Product, MatrixError> {
    let ((a_rows, a_cols), (b_rows, b_cols)) = (a.shape(), b.shape());
    if a_cols != b_rows {
        return Err(MatrixError::Shapes {
            a_rows,
            a_cols,
            b_rows,
            b_cols,
        });
    }
    match (a, b) {
        (MatrixView::F32(a), MatrixView::F32(b)) => Ok(product_of(a, b, threads)),
        (MatrixView::F64(a), MatrixView::F64(b)) => Ok(product_of(a, b, threads)),
        _ => Err(MatrixError::Mixed(a.dtype(), b.dtype())),
    }
}

/// A·B as a [`Product`]: the kernel writes its little-endian bytes in place when the machine is
/// little-endian and the buffer aligned (always, in practice), through an array otherwise.
fn product_of<T: Element>(a: ArrayView2<'_, T>, b: ArrayView2<'_, T>, threads: Threads) -> Product {
    let (m, n) = (a.nrows(), b.ncols());
    let mut product = Product::zeroed(m * n * size_of::<T>());
    if cfg!(target_endian = "little")
        && let Ok(numbers) = bytemuck::try_cast_slice_mut::<u8, T>(product.bytes_mut())
        && let Ok(c) = ArrayViewMut2::from_shape((m, n), numbers)
    {
        kernel::matmul_into(a, b, c, threads);
        return product;
    }
    let mut bytes = Vec::new();
    extend_le(kernel::matmul(a, b, threads).view(), &mut bytes);
    Product::from_bytes(&bytes)
}

/// A block of A or B kept in the message body it arrived in. Frames put payloads 8-byte
/// aligned ([`crate::message::encode_header`]), so on a little-endian machine the numbers are
/// viewed where they lie: no copy, and no second buffer of fresh pages per block. Otherwise
/// (big-endian, or a body from an older producer) they are decoded into an array of their own.
#[derive(Debug)]
pub struct Block(BlockData);

#[derive(Debug)]
enum BlockData {
    Body {
        bytes: Vec<u8>,
        start: usize,
        rows: usize,
        cols: usize,
        dtype: DType,
    },
    Owned(Matrix),
}

impl Block {
    /// The rows×cols block whose little-endian numbers are `bytes[start..]`; the caller checked
    /// the length (as [`crate::message::decode`] does).
    pub fn from_body(
        mut bytes: Vec<u8>,
        start: usize,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<Block, MatrixError> {
        // Shrunk first: shrinking may move the bytes, and the alignment checked below must be
        // the alignment the view will see. (A body grown frame by frame may have up to twice its
        // length allocated.)
        bytes.shrink_to_fit();
        let payload = bytes.get(start..).unwrap_or_default();
        let expected = (rows as u64)
            .checked_mul(cols as u64)
            .and_then(|n| n.checked_mul(dtype.size() as u64));
        if expected != Some(payload.len() as u64) {
            return Err(MatrixError::Length {
                rows,
                cols,
                dtype,
                expected: expected.unwrap_or(u64::MAX),
                got: payload.len() as u64,
            });
        }
        let aligned = cfg!(target_endian = "little")
            && match dtype {
                DType::F32 => bytemuck::try_cast_slice::<u8, f32>(payload).is_ok(),
                DType::F64 => bytemuck::try_cast_slice::<u8, f64>(payload).is_ok(),
            };
        if !aligned {
            return Ok(Block(BlockData::Owned(match dtype {
                DType::F32 => Matrix::F32(from_le(payload, rows, cols)),
                DType::F64 => Matrix::F64(from_le(payload, rows, cols)),
            })));
        }
        Ok(Block(BlockData::Body {
            bytes,
            start,
            rows,
            cols,
            dtype,
        }))
    }

    pub fn view(&self) -> MatrixView<'_> {
        match &self.0 {
            BlockData::Owned(m) => m.view(),
            BlockData::Body {
                bytes,
                start,
                rows,
                cols,
                dtype,
            } => {
                let payload = &bytes[*start..];
                // Alignment and length were checked in from_body, and the bytes never move.
                match dtype {
                    DType::F32 => MatrixView::F32(
                        ArrayView2::from_shape((*rows, *cols), bytemuck::cast_slice(payload))
                            .expect("checked in from_body"),
                    ),
                    DType::F64 => MatrixView::F64(
                        ArrayView2::from_shape((*rows, *cols), bytemuck::cast_slice(payload))
                            .expect("checked in from_body"),
                    ),
                }
            }
        }
    }

    /// Bytes of memory it holds.
    pub fn memory(&self) -> u64 {
        match &self.0 {
            BlockData::Owned(m) => (m.shape().0 * m.shape().1 * m.dtype().size()) as u64,
            BlockData::Body { bytes, .. } => bytes.capacity() as u64,
        }
    }
}

/// Multiplies the blocks of a decoded task into C's tile as a [`Product`].
///
/// The payload's length was checked against the header by [`crate::message::decode`].
pub fn compute_tile(
    task: &TaskHeader,
    payload: &[u8],
    threads: Threads,
) -> Result<Product, MessageError> {
    fn typed<T: Element>(t: &TaskHeader, payload: &[u8], threads: Threads) -> Product {
        let (r, c, d) = (t.rows as usize, t.cols as usize, t.depth as usize);
        let (pa, pb) = payload.split_at(r * d * size_of::<T>());
        with_le::<T, _>(pa, r, d, |a| {
            with_le::<T, _>(pb, d, c, |b| product_of(a, b, threads))
        })
    }
    let need = (task.rows as u64 * task.depth as u64 + task.depth as u64 * task.cols as u64)
        * task.dtype.size() as u64;
    if payload.len() as u64 != need {
        return Err(MessageError::PayloadLength {
            expected: need,
            got: payload.len() as u64,
        });
    }
    Ok(match task.dtype {
        DType::F32 => typed::<f32>(task, payload, threads),
        DType::F64 => typed::<f64>(task, payload, threads),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Plan, TileId};

    #[test]
    fn the_same_seed_gives_the_same_matrices_and_another_seed_does_not() {
        let (a1, b1) = generate(5, 4, 3, DType::F64, 7);
        let (a2, b2) = generate(5, 4, 3, DType::F64, 7);
        let (a3, _) = generate(5, 4, 3, DType::F64, 8);
        assert_eq!((&a1, &b1), (&a2, &b2));
        assert_ne!(a1, a3);
        assert_eq!(a1.shape(), (5, 4));
        assert_eq!(b1.shape(), (4, 3));
    }

    #[test]
    fn blocks_round_trip_through_their_bytes_strided_or_not_aligned_or_not() {
        let (Matrix::F64(a), _) = generate(9, 7, 1, DType::F64, 3) else {
            unreachable!()
        };
        for block in [a.view(), a.slice(s![1..8, 2..6]), a.t()] {
            let mut bytes = Vec::new();
            extend_le(block, &mut bytes);
            assert_eq!(from_le::<f64>(&bytes, block.nrows(), block.ncols()), block);
            with_le::<f64, _>(&bytes, block.nrows(), block.ncols(), |v| {
                assert_eq!(v, block)
            });
            // Shifted by one byte: not aligned for f64, so decoded instead of viewed.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            with_le::<f64, _>(&shifted[1..], block.nrows(), block.ncols(), |v| {
                assert_eq!(v, block)
            });
        }
    }

    #[test]
    fn a_task_computes_the_same_tile_as_the_whole_product() {
        let (Matrix::F64(a), Matrix::F64(b)) = generate(30, 20, 25, DType::F64, 1) else {
            unreachable!()
        };
        let plan = Plan::new(30, 20, 25, DType::F64, 8, 16 << 20).unwrap();
        let id = TileId {
            row: 3,
            col: 3,
            part: 0,
        }; // the ragged corner: 6x1
        let header = TaskHeader {
            job: "j".into(),
            run: String::new(),
            tile: id,
            dtype: DType::F64,
            rows: plan.rows(id.row).len() as u32,
            cols: plan.cols(id.col).len() as u32,
            depth: 20,
            at: None,
            recompute: 0,
        };
        let bytes = compute_tile(
            &header,
            &task_payload(&a, &b, &plan, id),
            Threads::Exactly(1),
        )
        .unwrap();
        let tile = from_le::<f64>(bytes.bytes(), 6, 1);
        // The whole product by another implementation (ndarray's): equal up to the rounding
        // of a length-20 dot product of numbers in [-1, 1), whatever order each sums in.
        let full = a.dot(&b);
        let worst = (&tile - &full.slice(s![24..30, 24..25]))
            .iter()
            .fold(0.0f64, |m, d| m.max(d.abs()));
        assert!(worst <= 20.0 * 20.0 * f64::EPSILON, "off by {worst:e}");
    }

    #[test]
    fn operands_with_mismatched_shapes_or_nan_are_refused() {
        let (a, _) = generate(3, 4, 5, DType::F64, 1);
        let (_, b) = generate(3, 5, 5, DType::F64, 1);
        let err = check_operands(&a, &b).unwrap_err();
        assert!(err.to_string().contains("A is 3x4 but B is 5x5"), "{err}");
        let mut nan = Array2::<f64>::zeros((4, 2));
        nan[(1, 1)] = f64::NAN;
        assert!(matches!(
            check_operands(&a, &Matrix::F64(nan)),
            Err(MatrixError::NotFinite("B"))
        ));
    }

    #[test]
    fn a_block_reads_the_same_in_its_body_or_copied_out_and_a_short_one_is_refused() {
        let (a, _) = generate(5, 7, 1, DType::F64, 3);
        let Matrix::F64(a) = a else { unreachable!() };
        let mut le = Vec::new();
        extend_le(a.view(), &mut le);
        for pad in [0usize, 8, 3] {
            // 0 and 8: aligned, viewed in place; 3: misaligned, decoded into its own array.
            let mut body = vec![0xAAu8; pad];
            body.extend_from_slice(&le);
            let block = Block::from_body(body, pad, 5, 7, DType::F64).unwrap();
            let MatrixView::F64(v) = block.view() else {
                panic!("an f64 block")
            };
            assert_eq!(v, a.view(), "payload at offset {pad}");
        }
        let short = Block::from_body(le[..8].to_vec(), 0, 5, 7, DType::F64);
        assert!(matches!(short, Err(MatrixError::Length { got: 8, .. })));
        let past_the_end = Block::from_body(vec![0; 8], 16, 1, 1, DType::F64);
        assert!(matches!(
            past_the_end,
            Err(MatrixError::Length { got: 0, .. })
        ));
    }
}
