//! The broker's floor: how long RabbitMQ on this machine takes to move a job's bytes when
//! nothing is computed — an estimate of the least time a job on this topology takes.
//!
//! Just before each large job (after its reference) the bench sends the job's own data through
//! the broker alone, on the job's own topology ([`gemmq::topology`], in a namespace of its own):
//! every block of A and B, in the job's message sizes, published with confirms (the producer's
//! window) to the operand exchange, which writes it to the job's stream; each "consumer" reads
//! the whole stream (as a worker whose tasks need every block does: with 2 workers, about every
//! one of them does), with a prefetch of 2, and meanwhile publishes its
//! share of C, one result-sized message per tile, each confirmed before the next (as a worker
//! confirms a result before it acks the task); a "collector" consumes the results queue. Every
//! party has its own connection, as the programs do, the programs' prefetch, and all run at
//! once, so that the stages overlap as well as they possibly can.
//!
//! Left out, so that it stays under a real job: the task messages (through the tasks quorum
//! queue, each delivered and acked), the manifest and its announcement, heartbeats, message
//! headers, and the wait of a tile for its blocks. One thing is done as a job might not: every
//! result goes in a message of its own, where a worker sends results under 1 MiB that queue up
//! behind a publish in one message. That can only matter for tiles under 1 MiB (1024 f64's
//! 512 KiB ones), not for the 4096 jobs' 1.5 MiB ones.
//!
//! It is a measurement, not a theorem: it varies from run to run as the job does, and a client
//! leaner than lapin could move the same bytes with less CPU. It runs in a child process
//! (`gemmq-bench __floor ...`, see [`crate::child`]).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use gemmq::broker::{ConfirmWindow, DEFAULT_CONFIRM_WINDOW, publish_confirmed};
use gemmq::topology::Topology;
use gemmq::{DType, Plan};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// The hidden first argument that makes the bench binary measure a floor and print it.
pub const SUBCOMMAND: &str = "__floor";

/// A reader's prefetch on the stream.
const STREAM_PREFETCH: u16 = 2;
/// The collector's default prefetch.
const COLLECTOR_PREFETCH: u16 = 64;
/// The longest wait for any one message before the floor gives up.
const PATIENCE: Duration = Duration::from_secs(60);

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
    /// Blocks and bytes published once (into the stream, read by every reader).
    pub blocks: u64,
    pub block_bytes: u64,
    /// Readers of the whole stream: the job's consumers.
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
    let args = [SUBCOMMAND.to_string(), serde_json::to_string(spec)?];
    crate::child::run("floor", &args, &[])
}

