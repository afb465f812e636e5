//! The reference: what one machine does with no queue at all — ndarray's `dot` (matrixmultiply)
//! on the same matrices the producer generates, in this process.

use std::time::Instant;

use gemmq::DType;
use gemmq::matrix::{self, Matrix};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// matrixmultiply's thread count (MATMUL_NUM_THREADS, set by the bench before the first use).
    pub threads: usize,
    /// Every run, in seconds.
    pub runs_seconds: Vec<f64>,
    pub best_seconds: f64,
    pub gflops: f64,
    /// CPU time over wall time of the best run: ≈ the number of cores actually busy.
    pub cpu_per_wall: f64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills in a plain struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF on a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Multiplies A·B (generated as the producer does from `seed`) `runs` times; the best counts.
pub fn measure(n: u64, dtype: DType, seed: u64, runs: usize, threads: usize) -> Reference {
    let n = n as usize;
    let (a, b) = matrix::generate(n, n, n, dtype, seed);
    let mut runs_seconds = Vec::new();
    let (mut best, mut best_cpu) = (f64::INFINITY, 0.0);
    for _ in 0..runs.max(1) {
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let c = match (&a, &b) {
            (Matrix::F32(a), Matrix::F32(b)) => Matrix::F32(a.dot(b)),
            (Matrix::F64(a), Matrix::F64(b)) => Matrix::F64(a.dot(b)),
            _ => unreachable!("generate gives one dtype"),
        };
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        std::hint::black_box(&c);
        drop(c);
        runs_seconds.push(secs);
        if secs < best {
            (best, best_cpu) = (secs, cpu);
        }
    }
    Reference {
        threads,
        runs_seconds,
        best_seconds: best,
        gflops: 2.0 * (n as f64).powi(3) / best / 1e9,
        cpu_per_wall: best_cpu / best,
    }
}
