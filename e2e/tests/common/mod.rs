//! Test harness: the three programs in-process against the real RabbitMQ on 127.0.0.1.
//!
//! Every test gets its own namespace (so its own task, retry and parking-lot queues) and job id,
//! which lets tests run in parallel on one broker; `Env::cleanup` deletes what it declared.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gemmq::broker::Broker;
use gemmq::config::{BrokerOptions, BrokerSettings, ConfigFile};
use gemmq::shutdown::CancellationToken;
use gemmq::{DType, Topology};
use tokio::task::JoinHandle;

pub mod broker;

pub struct Env {
    pub ns: String,
    pub broker: BrokerSettings,
    pub dir: tempfile::TempDir,
    pub stop: CancellationToken,
    consumers: Vec<JoinHandle<anyhow::Result<Arc<gemmq_consumer::Stats>>>>,
}

impl Drop for Env {
    /// A test that failed before its `cleanup` (or cleaned up only some jobs) would leave its
    /// namespace's queues on the broker for good; enough of them (each an open file or more)
    /// once stopped this machine's RabbitMQ from answering at all. So whatever is left under the
    /// namespace goes here, through the management API, however the test ended.
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = broker::management().delete_prefixed(&format!("{}.", self.ns));
    }
}

impl Env {
    pub fn new(name: &str) -> Self {
        Self::with_broker(name, BrokerOptions::default())
    }

