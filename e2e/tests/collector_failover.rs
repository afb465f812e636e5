//! A collector's failover with no shared disk: every collector has its own `--out`, and the one
//! that takes over rebuilds C from the job's results stream. Each ends with C checked against
//! A·B, every tile once.

mod common;

use std::time::{Duration, Instant};

use common::{Env, Proc, summary_json};

/// See pipeline.rs: k²·ε for k ≤ 300 in f64 is ~2e-11.
const TOLERANCE: f64 = 1e-10;
const MINUTE: Duration = Duration::from_secs(60);
/// 256 tiles of 16, at 20 ms each on two workers: ~2.5 s of work, time to kill a collector.
const SHAPE: (u64, u64, u64) = (256, 64, 256);
const TILES: u64 = 256;

/// A collector of `job` writing to its own directory `out` (relative to the test's).
fn collector(env: &Env, job: &str, out: &str, name: &str) -> Proc {
    env.spawn(
        "gemmq-collector",
        name,
        &["--job-id", job, "--out", out, "--idle-timeout", "60s"],
    )
}

fn start_job(env: &mut Env, job: &str) -> impl Future<Output = ()> {
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.delay = "20ms".parse().unwrap();
        env.spawn_consumer(s);
    }
    let producer = env.producer(job, SHAPE, 16);
    async move {
        gemmq_producer::run(&producer).await.unwrap();
    }
}

/// Waits until the collector writing to `out` has journaled `lines` lines.
async fn journaled(env: &Env, job: &str, out: &str, lines: usize) {
    let journal = gemmq_collector::checkpoint_dir(&env.dir.path().join(out), job).join("journal");
    let started = Instant::now();
    loop {
        let n = std::fs::read_to_string(&journal).map_or(0, |t| t.lines().count());
        if n >= lines {
            return;
        }
        assert!(started.elapsed() < MINUTE, "only {n} lines journaled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The collector that wrote to `job/` finished the job: complete, every tile once, C = A·B.
async fn finished_exactly(env: &mut Env, job: &str) {
    let summary = summary_json(env, job);
    assert_eq!(summary["status"], "complete", "{summary}");
    assert_eq!(summary["tasks_done"], TILES);
    assert_eq!(summary["verification"]["passed"], true);
    let err = common::max_error_against_local_product(env, job, SHAPE);
    assert!(
        err <= TOLERANCE,
        "max |C - A·B| = {err:e}: a tile was lost or added twice"
    );
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_on_another_disk_takes_over_from_a_killed_collector_and_rebuilds_c() {
    let mut env = Env::new("cf-standby");
    let job = "cfstandby";
    let a_out = format!("{job}-a");
    let mut a = collector(&env, job, &a_out, "collector-a");
    start_job(&mut env, job).await;
    a.wait_for("collecting", 1, MINUTE).await;
    let mut b = collector(&env, job, job, "collector-b");
    b.wait_for("standing by", 1, MINUTE).await;
    journaled(&env, job, &a_out, 20).await;
    a.signal("KILL");
    a.wait(MINUTE).await;

    assert_eq!(b.wait(MINUTE).await, Some(0), "{}", b.log());
    assert!(
        b.log().contains("from=the start"),
        "B read the stream from its start: {}",
        b.log()
    );
    assert!(
        !env.dir.path().join(&a_out).join("C.npy").exists(),
        "A never finished"
    );
    finished_exactly(&mut env, job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_whose_disk_is_gone_for_good_is_replaced_by_one_with_an_empty_disk() {
    let mut env = Env::new("cf-lostdisk");
    let job = "cflostdisk";
    let a_out = format!("{job}-a");
    let mut a = collector(&env, job, &a_out, "collector-a");
    start_job(&mut env, job).await;
    journaled(&env, job, &a_out, 20).await;
    a.signal("KILL");
    a.wait(MINUTE).await;
    std::fs::remove_dir_all(env.dir.path().join(&a_out)).expect("A's disk goes");

    let mut b = collector(&env, job, job, "collector-b");
    assert_eq!(b.wait(MINUTE).await, Some(0), "{}", b.log());
    finished_exactly(&mut env, job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_resumed_from_its_checkpoint_reads_on_from_where_it_stopped() {
    let mut env = Env::new("cf-resume");
    let job = "cfresume";
    let mut a = collector(&env, job, job, "collector-a");
    start_job(&mut env, job).await;
    journaled(&env, job, job, 20).await;
    a.signal("KILL");
    a.wait(MINUTE).await;

    let mut again = collector(&env, job, job, "collector-a-again");
    assert_eq!(again.wait(MINUTE).await, Some(0), "{}", again.log());
    let log = again.log();
    assert!(log.contains("resuming from the checkpoint"), "{log}");
    assert!(log.contains("from=offset"), "{log}");
    assert!(
        !log.contains("reading the job's results again"),
        "the stream is the one the checkpoint read: {log}"
    );
    assert_eq!(
        summary_json(&env, job)["duplicates_dropped"],
        0,
        "nothing already applied was read again"
    );
    finished_exactly(&mut env, job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_whose_job_was_finished_by_the_active_collector_exits_0_without_redoing_it() {
    let mut env = Env::new("cf-finished");
    let job = "cffinished";
    let mut a = collector(&env, job, job, "collector-a");
    start_job(&mut env, job).await;
    a.wait_for("collecting", 1, MINUTE).await;
    let b_out = format!("{job}-b");
    let mut b = collector(&env, job, &b_out, "collector-b");
    b.wait_for("standing by", 1, MINUTE).await;

    assert_eq!(a.wait(MINUTE).await, Some(0), "{}", a.log());
    assert_eq!(b.wait(MINUTE).await, Some(0), "{}", b.log());
    assert!(
        b.log().contains("was collected by another collector"),
        "{}",
        b.log()
    );
    assert!(!env.dir.path().join(&b_out).join("C.npy").exists());
    finished_exactly(&mut env, job).await;
}
