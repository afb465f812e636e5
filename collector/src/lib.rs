//! The collector: assembles C from a job's results, exactly once per tile, and checks it.
//!
//! It finds its job by id (`--job-id`, waiting for the producer if it has not announced it yet)
//! or takes the next announced job, and reads the job's results stream. One collector at a time
//! assembles a job: start a second one for the same job, on this machine or another, and it
//! stands by, taking over if the first one dies — reading the stream from the start when its
//! own checkpoint is empty, so no disk needs to be shared. Every result is applied once whatever
//! duplicates arrive ([`gemmq::assembly`]).
//! When every task has a result or has been parked it writes `C.npy` and `summary.json`, checks C
//! against A and B with Freivalds' test, and reports.
//!
//! Exit status: 0 complete and verified; 3 incomplete (tasks were parked; the report says which
//! and why); 4 C failed verification; 2 bad settings; 1 any other error.

mod apply;
pub mod cancel;
mod check;
mod collect;
mod metrics;
mod progress;
pub mod status;
pub mod web;

pub use check::{MAX_RECOMPUTES, WrongTile};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use gemmq::TileId;
use gemmq::assembly::{Assembly, AssemblyError, WorkerTally};
use gemmq::broker::{self, Broker};
use gemmq::config::{BrokerSettings, ConfigError, ConfigFile, Layered};
use gemmq::job;
use gemmq::message::{self, Inputs, Manifest};
use gemmq::shutdown::CancellationToken;
use gemmq::topology::{self, Topology};
use gemmq::verify::{Expected, Verdict};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::collect::Collection;
use crate::metrics::{JobFigures, JobState};
use crate::progress::Progress;

/// The job was finished by another collector, which removed its results stream: only a job
/// that is complete and verified is removed, so there is nothing left to do, and it is not a
/// failure (exit 0).
#[derive(Debug)]
pub struct CollectedElsewhere {
    pub job: String,
}

impl std::fmt::Display for CollectedElsewhere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} is over and its queues are gone: another collector collected it, complete and verified (its C.npy and summary.json are in that collector's --out)",
            self.job
        )
    }
}

impl std::error::Error for CollectedElsewhere {}

/// The job was cancelled (`gemmq-collector cancel`): there is no C to collect, which a script
/// waiting for one must hear ([`EXIT_CANCELLED`]).
#[derive(Debug)]
pub struct JobCancelled {
    pub job: String,
}

impl std::fmt::Display for JobCancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {job} was cancelled (gemmq-collector cancel): there is nothing to collect; run its producer again with --job-id {job} to start it anew",
            job = self.job
        )
    }
}

impl std::error::Error for JobCancelled {}

/// Exit status for a job whose tasks were parked.
pub const EXIT_INCOMPLETE: u8 = 3;
/// Exit status for a C that failed verification.
pub const EXIT_UNVERIFIED: u8 = 4;
/// Exit status for a job that was cancelled.
pub const EXIT_CANCELLED: u8 = 5;

/// Which job to collect and where to put it. Every flag also reads the environment variable
/// shown and the `[collector]` section of the config file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CollectorOptions {
    /// Job to collect; waits for it to be announced. Without it, takes the next announced job
    #[arg(long, env = "GEMMQ_JOB_ID")]
    pub job_id: Option<String>,
    /// Directory for C.npy and summary.json [default: out]
    #[arg(long, env = "GEMMQ_OUT", value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Results held unacknowledged at once [default: 64]
    #[arg(long, env = "GEMMQ_COLLECTOR_PREFETCH")]
    pub prefetch: Option<u16>,
    /// Give up when no result has arrived for this long, reporting what is missing
    /// (0 waits for as long as it takes) [default: 0]
    #[arg(long, env = "GEMMQ_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Check C against A and B (Freivalds) before reporting success [default: true]
    #[arg(long, env = "GEMMQ_VERIFY")]
    pub verify: Option<bool>,
    /// Refuse jobs whose C would take more memory than this [default: 8GiB]
    #[arg(long, env = "GEMMQ_MAX_OUTPUT_BYTES", value_name = "SIZE")]
    pub max_output_bytes: Option<bytesize::ByteSize>,
    /// Serve a live page of the job on this address while collecting, e.g. 127.0.0.1:8080
    /// (read-only: the tile map filling in, progress, workers, queues) [default: off]
    #[arg(long, env = "GEMMQ_WEB_ADDR", value_name = "ADDR")]
    pub web: Option<std::net::SocketAddr>,
    /// The management API, for the live page's queues
    /// [default: http://<the AMQP host>:15672 with the AMQP account]
    #[arg(long, env = "GEMMQ_MANAGEMENT_URL", value_name = "URL")]
    pub management_url: Option<String>,
    /// Serve Prometheus metrics on this address (GET /metrics), e.g. 127.0.0.1:9101: the job's
    /// tasks and tiles done and total, duplicates, rejected messages, its state and outcome
    /// [default: off]
    #[arg(long, env = "GEMMQ_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// With --metrics-addr: how long the metrics stay up after the job, so that Prometheus's
    /// next scrape sees how it ended (Ctrl-C cuts it short) [default: 15s]
    #[arg(long, env = "GEMMQ_METRICS_LINGER", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub metrics_linger: Option<Duration>,
}