    pub fn with_broker(name: &str, mut opts: BrokerOptions) -> Self {
        // The programs run in the test's process; DEBUG_LOG=1 shows their logs (filtered by
        // RUST_LOG) with `-- --nocapture`.
        if std::env::var_os("DEBUG_LOG").is_some() {
            gemmq::telemetry::init();
        }
        let ns = format!("t-{name}-{:08x}", rand::random::<u32>());
        opts.namespace = Some(ns.clone());
        opts.retry_delay = opts.retry_delay.or(Some(Duration::from_millis(200)));
        opts.connect_timeout = Some(Duration::from_secs(20));
        opts.amqp_url = std::env::var("AMQP_URL").ok();
        Env {
            ns,
            broker: opts.resolve().expect("test broker settings are valid"),
            dir: tempfile::tempdir().expect("a temp dir"),
            stop: CancellationToken::new(),
            consumers: Vec::new(),
        }
    }

    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }

    pub fn producer(
        &self,
        job: &str,
        (m, k, n): (u64, u64, u64),
        tile: u64,
    ) -> gemmq_producer::Settings {
        gemmq_producer::Settings {
            broker: self.broker.clone(),
            source: gemmq_producer::Source::Seed {
                m,
                k,
                n,
                dtype: DType::F64,
                seed: 7,
            },
            tile: gemmq::TileSize::Fixed(tile),
            job_id: job.into(),
            save_inputs: None,
            operands: Default::default(),
            // One tile to a message, as the tests' tiny tiles would otherwise be grouped (auto)
            // and a test of failures or dispatch would watch a handful of messages. The tests
            // of groups set it.
            group: gemmq::tiling::GroupSize::Fixed(1),
            confirm_window: 16,
            max_output_bytes: 8 << 30,
            management_url: broker::management_url(),
        }
    }

    /// Like [`Env::producer`], with A and B from another seed: the same job id and plan with
    /// other inputs is another run of the job.
    pub fn seeded_producer(
        &self,
        job: &str,
        (m, k, n): (u64, u64, u64),
        tile: u64,
        seed: u64,
    ) -> gemmq_producer::Settings {
        let mut p = self.producer(job, (m, k, n), tile);
        p.source = gemmq_producer::Source::Seed {
            m,
            k,
            n,
            dtype: DType::F64,
            seed,
        };
        p
    }

    pub fn consumer(&self, id: &str) -> gemmq_consumer::Settings {
        let opts = gemmq_consumer::ConsumerOptions {
            worker_id: Some(id.into()),
            shutdown_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        gemmq_consumer::Settings::resolve(opts, &ConfigFile::default(), self.broker.clone())
            .expect("test consumer settings are valid")
    }

    pub fn collector(&self, job: &str) -> gemmq_collector::Settings {
        let opts = gemmq_collector::CollectorOptions {
            job_id: Some(job.into()),
            out: Some(self.dir.path().join(job)),
            idle_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        gemmq_collector::Settings::resolve(opts, &ConfigFile::default(), self.broker.clone())
            .expect("test collector settings are valid")
    }

    /// Starts a consumer in this process; it runs until `stop_consumers`.
    pub fn spawn_consumer(&mut self, s: gemmq_consumer::Settings) {
        let stop = self.stop.clone();
        self.consumers.push(tokio::spawn(
            async move { gemmq_consumer::run(&s, stop).await },
        ));
    }

    /// Stops every consumer gracefully and returns their counters.
    pub async fn stop_consumers(&mut self) -> Vec<Arc<gemmq_consumer::Stats>> {
        self.stop.cancel();
        let mut out = Vec::new();
        for h in self.consumers.drain(..) {
            out.push(
                h.await
                    .expect("consumer task")
                    .expect("consumer ran cleanly"),
            );
        }
        out
    }

    pub async fn channel(&self) -> lapin::Channel {
        Broker::new(&self.broker, "gemmq-test")
            .unwrap()
            .channel()
            .await
            .expect("the test broker is reachable")
    }

    /// Deletes every queue and exchange of this test's namespace.
    pub async fn cleanup(&mut self, jobs: &[&str]) {
        self.stop.cancel();
        let ch = self.channel().await;
        let topo = self.topology();
        for job in jobs {
            let _ = topo.delete_job(&ch, job).await;
            let _ = topo.clear_cancelled(&ch, job).await;
        }
        let _ = topo.delete_shared(&ch).await;
    }
}

/// Runs a whole job: collector and producer together, consumers already running.
pub async fn run_job(
    env: &Env,
    job: &str,
    shape: (u64, u64, u64),
    tile: u64,
) -> (gemmq_producer::Receipt, gemmq_collector::Summary) {
    run_job_with(env, env.producer(job, shape, tile), env.collector(job)).await
}

pub async fn run_job_with(
    env: &Env,
    p: gemmq_producer::Settings,
    c: gemmq_collector::Settings,
) -> (gemmq_producer::Receipt, gemmq_collector::Summary) {
    let stop = env.stop.clone();
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    let receipt = gemmq_producer::run(&p)
        .await
        .expect("the producer publishes the job");
    let summary = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .expect("the collector finishes within 2 minutes")
        .expect("collector task")
        .expect("the collector runs cleanly");
    (receipt, summary)
}

/// GET `/api{path}` from the test broker's management API; `None` for an error (a 404 for
/// what does not exist yet).
pub fn try_mgmt(path: &str) -> Option<serde_json::Value> {
    broker::management().get(&format!("/api{path}")).ok()
}

/// GET `/api{path}` from the test broker's management API.
pub fn mgmt(path: &str) -> serde_json::Value {
    broker::management()
        .get(&format!("/api{path}"))
        .unwrap_or_else(|e| panic!("management API {path}: {e}"))
}

/// Waits until `n` workers' notice queues are bound to the namespace's operands exchange: the
/// workers are then sure to hear of every job done from now on.
#[allow(dead_code)]
pub async fn wait_for_notice_queues(env: &Env, n: usize) {
    let path = format!(
        "/exchanges/%2f/{}/bindings/source",
        env.topology().operands_exchange()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bound = try_mgmt(&path)
            .and_then(|v| v.as_array().cloned())
            .map_or(0, |b| {
                b.iter()
                    .filter(|b| b["routing_key"] == "done.*" && b["destination_type"] == "queue")
                    .count()
            });
        if bound >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{bound} of {n} notice queues bound within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages ready in a queue (not those delivered and unacked), by a passive declare.
pub async fn message_count(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..lapin::options::QueueDeclareOptions::durable()
        },
        Default::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"))
    .message_count()
}

/// How many tiles a job's results stream holds, read from its first message on a channel of
/// its own. Tiles, not messages: a worker batches the results it has ready at the same moment
/// (up to 64 tiles in one message), so a message count says little of how far a job is.
#[allow(dead_code)]
pub async fn result_tiles(env: &Env, results: &str) -> usize {
    use futures_util::StreamExt;
    use gemmq::message::Header;
    let ch = env.channel().await;
    let mut feed = read_from_first(&ch, results, 1000).await;
    let mut tiles = 0;
    // The stream sends what it holds at once: a short quiet means the end was reached.
    let mut wait = Duration::from_millis(200);
    while let Ok(Some(Ok(d))) = tokio::time::timeout(wait, feed.next()).await {
        wait = Duration::from_millis(20);
        let frame = gemmq::message::decode(&d.data, 1 << 30)
            .unwrap_or_else(|e| panic!("a message in {results} is unreadable: {e}"));
        tiles += match frame.header {
            Header::TileResult(_) => 1,
            Header::ResultBatch(batch) => batch.tiles.len(),
            _ => 0,
        };
        d.acker.ack(Default::default()).await.unwrap();
    }
    let _ = ch.close(200, "counted".into()).await;
    tiles
}

/// The message ids in a stream, front to back: read until `expected` have come (a stream's
/// declare-ok always counts 0 messages), then for half a second more, to see any beyond them.
#[allow(dead_code)]
pub async fn stream_message_ids(ch: &lapin::Channel, stream: &str, expected: usize) -> Vec<String> {
    use futures_util::StreamExt;
    let mut feed = read_from_first(ch, stream, 100).await;
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let wait = if ids.len() < expected {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(500)
        };
        let Ok(Some(Ok(d))) = tokio::time::timeout(wait, feed.next()).await else {
            break;
        };
        ids.push(
            d.properties
                .message_id()
                .as_ref()
                .map_or(String::new(), |i| i.to_string()),
        );
        d.acker.ack(Default::default()).await.unwrap();
    }
    ids
}

/// How many messages each chunk of a stream holds, front to back, for its first `messages`.
/// The broker sends a stream consumer a whole chunk whatever its prefetch: with a prefetch of
/// one and no ack, what comes before a short quiet is one chunk; the ack lets the next come.
pub async fn stream_chunks(ch: &lapin::Channel, stream: &str, messages: usize) -> Vec<usize> {
    use futures_util::StreamExt;
    let mut feed = read_from_first(ch, stream, 1).await;
    let (mut chunks, mut seen) = (Vec::new(), 0);
    while seen < messages {
        let mut last = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .unwrap_or_else(|_| panic!("{stream}: no chunk after {seen} messages"))
            .expect("the consumer is open")
            .expect("a delivery");
        let mut in_chunk = 1;
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(300), feed.next()).await
        {
            (last, in_chunk) = (d, in_chunk + 1);
        }
        chunks.push(in_chunk);
        seen += in_chunk;
        let multiple = lapin::options::BasicAckOptions { multiple: true };
        last.acker.ack(multiple).await.unwrap();
    }
    chunks
}

