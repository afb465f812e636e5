//! A wrong tile is found, computed again and replaced: the collector exits 0 with C = A·B and
//! names who sent the wrong one. The wrong tile comes from a forger: before any worker starts, a
//! foreign client publishes a well-formed result of zeros for tile (0, 0) to the job's results,
//! so the collector takes it first and drops the right one as a duplicate.

mod common;

use std::time::Duration;

use common::Env;
use gemmq::TileId;
use gemmq::config::BrokerOptions;
use gemmq::message::{self, Header, ResultHeader};
use lapin::options::BasicPublishOptions;

const MINUTE: Duration = Duration::from_secs(60);

/// Publishes the job, then a result of zeros for its tile (0, 0) (each part of it) from
/// "forger", ahead of any worker's.
async fn forge_tile_0_0(
    env: &Env,
    job: &str,
    shape: (u64, u64, u64),
    tile: u64,
    inline: bool,
) -> u32 {
    let mut producer = env.producer(job, shape, tile);
    if inline {
        producer.operands = gemmq::tiling::Operands::Inline;
    }
    let receipt = gemmq_producer::run(&producer)
        .await
        .expect("the producer publishes the job");
    let plan = &receipt.manifest.plan;
    let ch = env.channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    for part in 0..plan.parts() {
        let header = Header::TileResult(ResultHeader {
            job: job.into(),
            run: receipt.manifest.run.clone(),
            tile: TileId {
                row: 0,
                col: 0,
                part,
            },
            dtype: plan.dtype,
            rows: tile as u32,
            cols: tile as u32,
            worker: "forger".into(),
            attempt: 1,
            compute_micros: 1,
            recompute: 0,
        });
        let zeros = vec![0u8; (tile * tile) as usize * plan.dtype.size()];
        ch.basic_publish(
            env.topology().results_exchange().as_str().into(),
            job.into(),
            BasicPublishOptions::default(),
            &message::encode(&header, &[&zeros]),
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    plan.parts()
}

/// Runs the forged job with one worker and checks it ends healed: exit 0, C = A·B, the forger
/// named once, its tile computed again once. Returns the parts of k.
async fn healed(mut env: Env, job: &str, shape: (u64, u64, u64), tile: u64, inline: bool) -> u32 {
    let parts = forge_tile_0_0(&env, job, shape, tile, inline).await;
    let mut collector = env.spawn(
        "gemmq-collector",
        "collector",
        &["--job-id", job, "--out", job],
    );
    env.spawn_consumer(env.consumer("w1"));

    assert_eq!(collector.wait(MINUTE).await, Some(0), "{}", collector.log());
    let log = collector.log();
    assert!(log.contains("wrong tile: computing it again"), "{log}");
    let summary = common::summary_json(&env, job);
    assert_eq!(summary["status"], "complete", "{summary:#}");
    assert_eq!(summary["verification"]["passed"], true);
    assert_eq!(
        summary["wrong_tiles"],
        serde_json::json!([{ "tile": "C[0,0]", "sent_by": ["forger"], "recompute": 1 }]),
        "{summary:#}"
    );
    assert_eq!(summary["workers"]["forger"]["wrong_tiles"], 1);
    assert_eq!(summary["workers"]["w1"]["wrong_tiles"], 0);
    assert_eq!(
        summary["duplicates_dropped"], parts,
        "the worker's first results for the forged tile came second"
    );
    let err = common::max_error_against_local_product(&env, job, shape);
    assert!(
        err <= 1e-10,
        "max |C - A·B| = {err:e}: the forged tile is still there"
    );
    env.stop_consumers().await;
    env.cleanup(&[job]).await;
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_tile_is_found_computed_again_and_replaced_and_its_sender_named() {
    // 64 tiles: the worker computes (0, 0) among its first, so its right result reaches the
    // collector before the job is complete.
    healed(Env::new("heal"), "heal", (256, 32, 256), 32, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_tile_of_a_job_with_inline_operands_is_healed_with_its_blocks_sent_again() {
    healed(
        Env::new("heal-inline"),
        "healinline",
        (256, 32, 256),
        32,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_tile_of_a_k_split_job_is_healed_with_every_part_computed_again() {
    // 64 KiB messages: k = 300 goes in parts, each forged.
    let opts = BrokerOptions {
        max_message_bytes: Some(bytesize::ByteSize::kib(64)),
        ..Default::default()
    };
    let parts = healed(
        Env::with_broker("heal-split", opts),
        "healsplit",
        (256, 300, 256),
        32,
        false,
    )
    .await;
    assert!(parts > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tile_wrong_every_time_ends_the_job_unverified_after_three_recomputes_naming_it() {
    let mut env = Env::new("heal-bad");
    let job = "healbad";
    gemmq_producer::run(&env.producer(job, (64, 32, 64), 32))
        .await
        .expect("the producer publishes the job");
    // A worker with bad memory: every tile it sends is wrong.
    let _bad = env.spawn(
        "gemmq-consumer",
        "bad",
        &["--worker-id", "bad", "--corrupt-rate", "1"],
    );
    let mut collector = env.spawn(
        "gemmq-collector",
        "collector",
        &["--job-id", job, "--out", job],
    );

    assert_eq!(
        collector.wait(MINUTE).await,
        Some(gemmq_collector::EXIT_UNVERIFIED as i32),
        "{}",
        collector.log()
    );
    let log = collector.log();
    assert!(
        log.contains("tile still wrong after every recompute"),
        "{log}"
    );
    let summary = common::summary_json(&env, job);
    assert_eq!(summary["status"], "verification_failed", "{summary:#}");
    assert_eq!(gemmq_collector::MAX_RECOMPUTES, 3);
    let wrong = summary["wrong_tiles"].as_array().unwrap();
    assert_eq!(
        wrong.len(),
        4 * 3,
        "each of the 4 tiles computed again 3 times: {summary:#}"
    );
    assert!(
        wrong
            .iter()
            .all(|w| w["sent_by"] == serde_json::json!(["bad"]))
    );
    assert_eq!(summary["workers"]["bad"]["wrong_tiles"], 12);
    env.cleanup(&[job]).await;
}
