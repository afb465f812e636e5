//! Where A and B come from, a block at a time: generated from a seed, or read from a `.npy` file.
//!
//! Distributing a multiplication is for matrices one machine cannot hold, so nothing here holds
//! one. The producer makes or reads each block as it publishes it, and its memory is bounded by
//! the blocks in flight, whatever the size of the job; the producer and the collector walk the
//! same sources row by row to work out what C·x must be ([`crate::verify`]).
//!
//! A seeded matrix is defined entry by entry: the entry at row `i`, column `j` is the `j`-th
//! output of a SplitMix64 generator whose state starts from the matrix's seed and `i`
//! (counter-based: computed from `j` directly). Any block is then made without making what comes
//! before it, and the same seed gives the same matrix whatever the tiling. SplitMix64 passes
//! BigCrush and costs a few multiplications an entry, several times cheaper than the ChaCha
//! streams it replaced (the producer made A and B on the same cores as the job). The same seed
//! has given other numbers twice: before December 2026 (one stream, row-major) and before
//! 5 December 2026 (a ChaCha stream per 256 columns of a row).
//!
//! A `.npy` file is read where it lies: each row of a block is one positioned read
//! (`pread`) at its offset, so a file larger than the machine's memory can be published. The
//! header is parsed here, because the data's offset is what positioned reads need, and
//! ndarray-npy reads or maps whole arrays only.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::matrix::{Element, Matrix, MatrixError};
use crate::message::DType;

/// One of A and B.
#[derive(Debug)]
pub enum Operand {
    Seeded(Seeded),
    File(NpyFile),
}

/// A matrix of uniform numbers in [-1, 1), made from a seed one block at a time.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub seed: u64,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

/// A 2-D, C-ordered, little-endian float32 or float64 `.npy` file, open for positioned reads.
#[derive(Debug)]
pub struct NpyFile {
    pub path: PathBuf,
    file: File,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    /// Where the numbers start.
    offset: u64,
}

impl Operand {
    /// A and B of a seeded job: two independent matrices from one seed.
    pub fn seeded_pair(m: usize, k: usize, n: usize, dtype: DType, seed: u64) -> (Self, Self) {
        let (sa, sb) = crate::matrix::operand_seeds(seed);
        let make = |seed, rows, cols| {
            Operand::Seeded(Seeded {
                seed,
                rows,
                cols,
                dtype,
            })
        };
        (make(sa, m, k), make(sb, k, n))
    }