/// A consumer of `stream` from its first message on, `prefetch` unacked at a time (a stream
/// sends no more until they are acked).
async fn read_from_first(ch: &lapin::Channel, stream: &str, prefetch: u16) -> lapin::Consumer {
    ch.basic_qos(prefetch, Default::default()).await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-stream-offset".into(), gemmq::topology::text("first"));
    ch.basic_consume(stream.into(), "".into(), Default::default(), args)
        .await
        .unwrap_or_else(|e| panic!("stream {stream} can be read: {e}"))
}

/// The largest |C − A·B| over the product computed here.
pub fn max_error_against_local_product(env: &Env, job: &str, shape: (u64, u64, u64)) -> f64 {
    max_error_against_seed(env, job, shape, 7)
}

/// The largest |C − A·B| for A and B generated from `seed`.
pub fn max_error_against_seed(env: &Env, job: &str, (m, k, n): (u64, u64, u64), seed: u64) -> f64 {
    let (a, b) = gemmq::matrix::generate(m as usize, k as usize, n as usize, DType::F64, seed);
    let want = a.dot(&b).unwrap();
    let got = gemmq::matrix::Matrix::read_npy(&env.dir.path().join(job).join("C.npy"))
        .expect("C.npy is readable");
    let (gemmq::matrix::Matrix::F64(want), gemmq::matrix::Matrix::F64(got)) = (want, got) else {
        panic!("C should be f64")
    };
    assert_eq!(got.dim(), (m as usize, n as usize));
    (&got - &want)
        .iter()
        .fold(0.0f64, |acc, d| acc.max(d.abs()))
}

