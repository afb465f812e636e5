//! The scaling scenario (`--hosts 1,2,4,8,16`): one job per worker count W, every consumer on an
//! emulated host of its own ([`crate::hosts`]), so that what crosses the network costs what it
//! would between machines.
//!
//! Two cores cannot multiply faster with more workers, so the consumers model their multiply as a
//! sleep (`--modelled-gflops`, the consumer's `GEMMQ_MODELLED_GFLOPS`) and send tiles of zeros:
//! every byte travels as in a real job, C is complete (each tile once, or the collector fails)
//! but not verified. Every figure this prints is labelled "modelled compute".
//!
//! For each W it reports the end-to-end time; the multiply alone (the job's flops over W workers
//! at the modelled rate); what each worker's link received; what the broker's link sent and how
//! much of a second of the broker's CPU that took; and the time the links alone need — the
//! busiest link's bytes over its rate, a lower bound on any run over these links.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gemmq::DType;
use gemmq::tiling::Operands;
use serde::Serialize;

use crate::hosts::{self, Counters, Hosts, Rate};
use crate::procs::{Proc, wait_for_log};
use crate::{CONSUMER, Cli, PRODUCER};

const READY: Duration = Duration::from_secs(60);
const MIB: f64 = (1 << 20) as f64;

/// What the scenario was asked to run.
struct Scenario<'a> {
    cli: &'a Cli,
    hosts: &'a Hosts,
    env: crate::Env<'a>,
    n: u64,
    tile: u64,
}

/// One run: W workers, one job.
#[derive(Debug, Default, Serialize)]
pub struct Row {
    pub workers: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub tasks: Option<u64>,
    /// summary.json's wall_seconds: the first publish to C written.
    pub e2e_seconds: Option<f64>,
    /// The job's flops over W workers at the modelled rate.
    pub compute_alone_seconds: f64,
    /// The busiest link's bytes over its rate.
    pub links_alone_seconds: Option<f64>,
    pub busiest_link: Option<String>,
    /// |A| + |B|: what each worker received before the scale-out work.
    pub operands_mib: f64,
    /// (|A| + |B|) / √W: what a 2D distribution sends each worker.
    pub ideal_2d_mib: f64,
    pub worker_received_mib_mean: Option<f64>,
    pub worker_received_mib_max: Option<f64>,
    pub broker_sent_mib: Option<f64>,
    pub broker_received_mib: Option<f64>,
    /// broker_sent over e2e.
    pub broker_sent_mb_per_second: Option<f64>,
    pub broker_cpu_seconds: Option<f64>,
    pub retries: Option<u64>,
    pub duplicates_dropped: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    label: &'static str,
    n: u64,
    tile: u64,
    dtype: DType,
    link_rate: Rate,
    broker_link_rate: Rate,
    client_link_rate: Rate,
    modelled_gflops: f64,
    rows: Vec<Row>,
}