    pub fn open(path: &Path) -> Result<Self, MatrixError> {
        NpyFile::open(path).map(Operand::File)
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            Operand::Seeded(s) => (s.rows, s.cols),
            Operand::File(f) => (f.rows, f.cols),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Operand::Seeded(s) => s.dtype,
            Operand::File(f) => f.dtype,
        }
    }

    /// Its shape and dtype, as [`crate::matrix::check_conformable`] takes them.
    pub fn describe(&self) -> (usize, usize, DType) {
        let (r, c) = self.shape();
        (r, c, self.dtype())
    }

    /// Columns `cols` of row `i` into `out` (as long as `cols`).
    pub fn row<T: Element>(
        &self,
        i: usize,
        cols: Range<usize>,
        out: &mut [T],
    ) -> Result<(), MatrixError> {
        self.check::<T>(i..i + 1, &cols)?;
        match self {
            Operand::Seeded(s) => {
                s.fill(i, cols, out);
                Ok(())
            }
            Operand::File(f) => f.fill(i, cols, out),
        }
    }

    /// The block `rows` × `cols`.
    pub fn block<T: Element>(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Array2<T>, MatrixError> {
        self.check::<T>(rows.clone(), &cols)?;
        let width = cols.len();
        let mut data = vec![T::zero(); rows.len() * width];
        if width > 0 {
            for (i, out) in rows.clone().zip(data.chunks_exact_mut(width)) {
                self.row(i, cols.clone(), out)?;
            }
        }
        Ok(Array2::from_shape_vec((rows.len(), width), data).expect("sized above"))
    }

    /// Appends the block `rows` × `cols` to `out` as row-major little-endian bytes, the wire
    /// format of blocks, made or read a row at a time. (Not generic, so that callers get it
    /// compiled with this crate's optimisations whatever their own.)
    pub fn append_le(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<(), MatrixError> {
        fn typed<T: Element>(
            o: &Operand,
            rows: Range<usize>,
            cols: Range<usize>,
            out: &mut Vec<u8>,
        ) -> Result<(), MatrixError> {
            o.check::<T>(rows.clone(), &cols)?;
            out.reserve(rows.len() * cols.len() * size_of::<T>());
            let mut row = vec![T::zero(); cols.len()];
            for i in rows {
                o.row(i, cols.clone(), &mut row)?;
                crate::matrix::extend_le(ndarray::aview1(&row).insert_axis(ndarray::Axis(0)), out);
            }
            Ok(())
        }
        match self.dtype() {
            DType::F32 => typed::<f32>(self, rows, cols, out),
            DType::F64 => typed::<f64>(self, rows, cols, out),
        }
    }

    /// The whole matrix in memory: for tests, and for matrices known to be small.
    pub fn to_matrix(&self) -> Result<Matrix, MatrixError> {
        let (r, c) = self.shape();
        Ok(match self.dtype() {
            DType::F32 => Matrix::F32(self.block(0..r, 0..c)?),
            DType::F64 => Matrix::F64(self.block(0..r, 0..c)?),
        })
    }

    /// Whether every number is finite, a row at a time.
    pub fn check_finite(&self, name: &'static str) -> Result<(), MatrixError> {
        fn typed<T: Element>(o: &Operand, name: &'static str) -> Result<(), MatrixError> {
            let (rows, cols) = o.shape();
            let mut row = vec![T::zero(); cols];
            for i in 0..rows {
                o.row(i, 0..cols, &mut row)?;
                if !row.iter().all(|v| v.to_f64().is_finite()) {
                    return Err(MatrixError::NotFinite(name));
                }
            }
            Ok(())
        }
        match self {
            // Uniform in [-1, 1): nothing to look at.
            Operand::Seeded(_) => Ok(()),
            Operand::File(_) => match self.dtype() {
                DType::F32 => typed::<f32>(self, name),
                DType::F64 => typed::<f64>(self, name),
            },
        }
    }

    /// Writes the matrix as a `.npy` file, a row at a time.
    pub fn write_npy(&self, path: &Path) -> Result<(), MatrixError> {
        fn typed<T: Element>(o: &Operand, path: &Path) -> Result<(), MatrixError> {
            use std::io::Write;
            let err = |e: std::io::Error| MatrixError::Write {
                path: path.display().to_string(),
                message: e.to_string(),
            };
            let (rows, cols) = o.shape();
            let file = File::create(path).map_err(err)?;
            let mut w = std::io::BufWriter::new(file);
            w.write_all(&npy_header(T::DTYPE, rows, cols))
                .map_err(err)?;
            let (mut row, mut bytes) = (vec![T::zero(); cols], Vec::new());
            for i in 0..rows {
                o.row(i, 0..cols, &mut row)?;
                bytes.clear();
                crate::matrix::extend_le(
                    ndarray::aview1(&row).insert_axis(ndarray::Axis(0)),
                    &mut bytes,
                );
                w.write_all(&bytes).map_err(err)?;
            }
            w.flush().map_err(err)
        }
        match self.dtype() {
            DType::F32 => typed::<f32>(self, path),
            DType::F64 => typed::<f64>(self, path),
        }
    }

    fn check<T: Element>(
        &self,
        rows: Range<usize>,
        cols: &Range<usize>,
    ) -> Result<(), MatrixError> {
        let (r, c) = self.shape();
        if T::DTYPE != self.dtype() {
            return Err(MatrixError::Mixed(self.dtype(), T::DTYPE));
        }
        if rows.end > r || cols.end > c || rows.start > rows.end || cols.start > cols.end {
            return Err(MatrixError::Shapes {
                a_rows: r,
                a_cols: c,
                b_rows: rows.end,
                b_cols: cols.end,
            });
        }
        Ok(())
    }
}

impl Seeded {
    fn fill<T: Element>(&self, i: usize, cols: Range<usize>, out: &mut [T]) {
        let row = row_state(self.seed, i as u64);
        for (v, j) in out.iter_mut().zip(cols) {
            *v = T::from_f64(entry(row, j as u64));
        }
    }
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where row `row`'s generator starts: mixed, so neighbouring rows get unrelated streams.
fn row_state(seed: u64, row: u64) -> u64 {
    mix(mix(seed.wrapping_add(GOLDEN_GAMMA)) ^ row)
}

/// The `col`-th draw of the row's generator, uniform in [-1, 1): its top 53 bits as a fraction.
fn entry(row_state: u64, col: u64) -> f64 {
    let bits = mix(row_state.wrapping_add(col.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (bits >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
}

impl NpyFile {
    pub fn open(path: &Path) -> Result<Self, MatrixError> {
        let err = |message: String| MatrixError::Read {
            path: path.display().to_string(),
            message,
        };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let mut head = vec![0u8; 12];
        let got = file.read_at(&mut head, 0).map_err(|e| err(e.to_string()))?;
        let header = parse_header(&file, &head[..got]).map_err(err)?;
        let need = (header.rows as u64)
            .checked_mul(header.cols as u64)
            .and_then(|n| n.checked_mul(header.dtype.size() as u64))
            .and_then(|n| n.checked_add(header.offset))
            .ok_or_else(|| {
                err(format!(
                    "the shape {}x{} is too large",
                    header.rows, header.cols
                ))
            })?;
        if len < need {
            return Err(err(format!(
                "the file is {len} bytes, but a {}x{} {} array needs {need}: is it truncated?",
                header.rows, header.cols, header.dtype
            )));
        }
        Ok(NpyFile {
            path: path.to_path_buf(),
            file,
            rows: header.rows,
            cols: header.cols,
            dtype: header.dtype,
            offset: header.offset,
        })
    }

    fn fill<T: Element>(
        &self,
        i: usize,
        cols: Range<usize>,
        out: &mut [T],
    ) -> Result<(), MatrixError> {
        let size = size_of::<T>();
        let at = self.offset + ((i * self.cols + cols.start) * size) as u64;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out[..cols.len()]);
        self.file
            .read_exact_at(bytes, at)
            .map_err(|e| MatrixError::Read {
                path: self.path.display().to_string(),
                message: format!("row {i}: {e}"),
            })?;
        if cfg!(target_endian = "big") {
            for v in out.iter_mut() {
                let le = bytemuck::bytes_of(v).to_vec();
                *v = T::from_le_slice(&le);
            }
        }
        Ok(())
    }
}

struct Header {
    dtype: DType,
    rows: usize,
    cols: usize,
    offset: u64,
}

/// The header of a `.npy` file (format versions 1 to 3): `\x93NUMPY`, the version, the header's
/// length, then a Python dict literal with `descr`, `fortran_order` and `shape`.
fn parse_header(file: &File, head: &[u8]) -> Result<Header, String> {
    if head.len() < 10 || &head[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (len, start) = match head[6] {
        1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
        2 | 3 if head.len() < 12 => return Err("the .npy header is cut short".into()),
        2 | 3 => (
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if len > 1 << 20 {
        return Err(format!("a {len}-byte .npy header: not a matrix file"));
    }
    let mut dict = vec![0u8; len];
    file.read_exact_at(&mut dict, start as u64)
        .map_err(|e| format!("reading the .npy header: {e}"))?;
    let dict = String::from_utf8_lossy(&dict);
    let field = |key: &str| -> Result<String, String> {
        let at = dict
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("the .npy header has no '{key}'"))?;
        let rest = dict[at + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start();
        let end = if rest.starts_with('(') {
            rest.find(')').map(|e| e + 1)
        } else {
            rest.find([',', '}'])
        };
        Ok(rest[..end.unwrap_or(rest.len())].trim().to_string())
    };
    let dtype = match field("descr")?.trim_matches(['\'', '"']) {
        "<f8" => DType::F64,
        "<f4" => DType::F32,
        d => {
            return Err(format!(
                "unsupported array type {d}; gemmq reads 2-D little-endian float32 or float64 arrays (numpy: a.astype('<f8'))"
            ));
        }
    };
    if field("fortran_order")? != "False" {
        return Err(
            "the array is in Fortran (column-major) order; save it C-ordered (numpy: np.save(path, np.ascontiguousarray(a)))"
                .into(),
        );
    }
    let shape = field("shape")?;
    let dims: Vec<usize> = shape
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("cannot read the shape {shape}"))?;
    let [rows, cols] = dims[..] else {
        return Err(format!(
            "the array has shape {shape}; gemmq multiplies 2-D arrays"
        ));
    };
    Ok(Header {
        dtype,
        rows,
        cols,
        offset: (start + len) as u64,
    })
}

/// A version 1 `.npy` header for a C-ordered little-endian array, padded to 64 bytes as numpy
/// pads it.
fn npy_header(dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let descr = match dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    };
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_block_is_the_same_numbers_as_the_whole_matrix_there() {
        let (a, _) = Operand::seeded_pair(300, 700, 5, DType::F64, 42);
        let whole: Array2<f64> = a.block(0..300, 0..700).unwrap();
        for (rows, cols) in [
            (0..300, 0..700),
            (17..40, 250..610),
            (299..300, 0..1),
            (5..9, 256..512),
        ] {
            let block: Array2<f64> = a.block(rows.clone(), cols.clone()).unwrap();
            assert_eq!(block, whole.slice(ndarray::s![rows, cols]));
        }
        assert!(whole.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = whole.sum() / whole.len() as f64;
        assert!(mean.abs() < 0.01, "uniform on [-1, 1): mean {mean}");
        let variance = whole.mapv(|v| v * v).sum() / whole.len() as f64 - mean * mean;
        assert!((variance - 1.0 / 3.0).abs() < 0.01, "variance {variance}");
        // Neighbouring rows, and the same row of another seed, are unrelated streams.
        let other: Array2<f64> = Operand::seeded_pair(300, 700, 5, DType::F64, 43)
            .0
            .block(0..1, 0..700)
            .unwrap();
        let correlation = |x: ndarray::ArrayView1<f64>, y: ndarray::ArrayView1<f64>| {
            (&x * &y).sum() / x.len() as f64 * 3.0
        };
        let rows = correlation(whole.row(0), whole.row(1));
        let seeds = correlation(whole.row(0), other.row(0));
        assert!(rows.abs() < 0.15 && seeds.abs() < 0.15, "{rows} {seeds}");
    }

    #[test]
    fn a_block_goes_on_the_wire_as_its_numbers_little_endian_row_by_row() {
        let (a, _) = Operand::seeded_pair(20, 300, 1, DType::F32, 3);
        let block: Array2<f32> = a.block(3..7, 250..290).unwrap();
        let mut wire = vec![0xAB]; // appended after what is there
        a.append_le(3..7, 250..290, &mut wire).unwrap();
        assert_eq!(wire[0], 0xAB);
        assert_eq!(crate::matrix::from_le::<f32>(&wire[1..], 4, 40), block);
    }

    #[test]
    fn seeds_rows_and_segments_give_unrelated_numbers() {
        let (a, b) = Operand::seeded_pair(4, 600, 4, DType::F64, 42);
        let (a2, _) = Operand::seeded_pair(4, 600, 4, DType::F64, 43);
        let row = |o: &Operand, i, cols: Range<usize>| -> Vec<f64> {
            o.block(i..i + 1, cols).unwrap().into_raw_vec_and_offset().0
        };
        assert_ne!(row(&a, 0, 0..4), row(&a, 1, 0..4), "rows");
        assert_ne!(row(&a, 0, 0..4), row(&a, 0, 256..260), "segments");
        assert_ne!(row(&a, 0, 0..4), row(&b, 0, 0..4), "A and B");
        assert_ne!(row(&a, 0, 0..4), row(&a2, 0, 0..4), "seeds");
    }

    #[test]
    fn a_npy_file_is_read_block_by_block_as_numpy_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        for dtype in [DType::F32, DType::F64] {
            let (a, _) = Operand::seeded_pair(37, 29, 1, dtype, 7);
            let whole = a.to_matrix().unwrap();
            // Written by ndarray-npy (as numpy does), read back where it lies.
            let path = dir.path().join(format!("a-{dtype}.npy"));
            whole.write_npy(&path).unwrap();
            let file = Operand::open(&path).unwrap();
            assert_eq!((file.shape(), file.dtype()), ((37, 29), dtype));
            assert_eq!(file.to_matrix().unwrap(), whole);
            // And what this module writes, ndarray-npy reads.
            let again = dir.path().join(format!("again-{dtype}.npy"));
            file.write_npy(&again).unwrap();
            assert_eq!(Matrix::read_npy(&again).unwrap(), whole);
        }
    }

    #[test]
    fn npy_files_gemmq_cannot_read_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            Operand::open(&p).unwrap_err().to_string()
        };
        assert!(write("junk.npy", b"hello").contains("not a .npy file"));
        let with = |dict: &str, data: usize| {
            let mut h = b"\x93NUMPY\x01\x00".to_vec();
            h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
            h.extend_from_slice(dict.as_bytes());
            h.extend(std::iter::repeat_n(0u8, data));
            h
        };
        // (file, header dict, data bytes, what the error says: any of these)
        let cases: [(&str, &str, usize, &[&str]); 6] = [
            (
                "fortran.npy",
                "'descr': '<f8', 'fortran_order': True, 'shape': (2, 2)",
                32,
                &["Fortran"],
            ),
            (
                "int.npy",
                "'descr': '<i8', 'fortran_order': False, 'shape': (2, 2)",
                32,
                &["unsupported array type <i8"],
            ),
            (
                "3d.npy",
                "'descr': '<f8', 'fortran_order': False, 'shape': (2, 2, 2)",
                64,
                &["2-D"],
            ),
            (
                "short.npy",
                "'descr': '<f8', 'fortran_order': False, 'shape': (4, 4)",
                64,
                &["truncated"],
            ),
            (
                "huge.npy",
                "'descr': '<f8', 'fortran_order': False, 'shape': (2147483648, 1073741824)",
                64,
                &["truncated", "too large"],
            ),
            (
                "huger.npy",
                "'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 3)",
                64,
                &["too large"],
            ),
        ];
        for (name, dict, data, says) in cases {
            let e = write(name, &with(&format!("{{{dict}, }}"), data));
            assert!(says.iter().any(|s| e.contains(s)), "{name}: {e}");
        }
    }

    #[test]
    fn a_block_of_the_wrong_type_or_outside_the_matrix_is_an_error_not_a_panic() {
        let (a, _) = Operand::seeded_pair(8, 8, 8, DType::F64, 1);
        assert!(a.block::<f32>(0..1, 0..1).is_err());
        assert!(a.block::<f64>(0..9, 0..1).is_err());
        assert!(a.block::<f64>(0..1, 4..9).is_err());
    }
}