gemmq::layered!(CollectorOptions {
    job_id,
    out,
    prefetch,
    idle_timeout,
    verify,
    max_output_bytes,
    web,
    management_url,
    metrics_addr,
    metrics_linger
});

#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub job_id: Option<String>,
    pub out: PathBuf,
    pub prefetch: u16,
    pub idle_timeout: Option<Duration>,
    pub verify: bool,
    pub max_output_bytes: u64,
    pub collector_id: String,
    pub web: Option<std::net::SocketAddr>,
    pub management_url: Option<String>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub metrics_linger: Duration,
}

impl Settings {
    pub fn resolve(
        flags: CollectorOptions,
        file: &ConfigFile,
        broker: BrokerSettings,
    ) -> Result<Self, ConfigError> {
        let o = flags.or(file.section("collector")?);
        if let Some(job) = &o.job_id {
            topology::check_name("job-id", job)?;
        }
        let prefetch = o.prefetch.unwrap_or(64);
        if prefetch == 0 {
            return Err(ConfigError::invalid("prefetch", "must be at least 1"));
        }
        Ok(Settings {
            broker,
            job_id: o.job_id,
            out: o.out.unwrap_or_else(|| "out".into()),
            prefetch,
            idle_timeout: o.idle_timeout.filter(|d| !d.is_zero()),
            verify: o.verify.unwrap_or(true),
            max_output_bytes: o.max_output_bytes.map_or(8 << 30, |b| b.as_u64()),
            collector_id: broker::default_worker_id(),
            web: o.web,
            management_url: o.management_url,
            metrics_addr: o.metrics_addr,
            metrics_linger: o.metrics_linger.unwrap_or(Duration::from_secs(15)),
        })
    }
}

/// How the job ended (`summary.json`'s `status`; the live view is the [`status`] module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every tile is there and C passed verification (or verification was off).
    Complete,
    /// Some tasks were parked or never came; C.npy was not written.
    Incomplete,
    /// Every tile is there but C is not A·B.
    VerificationFailed,
}

impl Outcome {
    /// As summary.json spells it.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Incomplete => "incomplete",
            Outcome::VerificationFailed => "verification_failed",
        }
    }

    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Complete => 0,
            Outcome::Incomplete => EXIT_INCOMPLETE,
            Outcome::VerificationFailed => EXIT_UNVERIFIED,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParkedTile {
    pub tile: TileId,
    pub reason: String,
    pub attempts: u32,
    pub worker: String,
}

/// summary.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub job: String,
    pub status: Outcome,
    pub m: u64,
    pub k: u64,
    pub n: u64,
    pub dtype: gemmq::DType,
    pub tile: u64,
    pub k_parts: u32,
    pub tiles: u64,
    pub tasks: u64,
    pub tasks_done: u64,
    pub tiles_complete: u64,
    /// Tasks by the attempt that produced their result: {"1": 95, "2": 5} means 5 needed a retry.
    pub attempts: BTreeMap<u32, u64>,
    pub retries: u64,
    pub duplicates_dropped: u64,
    pub rejected_messages: u64,
    pub parked: Vec<ParkedTile>,
    pub workers: BTreeMap<String, WorkerTally>,
    /// From the producer's first publish to C checked.
    pub wall_seconds: f64,
    pub gflops: f64,
    pub verification: Option<Verdict>,
    pub output: Option<PathBuf>,
    /// Tiles that failed verification and were computed again, with who sent them.
    #[serde(default)]
    pub wrong_tiles: Vec<WrongTile>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Declares the shared topology, riding out what the broker says while a queue is starting:
