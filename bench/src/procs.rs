//! The programs under test as child processes, reaped with `wait4` so that their exit time and
//! peak resident memory (`ru_maxrss`) are exact.
//!
//! Each child gets a thread that blocks in `wait4` on its pid and records the moment it returned,
//! so the main thread can poll several children without losing timing precision.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How a child ended, from `wait4`.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// When `wait4` returned.
    pub at: Instant,
    /// The exit code, or None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Peak resident set size in KiB (Linux reports `ru_maxrss` in KiB). Linux keeps the
    /// spawning parent's peak in it too (the mm that exec replaced), so it is exact only when the
    /// parent is smaller than the child: the bench keeps itself small for that.
    pub maxrss_kib: u64,
    /// User + system CPU time.
    pub cpu_seconds: f64,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended oddly".into(),
        }
    }
}

type Slot = Arc<(Mutex<Option<Result<Exit, String>>>, Condvar)>;

/// A running program; killed (SIGKILL) and reaped on drop if it has not exited.
pub struct Proc {
    pub name: String,
    pub pid: i32,
    pub log: PathBuf,
    pub started: Instant,
    slot: Slot,
}

impl Proc {
    /// Starts `program` with `env`, stdout and stderr to `log`, in `dir`; in network namespace
    /// `netns` when given (`--hosts`): `ip netns exec` enters the namespace and execs the program
    /// in the same process, so the pid, `wait4` and its figures are the program's own.
    pub fn spawn(
        netns: Option<&str>,
        name: &str,
        program: &Path,
        env: &[(String, String)],
        remove_env: &[&str],
        dir: &Path,
        log: PathBuf,
    ) -> Result<Proc> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        };
        for k in remove_env {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id() as i32;
        // The std handle neither kills nor waits when dropped; the waiter thread reaps the child.
        drop(child);
        let slot: Slot = Arc::new((Mutex::new(None), Condvar::new()));
        let s = slot.clone();
        std::thread::Builder::new()
            .name(format!("wait4-{name}"))
            .spawn(move || {
                let r = wait4(pid);
                let (lock, cv) = &*s;
                *lock.lock().expect("waiter lock") = Some(r);
                cv.notify_all();
            })
            .context("starting a waiter thread")?;
        Ok(Proc {
            name: name.into(),
            pid,
            log,
            started,
            slot,
        })
    }

    /// The exit, if the child has ended.
    pub fn try_exit(&self) -> Option<Result<Exit>> {
        let guard = self.slot.0.lock().expect("waiter lock");
        guard
            .as_ref()
            .map(|r| r.clone().map_err(|e| anyhow::anyhow!("{}: {e}", self.name)))
    }

    /// Waits up to `within` for the child to end.
    pub fn wait(&self, within: Duration) -> Option<Result<Exit>> {
        let (lock, cv) = &*self.slot;
        let guard = lock.lock().expect("waiter lock");
        let (guard, _) = cv
            .wait_timeout_while(guard, within, |r| r.is_none())
            .expect("waiter lock");
        guard
            .as_ref()
            .map(|r| r.clone().map_err(|e| anyhow::anyhow!("{}: {e}", self.name)))
    }

    /// Sends `sig` unless the child has been reaped already (its pid could be reused).
    pub fn signal(&self, sig: i32) {
        let guard = self.slot.0.lock().expect("waiter lock");
        if guard.is_none() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not ended within `grace`.
    pub fn stop(&self, grace: Duration) -> Result<Exit> {
        self.signal(libc::SIGTERM);
        if let Some(r) = self.wait(grace) {
            return r;
        }
        self.signal(libc::SIGKILL);
        match self.wait(Duration::from_secs(10)) {
            Some(r) => r,
            None => bail!("{} (pid {}) did not die after SIGKILL", self.name, self.pid),
        }
    }

    /// Whether the log has a line containing `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(needle))
    }

    /// "<log path> ends:" and the log's last 20 lines, for error messages.
    pub fn log_ends(&self) -> String {
        format!("{} ends:\n{}", self.log.display(), self.log_tail(20))
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait(Duration::from_secs(10));
        }
    }
}

fn wait4(pid: i32) -> Result<Exit, String> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; status and ru are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        let at = Instant::now();
        if r == pid {
            let exited = libc::WIFEXITED(status);
            let signaled = libc::WIFSIGNALED(status);
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            return Ok(Exit {
                at,
                code: exited.then(|| libc::WEXITSTATUS(status)),
                signal: signaled.then(|| libc::WTERMSIG(status)),
                maxrss_kib: ru.ru_maxrss.max(0) as u64,
                cpu_seconds: tv(ru.ru_utime) + tv(ru.ru_stime),
            });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4({pid}): {err}"));
        }
    }
}

/// This process's own peak RSS in MiB: VmHWM of its address space, which is what exec hands on
/// to a spawned child's `ru_maxrss` (getrusage's own figure also carries cargo's, from before
/// the bench was exec'd).
pub fn own_peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Waits until `proc` logs `needle`, failing early if it exits.
pub fn wait_for_log(proc: &Proc, needle: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if proc.logged(needle) {
            return Ok(());
        }
        if let Some(exit) = proc.try_exit() {
            let how = exit.map_or_else(|e| e.to_string(), |e| e.describe());
            bail!(
                "{} ended ({how}) before logging {needle:?}; its log {}",
                proc.name,
                proc.log_ends()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not log {needle:?} within {within:?}; its log {}",
                proc.name,
                proc.log_ends()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
