//! One measured job: its in-process reference and the broker's floor first, then the real
//! programs as processes (consumers, a collector, the producer), and the figures read back from
//! their exits, their logs, summary.json and the management API.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gemmq::tiling::{GroupSize, Operands};

use crate::procs::{Exit, Proc};
use crate::table::opt;
use crate::{
    CONSUMER, Cli, Env, IDLE_CORES, PRODUCER, Run, Spec, bytes, consumer_traffic, machine,
    measure_floor, proc_stats, procs, reference, remove_outputs, spawn_collector, square_plan,
    wait_for_log,
};

/// How long a program may take to say it is ready.
const READY: Duration = Duration::from_secs(60);

pub(crate) struct Job<'a> {
    pub cli: &'a Cli,
    pub spec: &'a Spec,
    pub ns: &'a str,
    pub dir: &'a Path,
    pub env: &'a Env<'a>,
    pub max_message_bytes: u64,
}

impl Job<'_> {
    pub fn run(&self, run: &mut Run) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("out"))
            .with_context(|| format!("creating {}", self.dir.display()))?;
        self.reference(run)?;
        let operands = self.cli.operands.unwrap_or_default();
        let mut producer_env = producer_env(self.spec, self.cli.seed, operands);
        let consumers = self.start_consumers()?;
        if self.cli.warm {
            self.warm_up(&producer_env, &consumers)?;
        }
        // What the broker had sent the consumers, and the CPU they used, before the measured
        // job (starting up, and the warm-up job).
        let traffic_before = if self.cli.warm {
            consumer_traffic(self.cli, &consumers)
        } else {
            Some((0, 0))
        };
        let cpu_before: Vec<f64> = consumers
            .iter()
            .map(|c| machine::process_cpu_seconds(c.pid).unwrap_or(0.0))
            .collect();
        let collector = self.start_collector()?;
        producer_env.push(("GEMMQ_JOB_ID", self.spec.label.clone()));

        eprintln!(
            "   job: producer, {} consumers, collector",
            self.cli.consumers
        );
        let (broker_cpu0, machine_cpu0) = (
            machine::broker_cpu_seconds(),
            machine::machine_busy_cpu_seconds(),
        );
        let producer = self
            .env
            .spawn(PRODUCER, "producer", self.dir, self.ns, &producer_env)?;
        let cpu0 = (broker_cpu0, machine_cpu0);
        let (e2e, programs_cpu) = self.finish(&producer, &collector, &consumers, cpu0, run)?;
        let traffic =
            self.stop_consumers(&consumers, &cpu_before, traffic_before, programs_cpu, run)?;
        let (plan, tile, tasks, k_parts) = self.read_summary(operands, e2e, run)?;
        self.broker_bytes(&plan, &consumers, &producer, traffic, run);
        eprintln!(
            "   tile {tile}: {tasks} tasks ({k_parts} k-part{}, {} to a message), e2e {} s (from the first publish), {e2e:.2} s from the producer's start",
            if k_parts == 1 { "" } else { "s" },
            run.tasks_per_message.unwrap_or(1),
            opt(run.summary_wall_seconds, 2),
        );
        Ok(())
    }

    /// Waits for the job to end well: the collector with a verified C, the producer with 0.
    /// `cpu0`: the broker's and the machine's busy CPU seconds when the producer started.
    /// Returns e2e (the producer's start to the collector's exit) and their CPU seconds.
    fn finish(
        &self,
        producer: &Proc,
        collector: &Proc,
        consumers: &[Proc],
        (broker_cpu0, machine_cpu0): (Option<f64>, Option<f64>),
        run: &mut Run,
    ) -> Result<(f64, f64)> {
        let (collector_exit, producer_exit) =
            watch(producer, collector, consumers, self.cli.timeout)?;
        // The broker's and the machine's CPU over the job, up to the collector's exit.
        let delta = |before: Option<f64>, after: Option<f64>| Some(after? - before?);
        run.broker_cpu_seconds = delta(broker_cpu0, machine::broker_cpu_seconds());
        run.machine_busy_cpu_seconds = delta(machine_cpu0, machine::machine_busy_cpu_seconds());
        let e2e = collector_exit
            .at
            .saturating_duration_since(producer.started)
            .as_secs_f64();
        run.collector = Some(proc_stats("collector", &collector_exit));
        if collector_exit.code != Some(0) {
            bail!(
                "the collector did not verify a complete C ({}: 3 = tasks parked, 4 = verification failed); {}",
                collector_exit.describe(),
                collector.log_ends()
            );
        }
        let producer_exit = match producer_exit {
            Some(e) => e,
            None => match producer.wait(Duration::from_secs(60)) {
                Some(e) => e?,
                None => bail!("the producer did not exit after the collector finished"),
            },
        };
        run.producer = Some(proc_stats("producer", &producer_exit));
        let programs_cpu = producer_exit.cpu_seconds + collector_exit.cpu_seconds;
        if producer_exit.code != Some(0) {
            bail!("the producer failed ({})", producer_exit.describe());
        }
        Ok((e2e, programs_cpu))
    }

    /// The reference first, alone on the machine (the job's processes are not started yet),
    /// then the broker's floor.
    fn reference(&self, run: &mut Run) -> Result<()> {
        // The reference first, alone on the machine (the job's processes are not started yet).
        eprintln!(
            "   reference: {}×{} {} in process (matrixmultiply and gemm), {} thread(s), best of {} each",
            self.spec.n,
            self.spec.n,
            self.spec.dtype,
            self.cli.reference_threads,
            self.cli.reference_runs
        );
        run.idle_wait = Some(machine::wait_idle(self.cli.wait_idle, IDLE_CORES));
        let reference = reference::measure(
            self.spec.n,
            self.spec.dtype,
            self.cli.seed,
            self.cli.reference_runs,
            self.cli.reference_threads,
        )?;
        for k in &reference.kernels {
            eprintln!(
                "   reference: {} best {:.3} s (runs {:?})",
                k.kernel,
                k.best_seconds,
                k.runs_seconds
                    .iter()
                    .map(|s| (s * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            );
        }
        eprintln!(
            "   reference: {} best {:.3} s = {:.1} GFLOP/s (runs {:?}, cpu/wall {:.2}, machine busy {:.2} cores)",
            reference.kernel,
            reference.best_seconds,
            reference.gflops,
            reference
                .runs_seconds
                .iter()
                .map(|s| (s * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            reference.cpu_per_wall,
            reference.machine_busy_cores
        );
        let operands = self.cli.operands.unwrap_or_default();
        if !self.spec.small_tasks && !self.cli.no_floor && operands == Operands::Stream {
            measure_floor(
                self.cli,
                self.spec,
                self.ns,
                self.max_message_bytes,
                &reference,
                run,
            );
        }
        run.reference = Some(reference);
        run.fresh_write_mb_s = machine::fresh_write_mb_per_s(&self.cli.work_dir);
        if let Some(rate) = run.fresh_write_mb_s {
            eprintln!(
                "   machine: fresh page cache written at {rate:.0} MB/s (slow when the VM's host takes freed memory back)"
            );
        }
        eprintln!(
            "   bench's own peak RSS {:.0} MiB (a floor under the children's ru_maxrss)",
            procs::own_peak_rss_mib()
        );
        run.bench_peak_rss_mib = procs::own_peak_rss_mib();

        Ok(())
    }

    /// The job's collector, once it waits for the job.
    fn start_collector(&self) -> Result<Proc> {
        let collector = spawn_collector(
            self.cli,
            self.env,
            self.dir,
            self.ns,
            &self.spec.label,
            "out",
        )?;
        wait_for_log(
            &collector,
            "waiting for the producer to announce the job",
            READY,
        )?;
        Ok(collector)
    }

    /// The consumers, each once it consumes tasks.
    fn start_consumers(&self) -> Result<Vec<Proc>> {
        let mut consumers = Vec::new();
        for w in 1..=self.cli.consumers {
            let id = format!("{}-w{w}", self.ns);
            let mut extra = vec![("GEMMQ_WORKER_ID", id.clone())];
            if let Some(q) = self.spec.queue_size {
                extra.push(("GEMMQ_QUEUE_SIZE", q.to_string()));
            }
            consumers.push(self.env.spawn(CONSUMER, &id, self.dir, self.ns, &extra)?);
        }
        for c in &consumers {
            wait_for_log(c, "consuming tasks", READY)?;
        }
        Ok(consumers)
    }

    /// A job the consumers run first, not measured (`--warm`).
    fn warm_up(&self, producer_env: &[(&'static str, String)], consumers: &[Proc]) -> Result<()> {
        let label = format!("{}-warm-up", self.spec.label);
        eprintln!("   warm-up job {label}: the consumers' first, not measured");
        let collector = spawn_collector(self.cli, self.env, self.dir, self.ns, &label, "warm-up")?;
        wait_for_log(
            &collector,
            "waiting for the producer to announce the job",
            READY,
        )?;
        let mut warm_env = producer_env.to_vec();
        warm_env.push(("GEMMQ_JOB_ID", label.clone()));
        let producer =
            self.env
                .spawn(PRODUCER, "warm-up-producer", self.dir, self.ns, &warm_env)?;
        let exit = match collector.wait(self.cli.timeout) {
            Some(e) => e?,
            None => bail!(
                "the warm-up job did not finish within {:?} (--timeout)",
                self.cli.timeout
            ),
        };
        if exit.code != Some(0) {
            bail!(
                "the warm-up job's collector failed ({}); {}",
                exit.describe(),
                collector.log_ends()
            );
        }
        match producer.wait(Duration::from_secs(60)) {
            Some(Ok(e)) if e.code == Some(0) => {}
            _ => bail!(
                "the warm-up job's producer did not end well; see {}",
                producer.log.display()
            ),
        }
        for c in consumers {
            if let Some(e) = c.try_exit() {
                let how = e.map_or_else(|e| e.to_string(), |e| e.describe());
                bail!("consumer {} ended ({how}) during the warm-up job", c.name);
            }
        }
        if !self.cli.keep_outputs {
            remove_outputs(&self.dir.join("warm-up"));
        }
        Ok(())
    }

    /// Stops the consumers (SIGTERM) and adds up the programs' CPU; returns what the broker
    /// sent the consumers and got from them during the job.
    fn stop_consumers(
        &self,
        consumers: &[Proc],
        cpu_before: &[f64],
        traffic_before: Option<(u64, u64)>,
        mut programs_cpu: f64,
        run: &mut Run,
    ) -> Result<Option<(u64, u64)>> {
        // What the broker sent the consumers and got from them, before their connections close.
        let traffic = consumer_traffic(self.cli, consumers)
            .zip(traffic_before)
            .map(|((sent, recv), (sent0, recv0))| {
                (sent.saturating_sub(sent0), recv.saturating_sub(recv0))
            });
        for (c, before) in consumers.iter().zip(cpu_before) {
            let mut e = c.stop(Duration::from_secs(30))?;
            e.cpu_seconds -= before;
            if e.code != Some(0) {
                eprintln!(
                    "   warning: consumer {} did not stop cleanly on SIGTERM ({})",
                    c.name,
                    e.describe()
                );
            }
            programs_cpu += e.cpu_seconds;
            run.consumers.push(proc_stats(&c.name, &e));
        }
        run.programs_cpu_seconds = Some(programs_cpu);
        run.others_cpu_seconds = run
            .machine_busy_cpu_seconds
            .map(|m| m - programs_cpu - run.broker_cpu_seconds.unwrap_or(0.0));

        Ok(traffic)
    }

    /// summary.json: the plan as the programs used it, and the collector's own clock.
    fn read_summary(
        &self,
        operands: Operands,
        e2e: f64,
        run: &mut Run,
    ) -> Result<(gemmq::Plan, u64, u64, u32)> {
        // summary.json: the plan as the programs used it, and the collector's own clock.
        let summary_path = self.dir.join("out").join("summary.json");
        let summary: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&summary_path)
                .with_context(|| format!("reading {}", summary_path.display()))?,
        )
        .with_context(|| format!("parsing {}", summary_path.display()))?;
        let get_u = |k: &str| {
            summary[k]
                .as_u64()
                .with_context(|| format!("summary.json has no {k}"))
        };
        if summary["status"] != "complete" {
            bail!("summary.json says status {}", summary["status"]);
        }
        let tile = get_u("tile")?;
        let k_parts = get_u("k_parts")? as u32;
        let tasks = get_u("tasks")?;
        let plan = square_plan(self.spec, tile, self.max_message_bytes, operands)?;
        if plan.parts() != k_parts || plan.tasks() != tasks {
            eprintln!(
                "warning: summary.json's plan ({tasks} tasks, {k_parts} k-parts) differs from the bench's ({} tasks, {} k-parts)",
                plan.tasks(),
                plan.parts()
            );
        }
        run.tile = Some(tile);
        run.k_parts = Some(k_parts);
        run.tasks = Some(tasks);
        run.summary_wall_seconds = summary["wall_seconds"].as_f64();
        run.retries = summary["retries"].as_u64();
        run.duplicates_dropped = summary["duplicates_dropped"].as_u64();
        run.consumers_compute_seconds = summary["workers"].as_object().map(|w| {
            w.values()
                .filter_map(|t| t["compute_seconds"].as_f64())
                .sum()
        });
        run.tasks_per_worker = summary["workers"].as_object().map(|w| {
            let mut each: Vec<u64> = w.values().filter_map(|t| t["tasks"].as_u64()).collect();
            each.sort_unstable_by(|a, b| b.cmp(a));
            each
        });
        let flops = plan.flops();
        run.e2e_seconds = Some(e2e);
        run.e2e_gflops = Some(flops / e2e / 1e9);
        run.ratio_e2e_to_reference = run.reference.as_ref().map(|r| e2e / r.best_seconds);
        if let Some(wall) = run.summary_wall_seconds.filter(|w| *w > 0.0) {
            run.wall_gflops = Some(flops / wall / 1e9);
            run.tasks_per_second = Some(tasks as f64 / wall);
            run.ratio_wall_to_reference = run.reference.as_ref().map(|r| wall / r.best_seconds);
        }

        Ok((plan, tile, tasks, k_parts))
    }

    /// Bytes into the broker from the plan, and what the broker sent the consumers.
    fn broker_bytes(
        &self,
        plan: &gemmq::Plan,
        consumers: &[Proc],
        producer: &Proc,
        traffic: Option<(u64, u64)>,
        run: &mut Run,
    ) {
        let producer_log = std::fs::read_to_string(&producer.log).unwrap_or_default();
        // The group the producer published with: `auto`'s depends on the workers it counted.
        let announced = producer_log
            .lines()
            .find(|l| l.contains("job announced"))
            .and_then(|l| bytes::log_field(l, "group"));
        let per_message = match (announced, self.spec.task_group.unwrap_or_default()) {
            (Some(g), _) => g as u64,
            (None, GroupSize::Auto) => {
                gemmq::tiling::auto_group(plan, self.max_message_bytes, consumers.len() as u64)
            }
            (None, GroupSize::Fixed(g)) => g,
        };
        run.tasks_per_message = Some(per_message);
        let mut broker = bytes::from_plan(plan, per_message, &self.spec.label, &consumers[0].name);
        if let Some((received, sent)) = traffic {
            broker.consumers_received_bytes = Some(received);
            broker.consumers_sent_bytes = Some(sent);
        }
        if let Some(line) = producer_log
            .lines()
            .rev()
            .find(|l| l.contains("all tasks published and confirmed"))
        {
            broker.producer_log_mib = bytes::log_field(line, "mib");
            run.producer_publish_seconds = bytes::log_field(line, "seconds");
        }
        run.broker = Some(broker);
    }
}

/// Until the collector exits; the producer must end well too, the consumers must not end.
pub(crate) fn watch(
    producer: &Proc,
    collector: &Proc,
    consumers: &[Proc],
    timeout: Duration,
) -> Result<(Exit, Option<Exit>)> {
    let deadline = producer.started + timeout;
    let mut producer_exit = None;
    let collector_exit = loop {
        if producer_exit.is_none()
            && let Some(e) = producer.try_exit()
        {
            let e = e?;
            if e.code != Some(0) {
                bail!(
                    "the producer failed ({}); {}",
                    e.describe(),
                    producer.log_ends()
                );
            }
            producer_exit = Some(e);
        }
        if let Some(e) = collector.try_exit() {
            break e?;
        }
        for c in consumers {
            if let Some(e) = c.try_exit() {
                let how = e.map_or_else(|e| e.to_string(), |e| e.describe());
                bail!(
                    "consumer {} ended ({how}) during the job; {}",
                    c.name,
                    c.log_ends()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the job did not finish within {:?} (--timeout); the collector's log {} ends:\n{}",
                timeout,
                collector.log.display(),
                collector.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok((collector_exit, producer_exit))
}

/// The producer's settings for `spec`'s square job, A and B from `seed`.
pub(crate) fn producer_env(
    spec: &Spec,
    seed: u64,
    operands: Operands,
) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&str, String)> = vec![
        (
            "GEMMQ_OPERANDS",
            match operands {
                Operands::Inline => "inline",
                Operands::Stream => "stream",
            }
            .to_string(),
        ),
        ("GEMMQ_M", spec.n.to_string()),
        ("GEMMQ_K", spec.n.to_string()),
        ("GEMMQ_N", spec.n.to_string()),
        ("GEMMQ_DTYPE", spec.dtype.to_string()),
        ("GEMMQ_SEED", seed.to_string()),
    ];
    if let Some(t) = spec.tile {
        env.push(("GEMMQ_TILE", t.to_string()));
    }
    if let Some(g) = spec.task_group {
        env.push(("GEMMQ_GROUP", g.to_string()));
    }
    env
}
