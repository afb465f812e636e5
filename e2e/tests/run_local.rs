//! `scripts/run-local.sh`, the no-Docker twin of docker-compose.yml, runs a whole job against
//! the real RabbitMQ on 127.0.0.1: two worker processes, a collector and a producer.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root")
}

/// The debug binaries the script runs with `--debug --no-build`. `cargo test --workspace`
/// has built them already; building them here with other flags would recompile shared crates.
fn debug_binaries() -> PathBuf {
    let dir = common::bin("gemmq-collector")
        .parent()
        .expect("a directory")
        .to_path_buf();
    for b in ["gemmq-producer", "gemmq-consumer", "gemmq-collector"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --bins`",
            dir.join(b).display()
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_runs_a_job_with_two_workers() {
    debug_binaries();
    let mut env = Env::new("runlocal");
    let job = "runlocal";
    let out = env.dir.path().join("out");
    let log = env.dir.path().join("run-local.log");

    let mut cmd = Command::new("bash");
    cmd.current_dir(env.dir.path())
        .arg(root().join("scripts/run-local.sh"))
        .args(["--workers", "2", "--debug", "--no-build", "--"])
        .args(["--m", "96", "--k", "64", "--n", "80", "--tile", "32"]);
    // Only this test's settings: nothing from the shell that runs the tests.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GEMMQ_") {
            cmd.env_remove(k);
        }
    }
    let logfile = std::fs::File::create(&log).unwrap();
    cmd.env("GEMMQ_NAMESPACE", &env.ns)
        .env("GEMMQ_OUT", &out)
        .env("GEMMQ_RETRY_DELAY", "200ms")
        .env("GEMMQ_JOB_ID", job)
        .env("GEMMQ_IDLE_TIMEOUT", "60s")
        .stdin(Stdio::null())
        .stdout(logfile.try_clone().unwrap())
        .stderr(logfile);
    let mut child = cmd.spawn().expect("bash runs run-local.sh");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(180) {
            // SIGTERM: the script stops its programs gracefully on the way out.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    env.cleanup(&[job]).await;

    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("run-local.sh did not finish in 3 minutes:\n{output}"));
    assert!(
        status.success(),
        "run-local.sh failed ({status}):\n{output}"
    );
    assert!(
        out.join("C.npy").exists(),
        "no C.npy in {}:\n{output}",
        out.display()
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap())
            .expect("summary.json is JSON");
    assert_eq!(summary["status"], "complete", "{summary:#}");
    assert_eq!(summary["job"], job, "{summary:#}");
    // Both workers and every program left a log.
    for f in [
        "consumer-1.log",
        "consumer-2.log",
        "collector.log",
        "producer.log",
    ] {
        assert!(out.join("logs").join(f).exists(), "no logs/{f}");
    }
    let c = gemmq::matrix::Matrix::read_npy(&out.join("C.npy")).expect("C.npy reads back");
    assert_eq!(c.shape(), (96, 80));
}
