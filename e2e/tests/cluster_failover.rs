//! A job on a real 3-node RabbitMQ cluster that loses, mid-job, the node every program is
//! connected to: the workers and the collector carry on through the other nodes, and C is exact
//! with each tile counted once — whether the node comes back or stays down to the end.
//!
//! Needs the cluster of `scripts/cluster.sh up` and these variables, which `.ci/run` sets;
//! without them the tests say so and pass:
//!
//! | variable | what |
//! |---|---|
//! | `GEMMQ_CLUSTER_URLS` | every node's AMQP URL, comma-separated, the node to lose first |
//! | `GEMMQ_CLUSTER_MANAGEMENT_URL` | the management API of a node that stays up |
//! | `GEMMQ_CLUSTER_STOP` | a command that stops the first node (`scripts/cluster.sh stop 1`) |
//! | `GEMMQ_CLUSTER_START` | a command that starts it again and waits for it |

mod common;

use std::time::Duration;

use common::Env;
use gemmq_collector::{Outcome, status};

struct Cluster {
    urls: Vec<String>,
    management_url: String,
    stop: String,
    start: String,
}

/// The two scenarios share the cluster: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Cluster {
    fn from_env() -> Option<Cluster> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Some(Cluster {
            urls: var("GEMMQ_CLUSTER_URLS")?
                .split(',')
                .map(|u| u.trim().to_string())
                .collect(),
            management_url: var("GEMMQ_CLUSTER_MANAGEMENT_URL")?,
            stop: var("GEMMQ_CLUSTER_STOP")?,
            start: var("GEMMQ_CLUSTER_START")?,
        })
    }

    async fn run(command: &str) {
        let status = tokio::process::Command::new("sh")
            .args(["-c", command])
            .status()
            .await
            .expect("sh runs");
        assert!(status.success(), "`{command}` failed: {status}");
    }
}

/// Runs a 128-tile job with two workers (`per_tile` a tile) and the collector, every one given
/// the three nodes; stops the first node once a few tiles are done; starts it again after
/// `back_after` (and checks that the job was still running when the node was back), or only
/// once the job is over.
async fn lose_the_first_node_mid_job(name: &str, per_tile: &str, back_after: Option<Duration>) {
    let Some(cluster) = Cluster::from_env() else {
        eprintln!(
            "skipped: GEMMQ_CLUSTER_URLS and friends are not set (scripts/cluster.sh up; .ci/run sets them)"
        );
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    assert_eq!(cluster.urls.len(), 3, "three nodes");
    let mut env = Env::new(name);
    env.broker.amqp_urls = cluster.urls.clone();
    // What `gemmq-collector status` shows, asked of a node that stays up.
    let broker = env.broker.clone();
    let nodes = || status::nodes(&broker, Some(&cluster.management_url));
    let before = nodes().await.expect("the management API answers");
    assert!(
        before.iter().all(|n| n.running),
        "every node runs before the test: {before:?}"
    );
    for w in ["w1", "w2"] {
        let mut s = env.consumer(w);
        s.delay = per_tile.parse().unwrap();
        env.spawn_consumer(s);
    }
    let shape = (512, 64, 256);
    let mut p = env.producer(name, shape, 32);
    p.management_url = Some(cluster.management_url.clone());
    let c = env.collector(name);
    let stop = env.stop.clone();
    let collector = tokio::spawn(async move { gemmq_collector::run(&c, stop).await });
    let receipt = gemmq_producer::run(&p)
        .await
        .expect("the producer publishes");
    assert_eq!(receipt.tasks, 128);

    // Mid-job: 128 tiles over two workers take 64 tiles' time, at least 2 s.
    tokio::time::sleep(Duration::from_millis(400)).await;
    Cluster::run(&cluster.stop).await;
    let down = nodes().await.expect("the management API answers");
    assert_eq!(
        down.iter().filter(|n| !n.running).count(),
        1,
        "one node is down: {down:?}"
    );
    if let Some(after) = back_after {
        tokio::time::sleep(after).await;
        Cluster::run(&cluster.start).await;
        assert!(
            !collector.is_finished(),
            "the job was over before the node came back: make the tiles slower"
        );
    }

    let summary = tokio::time::timeout(Duration::from_secs(180), collector)
        .await
        .expect("the collector finishes within 3 minutes")
        .expect("collector task")
        .expect("the collector runs cleanly");
    if back_after.is_none() {
        Cluster::run(&cluster.start).await;
    }
    assert_eq!(summary.status, Outcome::Complete);
    assert!(summary.verification.as_ref().unwrap().passed);
    assert_eq!(summary.tasks_done, 128);
    assert_eq!(summary.tiles_complete, 128);
    let err = common::max_error_against_local_product(&env, name, shape);
    assert!(err <= 1e-10, "max |C - A·B| = {err:e}");
    env.stop_consumers().await;
    env.cleanup(&[name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_survives_losing_the_node_its_programs_use_until_it_comes_back() {
    // A node takes some seconds to start: 128 tiles at 200 ms over two workers take 12.8 s.
    lose_the_first_node_mid_job("node-back", "200ms", Some(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_finishes_on_the_other_nodes_when_the_lost_node_stays_down() {
    lose_the_first_node_mid_job("node-gone", "30ms", None).await;
}