/// `gemmq-bench __floor SPEC_JSON`: prints a [`Floor`] as JSON.
pub fn child_main() -> ExitCode {
    let spec = match std::env::args()
        .nth(2)
        .map(|s| serde_json::from_str::<Spec>(&s))
    {
        Some(Ok(spec)) => spec,
        Some(Err(e)) => {
            eprintln!("floor: the spec is not valid JSON: {e}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("usage: gemmq-bench {SUBCOMMAND} SPEC_JSON");
            return ExitCode::from(2);
        }
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
        // Whatever happened, leave no queues behind (the stream holds the job's A and B).
        match tokio::time::timeout(
            Duration::from_secs(30),
            crate::cleanup(&spec.amqp_url, &spec.namespace, job),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("floor: deleting namespace {}: {e:#}", spec.namespace),
            Err(_) => eprintln!(
                "floor: deleting namespace {} took over 30 s; delete its queues by hand",
                spec.namespace
            ),
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

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn confirming(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(ch)
}

async fn consume(ch: &Channel, queue: &str, prefetch: u16, args: FieldTable) -> Result<Consumer> {
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .with_context(|| format!("setting the prefetch of {queue}"))?;
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        args,
    )
    .await
    .with_context(|| format!("consuming {queue}"))
}

/// Takes and acks `count` messages.
async fn drain(mut consumer: Consumer, count: usize, what: &str) -> Result<()> {
    for i in 0..count {
        let d = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .with_context(|| {
                format!("{what}: message {i} of {count} did not come within {PATIENCE:?}")
            })?
            .with_context(|| format!("{what}: the consumer was cancelled"))?
            .with_context(|| format!("{what}: receiving"))?;
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .with_context(|| format!("{what}: acking"))?;
    }
    Ok(())
}

/// The bytes of each block of A and B, in publishing order.
fn block_sizes(plan: &Plan) -> Vec<u64> {
    plan.operand_ids()
        .into_iter()
        .map(|b| plan.block_bytes(b))
        .collect()
}

async fn run(spec: &Spec, topo: &Topology, job: &str) -> Result<Floor> {
    let (blocks, results) = message_sizes(spec)?;
    let largest = blocks.iter().chain(&results).copied().max().unwrap_or(0);
    let body = std::sync::Arc::new(vec![0x5au8; largest as usize]);
    let parties = Parties::connect(spec, topo, job, &results).await?;

    let cpu0 = crate::reference::cpu_seconds();
    let broker0 = crate::machine::broker_cpu_seconds();
    let t0 = Instant::now();
    let (publish_seconds, connections) =
        parties.race(topo, job, body, &blocks, &results, t0).await?;
    let seconds = t0.elapsed().as_secs_f64();
    for conn in connections {
        let _ = conn.close(200, "floor: done".into()).await;
    }
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

/// The job's messages as the plan makes them: every block of A and B, and every tile's result.
fn message_sizes(spec: &Spec) -> Result<(Vec<u64>, Vec<u64>)> {
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
    let results = plan
        .task_ids()
        .map(|t| (plan.rows(t.row).len() * plan.cols(t.col).len()) as u64 * size)
        .collect();
    Ok((block_sizes(&plan), results))
}

/// Everyone connected and consuming before the clock starts.
struct Parties {
    setup: lapin::Connection,
    /// Each reader: its connection, its stream consumer, its confirming channel for results, and
    /// the sizes of its share of the results.
    readers: Vec<(lapin::Connection, lapin::Consumer, lapin::Channel, Vec<u64>)>,
    collector_conn: lapin::Connection,
    collected: lapin::Consumer,
    producer_conn: lapin::Connection,
    producer_ch: lapin::Channel,
}

impl Parties {
    async fn connect(spec: &Spec, topo: &Topology, job: &str, results: &[u64]) -> Result<Self> {
        let setup = connect(&spec.amqp_url).await?;
        let ch = setup.create_channel().await.context("opening a channel")?;
        topo.declare(&ch).await?;
        topo.declare_job(&ch, job).await?;
        let mut readers = Vec::new();
        for r in 0..spec.readers {
            let conn = connect(&spec.amqp_url).await?;
            let ch = conn.create_channel().await.context("opening a channel")?;
            let mut from_first = FieldTable::default();
            from_first.insert("x-stream-offset".into(), gemmq::topology::text("first"));
            let stream = topo.operands_queue(job);
            let consumer = consume(&ch, &stream, STREAM_PREFETCH, from_first).await?;
            let results_ch = confirming(&conn).await?;
            let share: Vec<u64> = results
                .iter()
                .skip(r)
                .step_by(spec.readers)
                .copied()
                .collect();
            readers.push((conn, consumer, results_ch, share));
        }
        let collector_conn = connect(&spec.amqp_url).await?;
        let collector_ch = collector_conn
            .create_channel()
            .await
            .context("opening a channel")?;
        // The results are a stream, read from its start, as the collector reads them.
        let mut from_first = FieldTable::default();
        from_first.insert("x-stream-offset".into(), gemmq::topology::text("first"));
        let collected = consume(
            &collector_ch,
            &topo.results_queue(job),
            COLLECTOR_PREFETCH,
            from_first,
        )
        .await?;
        let producer_conn = connect(&spec.amqp_url).await?;
        let producer_ch = confirming(&producer_conn).await?;
        Ok(Parties {
            setup,
            readers,
            collector_conn,
            collected,
            producer_conn,
            producer_ch,
        })
    }

    /// Every party at once; the first error ends the floor (dropping the set aborts the rest).
    /// Returns when the publisher had every block confirmed, and the connections to close.
    async fn race(
        self,
        topo: &Topology,
        job: &str,
        body: std::sync::Arc<Vec<u8>>,
        blocks: &[u64],
        results: &[u64],
        t0: Instant,
    ) -> Result<(f64, Vec<lapin::Connection>)> {
        let mut parties: JoinSet<Result<Option<Duration>>> = JoinSet::new();
        {
            let (body, blocks) = (body.clone(), blocks.to_vec());
            let (exchange, key) = (topo.operands_exchange(), job.to_string());
            let producer_ch = self.producer_ch;
            parties.spawn(async move {
                let mut window = ConfirmWindow::new(producer_ch, DEFAULT_CONFIRM_WINDOW);
                for (i, len) in blocks.into_iter().enumerate() {
                    let block = &body[..len as usize];
                    window
                        .publish(&exchange, &key, block, persistent(), format!("block {i}"))
                        .await?;
                }
                window.flush().await?;
                Ok(Some(t0.elapsed()))
            });
        }
        let n_blocks = blocks.len();
        let mut connections = vec![self.setup, self.collector_conn, self.producer_conn];
        for (r, (conn, consumer, results_ch, share)) in self.readers.into_iter().enumerate() {
            connections.push(conn);
            parties.spawn(async move {
                drain(consumer, n_blocks, &format!("reader {r}'s stream")).await?;
                Ok(None)
            });
            let body = body.clone();
            let (exchange, key) = (topo.results_exchange(), job.to_string());
            parties.spawn(async move {
                for (i, len) in share.into_iter().enumerate() {
                    let result = &body[..len as usize];
                    let what = format!("reader {r}'s result {i}");
                    publish_confirmed(&results_ch, &exchange, &key, result, persistent(), what)
                        .await?;
                }
                Ok(None)
            });
        }
        let (n_results, collected) = (results.len(), self.collected);
        parties.spawn(async move {
            drain(collected, n_results, "the results queue").await?;
            Ok(None)
        });
        let mut publish_seconds = None;
        while let Some(joined) = parties.join_next().await {
            if let Some(published) = joined.context("a party of the floor panicked")?? {
                publish_seconds = Some(published.as_secs_f64());
            }
        }
        let publish_seconds = publish_seconds.context("the publisher never finished")?;
        Ok((publish_seconds, connections))
    }
}

/// The least end-to-end time a machine with `cores` cores allows for a job whose floor is
/// `floor` and whose in-process multiplication took `reference_cpu` core-seconds: the floor's
/// wall time, or all of that CPU spread perfectly over the cores, whichever is longer.
pub fn bound(floor: &Floor, reference_cpu: f64, cores: usize) -> Option<f64> {
    let broker = floor.broker_cpu_seconds?;
    let cpu = broker + floor.clients_cpu_seconds + reference_cpu;
    Some(floor.seconds.max(cpu / cores.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> String {
        std::env::var("AMQP_URL").unwrap_or_else(|_| gemmq::config::DEFAULT_AMQP_URL.into())
    }

    fn floor(seconds: f64, broker: Option<f64>, clients: f64) -> Floor {
        Floor {
            seconds,
            publish_seconds: seconds,
            broker_cpu_seconds: broker,
            clients_cpu_seconds: clients,
            blocks: 0,
            block_bytes: 0,
            readers: 2,
            results: 0,
            result_bytes: 0,
        }
    }

    #[test]
    fn the_bound_is_the_floor_or_all_the_cpu_spread_over_the_cores_whichever_is_longer() {
        // 1.0 + 0.5 + 1.5 core-seconds on 2 cores: 1.5 s, longer than the 0.9 s floor.
        assert_eq!(bound(&floor(0.9, Some(1.0), 0.5), 1.5, 2), Some(1.5));
        // On 8 cores the same CPU takes 0.375 s: the floor's own wall time bounds the job.
        assert_eq!(bound(&floor(0.9, Some(1.0), 0.5), 1.5, 8), Some(0.9));
        // Without the broker's CPU (no /proc, or a remote broker) there is no bound to give.
        assert_eq!(bound(&floor(0.9, None, 0.5), 1.5, 2), None);
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
        crate::cleanup(&spec.amqp_url, &ns, "floor").await.unwrap();

        // 4 block-rows of A and 4 block-columns of B (200 = 3 × 64 + 8), one 200-deep block each.
        assert_eq!((floor.blocks, floor.results), (8, 16));
        assert_eq!(floor.block_bytes, 2 * 200 * 200 * 4);
        assert_eq!(floor.result_bytes, 200 * 200 * 4);

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
