//! The same job on Dask distributed (`--dask PYTHON`), measured right after gemmq's and divided
//! by the same reference, so that "faster than Dask" is a figure of one run on one machine
//! rather than a comparison with a number from another machine.
//!
//! The job itself is `bench/compare/dask_job.py` (what it does and times is in its docstring):
//! a LocalCluster with as many worker processes as the bench runs consumers, A and B scattered
//! in blocks, one task per tile, C gathered. The cluster's start is not timed. For the large
//! jobs C is cut in 4 × 4 tiles, Dask's best here; for the tiny-task job in the same tiles as
//! gemmq's (`--small-n` / `--small-tile`: 16,384 tasks at N = 2048), one task each, so that both
//! count tasks per second. Each Dask worker gets the cores over the workers as BLAS threads, as
//! gemmq's consumers share the cores' kernel threads.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize)]
pub struct DaskRun {
    /// From handing A and B to the cluster to C whole in the driver.
    pub e2e_seconds: f64,
    /// e2e / the gemmq run's reference (best), the same divisor as gemmq's e2e/ref.
    pub ratio_to_reference: f64,
    /// BLAS threads each Dask worker used.
    pub blas_threads: u32,
    /// C checked against A·(B·x) after the clock stopped.
    pub verified: bool,
    /// Tiles of C, one task each (splits²).
    pub tasks: u64,
    /// tasks / e2e.
    pub tasks_per_second: f64,
}

#[derive(Deserialize)]
struct Printed {
    blas_threads: u32,
    splits: u64,
    runs: Vec<PrintedRun>,
}

#[derive(Deserialize)]
struct PrintedRun {
    e2e_seconds: f64,
    verified: bool,
}

/// Runs the Dask job once for n×n f64 on `workers` worker processes with `python`, C cut into
/// `splits` × `splits` tiles (a task each), and divides its time by `reference_seconds`. A job
/// that has not ended within `timeout` (the bench's `--timeout`) is killed with its cluster's
/// processes and reported as failed.
pub fn run(
    python: &Path,
    n: u64,
    workers: usize,
    splits: u64,
    reference_seconds: f64,
    timeout: Duration,
) -> Result<DaskRun> {
    let script = crate::workspace_root().join("bench/compare/dask_job.py");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blas_threads = (cores / workers.max(1)).max(1);
    let mut child = Command::new(python)
        .arg(&script)
        .args(["--n", &n.to_string(), "--workers", &workers.to_string()])
        .args(["--blas-threads", &blas_threads.to_string()])
        .args(["--splits", &splits.to_string(), "--runs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A group of its own, so that a hung job is killed with the worker processes its
        // LocalCluster started.
        .process_group(0)
        .spawn()
        .with_context(|| format!("--dask {}: could not run it", python.display()))?;
    // Read while it runs: a full pipe would stop it.
    let mut stdout = child.stdout.take().context("the Dask job's output")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the Dask job")? {
            break status;
        }
        if started.elapsed() > timeout {
            // SAFETY: kill(2) on the process group of our own unreaped child.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            bail!("the Dask job did not end within {timeout:?} (--timeout); it was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let printed = reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "the Dask job failed ({status}; its error is above); --dask needs a Python with dask[distributed] and numpy: python3 -m venv target/dask && target/dask/bin/pip install 'dask[distributed]' numpy"
        );
    }
    parse(&printed, reference_seconds)
}

/// The Dask job's result from what it printed: JSON on its last line (Dask may log above it).
fn parse(stdout: &str, reference_seconds: f64) -> Result<DaskRun> {
    let last = stdout.lines().last().unwrap_or_default();
    let printed: Printed = serde_json::from_str(last)
        .with_context(|| format!("reading the Dask job's result from {last:?}"))?;
    let Some(first) = printed.runs.first() else {
        bail!("the Dask job printed no run");
    };
    let tasks = printed.splits * printed.splits;
    Ok(DaskRun {
        e2e_seconds: first.e2e_seconds,
        ratio_to_reference: first.e2e_seconds / reference_seconds,
        blas_threads: printed.blas_threads,
        verified: first.verified,
        tasks,
        tasks_per_second: tasks as f64 / first.e2e_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_is_the_last_line_divided_by_the_gemmq_runs_reference() {
        let printed = "a log line\n{\"n\": 4096, \"workers\": 2, \"blas_threads\": 1, \"splits\": 4, \"runs\": [{\"e2e_seconds\": 2.5, \"relative_error\": 1e-15, \"verified\": true}]}\n";
        let d = parse(printed, 1.25).unwrap();
        assert_eq!((d.e2e_seconds, d.ratio_to_reference), (2.5, 2.0));
        assert_eq!((d.tasks, d.tasks_per_second), (16, 6.4));
        assert!(d.verified);
        assert_eq!(d.blas_threads, 1);
    }

    #[test]
    fn a_job_that_printed_no_result_is_an_error_that_quotes_what_it_printed() {
        let e = parse("Traceback: no module named dask\n", 1.0).unwrap_err();
        assert!(format!("{e:#}").contains("no module named dask"), "{e:#}");
        assert!(parse("{\"blas_threads\": 1, \"runs\": []}", 1.0).is_err());
    }

    #[test]
    fn a_job_that_hangs_is_killed_at_the_timeout_with_the_processes_it_started() {
        let dir = std::env::temp_dir().join(format!("gemmq-dask-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("child-alive");
        // A "python" that starts a child of its own (as a LocalCluster does) and never ends.
        let python = dir.join("python");
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\n(sleep 2; touch {}) &\nsleep 60\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let started = Instant::now();
        let e = run(&python, 64, 2, 4, 1.0, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("did not end within"), "{e:#}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the hung job's own child outlived it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
