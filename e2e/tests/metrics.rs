//! Metrics (`--metrics-addr`) scraped by a real Prometheus server: the consumers' and the
//! collector's endpoints as Prometheus stores them, queried through its HTTP API.
//!
//! Needs the `prometheus` binary (Debian's package; CI installs it). Without it the test says so
//! and passes, unless `CI` is set, where a missing Prometheus is a failure.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Env, Proc};

const MINUTE: Duration = Duration::from_secs(60);

fn prometheus_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("GEMMQ_PROMETHEUS")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join("prometheus")),
        );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have Prometheus for the metrics test (apt-get install prometheus)"
    );
    eprintln!(
        "SKIPPED: no prometheus binary (apt-get install prometheus, or GEMMQ_PROMETHEUS=path)"
    );
    None
}

/// The `host:port` a program logged it serves metrics on.
async fn metrics_target(p: &Proc) -> String {
    let url = p.logged_url("serving metrics for Prometheus").await;
    url.trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server scraping `targets` every second, on a port of its own.
fn start_prometheus(binary: &PathBuf, env: &Env, targets: &[String]) -> (Proc, String) {
    let dir = env.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: gemmq\n    static_configs:\n      - targets: [{}]\n",
        quoted.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join("prometheus.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("starting prometheus");
    let proc = Proc {
        child,
        log,
        name: "prometheus".into(),
    };
    (proc, format!("http://{addr}"))
}

/// The value of a PromQL query that returns one sample, or None while it returns none (not
/// scraped yet) or Prometheus is not up.
fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let url = format!("{prometheus}/api/v1/query");
    let body: serde_json::Value = ureq::get(&url)
        .query("query", promql)
        .call()
        .ok()?
        .body_mut()
        .read_json()
        .ok()?;
    assert_eq!(body["status"], "success", "{promql}: {body}");
    let result = body["data"]["result"].as_array()?;
    let [one] = result.as_slice() else {
        return None;
    };
    one["value"][1].as_str()?.parse().ok()
}

/// Polls `promql` until it equals `want`; the last value seen otherwise.
async fn eventually(prometheus: &str, promql: &str, want: f64) -> Option<f64> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < MINUTE {
        let (p, q) = (prometheus.to_string(), promql.to_string());
        last = tokio::task::spawn_blocking(move || query(&p, &q))
            .await
            .unwrap();
        if last == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_sees_the_consumers_count_every_task_and_the_collector_finish_the_job() {
    let Some(prometheus_bin) = prometheus_binary() else {
        return;
    };
    let mut env = Env::new("metrics");
    let job = "metricsjob";
    let workers: Vec<Proc> = ["mw1", "mw2"]
        .iter()
        .map(|id| {
            env.spawn(
                "gemmq-consumer",
                id,
                &[
                    "--worker-id",
                    id,
                    "--metrics-addr",
                    "127.0.0.1:0",
                    // Slow enough that Prometheus scrapes the job while it runs.
                    "--delay",
                    "40ms",
                    "--failure-rate",
                    "0.1",
                ],
            )
        })
        .collect();
    let mut targets = Vec::new();
    for w in &workers {
        targets.push(metrics_target(w).await);
    }
    let mut collector = env.spawn(
        "gemmq-collector",
        "collector",
        &[
            "--job-id",
            job,
            "--out",
            job,
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-linger",
            "2m",
        ],
    );
    let receipt = gemmq_producer::run(&env.producer(job, (256, 32, 256), 32))
        .await
        .unwrap();
    targets.push(metrics_target(&collector).await);
    let (_prometheus, url) = start_prometheus(&prometheus_bin, &env, &targets);

    collector
        .wait_for("metrics stay up for a last scrape", 1, 2 * MINUTE)
        .await;
    let tasks = receipt.tasks as f64;
    assert_eq!(
        eventually(&url, "sum(up{job=\"gemmq\"})", 3.0).await,
        Some(3.0),
        "Prometheus scrapes both workers and the collector"
    );
    assert_eq!(
        eventually(&url, "sum(gemmq_consumer_tasks_done_total)", tasks).await,
        Some(tasks),
        "the workers' tasks-done counters add up to the job's {tasks} tasks"
    );
    // The scrape that saw the last task done saw every failure before it.
    let now = |q: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || query(&url, q))
    };
    let failed = now("sum(gemmq_consumer_tasks_failed_total)").await.unwrap();
    let retried = now("sum(gemmq_consumer_tasks_retried_total)")
        .await
        .unwrap();
    assert!(
        failed.is_some_and(|f| f > 0.0),
        "10% failures were counted: {failed:?}"
    );
    assert_eq!(
        failed, retried,
        "every failure was retried (none reached the limit)"
    );
    let computed = "sum(gemmq_consumer_compute_seconds_count)";
    let messages = eventually(&url, computed, tasks + failed.unwrap()).await;
    assert_eq!(
        messages,
        Some(tasks + failed.unwrap()),
        "one compute time per attempt"
    );
    for (promql, want) in [
        (format!("gemmq_collector_tasks{{job_id=\"{job}\"}}"), tasks),
        (
            format!("gemmq_collector_tasks_done{{job_id=\"{job}\"}}"),
            tasks,
        ),
        (
            format!("gemmq_collector_job_status{{job_id=\"{job}\",status=\"complete\"}}"),
            1.0,
        ),
        (
            format!("gemmq_collector_rejected_total{{job_id=\"{job}\"}}"),
            0.0,
        ),
    ] {
        assert_eq!(
            eventually(&url, &promql, want).await,
            Some(want),
            "{promql}"
        );
    }

    // Ctrl-C ends the linger; the job's outcome is the exit status.
    collector.signal("INT");
    assert_eq!(collector.wait(MINUTE).await, Some(0), "{}", collector.log());
    drop(workers);
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_metrics_address_in_use_is_a_clear_error() {
    let env = Env::new("metrics-inuse");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut worker = env.spawn(
        "gemmq-consumer",
        "w",
        &["--worker-id", "w", "--metrics-addr", &addr],
    );
    assert_eq!(worker.wait(MINUTE).await, Some(1), "{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains(&format!("cannot serve metrics on {addr} (--metrics-addr)")),
        "{log}"
    );
}
