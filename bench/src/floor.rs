//! The broker's floor: how long RabbitMQ on this machine takes to move a job's bytes when
//! nothing is computed.
//!
//! Just before each large job (after its reference) the bench sends the job's own traffic
//! through the broker alone, on the job's own topology ([`gemmq::topology`], in a namespace of
//! its own): every block of A and B, in the job's message sizes, published with confirms to the
//! operand exchange, which writes it to the job's stream and copies it into one live queue per
//! consumer; each "consumer" drains its live queue and meanwhile publishes its share of C, one
//! result-sized message per tile, each confirmed before the next (as a worker confirms a result
//! before it acks the task); a "collector" consumes the results queue. Every party has its own
//! connection, as the programs do, and all run at once.
//!
//! That is a gemmq job with free multiplication and perfect overlap: no job on this topology
//! moves fewer bytes, so none can end sooner. `floor / reference` is the smallest
//! `e2e / reference` this machine allows, and `e2e − floor` is what computing and the
//! programs' own work add. Only the headers are left out (a few hundred bytes a message).
//!
//! It runs in a child process (`gemmq-bench __floor ...`) for the reason the reference does:
//! Linux carries a parent's peak RSS into the `ru_maxrss` of the children it spawns afterwards.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use gemmq::message::Side;
use gemmq::topology::Topology;
use gemmq::{DType, Plan};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

/// The hidden first argument that makes the bench binary measure a floor and print it.
pub const SUBCOMMAND: &str = "__floor";

/// Unconfirmed block messages the publisher allows, as the producer's default confirm window.
const CONFIRM_WINDOW: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Floor {
    /// First publish to the last result consumed.
    pub seconds: f64,
    /// First publish to the last block confirmed.
    pub publish_seconds: f64,
    /// RabbitMQ's CPU (beam.smp) over the same time.
    pub broker_cpu_seconds: Option<f64>,
    /// The clients' own CPU (this process: AMQP framing and copies).
    pub clients_cpu_seconds: f64,
    /// Blocks and bytes published once (into the stream and every live queue).
    pub blocks: u64,
    pub block_bytes: u64,
    /// Live queues, each receiving every block: the job's consumers.
    pub readers: usize,
    /// Result messages and bytes.
    pub results: u64,
    pub result_bytes: u64,
}

/// What to send: the job's plan, as the producer would cut it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub amqp_url: String,
    pub namespace: String,
    pub n: u64,
    pub dtype: DType,
    pub tile: u64,
    pub max_message_bytes: u64,
    pub readers: usize,
}