/// A compiled gemmq program: `target/<profile>/<name>`, next to this test's own directory.
pub fn bin(name: &str) -> std::path::PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("the test knows its path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    let target = profile_dir.parent().expect("target/<profile>");
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("debug");
    // A target directory of its own: `cargo test -p gemmq-e2e` unifies dependency features
    // otherwise than a workspace build of the binaries (rustls, ring), and in one shared
    // directory each would rebuild them after the other — 40 s per test binary.
    let bins = target.join("e2e-bins");
    // `cargo test -p gemmq-e2e` alone does not build the other packages' binaries, nor rebuild
    // them when their code changed: build once per test process (nothing to do when fresh).
    BUILD.call_once(|| {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args(["build", "--bins", "--target-dir"])
            .arg(&bins)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if profile == "release" {
            cargo.arg("--release");
        }
        let ok = cargo.status().is_ok_and(|s| s.success());
        assert!(ok, "cargo build --bins failed");
    });
    bins.join(profile).join(name)
}

/// A gemmq program running as its own process, with its log in the test's directory.
pub struct Proc {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    pub name: String,
}

impl Env {
    /// Starts `program` with this test's namespace and broker settings.
    pub fn spawn(&self, program: &str, name: &str, args: &[&str]) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let mut cmd = std::process::Command::new(bin(program));
        cmd.args(args)
            .env("GEMMQ_NAMESPACE", &self.ns)
            .env(
                "GEMMQ_RETRY_DELAY",
                format!("{}ms", self.broker.retry_delay.as_millis()),
            )
            .env(
                "GEMMQ_MAX_MESSAGE_BYTES",
                self.broker.max_message_bytes.to_string(),
            )
            .env("GEMMQ_CONNECT_TIMEOUT", "30s")
            .env("RUST_LOG", "info")
            .env_remove("GEMMQ_CONFIG")
            .current_dir(self.dir.path())
            .stdout(file.try_clone().expect("a log file"))
            .stderr(file);
        Proc {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("starting {program}: {e}")),
            log,
            name: name.to_string(),
        }
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {}", self.name);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// The `url=` field of the first line that says `event` (waiting up to a minute for it):
    /// where a program serving on port 0 listens.
    pub async fn logged_url(&self, event: &str) -> String {
        self.wait_for(event, 1, Duration::from_secs(60)).await;
        let log = self.log();
        let line = log.lines().find(|l| l.contains(event)).unwrap_or_default();
        line.split("url=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{} logs a url= with {event:?}:\n{log}", self.name))
            .to_string()
    }

    /// Waits until the log has `n` lines containing `needle`.
    pub async fn wait_for(&self, needle: &str, n: usize, within: Duration) {
        let started = std::time::Instant::now();
        while self.count(needle) < n {
            assert!(
                started.elapsed() < within,
                "{} did not log {n}× {needle:?} within {within:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit and returns its status code.
    pub async fn wait(&mut self, within: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child") {
                return status.code();
            }
            if started.elapsed() > within {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {within:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a finished job's summary.json.
pub fn summary_json(env: &Env, job: &str) -> serde_json::Value {
    let path = env.dir.path().join(job).join("summary.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("summary.json is JSON")
}
