//! The machine the figures came from.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub rabbitmq_version: String,
    pub rustc_version: String,
    pub date_utc: String,
    pub git_commit: String,
    /// Uncommitted changes in the working tree when the bench ran (the binaries were built from
    /// it, not from `git_commit` alone).
    pub git_dirty: bool,
    /// /proc/loadavg when the bench started: other work on the machine skews the figures.
    pub loadavg_at_start: String,
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn describe(management: &gemmq::management::Management) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_total_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_total_gib: (mem_total_gib * 10.0).round() / 10.0,
        kernel: run("uname", &["-sr"]).unwrap_or_else(|| "unknown".into()),
        rabbitmq_version: management
            .rabbitmq_version()
            .unwrap_or_else(|e| format!("unknown ({e})")),
        rustc_version: run(&rustc, &["--version"]).unwrap_or_else(|| "unknown".into()),
        date_utc: run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into()),
        git_commit: run("git", &["rev-parse", "--short", "HEAD"])
            .unwrap_or_else(|| "unknown".into()),
        git_dirty: run("git", &["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty()),
        loadavg_at_start: loadavg(),
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU time (user + system) RabbitMQ's Erlang VM has used so far: the sum over every `beam.smp`
/// process this machine shows in /proc. None when there is none (a remote or containerised
/// broker).
pub fn broker_cpu_seconds() -> Option<f64> {
    let mut ticks = 0u64;
    let mut found = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_pid = path
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim() != "beam.smp" {
            continue;
        }
        let Some(t) = stat_cpu_ticks(&path) else {
            continue;
        };
        ticks += t;
        found = true;
    }
    found.then(|| ticks as f64 / clock_ticks())
}

/// CPU time (user + system) a running process has used so far.
pub fn process_cpu_seconds(pid: i32) -> Option<f64> {
    stat_cpu_ticks(Path::new(&format!("/proc/{pid}"))).map(|t| t as f64 / clock_ticks())
}

fn stat_cpu_ticks(proc_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time every core of the machine has spent busy so far (all processes, anyone's): the
/// non-idle fields of /proc/stat's `cpu` line, steal included.
pub fn machine_busy_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    Some(busy as f64 / clock_ticks())
}

/// How long the bench waited for the machine to quieten, and how busy it was then.
#[derive(Debug, Clone, Serialize)]
pub struct IdleWait {
    pub waited_seconds: f64,
    /// Busy cores over the last one-second sample (anyone's work, the broker's included).
    pub busy_cores: f64,
    /// Whether it got under the threshold (false: it gave up waiting).
    pub idle: bool,
}

/// Samples the machine's busy cores over one-second windows until they drop under `cores`, for
/// at most `max` (one sample when `max` is zero).
pub fn wait_idle(max: Duration, cores: f64) -> IdleWait {
    let started = std::time::Instant::now();
    loop {
        let (b0, t0) = (machine_busy_cpu_seconds(), std::time::Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        let busy = match (b0, machine_busy_cpu_seconds()) {
            (Some(a), Some(b)) => (b - a) / t0.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        let idle = busy < cores;
        if idle || started.elapsed() >= max {
            if !idle {
                eprintln!(
                    "   machine still busy ({busy:.2} cores of other work) after waiting {max:?}; measuring anyway"
                );
            }
            return IdleWait {
                waited_seconds: started.elapsed().as_secs_f64(),
                busy_cores: busy,
                idle,
            };
        }
    }
}

/// Bytes the probe writes: a few of a job's stream segments' worth.
const PROBE_BYTES: usize = 128 << 20;

/// How fast this machine writes into fresh page cache right now, in MB/s: 128 MiB written to a
/// new file in `dir` and the file deleted unwritten (no disk involved). On the VMs these figures
/// come from, memory a process or the page cache frees is handed back to the host within seconds,
/// and touching it again costs a fault in the host: the same write ran 0.07 s or 0.36 s for
/// 384 MiB in one day, and the job — which writes its streams into fresh page cache and its
/// blocks into fresh memory — slows with it. Printed beside each run so that a slow run can be
/// told from a slow machine.
pub fn fresh_write_mb_per_s(dir: &Path) -> Option<f64> {
    let path = dir.join(format!("fresh-write-probe-{}", std::process::id()));
    let started = std::time::Instant::now();
    let written = write_probe_file(&path);
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    written.ok()?;
    Some(PROBE_BYTES as f64 / 1e6 / seconds)
}

/// [`PROBE_BYTES`] into a new file at `path`, a MiB at a time.
fn write_probe_file(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let chunk = vec![1u8; 1 << 20];
    let mut f = std::fs::File::create(path)?;
    for _ in 0..PROBE_BYTES / chunk.len() {
        f.write_all(&chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fresh_write_probe_gives_a_rate_and_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("gemmq-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rate = super::fresh_write_mb_per_s(&dir).expect("a writable directory");
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe's file is gone"
        );
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(
            super::fresh_write_mb_per_s(&dir),
            None,
            "no directory, no figure"
        );
    }
}
