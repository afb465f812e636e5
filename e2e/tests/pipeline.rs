//! The pipeline, end to end, against the real RabbitMQ: producer → consumers → collector.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Env, mgmt, run_job, run_job_with};
use gemmq::config::{BrokerOptions, DurationRange};
use gemmq::message::{self, Header, ResultHeader};
use gemmq::tiling::Operands;
use gemmq::topology;
use gemmq_collector::Outcome;
use lapin::options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions};

/// |C − A·B| for uniform [-1, 1) inputs: each entry is a k-term dot product, so rounding is at
/// most about k·ε·Σ|aᵢ||bᵢ| ≤ k²·ε ≈ 9e-12 for k = 200 in f64. 1e-10 leaves room for the
/// different summation order of the local product, and is still 10⁹ times smaller than any
/// wrong or missing term.
const TOLERANCE: f64 = 1e-10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ragged_shapes_through_three_consumers_give_exactly_a_times_b() {
    let mut env = Env::new("ragged");
    for id in ["w1", "w2", "w3"] {
        env.spawn_consumer(env.consumer(id));
    }
    let shape = (300, 200, 250);
    let (receipt, summary) = run_job(&env, "ragged", shape, 64).await;

    assert_eq!(
        receipt.tasks,
        5 * 4,
        "300 and 250 are cut into 5 and 4 tiles of up to 64"
    );
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 20);
    assert!(summary.verification.as_ref().unwrap().passed);
    let err = common::max_error_against_local_product(&env, "ragged", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let per_worker: u64 = summary.workers.values().map(|w| w.tasks).sum();
    assert_eq!(
        per_worker, 20,
        "every task is counted for exactly one worker"
    );
    env.stop_consumers().await;
    env.cleanup(&["ragged"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_ready_together_travel_together_and_each_tile_is_assembled_once() {
    // 144 tiles of 8x8 through two workers that may each hold 64 tasks: results pile up while
    // one awaits its confirm, and go back several to a message.
    let mut env = Env::new("batched");
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.queue_size = 64;
        env.spawn_consumer(s);
    }
    let shape = (96, 40, 96);
    let (receipt, summary) = run_job(&env, "batched", shape, 8).await;

    assert_eq!(receipt.tasks, 144);
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 144);
    assert_eq!(summary.duplicates_dropped, 0);
    let err = common::max_error_against_local_product(&env, "batched", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let stats = env.stop_consumers().await;
    let done: u64 = stats.iter().map(|s| s.done.load(Ordering::Relaxed)).sum();
    let messages: u64 = stats
        .iter()
        .map(|s| s.result_messages.load(Ordering::Relaxed))
        .sum();
    assert_eq!(done, 144);
    assert!(
        messages < done,
        "{done} results went back in {messages} messages: none were sent together"
    );
    env.cleanup(&["batched"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_operand_cache_is_too_small_rereads_blocks_at_their_offsets() {
    // Blocks of 32 rows/columns × depth 64 are 16 KiB; a 40 KiB cache holds two and a half of the
    // 8 the job has, so blocks are dropped and read again from their place in the stream.
    let mut env = Env::new("tinycache");
    let mut s = env.consumer("w1");
    s.operand_cache = 40 * 1024;
    env.spawn_consumer(s);
    let shape = (128, 64, 128);
    let mut p = env.producer("tinycache", shape, 32);
    p.operands = Operands::Stream;
    let (receipt, summary) = run_job_with(&env, p, env.collector("tinycache")).await;

    assert_eq!(receipt.tasks, 16);
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 16);
    let err = common::max_error_against_local_product(&env, "tinycache", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let stats = env.stop_consumers().await;
    let rereads = stats[0].operand_rereads.load(Ordering::Relaxed);
    assert!(
        rereads > 0,
        "no block was read again: the cache never dropped one"
    );
    env.cleanup(&["tinycache"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_left_over_from_an_earlier_job_under_the_same_id_is_dropped_not_computed() {
    let mut env = Env::new("leftover");
    let shape = (128, 64, 128);
    let mut p = env.producer("leftover", shape, 32);
    p.operands = Operands::Stream;
    let stop = env.stop.clone();
    let c = env.collector("leftover");
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    let receipt = gemmq_producer::run(&p)
        .await
        .expect("the producer publishes");
    // A duplicate of a task of an earlier job that used this id (another run), still queued.
    let ch = env.channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    let stale = Header::StreamedTask(message::TaskHeader {
        job: "leftover".into(),
        run: "0123456789abcdef".into(),
        tile: gemmq::TileId {
            row: 0,
            col: 0,
            part: 0,
        },
        dtype: gemmq::DType::F64,
        rows: 32,
        cols: 32,
        depth: 64,
        at: None,
        recompute: 0,
    });
    ch.basic_publish(
        env.topology().tasks_exchange().as_str().into(),
        topology::TASK_KEY.into(),
        BasicPublishOptions::default(),
        &message::encode(&stale, &[]),
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    env.spawn_consumer(env.consumer("leftover-w1"));
    let summary = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the job finishes within a minute")
        .expect("collector task")
        .expect("the collector runs cleanly");

    assert_eq!(receipt.tasks, 16);
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(
        summary.rejected_messages, 0,
        "no result of the old run came"
    );
    let err = common::max_error_against_local_product(&env, "leftover", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    // The leftover is dropped when the stream shows this job's run, not computed, not parked.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        if common::message_count(&ch, &env.topology().tasks_queue()).await == 0 {
            // Ready count 0; the leftover may still be held: stopping waits for it.
            break env.stop_consumers().await;
        }
        assert!(Instant::now() < deadline, "the leftover task was settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats[0].done.load(Ordering::Relaxed), 16);
    assert_eq!(stats[0].parked.load(Ordering::Relaxed), 0);
    assert_eq!(stats[0].received.load(Ordering::Relaxed), 17);
    env.cleanup(&["leftover"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_reads_only_the_blocks_of_the_tasks_it_takes_and_each_of_them_once() {
    let mut env = Env::new("need");
    // 4 × 4 tiles of 128 in groups of 4: four messages, each a 2 × 2 rectangle of tiles that
    // needs 2 of the 4 blocks of A and 2 of the 4 of B (1 MiB each: large enough that the
    // producer writes each to the stream as a chunk of its own).
    let shape = (512, 1024, 512);
    let mut p = env.producer("need", shape, 128);
    p.operands = Operands::Stream;
    p.group = gemmq::tiling::GroupSize::Fixed(4);
    let receipt = gemmq_producer::run(&p).await.expect("the job is published");
    assert_eq!((receipt.tasks, receipt.messages), (16, 4));
    // Each block is followed on the stream by a chunk end (the broker reads a stream consumer
    // one chunk ahead: that chunk is the empty marker, not the next block). The places the
    // tasks carry count the markers: the reads below would pass other blocks otherwise.
    let stream = env.topology().operands_queue("need");
    let on_stream = common::stream_message_ids(&env.channel().await, &stream, 16).await;
    assert_eq!(
        on_stream.len(),
        16,
        "8 blocks and their chunk ends: {on_stream:?}"
    );
    for pair in on_stream.chunks(2) {
        assert!(pair[0] != "need/chunk-end", "{on_stream:?}");
        assert_eq!(pair[1], "need/chunk-end", "{on_stream:?}");
    }
    // Each in a chunk of its own, the chunk end too: were it written with its block, the
    // stream would end with a block's chunk, whose CRC32 RabbitMQ checks for every reader
    // that opens the stream.
    let chunks = common::stream_chunks(&env.channel().await, &stream, 16).await;
    assert_eq!(chunks, vec![1; 16], "messages per chunk");
    // Three of the four messages held elsewhere: the first worker can take only one.
    let holder = env.channel().await;
    let tasks = env.topology().tasks_queue();
    for _ in 0..3 {
        holder
            .basic_get(tasks.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a task message is there");
    }
    let mut w = env.consumer("need-w1");
    w.queue_size = 1;
    env.spawn_consumer(w);
    let results = env.topology().results_queue("need");
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::result_tiles(&env, &results).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the first group was not computed in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = env.stop_consumers().await;
    let block_bytes = 128 * 1024 * 8;
    let (reads, bytes) = (
        first[0].operand_reads.load(Ordering::Relaxed),
        first[0].operand_bytes.load(Ordering::Relaxed),
    );
    assert_eq!(reads, 4, "one rectangle of tiles: 2 blocks of A and 2 of B");
    assert!(
        bytes >= 4 * block_bytes && bytes < 5 * block_bytes,
        "{bytes} bytes of blocks for a task message that needs 4 of {block_bytes}"
    );

    // The other three messages go back to the queue; a second worker takes them all.
    holder.close(200, "released".into()).await.expect("close");
    env.stop = gemmq::shutdown::CancellationToken::new();
    env.spawn_consumer(env.consumer("need-w2"));
    let summary = gemmq_collector::run(&env.collector("need"), env.stop.clone())
        .await
        .expect("the collector runs cleanly");
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.duplicates_dropped, 0);
    let err = common::max_error_against_local_product(&env, "need", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let second = env.stop_consumers().await;
    assert_eq!(
        second[0].operand_reads.load(Ordering::Relaxed),
        8,
        "three rectangles need every block: each read once"
    );
    assert_eq!(second[0].operand_rereads.load(Ordering::Relaxed), 0);
    env.cleanup(&["need"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_job_is_done_running_workers_drop_its_cached_blocks() {
    let env = Env::new("jobdone");
    let mut w = env.spawn(
        "gemmq-consumer",
        "jobdone-w1",
        &["--worker-id", "jobdone-w1"],
    );
    w.wait_for("consuming tasks", 1, Duration::from_secs(30))
        .await;
    common::wait_for_notice_queues(&env, 1).await;
    let mut p = env.producer("jobdone", (128, 64, 128), 32);
    p.operands = Operands::Stream;
    let (_, summary) = run_job_with(&env, p, env.collector("jobdone")).await;
    assert_eq!(summary.status, Outcome::Complete);
    // The collector's notice comes after the job's queues are deleted.
    w.wait_for(
        "job done; its cached operand blocks dropped",
        1,
        Duration::from_secs(10),
    )
    .await;
    w.signal("TERM");
    assert_eq!(w.wait(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_started_after_the_blocks_were_published_reads_them_from_the_stream() {
    let mut env = Env::new("late");
    let shape = (128, 64, 128);
    let mut p = env.producer("late", shape, 32);
    p.operands = Operands::Stream;
    let stop = env.stop.clone();
    let c = env.collector("late");
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    // Every block and task is on the broker before any worker exists.
    let receipt = gemmq_producer::run(&p)
        .await
        .expect("the producer publishes");
    assert_eq!(receipt.tasks, 16);
    env.spawn_consumer(env.consumer("late-w1"));
    let summary = tokio::time::timeout(Duration::from_secs(60), collector)
        .await
        .expect("the job finishes within a minute")
        .expect("collector task")
        .expect("the collector runs cleanly");

    assert_eq!(summary.status, Outcome::Complete);
    let err = common::max_error_against_local_product(&env, "late", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    let stats = env.stop_consumers().await;
    let all = stats[0].operand_bytes.load(Ordering::Relaxed);
    // 8 blocks of 16 KiB: small, so they came with one sweep of the stream, each once, and
    // no block needed a read of its own.
    assert!(
        (8 * 16 * 1024..9 * 16 * 1024).contains(&all),
        "the blocks came from the stream, each once ({all} bytes)"
    );
    assert_eq!(stats[0].operand_reads.load(Ordering::Relaxed), 0);
    // Its 16 tasks came at once and all waited for blocks: one of them opened the sweep, the
    // others waited for it (a stream consumer each would cost the broker a reader and the
    // chunks it sent before the cancel).
    assert_eq!(stats[0].operand_sweeps.load(Ordering::Relaxed), 1);
    env.cleanup(&["late"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_id_used_again_for_other_inputs_is_computed_from_its_new_blocks_not_the_cached_old_ones()
 {
    let mut env = Env::new("rerun");
    // One task at a time: one result per message, so the results queue counts tiles.
    let mut w = env.consumer("rerun-w1");
    w.queue_size = 1;
    env.spawn_consumer(w);
    let shape = (128, 64, 128);
    let run = |seed| {
        let mut p = env.seeded_producer("rerun", shape, 32, seed);
        p.operands = Operands::Stream;
        p
    };
    // The first run is computed (the worker caches its blocks) but never collected: its queues
    // are deleted by hand, so the worker hears no "job done" and keeps the blocks.
    gemmq_producer::run(&run(7))
        .await
        .expect("the first run publishes");
    let ch = env.channel().await;
    let results = env.topology().results_queue("rerun");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = common::result_tiles(&env, &results).await;
        // (More if a result went twice: a redelivered task.)
        if count >= 16 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first run computed in 30 s ({count} result tiles)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.topology()
        .delete_job(&ch, "rerun")
        .await
        .expect("the first run's queues are deleted");
    // The second run: other inputs of the same shapes under the same job id, while the
    // worker's cache still holds the old blocks under the same names.
    let (_, summary) = run_job_with(&env, run(8), env.collector("rerun")).await;

    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    let err = common::max_error_against_seed(&env, "rerun", shape, 8);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");
    env.cleanup(&["rerun"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_k_split_job_sums_each_partial_product_once_with_either_operand_transport() {
    // 64 KiB messages cannot hold a 64-row and a 64-column block of depth 200 (200 KiB): k is
    // split into parts whose partial products the collector adds up.
    let opts = BrokerOptions {
        max_message_bytes: Some(bytesize_kib(64)),
        ..Default::default()
    };
    let mut env = Env::with_broker("ksplit", opts);
    env.spawn_consumer(env.consumer("w1"));
    env.spawn_consumer(env.consumer("w2"));
    let shape = (130, 200, 70);
    for (job, operands) in [
        ("ksplit-inline", Operands::Inline),
        ("ksplit-stream", Operands::Stream),
    ] {
        let mut p = env.producer(job, shape, 64);
        p.operands = operands;
        let (receipt, summary) = run_job_with(&env, p, env.collector(job)).await;

        let parts = receipt.manifest.plan.parts();
        assert!(parts > 1, "k should have been split");
        assert_eq!(summary.tasks_done, 3 * 2 * parts as u64);
        assert_eq!(summary.tiles_complete, 6);
        assert_eq!(summary.status, Outcome::Complete);
        let err = common::max_error_against_local_product(&env, job, shape);
        assert!(err <= TOLERANCE, "{operands:?}: max |C - A·B| = {err:e}");
    }
    env.stop_consumers().await;
    env.cleanup(&["ksplit-inline", "ksplit-stream"]).await;
}

fn bytesize_kib(k: u64) -> bytesize::ByteSize {
    bytesize::ByteSize::kib(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_size_is_the_prefetch_and_the_broker_holds_the_rest() {
    let mut env = Env::new("prefetch");
    let topo = env.topology();
    // 64 slow tasks (0.25 s each, 16 s in all), one to a message, for one worker with room
    // for 3.
    let mut producer = env.producer("prefetch", (128, 16, 128), 16);
    producer.group = gemmq::tiling::GroupSize::Fixed(1);
    gemmq_producer::run(&producer).await.unwrap();
    let mut s = env.consumer("slow");
    s.queue_size = 3;
    s.delay = DurationRange {
        min: Duration::from_millis(250),
        max: Duration::from_millis(250),
    };
    let collector = env.collector("prefetch");
    env.spawn_consumer(s);

    // The management API refreshes every ~5 s (a new queue may show nothing for a round or
    // two): watch it until it has shown the worker busy, for at most 16 s.
    let queue = format!("/queues/%2F/{}", topo.tasks_queue());
    let started = Instant::now();
    let (mut seen_busy, mut max_unacked, mut prefetch) = (false, 0, None);
    while started.elapsed() < Duration::from_secs(16) && !(seen_busy && prefetch.is_some()) {
        let path = queue.clone();
        let q = tokio::task::spawn_blocking(move || mgmt(&path))
            .await
            .unwrap();
        let unacked = q["messages_unacknowledged"].as_u64().unwrap_or(0);
        let ready = q["messages_ready"].as_u64().unwrap_or(0);
        max_unacked = max_unacked.max(unacked);
        if unacked > 0 && ready > 0 {
            seen_busy = true;
        }
        if let Some(c) = q["consumer_details"].as_array().and_then(|c| c.first()) {
            prefetch = c["prefetch_count"].as_u64();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        prefetch,
        Some(3),
        "the broker knows the consumer's prefetch"
    );
    assert!(
        seen_busy,
        "the broker held ready tasks back while the worker was busy"
    );
    assert!(max_unacked <= 3, "the broker saw {max_unacked} unacked > 3");

    let summary = gemmq_collector::run(&collector, env.stop.clone())
        .await
        .unwrap();
    assert_eq!(summary.status, Outcome::Complete);
    let stats = env.stop_consumers().await;
    assert_eq!(
        stats[0].max_held.load(Ordering::Relaxed),
        3,
        "the worker held exactly its queue size at peak"
    );
    env.cleanup(&["prefetch"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_tasks_come_back_through_the_retry_queue_with_rising_attempts() {
    let mut env = Env::new("retry");
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.failure_rate = 0.3;
        s.max_attempts = 50; // with 0.3 per attempt, parking would be a 1-in-10^26 event
        env.spawn_consumer(s);
    }
    let (_, summary) = run_job(&env, "retry", (128, 64, 128), 16).await;

    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 64);
    assert!(
        summary.retries > 0,
        "64 tasks at 30% failure: some must have been retried"
    );
    let highest = *summary.attempts.keys().max().unwrap();
    assert!(
        highest >= 2,
        "attempt numbers read from x-death rise: {:?}",
        summary.attempts
    );
    let stats = env.stop_consumers().await;
    let retried: u64 = stats
        .iter()
        .map(|s| s.retried.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        retried, summary.retries,
        "every retry the workers made shows in the attempts"
    );
    env.cleanup(&["retry"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_attempts_run_out_tiles_are_parked_and_the_collector_reports_them() {
    let mut env = Env::new("park");
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.failure_rate = 1.0;
        s.max_attempts = 2;
        env.spawn_consumer(s);
    }
    let mut collector = env.collector("park");
    collector.idle_timeout = None; // it must end because of the notices, not a timeout
    let started = Instant::now();
    let (_, summary) = run_job_with(&env, env.producer("park", (32, 8, 32), 16), collector).await;

    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(summary.status, Outcome::Incomplete);
    assert_eq!(summary.status.exit_code(), gemmq_collector::EXIT_INCOMPLETE);
    assert_eq!(summary.parked.len(), 4);
    for p in &summary.parked {
        assert_eq!(p.attempts, 2);
        assert!(p.reason.contains("simulated failure"), "{}", p.reason);
    }
    assert!(
        !env.dir.path().join("park/C.npy").exists(),
        "no partial C is written"
    );
    // The parking lot holds the tasks themselves, with their reason for a person to read.
    let ch = env.channel().await;
    let parked = ch
        .basic_get(
            env.topology().parked_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a parked task");
    let reason = topology::header_str(&parked.delivery.properties, "x-gemmq-reason").unwrap();
    assert!(reason.contains("attempt 2 of 2"), "{reason}");
    env.stop_consumers().await;
    env.cleanup(&["park"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_delivered_twice_is_assembled_once() {
    let mut env = Env::new("dup");
    let topo = env.topology();
    // Inline operands: this test computes tasks itself, from their bodies.
    let mut p = env.producer("dup", (64, 32, 64), 16);
    p.operands = Operands::Inline;
    let c = env.collector("dup");
    gemmq_producer::run(&p).await.unwrap();

    // A worker that publishes its result and dies before acking: simulated by publishing the
    // result of three tasks and handing the tasks back. Real workers then compute them again.
    let ch = env.channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    for _ in 0..3 {
        let msg = ch
            .basic_get(
                topo.tasks_queue().as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
            .expect("a task");
        let (task, payload) = message::decode(&msg.delivery.data, 1 << 24)
            .unwrap()
            .into_task()
            .unwrap();
        let bytes = gemmq::matrix::compute_tile(&task, payload, gemmq::kernel::Threads::Exactly(1))
            .unwrap();
        let header = Header::TileResult(ResultHeader {
            job: task.job.clone(),
            run: String::new(),
            tile: task.tile,
            dtype: task.dtype,
            rows: task.rows,
            cols: task.cols,
            worker: "doomed".into(),
            attempt: 1,
            compute_micros: 1,
            recompute: 0,
        });
        // Published twice, as a redelivered result would be: both copies reach the collector
        // before the job can complete.
        for _ in 0..2 {
            ch.basic_publish(
                topo.results_exchange().as_str().into(),
                task.job.as_str().into(),
                BasicPublishOptions::default(),
                &message::encode(&header, &[bytes.bytes()]),
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        msg.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
    }
    env.spawn_consumer(env.consumer("w1"));
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        gemmq_collector::run(&c, env.stop.clone()),
    )
    .await
    .unwrap()
    .unwrap();

    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(summary.tasks_done, 16);
    // Three second copies, plus the results the real worker computed again for those tiles
    // (when they arrive before the last tile).
    assert!(
        (3..=6).contains(&summary.duplicates_dropped),
        "{}",
        summary.duplicates_dropped
    );
    assert!(
        summary.verification.unwrap().passed,
        "no tile was added twice"
    );
    env.stop_consumers().await;
    env.cleanup(&["dup"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_job_id_used_again_for_other_inputs_is_collected_again_into_the_same_out() {
    let mut env = Env::new("reuse");
    env.spawn_consumer(env.consumer("w1"));
    let shape = (32, 16, 32);
    let seeded = |seed| env.seeded_producer("reuse", shape, 16, seed);
    let (first, _) = run_job_with(&env, seeded(7), env.collector("reuse")).await;
    // Same id, same plan, other inputs: another run, which the finished checkpoint of the
    // first must not be taken for ("already collected"). Announced before the collector starts:
    // a collector that finds no job on the broker and a finished one in its --out reports that.
    let second = gemmq_producer::run(&seeded(8))
        .await
        .expect("the second run publishes");
    let summary = gemmq_collector::run(&env.collector("reuse"), env.stop.clone())
        .await
        .expect("the collector runs cleanly");

    assert_ne!(first.manifest.run, second.manifest.run);
    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(
        summary.tasks_done, 4,
        "the second run's tiles were collected"
    );
    let err = common::max_error_against_seed(&env, "reuse", shape, 8);
    assert!(
        err <= TOLERANCE,
        "max |C - A·B| = {err:e} against the second run's inputs"
    );
    env.stop_consumers().await;
    env.cleanup(&["reuse"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_run_again_on_a_finished_job_reports_it_and_resurrects_nothing() {
    let mut env = Env::new("again");
    env.spawn_consumer(env.consumer("w1"));
    run_job(&env, "again", (32, 16, 32), 16).await;
    let summary = tokio::time::timeout(
        Duration::from_secs(20),
        gemmq_collector::run(&env.collector("again"), env.stop.clone()),
    )
    .await
    .expect("it does not wait for a job that is done")
    .unwrap();
    assert_eq!(summary.status, Outcome::Complete);
    let ch = env.channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let results = env.topology().results_queue("again");
    let found = ch
        .queue_declare(results.as_str().into(), passive, Default::default())
        .await;
    assert!(found.is_err(), "the finished job's queues stay deleted");
    env.stop_consumers().await;
    env.cleanup(&["again"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_without_a_job_id_skips_the_announcement_of_an_earlier_run_of_the_same_id() {
    let mut env = Env::new("stalerun");
    env.spawn_consumer(env.consumer("w1"));
    let shape = (32, 16, 32);
    let seeded = |seed| env.seeded_producer("again", shape, 16, seed);
    // The first run is collected by id: its announcement stays on the jobs queue. Then the id
    // runs again for other inputs, announced behind it.
    run_job_with(&env, seeded(7), env.collector("again")).await;
    let second = gemmq_producer::run(&seeded(8)).await.unwrap();
    let mut any = env.collector("again");
    any.job_id = None;
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        gemmq_collector::run(&any, env.stop.clone()),
    )
    .await
    .expect("it neither waits on nor re-reports the finished run")
    .unwrap();

    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(
        summary.rejected_messages, 0,
        "no result was taken for another run's"
    );
    let err = common::max_error_against_seed(&env, "again", shape, 8);
    assert!(
        err <= TOLERANCE,
        "max |C - A·B| = {err:e} against run {}'s inputs",
        second.manifest.run
    );
    env.stop_consumers().await;
    env.cleanup(&["again"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_without_a_job_id_takes_the_next_unfinished_job() {
    let mut env = Env::new("nextjob");
    env.spawn_consumer(env.consumer("w1"));
    // Job "first" is collected by id: its announcement stays on the jobs queue, finished.
    run_job(&env, "first", (32, 16, 32), 16).await;
    gemmq_producer::run(&env.producer("second", (48, 16, 32), 16))
        .await
        .unwrap();
    let mut any = env.collector("second");
    any.job_id = None;
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        gemmq_collector::run(&any, env.stop.clone()),
    )
    .await
    .expect("it does not wait on the finished job")
    .unwrap();
    assert_eq!(summary.job, "second");
    assert_eq!(summary.status, Outcome::Complete);
    // Taking a job acks its announcement: only the finished job's stale one is left.
    let ch = env.channel().await;
    let jobs = env.topology().jobs_queue();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::durable()
    };
    let left = ch
        .queue_declare(jobs.as_str().into(), passive, Default::default())
        .await
        .unwrap();
    assert_eq!(
        left.message_count(),
        0,
        "the stale announcement was skipped and the taken one acked"
    );
    env.stop_consumers().await;
    env.cleanup(&["first", "second"]).await;
}

/// The bench's scaling scenario runs many workers on two cores by modelling the multiply: the
/// blocks still travel and every tile still comes back once, as zeros after a sleep of the
/// tile's flops at the modelled rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_modelling_its_compute_sleeps_for_the_flops_and_sends_zeros() {
    let mut env = Env::new("modelled");
    let mut s = env.consumer("w1");
    // 2·64·64·200 flops per tile at 0.1 GFLOP/s: 16 ms a tile, 0.26 s for the 16 tiles.
    s.modelled_gflops = Some(0.1);
    env.spawn_consumer(s);
    let mut c = env.collector("modelled");
    c.verify = false;
    let started = Instant::now();
    let (_, summary) = run_job_with(&env, env.producer("modelled", (256, 200, 256), 64), c).await;
    let took = started.elapsed();

    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 16);
    assert!(
        took >= Duration::from_millis(250),
        "16 tiles of 1.6 MFLOP at 0.1 GFLOP/s sleep 0.26 s; the job took {took:?}"
    );
    let c = gemmq::matrix::Matrix::read_npy(&env.dir.path().join("modelled").join("C.npy"))
        .expect("C.npy is readable");
    let gemmq::matrix::Matrix::F64(c) = c else {
        panic!("C should be f64")
    };
    assert_eq!(c.dim(), (256, 256));
    assert!(c.iter().all(|&x| x == 0.0), "modelled tiles are zeros");
    let stats = env.stop_consumers().await;
    assert!(
        stats[0].operand_bytes.load(Ordering::Relaxed) >= 2 * 256 * 200 * 8,
        "the blocks still travel: all of A and B to the one worker"
    );
    env.cleanup(&["modelled"]).await;
}
