//! The reference: what one machine does with no queue at all — ndarray's `dot` (matrixmultiply)
//! on the same matrices the producer generates.
//!
//! It runs in a child process of the bench (`gemmq-bench __reference ...`), for two reasons:
//! matrixmultiply reads MATMUL_NUM_THREADS once per process, and Linux carries a parent's peak
//! RSS into the `ru_maxrss` of the children it spawns afterwards, so the bench itself must never
//! hold the large matrices.

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use gemmq::DType;
use gemmq::matrix::{self, Matrix};
use serde::{Deserialize, Serialize};

/// The hidden first argument that makes the bench binary measure a reference and print it.
pub const SUBCOMMAND: &str = "__reference";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    /// matrixmultiply's thread count (MATMUL_NUM_THREADS, set by the bench before the first use).
    pub threads: usize,
    /// Every run, in seconds.
    pub runs_seconds: Vec<f64>,
    pub best_seconds: f64,
    pub gflops: f64,
    /// CPU time over wall time of the best run: ≈ the number of cores actually busy.
    pub cpu_per_wall: f64,
    /// Cores the whole machine kept busy during the best run (anyone's work): well above
    /// cpu_per_wall means other work competed with the reference.
    pub machine_busy_cores: f64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills in a plain struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF on a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measures the reference in a child process with MATMUL_NUM_THREADS = `threads`.
pub fn measure(n: u64, dtype: DType, seed: u64, runs: usize, threads: usize) -> Result<Reference> {
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let out = Command::new(exe)
        .args([
            SUBCOMMAND.to_string(),
            n.to_string(),
            dtype.to_string(),
            seed.to_string(),
            runs.to_string(),
            threads.to_string(),
        ])
        .env("MATMUL_NUM_THREADS", threads.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the reference")?;
    if !out.status.success() {
        bail!("the reference process failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("reading the reference's result")
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

/// Multiplies A·B (generated as the producer does from `seed`) `runs` times; the best counts.
fn run(n: u64, dtype: DType, seed: u64, runs: usize, threads: usize) -> Reference {
    let n = n as usize;
    let (a, b) = matrix::generate(n, n, n, dtype, seed);
    let mut runs_seconds = Vec::new();
    let (mut best, mut best_cpu, mut best_busy) = (f64::INFINITY, 0.0, 0.0);
    for _ in 0..runs.max(1) {
        let busy0 = crate::machine::machine_busy_cpu_seconds().unwrap_or(0.0);
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let c = match (&a, &b) {
            (Matrix::F32(a), Matrix::F32(b)) => Matrix::F32(a.dot(b)),
            (Matrix::F64(a), Matrix::F64(b)) => Matrix::F64(a.dot(b)),
            _ => unreachable!("generate gives one dtype"),
        };
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let busy = crate::machine::machine_busy_cpu_seconds().unwrap_or(0.0) - busy0;
        std::hint::black_box(&c);
        drop(c);
        runs_seconds.push(secs);
        if secs < best {
            (best, best_cpu, best_busy) = (secs, cpu, busy);
        }
    }
    Reference {
        threads,
        runs_seconds,
        best_seconds: best,
        gflops: 2.0 * (n as f64).powi(3) / best / 1e9,
        cpu_per_wall: best_cpu / best,
        machine_busy_cores: best_busy / best,
    }
}
