//! The broker restarts mid-job. This stops RabbitMQ for every test on the machine, so it is a
//! test binary of its own (cargo runs test binaries one after another) with a single test.

mod common;

use std::time::{Duration, Instant};

use common::Env;
use gemmq_collector::Outcome;

const TOLERANCE: f64 = 1e-10;

fn rabbitmqctl(args: &[&str]) {
    assert!(
        common::broker::rabbitmqctl_ok(args),
        "rabbitmqctl {args:?} failed (GEMMQ_TEST_RABBITMQCTL names the command)"
    );
}

/// Starts the broker again even if the test fails while it is stopped.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = common::broker::rabbitmqctl(&["start_app"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_job_loses_nothing_and_doubles_nothing() {
    let mut env = Env::new("restart");
    let job = "restart";
    // 4,096 tasks, published one confirm at a time: seconds of publishing.
    let shape = (1024, 64, 1024);
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.delay = "5ms".parse().unwrap();
        env.spawn_consumer(s);
    }
    let c = env.collector(job);
    let stop = env.stop.clone();
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    // Small confirm window and small tiles: the producer is still publishing when the broker goes.
    let mut p = env.producer(job, shape, 16);
    p.confirm_window = 1;
    let producer = tokio::spawn(async move { gemmq_producer::run(&p).await });

    let journal = gemmq_collector::checkpoint_dir(&env.dir.path().join(job), job).join("journal");
    let started = Instant::now();
    while std::fs::read_to_string(&journal).map_or(0, |t| t.lines().count()) < 50 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress before the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guard = Restart;
    rabbitmqctl(&["stop_app"]);
    let still_publishing = !producer.is_finished();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    std::mem::forget(guard);

    let receipt = tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer finishes after the restart")
        .unwrap()
        .expect("the producer reconnects and publishes what was not confirmed");
    let summary = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .expect("the collector finishes after the restart")
        .unwrap()
        .expect("the collector reconnects");
    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(summary.tasks_done, receipt.tasks);
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(err <= TOLERANCE, "{err:e}");
    let stats = env.stop_consumers().await;
    let reconnects: u64 = stats
        .iter()
        .map(|s| s.connections.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(
        reconnects >= 4,
        "both workers connected again after the restart: {reconnects}"
    );
    // What the test is for: the restart came while the producer was publishing, and it
    // reconnected to go on.
    assert!(
        still_publishing,
        "the producer had finished before the restart"
    );
    assert!(
        receipt.tries >= 2,
        "the producer was interrupted and tried again: {} tries",
        receipt.tries
    );
    env.cleanup(&[job]).await;
}
