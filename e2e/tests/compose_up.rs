//! `docker compose up --build --scale consumer=N` as a new user runs it: the repository's own
//! compose file and Dockerfile on a real Docker engine, with RabbitMQ 4, following the README.
//!
//! Needs Docker with Compose v2, so `cargo test` skips it; `.ci/run` runs it:
//!
//! ```sh
//! cargo test -p gemmq-e2e --test compose_up -- --ignored --nocapture
//! ```
//!
//! Where no image registry is reachable, build stand-ins first and pass them on:
//! `export $(scripts/offline-images.sh)`. Only the compose file's own settings are set (in a
//! `.env`, as the README says): the images, the host ports (`GEMMQ_TEST_COMPOSE_PORTS`, default
//! 5675 and 15675, so that a RabbitMQ of the machine's own keeps 5672), the account, and per
//! job the `GEMMQ_*` variables the README shows.
//!
//! The test works in a copy of the repository (its tracked and unignored files), so it neither
//! needs nor touches `./out` and `./.env`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gemmq::management::Management;
use gemmq::matrix::Matrix;
use serde_json::Value;

const PROJECT: &str = "gemmq-compose-test";
/// The compose file's `stop_grace_period` for consumers, after which Docker kills them; a clean
/// stop must come well before it (GEMMQ_SHUTDOWN_TIMEOUT is 30 s).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The demo's settings, with more attempts than its 5: at 20% failures a task fails 5 times in a
/// row once in ~3000, which would park it and end the job with exit 3 about once in 50 runs.
const DEMO_ATTEMPTS: &str = "12";

/// One compose project in a copy of the repository.
struct Compose {
    dir: tempfile::TempDir,
    user: String,
    pass: String,
    amqp_port: u16,
    ui_port: u16,
    started: Instant,
}

