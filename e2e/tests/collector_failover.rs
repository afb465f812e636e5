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
        b.log().contains("another collector collected it"),
        "{}",
        b.log()
    );
    assert!(!env.dir.path().join(&b_out).join("C.npy").exists());
    finished_exactly(&mut env, job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_of_a_cancelled_job_says_so_and_exits_5_unless_its_producer_runs_it_again() {
    let mut env = Env::new("cf-cancelled");
    let job = "cfcancelled";
    // Published with no worker running; a stand-in for the collector assembling it holds its
    // claim, and a real collector stands by.
    gemmq_producer::run(&env.producer(job, SHAPE, 16))
        .await
        .unwrap();
    let topo = env.topology();
    let broker = gemmq::broker::Broker::new(&env.broker, "gemmq-test").unwrap();
    let holder = broker.connection().await.unwrap();
    let claim = holder.create_channel().await.unwrap();
    assert!(topo.claim_job(&claim, job).await.unwrap());
    let mut standby = collector(&env, job, "standby", "collector-standby");
    standby.wait_for("standing by", 1, MINUTE).await;

    // What a cancel does while it holds the claim (gemmq-collector cancel itself is refused
    // while the standby could take the claim first): the mark, the job's queues deleted.
    topo.mark_cancelled(&claim, job).await.unwrap();
    for queue in topo.job_queues(job) {
        claim
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    let _ = holder.close(200, "cancelled".into()).await;
    assert_eq!(standby.wait(MINUTE).await, Some(5), "{}", standby.log());
    assert!(standby.log().contains("was cancelled"), "{}", standby.log());

    // Started after the cancel, a collector says so, waits in case the job is run again, and
    // at its idle timeout gives up as cancelled rather than as never announced.
    let mut late = env.spawn(
        "gemmq-collector",
        "collector-late",
        &["--job-id", job, "--out", "late", "--idle-timeout", "2s"],
    );
    late.wait_for("the job was cancelled", 1, MINUTE).await;
    assert_eq!(late.wait(MINUTE).await, Some(5), "{}", late.log());
    assert!(late.log().contains("was cancelled"), "{}", late.log());

    // Its producer run again, with a collector already waiting for the job, makes it a job
    // again, collected whole (the cancelled run's tasks still queued are the same tasks: the
    // first result of each tile counts).
    let mut again = collector(&env, job, job, "collector-again");
    again.wait_for("the job was cancelled", 1, MINUTE).await;
    gemmq_producer::run(&env.producer(job, SHAPE, 16))
        .await
        .unwrap();
    let conn = broker.connection().await.unwrap();
    assert!(
        !topo.is_cancelled(&conn, job).await,
        "announcing the job again removes the mark"
    );
    let _workers = worker_procs(&env, "again");
    assert_eq!(again.wait(MINUTE).await, Some(0), "{}", again.log());
    finished_exactly(&mut env, job).await;
}

/// The stream offset the checkpoint in `job/` has read through (its journal's last `O` line).
fn last_offset_journaled(env: &Env, job: &str) -> u64 {
    let journal = gemmq_collector::checkpoint_dir(&env.dir.path().join(job), job).join("journal");
    std::fs::read_to_string(journal)
        .unwrap()
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("O "))
        .find_map(|l| l.split(' ').next()?.parse().ok())
        .expect("the journal records the stream offset")
}

/// Two worker processes computing a tile in 20 ms each.
fn worker_procs(env: &Env, tag: &str) -> Vec<Proc> {
    ["w1", "w2"]
        .iter()
        .map(|id| {
            env.spawn(
                "gemmq-consumer",
                &format!("{id}-{tag}"),
                &["--worker-id", id, "--delay", "20ms"],
            )
        })
        .collect()
}

/// Every message of a stream, front to back, with its properties.
async fn read_all(env: &Env, stream: &str) -> Vec<(Vec<u8>, lapin::BasicProperties)> {
    use futures_util::StreamExt;
    let ch = env.channel().await;
    ch.basic_qos(1000, Default::default()).await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-stream-offset".into(), gemmq::topology::text("first"));
    let mut feed = ch
        .basic_consume(stream.into(), "".into(), Default::default(), args)
        .await
        .unwrap();
    let mut all = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), feed.next()).await
    {
        all.push((d.data, d.properties));
    }
    let _ = ch.close(200, "read".into()).await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_does_not_trust_its_offset_in_a_results_stream_declared_anew() {
    let mut env = Env::new("cf-anew");
    let job = "cfanew";
    let topo = env.topology();
    let mut workers = worker_procs(&env, "a");
    let mut a = collector(&env, job, job, "collector-a");
    gemmq_producer::run(&env.producer(job, SHAPE, 16))
        .await
        .unwrap();
    journaled(&env, job, job, 20).await;
    a.signal("KILL");
    a.wait(MINUTE).await;
    // Every result computed so far is in the stream once the workers have stopped cleanly.
    for w in &workers {
        w.signal("TERM");
    }
    for w in &mut workers {
        assert_eq!(w.wait(MINUTE).await, Some(0), "{}", w.log());
    }

    // The stream is deleted and declared again holding the same results in another order: the
    // ones the checkpoint does not hold first, at offsets it has read past. A collector that
    // trusted its offset would skip them and never complete.
    let read_through = last_offset_journaled(&env, job);
    let stream = topo.results_queue(job);
    let mut held = read_all(&env, &stream).await;
    assert!(
        held.len() as u64 > read_through + 1,
        "some results are not in the checkpoint"
    );
    held.rotate_left(read_through as usize + 1);
    let ch = env.channel().await;
    ch.queue_delete(stream.as_str().into(), Default::default())
        .await
        .unwrap();
    topo.declare_job(&ch, job).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for (body, props) in held {
        gemmq::broker::publish_confirmed(&ch, "", &stream, &body, props, "a result")
            .await
            .unwrap();
    }

    let _workers = worker_procs(&env, "b");
    let mut again = collector(&env, job, job, "collector-a-again");
    assert_eq!(again.wait(MINUTE).await, Some(0), "{}", again.log());
    assert!(
        again
            .log()
            .contains("reading the job's results again from the start"),
        "{}",
        again.log()
    );
    finished_exactly(&mut env, job).await;
}
