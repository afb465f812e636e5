//! Bad messages never crash a program, never block the queue and are never lost silently:
//! a bad task is parked with a reason that names the problem, a bad result is dropped and counted.

mod common;

use std::time::{Duration, Instant};

use common::{Env, run_job};
use gemmq::DType;
use gemmq::TileId;
use gemmq::message::{self, Header, ResultHeader, TaskHeader};
use gemmq::topology::{TASK_KEY, header_str};
use gemmq_collector::Outcome;
use lapin::options::{BasicGetOptions, BasicPublishOptions};

fn task(job: &str, rows: u32, cols: u32, depth: u32) -> Header {
    Header::InlineTask(TaskHeader {
        job: job.into(),
        run: String::new(),
        tile: TileId {
            row: 0,
            col: 0,
            part: 0,
        },
        dtype: DType::F64,
        rows,
        cols,
        depth,
        at: None,
        recompute: 0,
    })
}

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_tasks_are_parked_with_the_problem_named_and_the_worker_carries_on() {
    let mut env = Env::new("badtasks");
    let topo = env.topology();
    let ch = env.channel().await;
    topo.declare(&ch).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();

    let mut wrong_version = message::encode(&task("j", 1, 1, 1), &[&[0u8; 16]]);
    wrong_version[3] = 9;
    let mut bad_json = b"GMQ\x01".to_vec();
    bad_json.extend_from_slice(&5u32.to_le_bytes());
    bad_json.extend_from_slice(b"{nope");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"{\"a\": [[1, 2]], \"b\": [[3], [4]]}".to_vec(),
            "not a gemmq message",
        ),
        (wrong_version, "unsupported message version 9"),
        (
            message::encode(&task("j", 2, 2, 2), &[&[0u8; 10]]),
            "payload is 10 bytes but the header's dimensions need 64",
        ),
        (
            message::encode(&task("j", u32::MAX, u32::MAX, 1), &[]),
            "would exceed",
        ),
        (bad_json, "malformed header"),
        (
            message::encode(&task("no spaces allowed", 1, 1, 1), &[&[0u8; 16]]),
            "job",
        ),
    ];
    for (body, _) in &cases {
        publish(&ch, &topo.tasks_exchange(), TASK_KEY, body).await;
    }
    env.spawn_consumer(env.consumer("w1"));

    // The same worker then computes a whole job: bad tasks did not stop it.
    let (_, summary) = run_job(&env, "after", (64, 32, 64), 32).await;
    assert_eq!(summary.status, Outcome::Complete);

    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topo.parked_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        reasons.push(header_str(&m.delivery.properties, "x-gemmq-reason").unwrap_or_default());
    }
    assert_eq!(
        reasons.len(),
        cases.len(),
        "every bad task is in the parking lot: {reasons:#?}"
    );
    for (_, says) in &cases {
        assert!(
            reasons.iter().any(|r| r.contains(says)),
            "no parked reason mentions {says:?}: {reasons:#?}"
        );
    }
    env.stop_consumers().await;
    env.cleanup(&["after"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_for_a_job_that_no_longer_exists_is_dropped_not_retried_forever() {
    let mut env = Env::new("nojob");
    let topo = env.topology();
    let ch = env.channel().await;
    topo.declare(&ch).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let body = message::encode(&task("finished-long-ago", 1, 1, 1), &[&[0u8; 16]]);
    publish(&ch, &topo.tasks_exchange(), TASK_KEY, &body).await;
    env.spawn_consumer(env.consumer("w1"));

    let started = Instant::now();
    while common::message_count(&ch, &topo.tasks_queue()).await
        + common::message_count(&ch, &topo.retry_queue()).await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the task was never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = env.stop_consumers().await;
    assert_eq!(
        stats[0].parked.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        stats[0].retried.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(common::message_count(&ch, &topo.tasks_queue()).await, 0);
    env.cleanup(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_on_a_results_queue_is_dropped_and_counted_and_the_job_still_completes() {
    let mut env = Env::new("badresults");
    let topo = env.topology();
    let job = "badresults";
    let ch = env.channel().await;
    topo.declare(&ch).await.unwrap();
    topo.declare_job(&ch, job).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let result = |job: &str, row: u32, rows: u32| {
        Header::TileResult(ResultHeader {
            job: job.into(),
            run: String::new(),
            tile: TileId {
                row,
                col: 0,
                part: 0,
            },
            dtype: DType::F64,
            rows,
            cols: 32,
            worker: "liar".into(),
            attempt: 1,
            compute_micros: 0,
            recompute: 0,
        })
    };
    // A tile that fits, from a task of an earlier job under the same id (another run): its zeros
    // would be taken for tile (0, 0) and fail the check.
    let mut stale = result(job, 0, 32);
    if let Header::TileResult(h) = &mut stale {
        h.run = "0123456789abcdef".into();
    }
    let junk = [
        b"garbage".to_vec(),
        message::encode(&stale, &[&vec![0u8; 32 * 32 * 8]]),
        message::encode(&result(job, 7, 32), &[&vec![0u8; 32 * 32 * 8]]), // no row 7 in a 2x2 grid
        message::encode(&result(job, 0, 31), &[&vec![0u8; 31 * 32 * 8]]), // tile 0 has 32 rows
        message::encode(&result("some-other-job", 0, 32), &[&vec![0u8; 32 * 32 * 8]]),
    ];
    for body in &junk {
        publish(&ch, &topo.results_exchange(), job, body).await;
    }
    env.spawn_consumer(env.consumer("w1"));
    let (_, summary) = run_job(&env, job, (64, 32, 64), 32).await;
    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.rejected_messages, 5);
    assert!(
        summary.verification.unwrap().passed,
        "no junk made it into C"
    );
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_kept_crashing_its_workers_is_parked_not_run_again() {
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    let mut env = Env::new("crashloop");
    let topo = env.topology();
    let ch = env.channel().await;
    topo.declare(&ch).await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    // What the broker writes after dead-lettering a task at its delivery limit, six times.
    let mut death = FieldTable::default();
    death.insert("queue".into(), gemmq::topology::text(&topo.tasks_queue()));
    death.insert("reason".into(), gemmq::topology::text("delivery_limit"));
    death.insert("count".into(), AMQPValue::LongLongInt(6));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    let body = message::encode(&task("crashy", 1, 1, 1), &[&[0u8; 16]]);
    ch.basic_publish(
        topo.tasks_exchange().as_str().into(),
        TASK_KEY.into(),
        BasicPublishOptions::default(),
        &body,
        lapin::BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    env.spawn_consumer(env.consumer("w1")); // max attempts 5 < 7

    let started = Instant::now();
    let parked = loop {
        if let Some(m) = ch
            .basic_get(
                topo.parked_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the task was not parked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = header_str(&parked.delivery.properties, "x-gemmq-reason").unwrap();
    assert!(
        reason.contains("crashed or stalled its workers"),
        "{reason}"
    );
    let stats = env.stop_consumers().await;
    assert_eq!(
        stats[0].done.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "it was not run again"
    );
    env.cleanup(&[]).await;
}

/// Deletes the test's broker user however the test ends.
struct TempUser(&'static str);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = common::broker::rabbitmqctl(&["delete_user", self.0]);
    }
}

/// Runs a program to its end, killing it if it is still running after `limit`.
fn run_for(mut cmd: std::process::Command, limit: Duration) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the program starts");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (status, err, started.elapsed())
}

#[test]
fn a_user_who_may_not_declare_the_topology_is_told_how_to_fix_it_and_nothing_retries_forever() {
    let ctl = common::broker::rabbitmqctl_ok;
    let user = TempUser("gemmq-test-no-configure");
    let _ = ctl(&["delete_user", user.0]);
    assert!(ctl(&["add_user", user.0, "pw"]));
    // May read and write, may not declare (configure) anything.
    assert!(ctl(&[
        "set_permissions",
        "-p",
        "/",
        user.0,
        "^$",
        ".*",
        ".*"
    ]));
    let url = common::broker::amqp_url_as(user.0, "pw");
    let ns = format!("t-perm-{}", std::process::id());
    for (program, args) in [
        ("gemmq-producer", &["--m", "8", "--k", "8", "--n", "8"][..]),
        ("gemmq-consumer", &[][..]),
        ("gemmq-collector", &["--job-id", "j"][..]),
    ] {
        let mut cmd = std::process::Command::new(common::bin(program));
        cmd.args(args)
            .env("AMQP_URL", &url)
            .env("GEMMQ_NAMESPACE", &ns)
            .env("RUST_LOG", "info");
        let (code, err, took) = run_for(cmd, Duration::from_secs(30));
        assert_eq!(code, Some(1), "{program} exits with an error:\n{err}");
        assert!(
            err.contains("refused to let this user declare") && err.contains("set_permissions"),
            "{program} says what is wrong and what to do:\n{err}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{program} did not retry: {took:?}"
        );
    }
}
