//! The reference: what one machine does with no queue at all — the fastest in-process
//! multiplication of the same matrices the producer generates, on the same cores.
//!
//! Two kernels are timed, each its best of the runs, and the faster one is the reference:
//! ndarray's `dot` (matrixmultiply, threads from MATMUL_NUM_THREADS) and the `gemm` crate (what
//! gemmq's workers multiply with, [`gemmq::kernel`], with as many threads). On an
//! AVX-512 machine gemm is about twice as fast; on an AVX2 one they are close. Reporting only the
//! kernel the workers use would flatter gemmq wherever the other is faster.
//!
//! It runs in a child process of the bench (`gemmq-bench __reference ...`, see [`crate::child`]),
//! also because matrixmultiply reads MATMUL_NUM_THREADS once per process.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use gemmq::DType;
use gemmq::kernel::{self, Threads};
use gemmq::matrix::{self, Matrix};
use serde::{Deserialize, Serialize};

/// The hidden first argument that makes the bench binary measure a reference and print it.
pub const SUBCOMMAND: &str = "__reference";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    /// Threads each kernel used (matrixmultiply's MATMUL_NUM_THREADS, gemm's rayon pool).
    pub threads: usize,
    /// The faster kernel, whose best run is the reference.
    #[serde(default)]
    pub kernel: String,
    /// Every kernel's runs.
    #[serde(default)]
    pub kernels: Vec<KernelRuns>,
    /// Every run of the faster kernel, in seconds.
    pub runs_seconds: Vec<f64>,
    pub best_seconds: f64,
    pub gflops: f64,
    /// CPU time over wall time of the best run: ≈ the number of cores actually busy.
    pub cpu_per_wall: f64,
    /// Cores the whole machine kept busy during the best run (anyone's work): well above
    /// cpu_per_wall means other work competed with the reference.
    pub machine_busy_cores: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelRuns {
    pub kernel: String,
    pub runs_seconds: Vec<f64>,
    pub best_seconds: f64,
}

pub(crate) fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills in a plain struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF on a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measures the reference in a child process with `threads` threads per kernel.
pub fn measure(n: u64, dtype: DType, seed: u64, runs: usize, threads: usize) -> Result<Reference> {
    let args = [
        SUBCOMMAND.to_string(),
        n.to_string(),
        dtype.to_string(),
        seed.to_string(),
        runs.to_string(),
        threads.to_string(),
    ];
    crate::child::run(
        "reference",
        &args,
        &[("MATMUL_NUM_THREADS", threads.to_string())],
    )
}

/// `gemmq-bench __reference N DTYPE SEED RUNS THREADS`: prints a [`Reference`] as JSON.
pub fn child_main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let parsed = (|| -> Option<(u64, DType, u64, usize, usize)> {
        Some((
            args.first()?.parse().ok()?,
            args.get(1)?.parse().ok()?,
            args.get(2)?.parse().ok()?,
            args.get(3)?.parse().ok()?,
            args.get(4)?.parse().ok()?,
        ))
    })();
    let Some((n, dtype, seed, runs, threads)) = parsed else {
        eprintln!("usage: gemmq-bench {SUBCOMMAND} N DTYPE SEED RUNS THREADS");
        return ExitCode::from(2);
    };
    let r = run(n, dtype, seed, runs, threads);
    println!(
        "{}",
        serde_json::to_string(&r).expect("the reference is plain data")
    );
    ExitCode::SUCCESS
}

/// Multiplies A·B (generated as the producer does from `seed`) `runs` times with each kernel,
/// alternating them so that a disturbance hits both; each kernel's best counts, and the faster
/// kernel is the reference.
fn run(n: u64, dtype: DType, seed: u64, runs: usize, threads: usize) -> Reference {
    const KERNELS: [&str; 2] = ["matrixmultiply", "gemm"];
    let n = n as usize;
    let (a, b) = matrix::generate(n, n, n, dtype, seed);
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); KERNELS.len()];
    // (seconds, cpu, busy) of each kernel's best run.
    let mut best = vec![(f64::INFINITY, 0.0, 0.0); KERNELS.len()];
    for _ in 0..runs.max(1) {
        for (i, kernel) in KERNELS.iter().enumerate() {
            let busy0 = crate::machine::machine_busy_cpu_seconds().unwrap_or(0.0);
            let (cpu0, t0) = (cpu_seconds(), Instant::now());
            let c = match (*kernel, &a, &b) {
                ("matrixmultiply", Matrix::F32(a), Matrix::F32(b)) => Matrix::F32(a.dot(b)),
                ("matrixmultiply", Matrix::F64(a), Matrix::F64(b)) => Matrix::F64(a.dot(b)),
                (_, Matrix::F32(a), Matrix::F32(b)) => Matrix::F32(kernel::matmul(
                    a.view(),
                    b.view(),
                    Threads::Exactly(threads),
                )),
                (_, Matrix::F64(a), Matrix::F64(b)) => Matrix::F64(kernel::matmul(
                    a.view(),
                    b.view(),
                    Threads::Exactly(threads),
                )),
                _ => unreachable!("generate gives one dtype"),
            };
            let secs = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu0;
            let busy = crate::machine::machine_busy_cpu_seconds().unwrap_or(0.0) - busy0;
            std::hint::black_box(&c);
            drop(c);
            all[i].push(secs);
            if secs < best[i].0 {
                best[i] = (secs, cpu, busy);
            }
        }
    }
    let fastest = (0..KERNELS.len())
        .min_by(|&x, &y| best[x].0.total_cmp(&best[y].0))
        .expect("there are kernels");
    let (secs, cpu, busy) = best[fastest];
    Reference {
        threads,
        kernel: KERNELS[fastest].to_string(),
        kernels: KERNELS
            .iter()
            .zip(&all)
            .zip(&best)
            .map(|((k, runs), b)| KernelRuns {
                kernel: k.to_string(),
                runs_seconds: runs.clone(),
                best_seconds: b.0,
            })
            .collect(),
        runs_seconds: all[fastest].clone(),
        best_seconds: secs,
        gflops: 2.0 * (n as f64).powi(3) / secs / 1e9,
        cpu_per_wall: cpu / secs,
        machine_busy_cores: busy / secs,
    }
}
