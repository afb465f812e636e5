//! The tables the bench prints: one line per run, where the time went, and with `--repeat` the
//! median and best of each job.

use std::io::Write;

use crate::{Report, Run};

pub(crate) fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

pub(crate) fn print_table(r: &Report) {
    let mut out = std::io::stdout().lock();
    print_runs(&mut out, r);
    print_where_the_time_went(&mut out, r);
    let _ = writeln!(
        out,
        "floor s: the job's bytes through the broker alone, nothing computed (an estimate of the least time a job on this topology takes), fl/ref: floor / reference, fl rmq: RabbitMQ's CPU during the floor; bnd/ref: bound / reference, where the bound is the floor, or the floor's CPU (broker and clients) plus the reference's spread over every core, whichever is longer (an estimate of the least e2e the machine allows)\npublish s: producer connect → last confirm (its log); compute s: summed over consumers (summary.json); tasks each: the tasks each worker did, most first (how evenly the broker dealt the job out); cpu othr: other work on the machine (cpu all − ours − broker); cpu all: the whole machine busy; ref cores: the reference's CPU/wall and the machine's busy cores during it (2.00/2.00 = it had both cores to itself); peak prod: producer peak RSS MiB"
    );
    let _ = writeln!(
        out,
        "\ne2e s: from the producer's first publish (connecting, after generating A and B) to C written and verified (summary.json); GFLOP/s, e2e/ref and tasks/s use it; start s: from starting the producer process to the collector's exit (adds generating A and B)\nin MiB: bytes into the broker (producer's tasks and operand blocks + results), from the plan; ×min: over A + B + C once; wkrs MiB: bytes the broker sent the consumers (management API); cons MiB: the larger consumer peak RSS; coll MiB: collector peak RSS"
    );
    print_repeats(&mut out, r);
}

/// One line per run: times, ratios, bytes and memory.
fn print_runs(out: &mut impl Write, r: &Report) {
    let _ = writeln!(
        out,
        "\ngemmq-bench: {} {} consumers, {:?} operands, reference = the faster of matrixmultiply and gemm with {} thread(s), best of runs",
        r.consumers,
        if r.warm {
            "warm (second job)"
        } else {
            "fresh (first job)"
        },
        r.operands,
        r.reference_threads
    );
    let _ = writeln!(
        out,
        "{:<18} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "run",
        "tile",
        "tasks/kp",
        "e2e s",
        "GFLOP/s",
        "start s",
        "ref s",
        "ref GF/s",
        "e2e/ref",
        "in MiB",
        "min MiB",
        "×min",
        "wkrs MiB",
        "cons MiB",
        "coll MiB",
        "tasks/s"
    );
    for run in &r.runs {
        if !run.ok {
            let _ = writeln!(
                out,
                "{:<18} FAILED: {}",
                run.label,
                run.error
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
            continue;
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let b = run.broker.as_ref();
        let cons = run
            .consumers
            .iter()
            .map(|c| c.peak_rss_mib)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8}",
            run.label,
            run.tile.map_or("-".into(), |t| t.to_string()),
            format!("{}/{}", run.tasks.unwrap_or(0), run.k_parts.unwrap_or(0)),
            opt(run.summary_wall_seconds, 2),
            opt(run.wall_gflops, 1),
            opt(run.e2e_seconds, 2),
            opt(run.reference.as_ref().map(|x| x.best_seconds), 3),
            opt(run.reference.as_ref().map(|x| x.gflops), 1),
            opt(run.ratio_wall_to_reference, 2),
            opt(b.map(|b| mib(b.total_bytes)), 0),
            opt(b.map(|b| mib(b.minimum_bytes)), 0),
            opt(b.map(|b| b.ratio_to_minimum), 2),
            opt(b.and_then(|b| b.consumers_received_bytes).map(mib), 0),
            opt(cons, 0),
            opt(run.collector.as_ref().map(|c| c.peak_rss_mib), 0),
            opt(run.tasks_per_second, 0),
        );
    }
}