/// 404 "home node … down or inaccessible" comes for seconds after a restart, and when another
/// program declares the same new quorum queue at the same moment (compose starts them together).
async fn declare_topology(broker: &Broker, topo: &Topology) -> Result<Channel> {
    let mut pauses = gemmq::broker::retry_pauses();
    loop {
        let ch = broker.channel().await.context("connecting to RabbitMQ")?;
        match topo.declare(&ch).await {
            Ok(()) => return Ok(ch),
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => {
                let Some(pause) = pauses.next() else {
                    return Err(
                        anyhow::Error::new(e).context("the broker kept refusing the topology")
                    );
                };
                warn!(error = %e, retry_in = ?pause, "declaring the topology failed; trying again");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Collects one job until it is finished (or `shutdown`), then writes and reports.
pub async fn run(s: &Settings, shutdown: CancellationToken) -> Result<Summary> {
    let broker = Broker::new(&s.broker, &format!("gemmq-collector {}", s.collector_id))?
        .with_shutdown(shutdown.clone());
    let topo = s.broker.topology();
    let ch = declare_topology(&broker, &topo).await?;

    let (manifest, announcement) = find_job(s, &broker, &topo, &ch, &shutdown).await?;
    check_output_size(s, &manifest)?;
    let figures = JobFigures::new(&manifest);
    let metrics = match s.metrics_addr {
        Some(addr) => Some(metrics::serve(addr, &figures).await?),
        None => None,
    };
    std::fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;
    let mut asm = match open_checkpoint(s, &manifest, &figures, &shutdown).await? {
        Opened::Assembly(asm) => *asm,
        Opened::Finished(output) => return already_collected(s, &manifest.job, &output).await,
    };
    if asm.resumed > 0 {
        info!(
            job = %manifest.job, done = asm.resumed, total = manifest.plan.tasks(), checkpoint = %asm.dir().display(),
            "resuming from the checkpoint"
        );
    }
    let expected = s.verify.then(|| check::start(&manifest, &mut asm));
    let page = match s.web {
        Some(addr) => Some(
            web::Page::start(addr, &manifest, s.broker.clone(), s.management_url.clone()).await?,
        ),
        None => None,
    };
    let live = page.as_ref().map(|p| p.live.clone());
    let mut job = Collection {
        broker: &broker,
        topo: &topo,
        settings: s,
        manifest: &manifest,
        asm,
        progress: Progress::new(&manifest.job, manifest.plan.tasks()),
        rejected: 0,
        announcement,
        shutdown: &shutdown,
        conn: None,
        from_start: false,
        live: live.clone(),
        figures: figures.clone(),
    };
    let (verdict, wrong) = match collect_and_check(&mut job, expected).await {
        Ok(c) => c,
        Err(e) => {
            job.release().await;
            return Err(e);
        }
    };
    let mut claim = job.keep_claim();
    let done = Checked {
        asm: job.asm,
        rejected: job.rejected,
        verdict,
        wrong,
    };
    let summary = finish(s, &broker, &topo, &manifest, done).await;
    if let Ok(summary) = &summary {
        figures.set_state(JobState::of(summary.status));
        figures.set_wrong_tiles(summary.wrong_tiles.len() as u64);
        if let Some(page) = &page {
            page.live.done(summary.status.name());
        }
    }
    if let Some(page) = page {
        page.close().await;
    }
    // Held through finishing, so that a collector standing by takes over only a job that is
    // still to do, or finds it retired.
    claim.release().await;
    if let Some(server) = metrics {
        linger(s.metrics_linger, server, &shutdown).await;
    }
    summary
}

/// Keeps the metrics up a little after the job, for Prometheus's last scrape of it.
async fn linger(
    linger: Duration,
    server: gemmq::metrics::MetricsServer,
    shutdown: &CancellationToken,
) {
    if !linger.is_zero() && !shutdown.is_cancelled() {
        info!(linger = ?linger, url = %format!("http://{}/metrics", server.addr()), "job over; metrics stay up for a last scrape (--metrics-linger; Ctrl-C ends it)");
        tokio::select! {
            _ = tokio::time::sleep(linger) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    server.close().await;
}

/// Collects every result, then (when verifying and C is complete) checks C, healing wrong tiles.
async fn collect_and_check(
    job: &mut Collection<'_>,
    expected: Option<tokio::task::JoinHandle<Result<Expected>>>,
) -> Result<(Option<Verdict>, Vec<WrongTile>)> {
    job.until_done().await?;
    // A job resumed from a checkpoint that already held every tile reads no batch: the figures
    // come from the checkpoint here.
    job.figures.update(&job.asm, job.rejected);
    let Some(expected) = expected else {
        return Ok((None, Vec::new()));
    };
    let expected = expected.await.context("the verification task failed")??;
    if !job.asm.is_complete() {
        return Ok((None, Vec::new()));
    }
    job.figures.set_state(JobState::Verifying);
    let (verdict, wrong) = check::verify_and_heal(job, &expected).await?;
    Ok((Some(verdict), wrong))
}

/// A job collected and checked: what `finish` writes and reports.
struct Checked {
    asm: Assembly,
    rejected: u64,
    verdict: Option<Verdict>,
    wrong: Vec<WrongTile>,
}

/// The job named by `--job-id` (waiting for its announcement), or the next one announced, whose
/// announcement stays unacked until its results queue is ours.
async fn find_job(
    s: &Settings,
    broker: &Broker,
    topo: &Topology,
    ch: &Channel,
    shutdown: &CancellationToken,
) -> Result<(Manifest, Option<(Delivery, Channel)>)> {
    Ok(match &s.job_id {
        Some(job) => (
            wait_for_manifest(broker, ch, topo, job, s, shutdown).await?,
            None,
        ),
        None => {
            let (m, d, ch) = next_job(broker, topo, shutdown).await?;
            (m, Some((d, ch)))
        }
    })
}

/// Refuses a C larger than `--max-output-bytes` before anything is written.
fn check_output_size(s: &Settings, manifest: &Manifest) -> Result<()> {
    let plan = &manifest.plan;
    let c_bytes = plan
        .m
        .checked_mul(plan.n)
        .and_then(|e| e.checked_mul(plan.dtype.size() as u64))
        .unwrap_or(u64::MAX);
    if c_bytes > s.max_output_bytes {
        bail!(ConfigError::invalid(
            "max-output-bytes",
            format!(
                "job {}'s C is {}x{} {} = {c_bytes} bytes, over the {} allowed; raise --max-output-bytes if this machine has the disk",
                manifest.job, plan.m, plan.n, plan.dtype, s.max_output_bytes
            )
        ));
    }
    Ok(())
}

/// The checkpoint directory of a job under `out`.
pub fn checkpoint_dir(out: &Path, job: &str) -> PathBuf {
    out.join(format!(".gemmq-checkpoint-{job}"))
}

/// Opens the job's checkpoint, standing by while another collector holds it.
enum Opened {
    Assembly(Box<Assembly>),
    /// Another collector (or this one, before a restart) already wrote C here.
    Finished(PathBuf),
}

async fn open_checkpoint(
    s: &Settings,
    manifest: &Manifest,
    figures: &JobFigures,
    shutdown: &CancellationToken,
) -> Result<Opened> {
    let dir = checkpoint_dir(&s.out, &manifest.job);
    let mut said = false;
    loop {
        match Assembly::open(&manifest.plan, &manifest.job, &manifest.run, &dir) {
            Ok(asm) => {
                figures.set_state(JobState::Collecting);
                return Ok(Opened::Assembly(Box::new(asm)));
            }
            Err(AssemblyError::AlreadyFinished { output }) => return Ok(Opened::Finished(output)),
            Err(e) if Assembly::is_locked(&e) => {
                figures.set_state(JobState::StandingBy);
                if !said {
                    info!(job = %manifest.job, checkpoint = %dir.display(), "standing by: another collector is assembling this job; taking over if it stops");
                    said = true;
                }
            }
            Err(e) => return Err(e).context("opening the checkpoint"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => bail!("interrupted while standing by"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The job was collected already: report the summary that collector wrote.
async fn already_collected(s: &Settings, job: &str, output: &Path) -> Result<Summary> {
    let path = s.out.join("summary.json");
    // The collector that finished writes its summary just after releasing the checkpoint.
    for _ in 0..100 {
        if let Some(summary) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Summary>(&b).ok())
            .filter(|sum| sum.job == job)
        {
            info!(%job, output = %output.display(), status = ?summary.status, "this job was already collected; nothing to do");
            return Ok(summary);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "job {job} was already collected into {} but {} is missing or unreadable",
        output.display(),
        path.display()
    )
}

pub(crate) fn retries(attempts: &BTreeMap<u32, u64>) -> u64 {
    attempts
        .iter()
        .map(|(a, n)| (*a as u64).saturating_sub(1) * n)
        .sum()
}

async fn finish(
    s: &Settings,
    broker: &Broker,
    topo: &Topology,
    manifest: &Manifest,
    done: Checked,
) -> Result<Summary> {
    let Checked {
        asm,
        rejected,
        verdict,
        wrong,
    } = done;
    let mut summary = Summary::of(manifest, &asm, rejected);
    summary.wrong_tiles = wrong;
    if asm.is_complete() {
        let path = s.out.join("C.npy");
        asm.finish(&path).context("writing C.npy")?;
        summary.output = Some(path);
        summary.status = match &verdict {
            Some(v) if !v.passed => Outcome::VerificationFailed,
            _ => Outcome::Complete,
        };
        summary.verification = verdict;
    } else {
        info!(checkpoint = %asm.dir().display(), "the checkpoint is kept: run the producer again with the same --job-id to redo missing tiles, and this collector to resume");
    }
    summary.wall_seconds = (unix_ms().saturating_sub(manifest.created_ms)) as f64 / 1e3;
    summary.gflops = manifest.plan.flops() / summary.wall_seconds.max(1e-9) / 1e9;
    write_summary(s, &summary)?;
    report(&summary);
    if summary.status == Outcome::Complete {
        retire(broker, topo, manifest).await;
    }
    Ok(summary)
}

impl Summary {
    /// What the checkpoint says of the job; the outcome, timing and verification come after.
    fn of(manifest: &Manifest, asm: &Assembly, rejected: u64) -> Self {
        let plan = &manifest.plan;
        Summary {
            job: manifest.job.clone(),
            status: Outcome::Incomplete,
            m: plan.m,
            k: plan.k,
            n: plan.n,
            dtype: plan.dtype,
            tile: plan.tile,
            k_parts: plan.parts(),
            tiles: plan.tiles(),
            tasks: plan.tasks(),
            tasks_done: asm.tasks_done(),
            tiles_complete: asm.tiles_complete(),
            retries: retries(&asm.attempts),
            attempts: asm.attempts.clone(),
            duplicates_dropped: asm.duplicates,
            rejected_messages: rejected,
            parked: asm
                .parked()
                .map(|p| ParkedTile {
                    tile: p.tile,
                    reason: p.reason.clone(),
                    attempts: p.attempts,
                    worker: p.worker.clone(),
                })
                .collect(),
            workers: asm.workers.clone(),
            wall_seconds: 0.0,
            gflops: 0.0,
            verification: None,
            output: None,
            wrong_tiles: Vec::new(),
        }
    }
}

/// Whole or not at all: a standby collector (and scripts) read it while it may be written.
fn write_summary(s: &Settings, summary: &Summary) -> Result<()> {
    let json = serde_json::to_vec_pretty(summary).expect("the summary is plain data");
    let path = s.out.join("summary.json");
    let tmp = s.out.join(".summary.json.tmp");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// The job is done: its queues go, and the workers are told. Late duplicates are then dropped
/// by the workers.
async fn retire(broker: &Broker, topo: &Topology, manifest: &Manifest) {
    let deleted = async {
        let ch = broker.channel().await?;
        topo.delete_job(&ch, &manifest.job).await?;
        Ok(ch)
    };
    match deleted.await as Result<_, gemmq::broker::BrokerError> {
        // After the queues are gone: a worker that hears it has nothing more to read.
        Ok(ch) => {
            if let Err(e) = gemmq::job::announce_done(&ch, topo, &manifest.job, &manifest.run).await
            {
                warn!(error = %e, "could not tell the workers that the job is done; they drop its blocks when they need the room");
            }
        }
        Err(e) => warn!(error = %e, "could not delete the finished job's queues"),
    }
}

fn report(s: &Summary) {
    let v = s
        .verification
        .as_ref()
        .map_or("not checked".to_string(), |v| {
            format!(
                "{} (Freivalds, {} rounds, worst error {:.2e} of the rounding bound)",
                if v.passed { "passed" } else { "FAILED" },
                v.rounds,
                v.worst_ratio
            )
        });
    info!(
        job = %s.job, status = ?s.status, tasks_done = s.tasks_done, tasks = s.tasks,
        retries = s.retries, duplicates = s.duplicates_dropped, parked = s.parked.len(),
        wall_s = format!("{:.2}", s.wall_seconds), gflops = format!("{:.2}", s.gflops),
        verification = %v, "job finished"
    );
    for p in &s.parked {
        error!(tile = %p.tile, attempts = p.attempts, worker = %p.worker, reason = %p.reason, "missing: tile parked");
    }
    for w in &s.wrong_tiles {
        warn!(tile = %w.tile, sent_by = ?w.sent_by, recompute = w.recompute, "tile was wrong and was computed again");
    }
    for (w, t) in &s.workers {
        info!(worker = %w, tasks = t.tasks, failures = t.failures, wrong_tiles = t.wrong_tiles, compute_s = format!("{:.2}", t.compute_seconds), "per worker");
    }
}

/// Waits until the job's manifest is there.
async fn wait_for_manifest(
    broker: &Broker,
    ch: &Channel,
    topo: &Topology,
    job: &str,
    s: &Settings,
    shutdown: &CancellationToken,
) -> Result<Manifest> {
    let started = Instant::now();
    let (mut said, mut cancelled) = (false, false);
    let mut ch = ch.clone();
    let mut pauses = gemmq::broker::retry_pauses();
    loop {
        // Only peek at a queue that exists: declaring it here would resurrect the queues of a
        // job that another collector finished and removed.
        if job_exists(broker, topo, job).await {
            match job::peek_manifest(&ch, topo, job).await {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => pauses = gemmq::broker::retry_pauses(),
                Err(e @ job::JobError::BadManifest { .. }) => return Err(e.into()),
                Err(job::JobError::Amqp(e)) if gemmq::topology::is_access_refused(&e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "this user may not read job {job}'s manifest queue; give it read permission on the namespace's queues"
                    )));
                }
                // The queue is there but not answering (starting after a restart), or the
                // connection went: look again on a fresh channel, a bounded number of times.
                Err(e) => {
                    let Some(pause) = pauses.next() else {
                        return Err(anyhow::Error::new(e).context("reading the job's manifest"));
                    };
                    warn!(job, error = %e, retry_in = ?pause, "could not read the job's manifest; trying again");
                    tokio::time::sleep(pause).await;
                    ch = broker.channel().await.context("connecting to RabbitMQ")?;
                }
            }
        } else if let Some(done) = finished_here(s, job) {
            return Ok(done);
        }
        if !said {
            // A cancelled job may be run again under its id, the collector often started
            // first: wait for it as for any job, saying what is known.
            cancelled = was_cancelled(broker, topo, job).await;
            if cancelled {
                warn!(
                    job,
                    "the job was cancelled (gemmq-collector cancel); waiting in case its producer runs it again (--idle-timeout gives up, exit 5)"
                );
            } else {
                info!(job, "waiting for the producer to announce the job");
            }
            said = true;
        }
        if s.idle_timeout.is_some_and(|t| started.elapsed() >= t) {
            if cancelled {
                return Err(JobCancelled { job: job.into() }.into());
            }
            bail!(
                "job {job} was not announced within the idle timeout; is the producer running with --job-id {job}?"
            );
        }
        // Often the producer is starting at the same moment: look often at first, then ease off
        // the broker.
        let poll = if started.elapsed() < Duration::from_secs(10) {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(250)
        };
        tokio::select! {
            _ = shutdown.cancelled() => bail!("interrupted while waiting for job {job}"),
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// The manifest of a job this `--out` already holds a finished checkpoint of.
fn finished_here(s: &Settings, job: &str) -> Option<Manifest> {
    let dir = checkpoint_dir(&s.out, job);
    if !dir.join("done").exists() {
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("plan.json")).ok()?).ok()?;
    let plan: gemmq::Plan = serde_json::from_value(v.get("plan")?.clone()).ok()?;
    // The run the checkpoint was of, so that opening it finds it finished (none before runs).
    let run = v.get("run").and_then(|r| r.as_str()).unwrap_or_default();
    Some(Manifest {
        version: message::VERSION,
        job: job.to_string(),
        plan,
        inputs: Inputs::Seed(0),
        created_ms: 0,
        run: run.to_string(),
        check: None,
    })
}

/// Whether the job carries the mark of a cancel (in doubt, not).
pub(crate) async fn was_cancelled(broker: &Broker, topo: &Topology, job: &str) -> bool {
    let Ok(conn) = broker.connection().await else {
        return false;
    };
    topo.is_cancelled(&conn, job).await
}

/// Whether the job's manifest queue is still there (a finished job's queues are deleted).
async fn job_exists(broker: &Broker, topo: &Topology, job: &str) -> bool {
    let Ok(conn) = broker.connection().await else {
        return true;
    };
    // In doubt (the broker did not answer), it exists.
    topo.has_manifest_queue(&conn, job).await.unwrap_or(true)
}

/// Whether the job's queues now hold another run than the one `announced` (the announcement of
/// a finished run, left on the jobs queue by a collector started with --job-id, and the id used
/// again): that run has its own announcement. When the manifest cannot be read, not: the
/// collector then goes by the announcement, as before runs existed.
async fn superseded(broker: &Broker, topo: &Topology, announced: &Manifest) -> bool {
    // A failed peek may close its channel: use a throwaway one.
    let Ok(ch) = broker.channel().await else {
        return false;
    };
    let current = job::peek_manifest(&ch, topo, &announced.job).await;
    let _ = ch.close(200, "peeked".into()).await;
    match current {
        Ok(Some(m)) => message::other_run(&m.run, &announced.run),
        _ => false,
    }
}

/// Takes the next job announced on the jobs queue; the announcement is acked by the caller once
/// it consumes the job's results.
async fn next_job(
    broker: &Broker,
    topo: &Topology,
    shutdown: &CancellationToken,
) -> Result<(Manifest, Delivery, Channel)> {
    let ch = broker.channel().await?;
    ch.basic_qos(1, BasicQosOptions { global: false }).await?;
    let mut jobs = ch
        .basic_consume(
            topo.jobs_queue().as_str().into(),
            "gemmq-collector:next-job".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %topo.jobs_queue(), "waiting for the next job");
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => bail!("interrupted while waiting for a job"),
            d = jobs.next() => match d {
                Some(d) => d.context("reading the jobs queue")?,
                None => bail!("the broker cancelled the jobs consumer"),
            },
        };
        match Manifest::from_json(&d.data) {
            Ok(m)
                if job_exists(broker, topo, &m.job).await
                    && !superseded(broker, topo, &m).await =>
            {
                // Stop receiving announcements, but keep the channel: this one is still unacked.
                let _ = ch.basic_cancel(jobs.tag(), Default::default()).await;
                return Ok((m, d, ch));
            }
            Ok(m) => {
                // A collector started with --job-id finished it and removed its queues, or the
                // job was cancelled; or it was, and the id is running again for other inputs, announced further on.
                if was_cancelled(broker, topo, &m.job).await {
                    info!(job = %m.job, run = %m.run, "skipping the announcement of a cancelled job");
                } else {
                    info!(job = %m.job, run = %m.run, "skipping the announcement of a job run that is over (finished, or run again since)");
                }
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                warn!(error = %e, "unreadable job announcement dropped");
                d.acker.ack(BasicAckOptions::default()).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_named_as_summary_json_spells_it() {
        for o in [
            Outcome::Complete,
            Outcome::Incomplete,
            Outcome::VerificationFailed,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.name());
        }
    }
}
