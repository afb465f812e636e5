//! Tiny tiles, several to a task message, against the real RabbitMQ: a group is delivered,
//! retried, parked and acknowledged as one message, and each of its tiles is still assembled
//! exactly once.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Env, run_job_with};
use gemmq::shutdown::CancellationToken;
use gemmq::tiling::GroupSize;
use gemmq::topology;
use gemmq_collector::Outcome;
use lapin::options::BasicGetOptions;

/// As in pipeline.rs: far above rounding, far below any wrong or missing term.
const TOLERANCE: f64 = 1e-10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_tiles_travel_several_to_a_message_and_c_is_still_exactly_a_times_b() {
    let mut env = Env::new("grouped");
    for id in ["w1", "w2"] {
        env.spawn_consumer(env.consumer(id));
    }
    let shape = (96, 40, 96);
    let mut producer = env.producer("grouped", shape, 8);
    producer.group = GroupSize::Fixed(10);
    let (receipt, summary) = run_job_with(&env, producer, env.collector("grouped")).await;

    assert_eq!(receipt.tasks, 144, "12 × 12 tiles of 8");
    assert_eq!(
        receipt.messages, 16,
        "at most 10 a message, as square as can be: 4 × 4 rectangles of 3 × 3 tiles"
    );
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 144);
    assert_eq!(summary.duplicates_dropped, 0);
    assert!(summary.verification.as_ref().unwrap().passed);
    let err = common::max_error_against_local_product(&env, "grouped", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let per_worker: u64 = summary.workers.values().map(|w| w.tasks).sum();
    assert_eq!(per_worker, 144, "workers are credited per tile");
    let stats = env.stop_consumers().await;
    let received: u64 = stats
        .iter()
        .map(|s| s.received.load(Ordering::Relaxed))
        .sum();
    assert_eq!(received, 16, "the workers took 16 messages for 144 tiles");
    env.cleanup(&["grouped"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_groups_leave_every_worker_consuming_two_messages_when_they_are_more_than_eight() {
    let mut env = Env::new("manyworkers");
    let workers = 12;
    for i in 0..workers {
        env.spawn_consumer(env.consumer(&format!("w{i}")));
    }
    // The producer counts the workers consuming when it reaches the broker.
    let ch = env.channel().await;
    let topo = env.topology();
    topo.declare(&ch).await.expect("topology declared");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while topo.task_consumers(&ch).await.expect("counted") < workers {
        assert!(
            std::time::Instant::now() < deadline,
            "{workers} workers consuming within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let shape = (128, 24, 128);
    let mut producer = env.producer("manyworkers", shape, 16);
    producer.group = GroupSize::Auto;
    let (receipt, summary) = run_job_with(&env, producer, env.collector("manyworkers")).await;

    assert_eq!(receipt.tasks, 64, "8 × 8 tiles of 16");
    assert_eq!(
        receipt.messages, 32,
        "two or more messages per worker: 32 rectangles of 1 × 2 tiles, not auto's usual 16 of 4"
    );
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 64);
    assert!(summary.verification.as_ref().unwrap().passed);
    let err = common::max_error_against_local_product(&env, "manyworkers", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let stats = env.stop_consumers().await;
    let fewest = stats
        .iter()
        .map(|s| s.received.load(Ordering::Relaxed))
        .min();
    // Dealt out in turn, 32 messages give each of 12 workers 2 or 3; auto's usual 16 left
    // 8 of them with one.
    assert!(
        fewest.is_some_and(|n| n >= 2),
        "every one of the {workers} workers took two messages or more: the fewest {fewest:?}"
    );
    env.cleanup(&["manyworkers"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_largest_group_goes_out_as_one_message_and_comes_back_as_one_result() {
    let mut env = Env::new("biggest");
    env.spawn_consumer(env.consumer("w1"));
    let shape = (256, 48, 256);
    let mut producer = env.producer("biggest", shape, 16);
    producer.group = GroupSize::Fixed(gemmq::message::MAX_GROUP as u64);
    let (receipt, summary) = run_job_with(&env, producer, env.collector("biggest")).await;

    assert_eq!(receipt.tasks, 256, "16 × 16 tiles of 16");
    assert_eq!(receipt.messages, 1, "all 256 in one task message");
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 256);
    let err = common::max_error_against_local_product(&env, "biggest", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let stats = env.stop_consumers().await;
    assert_eq!(stats[0].received.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats[0].result_messages.load(Ordering::Relaxed),
        1,
        "the group's 256 results in one message, its header within the limit"
    );
    env.cleanup(&["biggest"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_group_is_retried_whole_and_its_tiles_share_their_attempt_number() {
    let mut env = Env::new("grpretry");
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.failure_rate = 0.5;
        s.max_attempts = 50; // parking: 16 groups × 0.5⁵⁰, never
        env.spawn_consumer(s);
    }
    let mut producer = env.producer("grpretry", (128, 64, 128), 16);
    producer.group = GroupSize::Fixed(4);
    let (receipt, summary) = run_job_with(&env, producer, env.collector("grpretry")).await;

    assert_eq!(receipt.messages, 16);
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 64);
    assert!(summary.verification.as_ref().unwrap().passed);
    assert!(
        summary.attempts.keys().any(|&a| a >= 2),
        "16 groups at 50% failure: some were retried ({:?})",
        summary.attempts
    );
    for (attempt, tiles) in &summary.attempts {
        assert_eq!(
            tiles % 4,
            0,
            "the 4 tiles of a group fail and come back together, so {tiles} tiles on attempt {attempt} must be whole groups ({:?})",
            summary.attempts
        );
    }
    env.stop_consumers().await;
    env.cleanup(&["grpretry"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_whose_attempts_run_out_is_parked_once_and_each_of_its_tiles_reported() {
    let mut env = Env::new("grppark");
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.failure_rate = 1.0;
        s.max_attempts = 2;
        env.spawn_consumer(s);
    }
    let mut producer = env.producer("grppark", (32, 8, 32), 8);
    producer.group = GroupSize::Fixed(4);
    let mut collector = env.collector("grppark");
    collector.idle_timeout = None; // it must end because of the notices, not a timeout
    let (receipt, summary) = run_job_with(&env, producer, collector).await;

    assert_eq!(receipt.messages, 4, "16 tiles in groups of 4");
    assert_eq!(summary.status, Outcome::Incomplete);
    assert_eq!(
        summary.parked.len(),
        16,
        "every tile of every group is reported"
    );
    for p in &summary.parked {
        assert_eq!(p.attempts, 2);
        assert!(p.reason.contains("simulated failure"), "{}", p.reason);
    }
    let ch = env.channel().await;
    let parked_queue = env.topology().parked_queue();
    assert_eq!(
        common::message_count(&ch, &parked_queue).await,
        4,
        "the parking lot holds each group once, as it was sent"
    );
    let parked = ch
        .basic_get(
            parked_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a parked group");
    let tiles = topology::header_str(&parked.delivery.properties, "x-gemmq-tile").unwrap();
    assert!(tiles.ends_with("(4 tiles)"), "{tiles}");
    env.stop_consumers().await;
    env.cleanup(&["grppark"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_reads_the_small_blocks_its_messages_need_and_skips_the_others() {
    let mut env = Env::new("skip");
    // 16 × 16 tiles of 16 with k = 4096: 32 blocks of 512 KiB, small (they come with the
    // worker's sweep of the stream), and 4 messages of 8 × 8 tiles. On the stream, in the order
    // the rectangles need them: A's first half (offsets 0-7), B's first half (8-15), B's second
    // half (16-23), A's second half (24-31).
    let shape = (256, 4096, 256);
    let mut producer = env.producer("skip", shape, 16);
    producer.group = GroupSize::Fixed(64);
    let stop = env.stop.clone();
    let c = env.collector("skip");
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    let receipt = gemmq_producer::run(&producer)
        .await
        .expect("the producer publishes");
    assert_eq!(receipt.messages, 4);
    // The first three rectangles are held here, unacked: a worker started now gets the last,
    // which needs the second halves of A and B only.
    let ch = env.channel().await;
    let tasks = env.topology().tasks_queue();
    for _ in 0..3 {
        ch.basic_get(tasks.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a task message");
    }
    let (first, w1) = (CancellationToken::new(), env.consumer("w1"));
    let w1 = {
        let stop = first.clone();
        tokio::spawn(async move { gemmq_consumer::run(&w1, stop).await })
    };
    let results = env.topology().results_queue("skip");
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::result_tiles(&env, &results).await < 64 {
        assert!(
            Instant::now() < deadline,
            "w1 computes its rectangle within a minute"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.cancel();
    let stats = w1.await.expect("w1's task").expect("w1 ran cleanly");
    let read = stats.operand_bytes.load(Ordering::Relaxed);
    let block = 16 * 4096 * 8;
    assert!(
        (16 * block..17 * block).contains(&read),
        "w1 received the 16 blocks its rectangle needs, not all 32 ({read} bytes)"
    );

    // The other three go back to the queue: a second worker needs the blocks w1 skipped.
    ch.close(200, "released".into()).await.unwrap();
    env.spawn_consumer(env.consumer("w2"));
    let summary = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .expect("the job finishes within 2 minutes")
        .expect("collector task")
        .expect("the collector runs cleanly");
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 256);
    assert_eq!(summary.duplicates_dropped, 0);
    let err = common::max_error_against_local_product(&env, "skip", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    env.stop_consumers().await;
    env.cleanup(&["skip"]).await;
}
