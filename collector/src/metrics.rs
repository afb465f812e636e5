//! The collector's metrics for Prometheus (`--metrics-addr`): its job's progress and outcome.
//!
//! [`JobFigures`] is updated where the progress bar is (after each committed batch) and where
//! the job changes state; the endpoint reads it at each scrape. Every sample carries the job's
//! id as `job_id` (not `job`: Prometheus gives each target a `job` label of its own, and would
//! rename ours `exported_job`). After the job the endpoint stays up for `--metrics-linger`, so that Prometheus's
//! next scrape sees how it ended before the process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use gemmq::assembly::Assembly;
use gemmq::message::Manifest;
use gemmq::metrics::{Figures, MetricsError, MetricsServer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

/// Where the job is, as `gemmq_collector_job_status{status=…}` says it (1 for the current
/// state, 0 for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    /// Another collector holds the job; this one takes over if it stops.
    StandingBy = 0,
    Collecting,
    /// Every result is in; C is being checked (and wrong tiles computed again).
    Verifying,
    Complete,
    Incomplete,
    VerificationFailed,
}

impl JobState {
    const ALL: [JobState; 6] = [
        JobState::StandingBy,
        JobState::Collecting,
        JobState::Verifying,
        JobState::Complete,
        JobState::Incomplete,
        JobState::VerificationFailed,
    ];

    fn name(self) -> &'static str {
        match self {
            JobState::StandingBy => "standing_by",
            JobState::Collecting => "collecting",
            JobState::Verifying => "verifying",
            JobState::Complete => "complete",
            JobState::Incomplete => "incomplete",
            JobState::VerificationFailed => "verification_failed",
        }
    }

    pub fn of(outcome: crate::Outcome) -> Self {
        match outcome {
            crate::Outcome::Complete => JobState::Complete,
            crate::Outcome::Incomplete => JobState::Incomplete,
            crate::Outcome::VerificationFailed => JobState::VerificationFailed,
        }
    }
}

/// One job's figures, as the collector last saw them.
#[derive(Debug)]
pub struct JobFigures {
    job: String,
    tasks: u64,
    tiles: u64,
    tasks_done: AtomicU64,
    tiles_done: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    parked: AtomicU64,
    wrong_tiles: AtomicU64,
    state: AtomicU8,
}

impl JobFigures {
    pub fn new(manifest: &Manifest) -> Arc<Self> {
        Arc::new(JobFigures {
            job: manifest.job.clone(),
            tasks: manifest.plan.tasks(),
            tiles: manifest.plan.tiles(),
            tasks_done: AtomicU64::new(0),
            tiles_done: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            wrong_tiles: AtomicU64::new(0),
            state: AtomicU8::new(JobState::Collecting as u8),
        })
    }

