//! Real faults against the real broker: killed workers, killed collectors, a producer killed
//! mid-publish, graceful shutdown. Each ends with C checked against A·B, every tile once.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Env, Proc, summary_json};
use gemmq::config::BrokerOptions;
use gemmq_collector::Outcome;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// See pipeline.rs: k²·ε for k ≤ 300 in f64 is ~2e-11.
const TOLERANCE: f64 = 1e-10;

/// How a fault test ends once its collector is done: summary.json says complete, C == A·B, the
/// consumers stop cleanly, and the job's queues are deleted.
async fn complete_and_clean_up(env: &mut Env, job: &str, shape: (u64, u64, u64)) {
    assert_eq!(summary_json(env, job)["status"], "complete");
    let err = common::max_error_against_local_product(env, job, shape);
    assert!(err <= TOLERANCE, "{err:e}");
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}
const MINUTE: Duration = Duration::from_secs(60);

fn journal(env: &Env, job: &str) -> PathBuf {
    gemmq_collector::checkpoint_dir(&env.dir.path().join(job), job).join("journal")
}

async fn wait_for_journal(env: &Env, job: &str, lines: usize) {
    let started = Instant::now();
    loop {
        let n = std::fs::read_to_string(journal(env, job)).map_or(0, |t| t.lines().count());
        if n >= lines {
            return;
        }
        assert!(
            started.elapsed() < MINUTE,
            "the collector journaled only {n} lines"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job of 1,024 tiles of 16 (64 blocks) over 512×64·64×512, whose producer waits for each
/// confirm before the next message: still publishing for a second or more, time for a test to
/// break something under it.
const SLOW_JOB: (u64, u64, u64) = (512, 64, 512);

fn publish_slowly(
    env: &Env,
    job: &str,
) -> tokio::task::JoinHandle<anyhow::Result<gemmq_producer::Receipt>> {
    let p = slow_producer(env, job);
    tokio::spawn(async move { gemmq_producer::run(&p).await })
}

/// The settings of [`SLOW_JOB`]'s producer: a confirm before each next message.
fn slow_producer(env: &Env, job: &str) -> gemmq_producer::Settings {
    let mut p = env.producer(job, SLOW_JOB, 16);
    p.confirm_window = 1;
    p
}

/// Waits for the producer to be done publishing (after whatever the test broke), and for its
/// receipt.
async fn publishing_ends(
    producer: tokio::task::JoinHandle<anyhow::Result<gemmq_producer::Receipt>>,
) -> gemmq_producer::Receipt {
    tokio::time::timeout(MINUTE, producer)
        .await
        .expect("the producer finishes")
        .unwrap()
        .expect("the producer recovers")
}

/// Waits until the tasks queue holds `n` tasks (no worker is running); returns the channel it
/// asked on.
async fn tasks_queued(env: &Env, n: u32) -> lapin::Channel {
    let ch = env.channel().await;
    env.topology().declare(&ch).await.unwrap();
    let tasks = env.topology().tasks_queue();
    let started = Instant::now();
    while common::message_count(&ch, &tasks).await < n {
        assert!(started.elapsed() < MINUTE, "the producer published nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ch
}

/// The blocks in the job's operand stream (`expected` of them, or more): how many, and how
/// many different ones.
async fn blocks_in_stream(env: &Env, job: &str, expected: usize) -> (usize, usize) {
    let stream = env.topology().operands_queue(job);
    let mut ids = common::stream_message_ids(&env.channel().await, &stream, expected).await;
    let all = ids.len();
    ids.sort();
    ids.dedup();
    (all, ids.len())
}

/// Collects a 1,024-tile job to its end and checks C: every tile once, none parked, C = A·B.
async fn collect_all_1024_tiles_once(mut env: Env, job: &str, shape: (u64, u64, u64)) {
    let mut collector = env.collector(job);
    collector.idle_timeout = Some(Duration::from_secs(30));
    let summary = tokio::time::timeout(MINUTE, gemmq_collector::run(&collector, env.stop.clone()))
        .await
        .expect("the job finishes within a minute")
        .unwrap();
    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(summary.tasks_done, 1024);
    assert!(summary.parked.is_empty());
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(err <= TOLERANCE, "{err:e}");
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

fn collector_proc(env: &Env, job: &str, name: &str) -> Proc {
    env.spawn(
        "gemmq-collector",
        name,
        &["--job-id", job, "--out", job, "--idle-timeout", "60s"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_task_loses_nothing_and_others_finish_its_work() {
    let mut env = Env::new("killworker");
    let job = "killworker";
    let doomed = env.spawn(
        "gemmq-consumer",
        "doomed",
        &[
            "--worker-id",
            "doomed",
            "--queue-size",
            "5",
            "--delay",
            "10s",
        ],
    );
    gemmq_producer::run(&env.producer(job, (128, 64, 128), 32))
        .await
        .unwrap();
    doomed.wait_for("task received", 5, MINUTE).await;
    doomed.signal("KILL");

    env.spawn_consumer(env.consumer("survivor"));
    let summary = gemmq_collector::run(&env.collector(job), env.stop.clone())
        .await
        .unwrap();
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(
        summary.workers["survivor"].tasks, 16,
        "the survivor computed every tile, including the 5 the dead worker held"
    );
    assert!(summary.verification.unwrap().passed);
    let err = common::max_error_against_local_product(&env, job, (128, 64, 128));
    assert!(err <= TOLERANCE, "{err:e}");
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_killed_mid_job_resumes_from_its_checkpoint_and_adds_each_part_once() {
    // k is split (64 KiB messages) so the crash can fall between the parts of a tile.
    let opts = BrokerOptions {
        max_message_bytes: Some(bytesize::ByteSize::kib(64)),
        ..Default::default()
    };
    let mut env = Env::with_broker("killcollector", opts);
    let job = "killcollector";
    let shape = (256, 300, 256);
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.delay = "10ms".parse().unwrap();
        env.spawn_consumer(s);
    }
    let mut first = collector_proc(&env, job, "collector-1");
    let receipt = gemmq_producer::run(&env.producer(job, shape, 32))
        .await
        .unwrap();
    assert!(receipt.manifest.plan.parts() > 1);
    wait_for_journal(&env, job, 60).await;
    first.signal("KILL");
    first.wait(MINUTE).await;

    let mut second = collector_proc(&env, job, "collector-2");
    assert_eq!(second.wait(MINUTE).await, Some(0), "{}", second.log());
    assert!(
        second.log().contains("resuming from the checkpoint"),
        "{}",
        second.log()
    );
    let summary = summary_json(&env, job);
    assert_eq!(summary["status"], "complete");
    assert_eq!(summary["tasks_done"], receipt.tasks);
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(
        err <= TOLERANCE,
        "max |C - A·B| = {err:e}: a part was lost or added twice"
    );
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_collector_takes_over_when_the_active_one_dies() {
    let mut env = Env::new("standby");
    let job = "standby";
    let shape = (256, 64, 256);
    for id in ["w1", "w2"] {
        let mut s = env.consumer(id);
        s.delay = "50ms".parse().unwrap();
        env.spawn_consumer(s);
    }
    let mut active = collector_proc(&env, job, "active");
    gemmq_producer::run(&env.producer(job, shape, 32))
        .await
        .unwrap();
    active.wait_for("collecting", 1, MINUTE).await;
    let mut standby = collector_proc(&env, job, "standby");
    standby.wait_for("standing by", 1, MINUTE).await;
    wait_for_journal(&env, job, 10).await;
    active.signal("KILL");
    active.wait(MINUTE).await;

    assert_eq!(standby.wait(MINUTE).await, Some(0), "{}", standby.log());
    assert!(standby.log().contains("resuming from the checkpoint"));
    complete_and_clean_up(&mut env, job, shape).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_killed_mid_publish_and_run_again_completes_the_job_once() {
    let mut env = Env::new("killproducer");
    let job = "killproducer";
    let shape = (512, 128, 512);
    let args = [
        "--job-id",
        job,
        "--m",
        "512",
        "--k",
        "128",
        "--n",
        "512",
        "--tile",
        "16",
        "--seed",
        "7",
        "--confirm-window",
        "1",
        // 256 messages of 4 tasks (auto would make 16 of 64): many to kill the producer amid,
        // and a re-run that must publish the same groups again.
        "--group",
        "4",
    ];
    let mut first = env.spawn("gemmq-producer", "producer-1", &args);
    let ch = env.channel().await;
    env.topology().declare(&ch).await.unwrap();
    let queue = env.topology().tasks_queue();
    let started = Instant::now();
    loop {
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::durable()
                },
                FieldTable::default(),
            )
            .await;
        if q.is_ok_and(|q| q.message_count() >= 20) {
            break;
        }
        assert!(started.elapsed() < MINUTE, "the producer published nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.signal("KILL");
    assert_eq!(
        first.wait(MINUTE).await,
        None,
        "killed mid-publish, not finished"
    );

    let mut second = env.spawn("gemmq-producer", "producer-2", &args);
    assert_eq!(second.wait(MINUTE).await, Some(0), "{}", second.log());
    assert!(
        second
            .log()
            .contains("job already announced with the same plan")
    );
    // It carries on the run the first one announced, so that workers keep the blocks they have.
    let manifest = gemmq::job::peek_manifest(&ch, &env.topology(), job)
        .await
        .expect("the manifest is readable")
        .expect("the job has its manifest");
    assert_eq!(manifest.run.len(), 16);
    assert!(
        second.log().contains(&format!("run={}", manifest.run)),
        "{}",
        second.log()
    );
    for id in ["w1", "w2"] {
        env.spawn_consumer(env.consumer(id));
    }
    let summary = gemmq_collector::run(&env.collector(job), env.stop.clone())
        .await
        .unwrap();
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.tasks_done, 1024);
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(err <= TOLERANCE, "{err:e}");
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_a_worker_and_a_collector_gracefully_and_nothing_is_lost() {
    let mut env = Env::new("graceful");
    let job = "graceful";
    let shape = (128, 64, 128);
    let mut worker = env.spawn(
        "gemmq-consumer",
        "worker",
        &[
            "--worker-id",
            "graceful",
            "--queue-size",
            "4",
            "--delay",
            "1s",
            "--shutdown-timeout",
            "5s",
        ],
    );
    let mut collector = collector_proc(&env, job, "collector-1");
    gemmq_producer::run(&env.producer(job, shape, 32))
        .await
        .unwrap();
    worker.wait_for("task received", 4, MINUTE).await;
    let t = Instant::now();
    worker.signal("TERM");
    assert_eq!(worker.wait(MINUTE).await, Some(0), "{}", worker.log());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the task in hand takes 1 s; the rest are handed back at once"
    );
    assert!(
        worker.log().contains("stopped consuming"),
        "{}",
        worker.log()
    );

    collector.signal("TERM");
    assert_eq!(collector.wait(MINUTE).await, Some(1));
    assert!(
        collector
            .log()
            .contains("run the collector again with --job-id graceful to resume"),
        "{}",
        collector.log()
    );

    env.spawn_consumer(env.consumer("w2"));
    let mut again = collector_proc(&env, job, "collector-2");
    assert_eq!(again.wait(MINUTE).await, Some(0), "{}", again.log());
    complete_and_clean_up(&mut env, job, shape).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operand_stream_deleted_mid_publish_is_declared_again_with_every_block() {
    let mut env = Env::new("streamgone");
    let job = "streamgone";
    let shape = SLOW_JOB;
    // One confirm at a time: the stream goes while blocks are still to come.
    let producer = publish_slowly(&env, job);
    let ch = tasks_queued(&env, 100).await;
    ch.queue_delete(
        env.topology().operands_queue(job).as_str().into(),
        Default::default(),
    )
    .await
    .expect("the operand stream is deleted");
    let receipt = publishing_ends(producer).await;
    assert_eq!(receipt.tasks, 1024);
    assert!(receipt.tries >= 2, "publishing was never interrupted");

    // A worker started now saw no block go by: it reads every one from the stream, which must
    // hold those published before it was deleted too.
    env.spawn_consumer(env.consumer("late"));
    collect_all_1024_tiles_once(env, job, shape).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_deleted_while_a_worker_reads_it_is_noticed_and_refilled() {
    let mut env = Env::new("livecheck");
    let job = "livecheck";
    let shape = SLOW_JOB;
    env.spawn_consumer(env.consumer("live"));
    let topo = env.topology();
    let started = Instant::now();
    let producer = publish_slowly(&env, job);
    let ch = env.channel().await;
    // No collector yet: a result in the results stream shows the worker has read blocks.
    let results = topo.results_queue(job);
    loop {
        let announced = gemmq::topology::queue_exists(&env.channel().await, &results)
            .await
            .unwrap();
        if announced && common::result_tiles(&env, &results).await >= 1 {
            break;
        }
        assert!(started.elapsed() < MINUTE, "no results came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ch.queue_delete(topo.operands_queue(job).as_str().into(), Default::default())
        .await
        .expect("the operand stream is deleted");
    let receipt = publishing_ends(producer).await;
    assert_eq!(receipt.tasks, 1024);
    if receipt.tries < 2 {
        // The producer had confirmed its last message before the stream went (on a loaded
        // machine the worker can trail it): running it again is how an operator refills a
        // running job's stream, and must find it gone and publish every block again.
        let again = gemmq_producer::run(&slow_producer(&env, job))
            .await
            .expect("the producer run again refills the stream");
        assert_eq!(again.tasks, 1024);
    }
    // Late workers read the stream: it must hold every block again, including those published
    // before it was deleted.
    let (_, distinct) = blocks_in_stream(&env, job, 64).await;
    assert_eq!(distinct, 64);

    collect_all_1024_tiles_once(env, job, shape).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unroutable_task_is_published_again_without_publishing_the_blocks_again() {
    let mut env = Env::new("taskroute");
    let job = "taskroute";
    let shape = SLOW_JOB;
    let producer = publish_slowly(&env, job);
    let ch = tasks_queued(&env, 100).await;
    let topo = env.topology();
    let tasks = topo.tasks_queue();
    // The next task finds no queue: it comes back unroutable and fails the producer's try,
    // whose next one declares the binding again.
    ch.queue_unbind(
        tasks.as_str().into(),
        topo.tasks_exchange().as_str().into(),
        gemmq::topology::TASK_KEY.into(),
        FieldTable::default(),
    )
    .await
    .expect("the tasks queue is unbound");
    let receipt = publishing_ends(producer).await;
    assert_eq!(receipt.tasks, 1024);
    assert!(receipt.tries >= 2, "publishing was never interrupted");
    // 32 blocks of A and 32 of B, each once: a task that found no queue says nothing about
    // the stream.
    assert_eq!(
        blocks_in_stream(&env, job, 64).await,
        (64, 64),
        "every block once"
    );

    env.spawn_consumer(env.consumer("w1"));
    collect_all_1024_tiles_once(env, job, shape).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_finds_a_running_jobs_stream_missing_retries_its_tasks_instead_of_dropping_them()
 {
    let mut env = Env::new("nostream");
    let job = "nostream";
    let shape = (64, 32, 64);
    // Published with no worker running, then the stream is deleted: the job is still running
    // (its results queue is there), only its record of blocks is gone.
    let receipt = gemmq_producer::run(&env.producer(job, shape, 16))
        .await
        .expect("the job is published");
    let ch = env.channel().await;
    ch.queue_delete(
        env.topology().operands_queue(job).as_str().into(),
        Default::default(),
    )
    .await
    .expect("the operand stream is deleted");
    let mut w = env.consumer("w1");
    w.max_attempts = 100; // retried every 200 ms until the blocks are back
    env.spawn_consumer(w);
    let tasks = env.topology().tasks_queue();
    let retry = env.topology().retry_queue();
    let started = Instant::now();
    // The worker's tasks go round the retry queue while the stream is missing.
    loop {
        let waiting = common::message_count(&ch, &retry).await;
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < MINUTE,
            "no task was retried ({} still queued)",
            common::message_count(&ch, &tasks).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Running the producer again declares the stream and publishes the blocks (and the tasks)
    // again; the retried tasks then find their blocks.
    gemmq_producer::run(&env.producer(job, shape, 16))
        .await
        .expect("the job is published again");
    let summary = tokio::time::timeout(
        MINUTE,
        gemmq_collector::run(&env.collector(job), env.stop.clone()),
    )
    .await
    .expect("the job finishes within a minute")
    .unwrap();
    assert_eq!(summary.status, Outcome::Complete, "{summary:?}");
    assert_eq!(summary.tasks_done, receipt.tasks);
    assert!(summary.parked.is_empty());
    let stats = env.stop_consumers().await;
    let retried: u64 = stats
        .iter()
        .map(|s| s.retried.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(
        retried > 0,
        "the tasks were retried, not dropped as if the job were gone"
    );
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(err <= TOLERANCE, "{err:e}");
    env.cleanup(&[job]).await;
}