/// Runs the scenario for every W of `--hosts`; false when a run failed.
pub fn run(cli: &Cli, bins: &[PathBuf; 3], extra_env: &[(String, String)]) -> Result<bool> {
    let max_w = *cli.hosts.iter().max().context("--hosts is empty")?;
    let work_dir = std::path::absolute(&cli.work_dir)?;
    std::fs::create_dir_all(&work_dir)?;
    let n = *cli.sizes.first().context("--sizes is empty")?;
    let tile = cli
        .tile
        .context("--hosts needs --tile (e.g. --sizes 4096 --tile 512)")?;
    eprintln!(
        "hosts: {max_w} worker hosts with {} links, the broker's host with a {} link, the producer's and collector's with a {} link; modelled compute {} GFLOP/s per worker",
        show_rate(cli.link_rate),
        show_rate(cli.broker_link_rate),
        show_rate(cli.client_link_rate),
        cli.modelled_gflops
    );
    let hosts = Hosts::up(&hosts::Spec {
        workers: max_w,
        link: cli.link_rate,
        client_link: cli.client_link_rate,
        broker_link: cli.broker_link_rate,
        dir: work_dir.join("hosts"),
    })?;
    // The programs' usual environment, pointed at the broker's host.
    let programs = crate::ProgramEnv::new(cli, extra_env)?;
    let mut base = programs.base;
    base.retain(|(k, _)| k != "AMQP_URL");
    base.push(("AMQP_URL".into(), hosts.amqp_url()));
    base.push(("GEMMQ_MANAGEMENT_URL".into(), hosts.management_url()));
    // The modelled compute: the consumers sleep and send zeros, so the collector cannot verify.
    base.push((
        "GEMMQ_MODELLED_GFLOPS".into(),
        cli.modelled_gflops.to_string(),
    ));
    base.push(("GEMMQ_VERIFY".into(), "false".into()));
    let scenario = Scenario {
        cli,
        hosts: &hosts,
        env: crate::Env {
            bins,
            base: &base,
            remove: programs.remove.iter().map(String::as_str).collect(),
        },
        n,
        tile,
    };
    let mut report = Report {
        command: std::iter::once("cargo run --release -p gemmq-bench --".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        label: "modelled compute: each worker sleeps for its tiles' flops at --modelled-gflops; C complete, not verified",
        n,
        tile,
        dtype: DType::F64,
        link_rate: cli.link_rate,
        broker_link_rate: cli.broker_link_rate,
        client_link_rate: cli.client_link_rate,
        modelled_gflops: cli.modelled_gflops,
        rows: Vec::new(),
    };
    let json = work_dir.join("scaling-results.json");
    for &w in &cli.hosts {
        let ns = format!("scale-{}-w{w}", std::process::id());
        eprintln!("\n== {w} worker host(s): namespace {ns}");
        let row = scenario.run_one(w, &ns, &work_dir.join(&ns));
        match &row.error {
            Some(e) => eprintln!("!! W = {w} FAILED: {e}"),
            None => eprintln!("   e2e {:.2} s", row.e2e_seconds.unwrap_or(0.0)),
        }
        report.rows.push(row);
        std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", json.display()))?;
    }
    print_table(&report);
    eprintln!("\nresults written to {}", json.display());
    Ok(report.rows.iter().all(|r| r.ok))
}

impl Scenario<'_> {
    fn run_one(&self, w: usize, ns: &str, dir: &Path) -> Row {
        let operands = 2.0 * (self.n * self.n * 8) as f64 / MIB;
        let flops = 2.0 * (self.n as f64).powi(3);
        let mut row = Row {
            workers: w,
            compute_alone_seconds: flops / (w as f64 * self.cli.modelled_gflops * 1e9),
            operands_mib: operands,
            ideal_2d_mib: operands / (w as f64).sqrt(),
            ..Row::default()
        };
        let job = format!("n{}-w{w}", self.n);
        if let Err(e) = self.job(w, ns, &job, dir, &mut row) {
            row.error = Some(format!("{e:#}"));
        } else {
            row.ok = true;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt
            && let Err(e) = rt.block_on(crate::cleanup(&self.hosts.amqp_url(), ns, &job))
        {
            eprintln!("warning: could not delete namespace {ns}'s queues: {e:#}");
        }
        if !self.cli.keep_outputs {
            crate::remove_outputs(&dir.join("out"));
        }
        row
    }

    fn job(&self, w: usize, ns: &str, job: &str, dir: &Path, row: &mut Row) -> Result<()> {
        std::fs::create_dir_all(dir.join("out"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let consumers = (1..=w)
            .map(|i| {
                let id = format!("{ns}-w{i}");
                let extra = [("GEMMQ_WORKER_ID", id.clone())];
                let netns = hosts::worker_netns(i);
                self.env
                    .spawn_in(Some(&netns), CONSUMER, &id, dir, ns, &extra)
            })
            .collect::<Result<Vec<_>>>()?;
        for c in &consumers {
            wait_for_log(c, "consuming tasks", READY)?;
        }
        let collector = crate::spawn_collector(self.cli, &self.env, dir, ns, job, "out")?;
        wait_for_log(
            &collector,
            "waiting for the producer to announce the job",
            READY,
        )?;
        let before = self.hosts.counters()?;
        let cpu0 = self.hosts.broker_cpu_seconds();
        let spec = crate::Spec {
            label: job.to_string(),
            group: job.to_string(),
            n: self.n,
            dtype: DType::F64,
            tile: Some(self.tile),
            small_tasks: false,
            queue_size: None,
            task_group: None,
        };
        let mut producer_env = crate::job::producer_env(&spec, self.cli.seed, Operands::Stream);
        producer_env.push(("GEMMQ_JOB_ID", job.to_string()));
        let producer = self
            .env
            .spawn(PRODUCER, "producer", dir, ns, &producer_env)?;
        self.finish(&producer, &collector, &consumers)?;
        let traffic = &self.hosts.counters()? - &before;
        row.broker_cpu_seconds = Some(self.hosts.broker_cpu_seconds() - cpu0);
        for c in &consumers {
            let e = c.stop(Duration::from_secs(30))?;
            if e.code != Some(0) {
                eprintln!(
                    "   warning: consumer {} did not stop cleanly ({})",
                    c.name,
                    e.describe()
                );
            }
        }
        read_summary(&dir.join("out").join("summary.json"), row)?;
        self.traffic(&traffic, row);
        Ok(())
    }

    /// Until the collector has written a complete C; the producer must end well, and no
    /// consumer may end.
    fn finish(&self, producer: &Proc, collector: &Proc, consumers: &[Proc]) -> Result<()> {
        let (collector_exit, producer_exit) =
            crate::job::watch(producer, collector, consumers, self.cli.timeout)?;
        if collector_exit.code != Some(0) {
            bail!(
                "the collector did not finish the job ({}); {}",
                collector_exit.describe(),
                collector.log_ends()
            );
        }
        match producer_exit.or_else(|| {
            producer
                .wait(Duration::from_secs(60))
                .transpose()
                .ok()
                .flatten()
        }) {
            Some(e) if e.code == Some(0) => Ok(()),
            _ => bail!(
                "the producer did not end well; see {}",
                producer.log.display()
            ),
        }
    }

    /// Bytes per link, and the time the busiest link alone needs for them.
    fn traffic(&self, t: &Counters, row: &mut Row) {
        let (link, broker_link, client_link) = (
            self.cli.link_rate.bytes_per_second(),
            self.cli.broker_link_rate.bytes_per_second(),
            self.cli.client_link_rate.bytes_per_second(),
        );
        let mut links: Vec<(String, f64)> = vec![
            ("broker out".into(), t.broker.sent as f64 / broker_link),
            ("broker in".into(), t.broker.received as f64 / broker_link),
            ("producer out".into(), t.client.sent as f64 / client_link),
            (
                "collector in".into(),
                t.client.received as f64 / client_link,
            ),
        ];
        for (i, wl) in t.workers.iter().enumerate() {
            links.push((format!("worker {} in", i + 1), wl.received as f64 / link));
            links.push((format!("worker {} out", i + 1), wl.sent as f64 / link));
        }
        let busiest = links.into_iter().max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((name, secs)) = busiest {
            row.links_alone_seconds = Some(secs);
            row.busiest_link = Some(name);
        }
        // Only the hosts that ran this job's workers.
        let received: Vec<f64> = t.workers[..row.workers]
            .iter()
            .map(|l| l.received as f64 / MIB)
            .collect();
        row.worker_received_mib_mean = Some(received.iter().sum::<f64>() / received.len() as f64);
        row.worker_received_mib_max = received.iter().copied().reduce(f64::max);
        row.broker_sent_mib = Some(t.broker.sent as f64 / MIB);
        row.broker_received_mib = Some(t.broker.received as f64 / MIB);
        row.broker_sent_mb_per_second = row
            .e2e_seconds
            .filter(|s| *s > 0.0)
            .map(|s| t.broker.sent as f64 / 1e6 / s);
    }
}

fn read_summary(path: &Path, row: &mut Row) -> Result<()> {
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    if summary["status"] != "complete" {
        bail!("summary.json says status {}", summary["status"]);
    }
    row.e2e_seconds = summary["wall_seconds"].as_f64();
    row.tasks = summary["tasks"].as_u64();
    row.retries = summary["retries"].as_u64();
    row.duplicates_dropped = summary["duplicates_dropped"].as_u64();
    Ok(())
}

fn show_rate(r: Rate) -> String {
    if r.bits_per_second >= 1e9 {
        format!("{} Gbit/s", r.bits_per_second / 1e9)
    } else {
        format!("{} Mbit/s", r.bits_per_second / 1e6)
    }
}

fn print_table(r: &Report) {
    println!(
        "\nScaling, modelled compute ({} GFLOP/s per worker, a sleep): {n}³ f64, tile {}, worker links {}, broker link {}, producer and collector link {}",
        r.modelled_gflops,
        r.tile,
        show_rate(r.link_rate),
        show_rate(r.broker_link_rate),
        show_rate(r.client_link_rate),
        n = r.n,
    );
    println!(
        "| W | e2e s | compute alone s | links alone s (busiest) | MiB per worker, mean (max) | (A+B)/√W MiB | broker sent MiB | broker MB/s | RabbitMQ core-s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let f = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
    for row in &r.rows {
        if !row.ok {
            println!("| {} | failed | | | | | | | |", row.workers);
            continue;
        }
        println!(
            "| {} | {} | {:.2} | {} ({}) | {} ({}) | {:.0} | {} | {} | {} |",
            row.workers,
            f(row.e2e_seconds, 2),
            row.compute_alone_seconds,
            f(row.links_alone_seconds, 2),
            row.busiest_link.as_deref().unwrap_or("?"),
            f(row.worker_received_mib_mean, 0),
            f(row.worker_received_mib_max, 0),
            row.ideal_2d_mib,
            f(row.broker_sent_mib, 0),
            f(row.broker_sent_mb_per_second, 0),
            f(row.broker_cpu_seconds, 2),
        );
    }
}