/// Measures the floor in a child process.
pub fn measure(spec: &Spec) -> Result<Floor> {
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let out = Command::new(exe)
        .args([SUBCOMMAND, &serde_json::to_string(spec)?])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the floor")?;
    if !out.status.success() {
        bail!("the floor process failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("reading the floor's result")
}

/// `gemmq-bench __floor SPEC_JSON`: prints a [`Floor`] as JSON.
pub fn child_main() -> ExitCode {
    let Some(spec) = std::env::args()
        .nth(2)
        .and_then(|s| serde_json::from_str::<Spec>(&s).ok())
    else {
        eprintln!("usage: gemmq-bench {SUBCOMMAND} SPEC_JSON");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floor: starting tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let job = "floor";
    let topo = Topology::new(&spec.namespace, Duration::from_secs(2));
    let result = rt.block_on(async {
        let measured = tokio::time::timeout(Duration::from_secs(300), run(&spec, &topo, job)).await;
        // Whatever happened, leave no queues behind.
        if let Err(e) = cleanup(&spec.amqp_url, &topo, job).await {
            eprintln!(
                "floor: could not delete namespace {}: {e:#}",
                spec.namespace
            );
        }
        measured.context("the floor took over 5 minutes")?
    });
    match result {
        Ok(floor) => {
            println!(
                "{}",
                serde_json::to_string(&floor).expect("the floor is plain data")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(url: &str) -> Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")
}

async fn cleanup(url: &str, topo: &Topology, job: &str) -> Result<()> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    let _ = topo.delete_job(&ch, job).await;
    let ch = conn.create_channel().await?;
    topo.delete_shared(&ch).await?;
    let _ = conn.close(200, "floor: cleanup".into()).await;
    Ok(())
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn confirming(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

async fn run(spec: &Spec, topo: &Topology, job: &str) -> Result<Floor> {
    let plan = Plan::with_operands(
        spec.n,
        spec.n,
        spec.n,
        spec.dtype,
        spec.tile,
        spec.max_message_bytes,
        gemmq::tiling::Operands::Stream,
    )?;
    let size = plan.dtype.size() as u64;
    let blocks: Vec<u64> = plan
        .operand_ids()
        .into_iter()
        .map(|b| {
            let (rows, cols) = match b.side {
                Side::A => (plan.rows(b.index).len(), plan.depth(b.part).len()),
                Side::B => (plan.depth(b.part).len(), plan.cols(b.index).len()),
            };
            (rows * cols) as u64 * size
        })
        .collect();
    let results: Vec<u64> = plan
        .task_ids()
        .map(|t| (plan.rows(t.row).len() * plan.cols(t.col).len()) as u64 * size)
        .collect();
    let largest = blocks.iter().chain(&results).copied().max().unwrap_or(0);
    let body = vec![0x5au8; largest as usize];

    let setup = connect(&spec.amqp_url).await?;
    let ch = setup.create_channel().await?;
    topo.declare(&ch).await?;
    topo.declare_job(&ch, job).await?;

    // The readers first, so that every block reaches every live queue.
    let mut readers = Vec::new();
    for r in 0..spec.readers {
        let conn = connect(&spec.amqp_url).await?;
        let ch = conn.create_channel().await?;
        let queue = topo
            .declare_live_operands(&ch, &format!("floor{r}"), u64::MAX)
            .await?;
        ch.basic_qos(8, BasicQosOptions::default()).await?;
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let share: Vec<u64> = results
            .iter()
            .skip(r)
            .step_by(spec.readers)
            .copied()
            .collect();
        readers.push((conn, ch, consumer, share));
    }
    let collector_conn = connect(&spec.amqp_url).await?;
    let collector_ch = collector_conn.create_channel().await?;
    collector_ch
        .basic_qos(16, BasicQosOptions::default())
        .await?;
    let mut collected = collector_ch
        .basic_consume(
            topo.results_queue(job).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let producer_conn = connect(&spec.amqp_url).await?;
    let producer_ch = confirming(&producer_conn).await?;

    let cpu0 = crate::reference::cpu_seconds();
    let broker0 = crate::machine::broker_cpu_seconds();
    let t0 = Instant::now();

    let publish = {
        let (ch, body, blocks) = (producer_ch.clone(), body.clone(), blocks.clone());
        let (exchange, key) = (topo.operands_exchange(), job.to_string());
        tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            for len in blocks {
                let confirm = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body[..len as usize],
                        persistent(),
                    )
                    .await?;
                pending.push_back(confirm);
                if pending.len() >= CONFIRM_WINDOW
                    && let Some(c) = pending.pop_front()
                {
                    c.await?;
                }
            }
            for c in pending {
                c.await?;
            }
            anyhow::Ok(t0.elapsed())
        })
    };
    let mut tasks = Vec::new();
    for (conn, ch, mut consumer, share) in readers {
        let n_blocks = blocks.len();
        let body = body.clone();
        let results_ch = confirming(&conn).await?;
        let (exchange, key) = (topo.results_exchange(), job.to_string());
        let drain = tokio::spawn(async move {
            for _ in 0..n_blocks {
                let d = consumer
                    .next()
                    .await
                    .context("a live queue's consumer was cancelled")??;
                d.acker.ack(BasicAckOptions::default()).await?;
            }
            drop(ch);
            anyhow::Ok(())
        });
        let send = tokio::spawn(async move {
            for len in share {
                results_ch
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body[..len as usize],
                        persistent(),
                    )
                    .await?
                    .await?;
            }
            anyhow::Ok(())
        });
        tasks.push((conn, drain, send));
    }
    for _ in 0..results.len() {
        let d = tokio::time::timeout(Duration::from_secs(60), collected.next())
            .await
            .context("no result for a minute")?
            .context("the results consumer was cancelled")??;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    let publish_seconds = publish.await??.as_secs_f64();
    for (_conn, drain, send) in tasks {
        drain.await??;
        send.await??;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let broker = crate::machine::broker_cpu_seconds()
        .zip(broker0)
        .map(|(b1, b0)| b1 - b0);
    Ok(Floor {
        seconds,
        publish_seconds,
        broker_cpu_seconds: broker,
        clients_cpu_seconds: crate::reference::cpu_seconds() - cpu0,
        blocks: blocks.len() as u64,
        block_bytes: blocks.iter().sum(),
        readers: spec.readers,
        results: results.len() as u64,
        result_bytes: results.iter().sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> String {
        std::env::var("AMQP_URL").unwrap_or_else(|_| gemmq::config::DEFAULT_AMQP_URL.into())
    }

    #[tokio::test]
    async fn the_floor_moves_every_block_to_every_reader_and_every_result_once_then_cleans_up() {
        let ns = format!("bench-floor-test-{}", std::process::id());
        let spec = Spec {
            amqp_url: url(),
            namespace: ns.clone(),
            n: 200,
            dtype: DType::F32,
            tile: 64,
            max_message_bytes: 16 << 20,
            readers: 3,
        };
        let topo = Topology::new(&ns, Duration::from_secs(2));
        let floor = run(&spec, &topo, "floor").await.unwrap();
        cleanup(&spec.amqp_url, &topo, "floor").await.unwrap();

        // 4 block-rows of A and 4 block-columns of B (200 = 3 × 64 + 8), one 200-deep block each.
        assert_eq!((floor.blocks, floor.results), (8, 16));
        assert_eq!(floor.block_bytes, 2 * 200 * 200 * 4);
        assert_eq!(floor.result_bytes, 200 * 200 * 4);
        assert!(floor.publish_seconds <= floor.seconds);

        let conn = connect(&spec.amqp_url).await.unwrap();
        for q in [
            topo.results_queue("floor"),
            topo.operands_queue("floor"),
            topo.tasks_queue(),
        ] {
            // A passive declare of a missing queue closes its channel: one channel each.
            let ch = conn.create_channel().await.unwrap();
            assert!(
                !gemmq::topology::queue_exists(&ch, &q).await.unwrap(),
                "{q} was left behind"
            );
        }
    }
}
