//! `gemmq-collector status`: live workers from heartbeats, queue figures from the management API.

mod common;

use std::time::Duration;

use common::Env;
use gemmq_collector::status::{self, Watcher};

fn worker(env: &Env, id: &str, queue_size: &str) -> common::Proc {
    env.spawn(
        "gemmq-consumer",
        id,
        &[
            "--worker-id",
            id,
            "--queue-size",
            queue_size,
            "--heartbeat",
            "300ms",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_lists_live_workers_with_their_prefetch_and_the_queues() {
    let mut env = Env::new("status");
    let a = worker(&env, "alpha", "3");
    let b = worker(&env, "beta", "7");
    a.wait_for("consuming tasks", 1, Duration::from_secs(30))
        .await;
    b.wait_for("consuming tasks", 1, Duration::from_secs(30))
        .await;

    // The command as a script would call it.
    let out = std::process::Command::new(common::bin("gemmq-collector"))
        .args(["status", "--once", "--json", "--listen", "1s"])
        .env("GEMMQ_NAMESPACE", &env.ns)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let workers = snap["workers"].as_array().unwrap();
    let prefetch = |id: &str| {
        workers
            .iter()
            .find(|w| w["worker"] == id)
            .map(|w| w["queue_size"].clone())
    };
    assert_eq!(prefetch("alpha"), Some(3.into()), "{snap:#}");
    assert_eq!(prefetch("beta"), Some(7.into()), "{snap:#}");
    let nodes = snap["nodes"]
        .as_array()
        .expect("the broker's nodes are listed");
    assert!(
        !nodes.is_empty() && nodes.iter().all(|n| n["running"] == true),
        "the one broker node is up: {snap:#}"
    );
    let queues: Vec<&str> = snap["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(
        queues.contains(&format!("{}.tasks", env.ns).as_str()),
        "{queues:?}"
    );
    assert!(
        queues.contains(&format!("{}.retry", env.ns).as_str()),
        "{queues:?}"
    );
    // The figures, not only the names: the task queue's two consumers, once the management
    // API's statistics (refreshed every ~5 s) have caught up.
    let tasks = format!("{}.tasks", env.ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let figures = loop {
        let all = status::queue_figures(&env.broker, common::broker::management_url().as_deref())
            .await
            .expect("the management API answers");
        let q = all
            .into_iter()
            .find(|q| q.name == tasks)
            .expect("the task queue is listed");
        if q.consumers == 2 || std::time::Instant::now() > deadline {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(figures.consumers, 2, "{figures:?}");
    assert_eq!(
        (figures.messages_ready, figures.messages_unacknowledged),
        (0, 0),
        "no job, no tasks: {figures:?}"
    );
    assert!(
        figures.purpose.contains("waiting for a worker"),
        "{figures:?}"
    );
    // A quorum queue lists its replicas, every one of them up on a healthy broker.
    assert!(
        !figures.members.is_empty() && figures.online.len() == figures.members.len(),
        "{figures:?}"
    );
    assert_eq!(
        figures.replicas(),
        format!("{0}/{0}", figures.members.len())
    );
    drop((a, b));
    env.cleanup(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_drops_out_within_three_heartbeats_and_a_stopped_one_at_once() {
    let mut env = Env::new("status-live");
    let a = worker(&env, "doomed", "10");
    let mut b = worker(&env, "leaving", "10");
    let mut watch = Watcher::new(&env.broker).await.unwrap();
    watch.pump(Duration::from_secs(1)).await.unwrap();
    let names = |w: &Watcher| w.alive().into_iter().map(|s| s.worker).collect::<Vec<_>>();
    assert_eq!(names(&watch), ["doomed", "leaving"]);

    a.signal("KILL");
    // 3 missed heartbeats of 300 ms, and one more interval for the last one in flight.
    watch.pump(Duration::from_millis(1300)).await.unwrap();
    assert_eq!(names(&watch), ["leaving"]);

    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(30)).await, Some(0));
    watch.pump(Duration::from_millis(200)).await.unwrap();
    assert!(
        names(&watch).is_empty(),
        "a worker that stops says so: {:?}",
        names(&watch)
    );

    // A new worker appears within a heartbeat or two.
    let _c = worker(&env, "newcomer", "10");
    watch.pump(Duration::from_secs(2)).await.unwrap();
    assert_eq!(names(&watch), ["newcomer"]);
    let snap = status::snapshot(
        &env.broker,
        Duration::from_millis(800),
        common::broker::management_url().as_deref(),
    )
    .await
    .unwrap();
    assert_eq!(snap.workers.len(), 1);
    env.cleanup(&[]).await;
}
