//! Jobs as users bring them: their own .npy files, f32, two jobs at once on the same workers,
//! and the collector's progress on a terminal. (A wrong tile: healing.rs.)

mod common;

use std::time::Duration;

use common::{Env, run_job_with};
use gemmq::DType;
use gemmq::matrix::Matrix;
use gemmq_collector::Outcome;

/// The largest |C − A·B| relative to the largest |A·B|, C read from `out/C.npy`.
fn relative_error(c_npy: &std::path::Path, a: &Matrix, b: &Matrix) -> f64 {
    let want = a.dot(b).expect("A and B conform");
    let got = Matrix::read_npy(c_npy).expect("C.npy is readable");
    match (want, got) {
        (Matrix::F64(w), Matrix::F64(g)) => {
            assert_eq!(g.dim(), w.dim());
            let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            (&g - &w).iter().fold(0.0f64, |m, d| m.max(d.abs())) / scale
        }
        (Matrix::F32(w), Matrix::F32(g)) => {
            assert_eq!(g.dim(), w.dim());
            let scale = w.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            ((&g - &w).iter().fold(0.0f32, |m, d| m.max(d.abs())) / scale) as f64
        }
        _ => panic!("C has another dtype than A and B"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_from_the_users_npy_files_gives_exactly_their_product() {
    let mut env = Env::new("npy");
    env.spawn_consumer(env.consumer("w1"));
    env.spawn_consumer(env.consumer("w2"));
    // Files as numpy would write them, of a shape no seed made.
    let (a, b) = gemmq::matrix::generate(70, 45, 33, DType::F64, 11);
    let (a_path, b_path) = (env.dir.path().join("A.npy"), env.dir.path().join("B.npy"));
    a.write_npy(&a_path).unwrap();
    b.write_npy(&b_path).unwrap();
    let mut p = env.producer("npy", (0, 0, 0), 16);
    p.source = gemmq_producer::Source::Files {
        a: a_path,
        b: b_path,
    };
    let (receipt, summary) = run_job_with(&env, p, env.collector("npy")).await;

    assert_eq!(
        (
            receipt.manifest.plan.m,
            receipt.manifest.plan.k,
            receipt.manifest.plan.n
        ),
        (70, 45, 33),
        "the plan is the files' shapes"
    );
    assert_eq!(summary.status, Outcome::Complete);
    let err = relative_error(&env.dir.path().join("npy/C.npy"), &a, &b);
    assert!(err <= 1e-14, "|C - A·B| / |A·B| = {err:e}");
    env.stop_consumers().await;
    env.cleanup(&["npy"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_f32_job_is_computed_and_written_in_f32() {
    let mut env = Env::new("f32");
    env.spawn_consumer(env.consumer("w1"));
    let mut p = env.producer("f32", (96, 80, 64), 32);
    p.source = gemmq_producer::Source::Seed {
        m: 96,
        k: 80,
        n: 64,
        dtype: DType::F32,
        seed: 3,
    };
    let (_, summary) = run_job_with(&env, p, env.collector("f32")).await;

    assert_eq!(summary.status, Outcome::Complete);
    assert_eq!(summary.dtype, DType::F32);
    let (a, b) = gemmq::matrix::generate(96, 80, 64, DType::F32, 3);
    let c_npy = env.dir.path().join("f32/C.npy");
    assert!(matches!(Matrix::read_npy(&c_npy).unwrap(), Matrix::F32(_)));
    // k = 80 terms in f32: a few ulps of the largest entry.
    let err = relative_error(&c_npy, &a, &b);
    assert!(err <= 1e-5, "|C - A·B| / |A·B| = {err:e}");
    env.stop_consumers().await;
    env.cleanup(&["f32"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_jobs_at_once_on_the_same_workers_each_get_their_own_c() {
    let mut env = Env::new("two");
    env.spawn_consumer(env.consumer("w1"));
    env.spawn_consumer(env.consumer("w2"));
    let (one, two) = tokio::join!(
        run_job_with(
            &env,
            env.seeded_producer("one", (64, 48, 64), 16, 1),
            env.collector("one")
        ),
        run_job_with(
            &env,
            env.seeded_producer("two", (64, 48, 64), 16, 2),
            env.collector("two")
        ),
    );
    for (job, seed, (_, summary)) in [("one", 1, one), ("two", 2, two)] {
        assert_eq!(summary.status, Outcome::Complete, "{job}");
        assert_eq!(summary.tasks_done, 16, "{job}");
        let err = common::max_error_against_seed(&env, job, (64, 48, 64), seed);
        assert!(err <= 1e-10, "{job}: max |C - A·B| = {err:e}");
    }
    env.stop_consumers().await;
    env.cleanup(&["one", "two"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_terminal_the_collector_draws_a_progress_bar() {
    let mut env = Env::new("bar");
    env.spawn_consumer(env.consumer("w1"));
    let out = env.dir.path().join("bar");
    // `script` gives the collector a terminal (a pseudo-terminal) and copies what it draws.
    let command = format!(
        "{} --job-id bar --out {}",
        common::bin("gemmq-collector").display(),
        out.display()
    );
    let collector = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("GEMMQ_NAMESPACE", &env.ns)
        .env(
            "GEMMQ_RETRY_DELAY",
            format!("{}ms", env.broker.retry_delay.as_millis()),
        )
        .env(
            "GEMMQ_MAX_MESSAGE_BYTES",
            env.broker.max_message_bytes.to_string(),
        )
        .env_remove("GEMMQ_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    gemmq_producer::run(&env.producer("bar", (64, 32, 64), 16))
        .await
        .expect("the producer publishes the job");
    let done = tokio::task::spawn_blocking(move || collector.wait_with_output());
    let output = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .expect("the collector finishes within a minute")
        .unwrap()
        .unwrap();
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    for drawn in ["[====", "16/16 tasks", "retries 0  parked 0"] {
        assert!(screen.contains(drawn), "the bar shows {drawn:?}:\n{screen}");
    }
    assert!(
        !screen.contains("progress done="),
        "no progress log lines on a terminal:\n{screen}"
    );
    env.stop_consumers().await;
    env.cleanup(&["bar"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_leaves_no_queue_of_its_own_and_its_queued_tasks_are_dropped_not_computed()
{
    use gemmq_collector::cancel::{Cancelled, cancel};
    use std::sync::atomic::Ordering::Relaxed;

    let mut env = Env::new("cancel");
    // Published with no worker running: every task waits in the shared queue. Blocks of 2 MiB,
    // which a worker reads one by one at their offsets (several at once), not by a sweep.
    gemmq_producer::run(&env.producer("gone", (1024, 1024, 1024), 256))
        .await
        .expect("the producer publishes the job");
    let topo = env.topology();
    let ch = env.channel().await;
    let queued = common::message_count(&ch, &topo.tasks_queue()).await;
    assert!(queued > 0, "the job's tasks wait for a worker");
    let broker = gemmq::broker::Broker::new(&env.broker, "gemmq-test").unwrap();

    // A collector assembling the job holds its claim: cancelling is refused, and says why.
    let collector = broker.connection().await.unwrap();
    let claim = collector.create_channel().await.unwrap();
    assert!(topo.claim_job(&claim, "gone").await.unwrap());
    let refused = cancel(&broker, &topo, "gone").await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("held by a running collector"),
        "{refused:#}"
    );
    let _ = collector.close(200, "collector stopped".into()).await;

    assert_eq!(
        cancel(&broker, &topo, "gone").await.unwrap(),
        Cancelled::Removed
    );
    for queue in topo.job_queues("gone") {
        let ch = env.channel().await;
        assert!(
            !gemmq::topology::queue_exists(&ch, &queue).await.unwrap(),
            "{queue} is deleted"
        );
    }
    let conn = broker.connection().await.unwrap();
    assert!(
        topo.is_cancelled(&conn, "gone").await,
        "the cancel leaves its mark"
    );
    assert_eq!(
        cancel(&broker, &topo, "gone").await.unwrap(),
        Cancelled::NoSuchJob,
        "cancelling again finds nothing"
    );

    // A worker started now drops every task of the job, each received once, on one connection
    // throughout: its whole prefetch of them at once finds no stream. (Asked all at once whether
    // the job was gone, the worker program reconnected 7 to 9 times a run and retried tasks.)
    let mut worker = env.consumer("w1");
    worker.queue_size = 32;
    env.spawn_consumer(worker);
    let drained = async {
        while common::message_count(&env.channel().await, &topo.tasks_queue()).await > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), drained)
        .await
        .expect("the worker takes every task of the cancelled job");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = env.stop_consumers().await;
    let s = &stats[0];
    assert_eq!(
        (
            s.received.load(Relaxed),
            s.done.load(Relaxed),
            s.retried.load(Relaxed),
            s.parked.load(Relaxed),
            s.connections.load(Relaxed)
        ),
        (u64::from(queued), 0, 0, 0, 1),
        "each task received once; none computed, retried or parked; no reconnection"
    );
    let ch = env.channel().await;
    assert_eq!(
        common::message_count(&ch, &topo.tasks_queue()).await,
        0,
        "the worker acked every task it dropped (a task it held when it stopped would be back)"
    );
    assert_eq!(common::message_count(&ch, &topo.parked_queue()).await, 0);
    assert_eq!(common::message_count(&ch, &topo.retry_queue()).await, 0);
    env.cleanup(&["gone"]).await;
}
