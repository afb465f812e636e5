//! Progress: a bar for a person at a terminal, a log line every few seconds for everyone else.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    last_log: Instant,
    every: Duration,
}

impl Progress {
    pub fn new(job: &str, total: u64) -> Self {
        let bar = gemmq::telemetry::stderr_is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {pos}/{len} tasks  {per_sec}  eta {eta}  {msg}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(job.to_string());
            bar
        });
        Progress {
            bar,
            total,
            started: Instant::now(),
            last_log: Instant::now(),
            every: Duration::from_secs(5),
        }
    }

    /// Updates the display; `retries` and `parked` are shown beside the count.
    pub fn update(&mut self, done: u64, retries: u64, parked: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(format!("retries {retries}  parked {parked}"));
        } else if self.last_log.elapsed() >= self.every || done == self.total {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(done)) as f64 / rate
            } else {
                f64::INFINITY
            };
            info!(
                done,
                total = self.total,
                percent = format!("{:.1}", 100.0 * done as f64 / self.total.max(1) as f64),
                tasks_per_s = format!("{rate:.1}"),
                eta_s = format!("{eta:.0}"),
                retries,
                parked,
                "progress"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