/// One line per run: the floor and bound, and where the CPU went.
fn print_where_the_time_went(out: &mut impl Write, r: &Report) {
    let _ = writeln!(
        out,
        "\nwhere the time went (seconds; CPU figures are core-seconds over the job, {} cores)",
        r.machine.nproc
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "run",
        "floor s",
        "fl/ref",
        "fl rmq",
        "bnd/ref",
        "start s",
        "publish s",
        "compute s",
        "tasks each",
        "cpu prod",
        "cpu cons",
        "cpu coll",
        "cpu rmq",
        "cpu othr",
        "cpu all",
        "cores×e2e",
        "ref cores",
        "peak prod"
    );
    for run in r.runs.iter().filter(|r| r.ok) {
        let cons: f64 = run.consumers.iter().map(|c| c.cpu_seconds).sum();
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
            run.label,
            opt(run.floor.as_ref().map(|f| f.seconds), 2),
            opt(run.ratio_floor_to_reference, 2),
            opt(run.floor.as_ref().and_then(|f| f.broker_cpu_seconds), 2),
            opt(run.ratio_bound_to_reference, 2),
            opt(run.e2e_seconds, 2),
            opt(run.producer_publish_seconds, 2),
            opt(run.consumers_compute_seconds, 2),
            run.tasks_per_worker.as_ref().map_or("-".into(), |each| each
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("/")),
            opt(run.producer.as_ref().map(|p| p.cpu_seconds), 2),
            opt(Some(cons), 2),
            opt(run.collector.as_ref().map(|c| c.cpu_seconds), 2),
            opt(run.broker_cpu_seconds, 2),
            opt(run.others_cpu_seconds, 2),
            opt(run.machine_busy_cpu_seconds, 2),
            opt(run.e2e_seconds.map(|e| e * r.machine.nproc as f64), 2),
            run.reference.as_ref().map_or("-".into(), |x| format!(
                "{:.2}/{:.2}",
                x.cpu_per_wall, x.machine_busy_cores
            )),
            opt(run.producer.as_ref().map(|p| p.peak_rss_mib), 0),
        );
    }
}

/// The Dask run beside `run`, when its C was right.
fn dask_ok(run: &Run) -> Option<&crate::dask::DaskRun> {
    run.dask.as_ref().filter(|d| d.verified)
}

/// With --repeat: the median and best of each job's runs.
fn print_repeats(out: &mut impl Write, r: &Report) {
    let mut labels: Vec<&str> = Vec::new();
    for run in r.runs.iter().filter(|run| run.group != run.label) {
        if !labels.contains(&run.group.as_str()) {
            labels.push(&run.group);
        }
    }
    if labels.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nrepeated runs: median (best) of each; a failed run counts as missing; dask/ref, dask tasks/s: the same job on Dask distributed (--dask) over the same reference\n{:<22} {:>5} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>16} {:>14} {:>18}",
        "job",
        "runs",
        "e2e s",
        "e2e/ref",
        "floor/ref",
        "bound/ref",
        "start s",
        "start/ref",
        "tasks/s",
        "dask/ref",
        "dask tasks/s"
    );
    for base in labels {
        let runs: Vec<&Run> = r
            .runs
            .iter()
            .filter(|run| run.ok && run.group == base)
            .collect();
        let pick = |f: &dyn Fn(&Run) -> Option<f64>, higher_is_better: bool| {
            let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                return "-".to_string();
            }
            let median = if v.len() % 2 == 1 {
                v[v.len() / 2]
            } else {
                (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
            };
            let best = if higher_is_better {
                v[v.len() - 1]
            } else {
                v[0]
            };
            format!("{median:.2} ({best:.2})")
        };
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14} {:>16} {:>14} {:>18}",
            base,
            runs.len(),
            pick(&|r| r.summary_wall_seconds, false),
            pick(&|r| r.ratio_wall_to_reference, false),
            pick(&|r| r.ratio_floor_to_reference, false),
            pick(&|r| r.ratio_bound_to_reference, false),
            pick(&|r| r.e2e_seconds, false),
            pick(&|r| r.ratio_e2e_to_reference, false),
            pick(&|r| r.tasks_per_second, true),
            pick(&|r| dask_ok(r).map(|d| d.ratio_to_reference), false),
            pick(
                &|r| dask_ok(r)
                    .filter(|_| r.small_tasks)
                    .map(|d| d.tasks_per_second),
                true
            ),
        );
    }
}