impl Compose {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        copy_repository(dir.path());
        let (amqp_port, ui_port) = match std::env::var("GEMMQ_TEST_COMPOSE_PORTS") {
            Ok(p) => {
                let (a, u) = p
                    .split_once(',')
                    .expect("GEMMQ_TEST_COMPOSE_PORTS is AMQP,UI");
                (a.parse().unwrap(), u.parse().unwrap())
            }
            Err(_) => (5675, 15675),
        };
        let c = Compose {
            dir,
            user: "gemmq".into(),
            pass: format!("compose-test-{:016x}", rand::random::<u64>()),
            amqp_port,
            ui_port,
            started: Instant::now(),
        };
        // `.env` as a user writes it from .env.example, plus the settings this machine needs.
        let mut env = format!(
            "RABBITMQ_USER={}\nRABBITMQ_PASS={}\nHOST_UID={}\nHOST_GID={}\nRABBITMQ_AMQP_PORT={amqp_port}\nRABBITMQ_UI_PORT={ui_port}\n",
            c.user,
            c.pass,
            id("-u"),
            id("-g")
        );
        for var in ["RABBITMQ_IMAGE", "RUST_IMAGE", "RUNTIME_IMAGE"] {
            if let Ok(v) = std::env::var(var) {
                env += &format!("{var}={v}\n");
            }
        }
        std::fs::write(c.dir.path().join(".env"), env).expect("writing .env");
        // Whatever an interrupted earlier run left.
        c.run(&["down", "-v", "--timeout", "5"], &[]);
        c
    }

    fn log(&self, what: &str) {
        eprintln!(
            "[compose {:>6.1}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    /// `docker compose -p PROJECT ARGS` in the copy, with `vars` set as the README sets them.
    fn run(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("docker");
        cmd.arg("compose")
            .args(["-p", PROJECT])
            .args(args)
            .current_dir(self.dir.path());
        // Only what the test means to set: none of the caller's GEMMQ_* or AMQP_URL.
        for (k, _) in std::env::vars() {
            if k.starts_with("GEMMQ_") || k == "AMQP_URL" || k.starts_with("RABBITMQ_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(vars.iter().copied());
        cmd.output()
            .expect("docker compose runs (is Docker installed?)")
    }

    fn ok(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let out = self.run(args, vars);
        assert!(
            out.status.success(),
            "docker compose {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Container ids of a service; `all` includes exited ones.
    fn ids(&self, service: &str, all: bool) -> Vec<String> {
        let flags = if all { "-aq" } else { "-q" };
        let out = self.ok(&["ps", flags, service], &[]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// Waits for the service's one container to exit and returns its exit code.
    fn exit_code(&self, service: &str, within: Duration) -> i64 {
        let ids = self.ids(service, true);
        assert_eq!(ids.len(), 1, "one {service} container: {ids:?}");
        let deadline = Instant::now() + within;
        loop {
            let state = inspect(&ids[0], "{{.State.Status}} {{.State.ExitCode}}");
            if let Some(code) = state.strip_prefix("exited ") {
                return code.trim().parse().expect("an exit code");
            }
            if Instant::now() > deadline {
                let logs = self.run(&["logs", "--tail", "30", service], &[]);
                panic!(
                    "{service} still {state} after {within:?}:\n{}",
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The README's command for scaling while a job runs: only the consumer service, so the
    /// finished producer and collector are not started again.
    fn scale_consumers(&self, n: usize, vars: &[(&str, &str)]) {
        let scale = format!("consumer={n}");
        self.ok(
            &[
                "up",
                "-d",
                "--no-deps",
                "--no-recreate",
                "--scale",
                &scale,
                "consumer",
            ],
            vars,
        );
    }

    fn management(&self) -> Management {
        Management::new(
            &format!(
                "amqp://{}:{}@127.0.0.1:{}/%2f",
                self.user, self.pass, self.amqp_port
            ),
            Some(&format!("http://127.0.0.1:{}", self.ui_port)),
        )
        .expect("valid URLs")
    }

    fn amqp_url(&self) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:{}/%2f",
            self.user, self.pass, self.amqp_port
        )
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn summary(&self) -> Value {
        let path = self.out().join("summary.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("summary.json is JSON")
    }

    /// out/C.npy against A·B from the inputs the producer saved to out/.
    fn assert_c_is_a_times_b(&self) {
        let read = |name: &str| {
            Matrix::read_npy(&self.out().join(name))
                .unwrap_or_else(|e| panic!("out/{name} is readable: {e}"))
        };
        let want = read("A.npy").dot(&read("B.npy")).expect("A and B conform");
        let (Matrix::F64(want), Matrix::F64(got)) = (want, read("C.npy")) else {
            panic!("C should be f64")
        };
        assert_eq!(got.dim(), want.dim());
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let err = (&got - &want).iter().fold(0.0f64, |m, d| m.max(d.abs()));
        assert!(
            err <= 1e-12 * scale,
            "|C - A·B| = {err} (|A·B| up to {scale})"
        );
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(&["logs", "--tail", "40"], &[]);
            eprintln!("{}", String::from_utf8_lossy(&logs.stdout));
        }
        self.run(&["down", "-v", "--timeout", "5"], &[]);
    }
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn inspect(id: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "-f", format, id])
        .output()
        .expect("docker inspect runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The repository's tracked and unignored files, as they are in the working tree.
fn copy_repository(to: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git ls-files in {}", root.display());
    for rel in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).expect("UTF-8 paths"));
        let from = root.join(rel);
        if !from.is_file() {
            continue; // deleted in the working tree
        }
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&from, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", rel.display()));
    }
    std::fs::create_dir_all(to.join("out")).unwrap();
}

/// Counts results the collector has taken so far, from its progress lines.
fn progress(c: &Compose) -> u64 {
    let logs = c.run(&["logs", "--no-log-prefix", "collector"], &[]);
    String::from_utf8_lossy(&logs.stdout)
        .lines()
        .filter_map(|l| l.split(" done=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_for_progress(c: &Compose, at_least: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while progress(c) < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} results within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The tasks queue as AMQP sees it now: (ready, consumers). Exact, unlike the management API.
async fn tasks_queue(c: &Compose) -> (u32, u32) {
    let conn = lapin::Connection::connect(&c.amqp_url(), Default::default())
        .await
        .expect("the broker's AMQP port answers with the .env account");
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "gemmq.tasks".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::durable()
            },
            Default::default(),
        )
        .await
        .expect("gemmq.tasks exists");
    let _ = conn.close(200, "done".into()).await;
    (q.message_count(), q.consumer_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker with Compose v2; .ci/run runs it (see the file's doc)"]
async fn compose_up_runs_jobs_scales_and_stops_gracefully_on_rabbitmq_4() {
    let c = Compose::new();

    // 1. The README's first command: the default 1024³ job on 4 consumers.
    c.log("docker compose up --build -d --scale consumer=4");
    let build = Instant::now();
    c.ok(
        &["up", "--build", "-d", "--scale", "consumer=4"],
        &[("GEMMQ_JOB_ID", "first"), ("GEMMQ_SAVE_INPUTS", "/app/out")],
    );
    c.log(&format!(
        "built and started in {:.0} s",
        build.elapsed().as_secs_f64()
    ));
    assert_eq!(
        c.exit_code("collector", Duration::from_secs(180)),
        0,
        "the collector reports a complete, verified job"
    );
    assert_eq!(c.exit_code("producer", Duration::from_secs(10)), 0);
    c.assert_c_is_a_times_b();
    assert_eq!(c.summary()["job"], "first");
    c.log("job 'first' complete; C == A·B");

    // The management UI as the README describes it: the .env account on RABBITMQ_UI_PORT, the 4
    // consumers on gemmq.tasks, each with its queue size as prefetch and named after its
    // container (the worker id starts with the container's host name, its short id).
    let api = c.management();
    let containers: Vec<String> = c
        .ids("consumer", false)
        .iter()
        .map(|id| id[..12].to_string())
        .collect();
    assert_eq!(containers.len(), 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    let consumers = loop {
        // The API's figures lag by ~5 s.
        let q = api.get("/api/queues/%2F/gemmq.tasks");
        if let Ok(q) = &q
            && q["consumers"] == 4
        {
            break q["consumer_details"]
                .as_array()
                .cloned()
                .unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "gemmq.tasks should show 4 consumers: {q:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    for container in &containers {
        let mine: Vec<&Value> = consumers
            .iter()
            .filter(|d| {
                d["consumer_tag"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(&format!("gemmq-consumer:{container}-")))
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "one consumer of container {container}: {consumers:#?}"
        );
        assert_eq!(mine[0]["prefetch_count"], 10, "prefetch = queue size");
    }
    let guest = Management::new(
        &format!("amqp://guest:guest@127.0.0.1:{}/%2f", c.amqp_port),
        Some(&format!("http://127.0.0.1:{}", c.ui_port)),
    )
    .unwrap();
    let refused = guest.get("/api/overview").expect_err("guest is refused");
    assert!(refused.to_string().contains("401"), "{refused}");
    assert!(
        lapin::Connection::connect(
            &format!("amqp://guest:guest@127.0.0.1:{}/%2f", c.amqp_port),
            Default::default()
        )
        .await
        .is_err(),
        "guest cannot log in over AMQP"
    );
    c.log("management API: 4 consumers, prefetch 10, named after their containers; guest refused");

    // 2. The demo, scaled 4 → 6 → 2 mid-job with the README's commands.
    let demo = [
        ("GEMMQ_CONFIG", "config/demo.toml"),
        ("GEMMQ_JOB_ID", "demo-1"),
        ("GEMMQ_SAVE_INPUTS", "/app/out"),
        ("GEMMQ_MAX_ATTEMPTS", DEMO_ATTEMPTS),
    ];
    c.log("demo-1: up -d --scale consumer=4");
    c.ok(&["up", "-d", "--scale", "consumer=4"], &demo);
    wait_for_progress(&c, 8, Duration::from_secs(90));
    c.log("demo-1: scale to 6");
    c.scale_consumers(6, &demo);
    assert_eq!(c.ids("consumer", false).len(), 6);
    wait_for_progress(&c, 24, Duration::from_secs(90));
    c.log("demo-1: scale to 2");
    c.scale_consumers(2, &demo);
    assert_eq!(c.ids("consumer", false).len(), 2);
    assert_eq!(
        c.exit_code("collector", Duration::from_secs(240)),
        0,
        "the demo completes, verified, after scaling"
    );
    let s = c.summary();
    assert_eq!(s["job"], "demo-1");
    assert_eq!(s["tasks_done"], s["tasks"], "{s:#}");
    assert!(
        s["retries"].as_u64().unwrap_or(0) > 0,
        "20% failures were retried: {s:#}"
    );
    c.assert_c_is_a_times_b();
    c.log(&format!(
        "demo-1 complete: {} retries, {} duplicates dropped; C == A·B",
        s["retries"], s["duplicates_dropped"]
    ));

    // 3. Consumers stopped mid-job (SIGTERM, as `docker compose down` sends): each exits 0
    // within the shutdown timeout and the tasks it held go back to the queue.
    let demo2 = [
        ("GEMMQ_CONFIG", "config/demo.toml"),
        ("GEMMQ_JOB_ID", "demo-2"),
        ("GEMMQ_SAVE_INPUTS", "/app/out"),
        ("GEMMQ_MAX_ATTEMPTS", DEMO_ATTEMPTS),
    ];
    c.log("demo-2: up -d --scale consumer=2, then stop the consumers mid-job");
    c.ok(&["up", "-d", "--scale", "consumer=2"], &demo2);
    wait_for_progress(&c, 4, Duration::from_secs(90));
    let held = c.ids("consumer", false);
    let stopping = Instant::now();
    c.ok(&["stop", "consumer"], &[]);
    let took = stopping.elapsed();
    for id in &held {
        assert_eq!(
            inspect(id, "{{.State.ExitCode}}"),
            "0",
            "consumer {id} stopped cleanly"
        );
    }
    assert!(
        took < SHUTDOWN_TIMEOUT,
        "consumers stopped in {took:?}, beyond the shutdown timeout"
    );
    let (ready, consumers) = tasks_queue(&c).await;
    assert_eq!(consumers, 0);
    assert!(ready > 0, "the tasks the consumers held are ready again");
    c.log(&format!(
        "consumers stopped in {:.1} s, exit 0; {ready} tasks ready again",
        took.as_secs_f64()
    ));
    c.scale_consumers(2, &demo2);
    // Stopped containers are started again, not new ones.
    let mut restarted = c.ids("consumer", false);
    restarted.sort();
    let mut before = held.clone();
    before.sort();
    assert_eq!(restarted, before);
    assert_eq!(c.exit_code("collector", Duration::from_secs(240)), 0);
    let s = c.summary();
    assert_eq!(s["job"], "demo-2");
    assert_eq!(s["tasks_done"], s["tasks"], "nothing lost: {s:#}");
    c.assert_c_is_a_times_b();
    c.log("demo-2 complete after the stop; C == A·B");

    // 4. `docker compose down`: every container stops, the consumers with exit 0.
    let since = unix_now();
    let downing = Instant::now();
    c.ok(&["down"], &[]);
    let took = downing.elapsed();
    let died = Command::new("docker")
        .args([
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &unix_now().to_string(),
            "--filter",
            &format!("label=com.docker.compose.project={PROJECT}"),
            "--filter",
            "event=die",
            "--format",
            "{{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}",
        ])
        .output()
        .expect("docker events runs");
    let died = String::from_utf8_lossy(&died.stdout).to_string();
    let consumers: Vec<&str> = died.lines().filter(|l| l.contains("-consumer-")).collect();
    assert_eq!(consumers.len(), 2, "{died}");
    assert!(consumers.iter().all(|l| l.ends_with(" 0")), "{died}");
    assert!(took < SHUTDOWN_TIMEOUT, "down took {took:?}");
    c.log(&format!(
        "docker compose down in {:.1} s; consumers exited 0",
        took.as_secs_f64()
    ));
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