    /// What the checkpoint holds now.
    pub fn update(&self, asm: &Assembly, rejected: u64) {
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.tasks_done, asm.tasks_done());
        set(&self.tiles_done, asm.tiles_complete());
        set(&self.duplicates, asm.duplicates);
        set(&self.rejected, rejected);
        set(&self.retries, crate::retries(&asm.attempts));
        set(&self.parked, asm.parked().count() as u64);
    }

    /// The job's results are being read by this collector: a standby that got the claim is now
    /// collecting; any later state (verifying, which reads the recomputed tiles) stays.
    pub fn claimed(&self) {
        let _ = self.state.compare_exchange(
            JobState::StandingBy as u8,
            JobState::Collecting as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn set_state(&self, state: JobState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn set_wrong_tiles(&self, n: u64) {
        self.wrong_tiles.store(n, Ordering::Relaxed);
    }
}

impl Collector for JobFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let job = [("job_id", self.job.as_str())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut f = Figures::new(&mut encoder);
        let gauge = |f: &mut Figures, name: &str, help: &str, v: u64| {
            f.gauges(name, help, &[(job, v as i64)])
        };
        gauge(
            &mut f,
            "tasks",
            "Tasks in the job (tiles × parts of k)",
            self.tasks,
        )?;
        gauge(
            &mut f,
            "tasks_done",
            "Tasks whose result is assembled",
            get(&self.tasks_done),
        )?;
        gauge(&mut f, "tiles", "Tiles of C", self.tiles)?;
        gauge(
            &mut f,
            "tiles_done",
            "Tiles of C complete (every part of k in)",
            get(&self.tiles_done),
        )?;
        gauge(
            &mut f,
            "tasks_parked",
            "Tasks parked: they will not be computed",
            get(&self.parked),
        )?;
        f.counters(
            "duplicates",
            "Results dropped because their tile was already assembled",
            &[(job, get(&self.duplicates))],
        )?;
        f.counters(
            "rejected",
            "Messages on the results stream that did not belong to the job, dropped",
            &[(job, get(&self.rejected))],
        )?;
        f.counters(
            "retries",
            "Attempts beyond the first that the assembled results needed",
            &[(job, get(&self.retries))],
        )?;
        f.counters(
            "wrong_tiles",
            "Tiles that failed verification and were computed again",
            &[(job, get(&self.wrong_tiles))],
        )?;
        let now = self.state.load(Ordering::Relaxed);
        let states: Vec<_> = JobState::ALL
            .iter()
            .map(|s| {
                (
                    [("job_id", self.job.as_str()), ("status", s.name())],
                    i64::from(*s as u8 == now),
                )
            })
            .collect();
        f.gauges(
            "job_status",
            "1 for the job's current state: standing_by, collecting, verifying, complete (every tile in and C verified, unless --verify false), incomplete (tasks parked) or verification_failed",
            &states,
        )
    }
}

/// Serves `figures` on `addr`.
pub async fn serve(
    addr: SocketAddr,
    figures: &Arc<JobFigures>,
) -> Result<MetricsServer, MetricsError> {
    MetricsServer::start(addr, registry(figures)).await
}

fn registry(figures: &Arc<JobFigures>) -> Registry {
    let mut registry = Registry::with_prefix("gemmq_collector");
    registry.register_collector(Box::new(figures.clone()));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::{self, Header, Inputs, ResultHeader};
    use gemmq::{DType, Plan, TileId};

    #[test]
    fn the_job_s_progress_and_outcome_are_exposed_under_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::new(16, 4, 16, DType::F64, 8, 1 << 20).unwrap();
        let mut asm = Assembly::open(&plan, "j1", "r1", dir.path()).unwrap();
        let manifest = Manifest {
            version: message::VERSION,
            job: "j1".into(),
            plan,
            inputs: Inputs::Seed(1),
            created_ms: 0,
            run: "r1".into(),
            check: None,
        };
        let h = ResultHeader {
            job: "j1".into(),
            run: "r1".into(),
            tile: TileId {
                row: 0,
                col: 0,
                part: 0,
            },
            dtype: DType::F64,
            rows: 8,
            cols: 8,
            worker: "w".into(),
            attempt: 2,
            compute_micros: 1,
            recompute: 0,
        };
        let bytes = message::encode(&Header::TileResult(h.clone()), &[&[0u8; 512]]);
        let frame = message::decode(&bytes, 1 << 20).unwrap();
        asm.apply_result(&h, frame.payload).unwrap();
        asm.apply_result(&h, frame.payload).unwrap();

        let figures = JobFigures::new(&manifest);
        figures.update(&asm, 5);
        figures.set_state(JobState::Verifying);
        let text = gemmq::metrics::render(&registry(&figures));
        for line in [
            "gemmq_collector_tasks{job_id=\"j1\"} 4\n",
            "gemmq_collector_tasks_done{job_id=\"j1\"} 1\n",
            "gemmq_collector_tiles{job_id=\"j1\"} 4\n",
            "gemmq_collector_tiles_done{job_id=\"j1\"} 1\n",
            "gemmq_collector_duplicates_total{job_id=\"j1\"} 1\n",
            "gemmq_collector_rejected_total{job_id=\"j1\"} 5\n",
            "gemmq_collector_retries_total{job_id=\"j1\"} 1\n",
            "gemmq_collector_job_status{job_id=\"j1\",status=\"verifying\"} 1\n",
            "gemmq_collector_job_status{job_id=\"j1\",status=\"complete\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }

        figures.claimed();
        let text = gemmq::metrics::render(&registry(&figures));
        assert!(
            text.contains("status=\"verifying\"} 1\n"),
            "the recomputed tiles read while verifying leave the job verifying"
        );
        figures.set_state(JobState::StandingBy);
        figures.claimed();
        let text = gemmq::metrics::render(&registry(&figures));
        assert!(text.contains("status=\"collecting\"} 1\n"), "{text}");

        figures.set_state(JobState::of(crate::Outcome::Complete));
        let text = gemmq::metrics::render(&registry(&figures));
        assert!(text.contains("gemmq_collector_job_status{job_id=\"j1\",status=\"complete\"} 1\n"));
        assert!(
            text.contains("gemmq_collector_job_status{job_id=\"j1\",status=\"verifying\"} 0\n")
        );
    }
}
