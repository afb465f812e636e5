//! Inputs bigger than one machine's memory: the producer makes or reads A and B a block at a
//! time, and refuses up front a job that cannot fit.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, bin};
use gemmq::DType;
use gemmq::inputs::Operand;
use gemmq::matrix::Matrix;
use gemmq_collector::Outcome;

/// Runs the producer binary with `args` in `env`'s namespace; its exit code, peak RSS (bytes,
/// from the kernel's accounting of this one child) and output.
fn producer(env: &Env, args: &[&str], prefix: &[&str]) -> (Option<i32>, u64, String) {
    run_producer(&Place::of(env), args, prefix)
}

/// Where a producer runs: the test's directory and namespace, and the broker settings every
/// program of the test shares.
#[derive(Clone)]
struct Place {
    dir: std::path::PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl Place {
    fn of(env: &Env) -> Place {
        Place {
            dir: env.dir.path().to_path_buf(),
            vars: vec![
                ("GEMMQ_NAMESPACE", env.ns.clone()),
                (
                    "GEMMQ_RETRY_DELAY",
                    format!("{}ms", env.broker.retry_delay.as_millis()),
                ),
                (
                    "GEMMQ_MAX_MESSAGE_BYTES",
                    env.broker.max_message_bytes.to_string(),
                ),
                ("GEMMQ_CONNECT_TIMEOUT", "30s".into()),
                ("RUST_LOG", "info".into()),
            ],
        }
    }
}

// Reaped by wait4, not Child::wait, for its rusage.
#[allow(clippy::zombie_processes)]
fn run_producer(place: &Place, args: &[&str], prefix: &[&str]) -> (Option<i32>, u64, String) {
    let dir = &place.dir;
    let (program, mut argv) = match prefix.split_first() {
        Some((first, rest)) => (
            std::path::PathBuf::from(first),
            rest.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ),
        None => (bin("gemmq-producer"), Vec::new()),
    };
    if !prefix.is_empty() {
        argv.push(bin("gemmq-producer").display().to_string());
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    let log = dir.join(format!("producer-{}.log", rand_suffix()));
    let file = std::fs::File::create(&log).expect("a log file");
    let child = Command::new(program)
        .args(&argv)
        .envs(place.vars.iter().map(|(k, v)| (k, v)))
        .env_remove("GEMMQ_CONFIG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("a log file"))
        .stderr(file)
        .spawn()
        .expect("the producer starts");
    // wait4 rather than Child::wait: it gives this child's own peak RSS.
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    (code, usage.ru_maxrss as u64 * 1024, output)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_12288_cubed_job_is_published_by_a_producer_that_holds_neither_a_nor_b() {
    let mut env = Env::new("big12288");
    // A + B = 2.25 GiB of f64, all published into the job's stream; no worker runs. The broker
    // disk check is skipped (no management API on port 1): it would count the results stream a
    // worker-less job never fills — C in 9 parts of k, 10 GiB, more than some test machines have
    // free. The check has its own test below.
    let mut place = Place::of(&env);
    place
        .vars
        .push(("GEMMQ_MANAGEMENT_URL", "http://127.0.0.1:1".into()));
    let (code, rss, log) = run_producer(
        &place,
        &[
            "--m", "12288", "--k", "12288", "--n", "12288", "--job-id", "big12288",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("all tasks published and confirmed"), "{log}");
    let mib = rss >> 20;
    assert!(
        mib <= 512,
        "the producer peaked at {mib} MiB for 2,304 MiB of A and B; the bound is 512"
    );
    env.cleanup(&["big12288"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_cannot_fit_the_collector_or_the_brokers_disk_is_refused_up_front() {
    let env = Env::new("toolarge");
    // C of 65536² f64 is 32 GiB, over the 8 GiB a collector takes by default. (Before A and B
    // were made a block at a time, this job aborted on a 32 GiB allocation, exit 134.)
    let (code, _, log) = producer(
        &env,
        &[
            "--m", "65536", "--k", "65536", "--n", "65536", "--job-id", "toolarge",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("C would be 32.00 GiB") && log.contains("--max-output-bytes"),
        "{log}"
    );
    // A and B of 512 × 2³¹ and 2³¹ × 512: 16 TiB for the operand stream, more than any
    // broker's disk, for a C of 2 MiB. The broker's free disk comes from its management API:
    // without it the producer would go ahead and publish for hours.
    if common::broker::management_url().is_none() && common::try_mgmt("/overview").is_none() {
        eprintln!("the broker's disk check skipped: no management API");
        return;
    }
    let k = (1u64 << 31).to_string();
    let (code, _, log) = producer(
        &env,
        &[
            "--m", "512", "--k", &k, "--n", "512", "--job-id", "toolarge",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("of the broker's disk"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_from_npy_files_larger_than_the_producers_memory_limit_completes_with_c_exact() {
    let mut env = Env::new("bignpy");
    // A and B of 256 MiB each, for a producer whose address space may not exceed 512 MiB
    // (its code, stacks and runtime reserve about 340 MiB of it): it cannot hold them.
    let (m, k, n) = (2048, 16384, 2048);
    let (a, b) = Operand::seeded_pair(m, k, n, DType::F64, 11);
    let (a_path, b_path) = (env.dir.path().join("A.npy"), env.dir.path().join("B.npy"));
    a.write_npy(&a_path).expect("A.npy written");
    b.write_npy(&b_path).expect("B.npy written");
    for id in ["w1", "w2"] {
        env.spawn_consumer(env.consumer(id));
    }
    let c = env.collector("bignpy");
    let stop = env.stop.clone();
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    let (a_arg, b_arg) = (a_path.display().to_string(), b_path.display().to_string());
    let place = Place::of(&env);
    let (code, _, log) = tokio::task::spawn_blocking(move || {
        run_producer(
            &place,
            &["--a", &a_arg, "--b", &b_arg, "--job-id", "bignpy"],
            &["prlimit", "--as=536870912"],
        )
    })
    .await
    .expect("the producer ran");
    assert_eq!(code, Some(0), "{log}");
    let summary = tokio::time::timeout(Duration::from_secs(300), collector)
        .await
        .expect("the job completes within 5 minutes")
        .expect("collector task")
        .expect("the collector runs cleanly");
    assert_eq!(summary.status, Outcome::Complete);
    assert!(summary.verification.as_ref().is_some_and(|v| v.passed));
    let want = a.to_matrix().unwrap().dot(&b.to_matrix().unwrap()).unwrap();
    let got = Matrix::read_npy(&env.dir.path().join("bignpy").join("C.npy")).unwrap();
    let (Matrix::F64(want), Matrix::F64(got)) = (want, got) else {
        panic!("f64 in, f64 out")
    };
    let err = (&got - &want).iter().fold(0.0f64, |m, d| m.max(d.abs()));
    // k = 16384 terms of [-1, 1) products: rounding stays far below 1e-9.
    assert!(err <= 1e-9, "max |C - A·B| = {err:e}");
    env.cleanup(&["bignpy"]).await;
}
