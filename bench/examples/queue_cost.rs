//! What a message costs the broker, by queue type: publishes `N` messages of `SIZE` bytes with
//! confirms (a window of `WINDOW`) to a quorum, a classic (v2) and a stream queue, then consumes
//! them (acking every `ACK_EVERY`-th with `multiple`), and prints RabbitMQ's CPU time
//! (`beam.smp`, from /proc) for each phase.
//!
//! ```sh
//! cargo run --release -p gemmq-bench --example queue_cost -- 4096 2200 256   # tiny results
//! cargo run --release -p gemmq-bench --example queue_cost -- 80 1605632 32   # 448² f64 tiles
//! ```
//!
//! The figures behind two design choices (BENCHMARKS.md): results stay on a quorum queue (for
//! large messages it costs the broker no more than the others), and tiny results are sent
//! several to a message (per-message cost dominates below a few hundred kilobytes).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// RabbitMQ's CPU seconds so far (user + system), read from /proc.
fn broker_cpu() -> Result<f64> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "beam.smp"])
        .output()
        .context("running pgrep")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(pid) = stdout.lines().next() else {
        bail!("no beam.smp process: is RabbitMQ running on this machine?");
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc stat line")?
            .parse::<f64>()?)
    };
    // utime and stime, fields 14 and 15 of stat (11 and 12 after the command name).
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| -> Result<usize> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse()
                .context("usage: queue_cost N SIZE [WINDOW [ACK_EVERY]]")
        })
    };
    let (n, size, window) = (arg(0, 4096)?, arg(1, 2200)?, arg(2, 64)?.max(1));
    // Acks: one `multiple` ack per this many deliveries (1 = every delivery acked on its own).
    let ack_every = arg(3, 10)?.max(1);
    let url = std::env::var("AMQP_URL").unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let body = vec![7u8; size];
    for kind in ["quorum", "classic", "stream"] {
        let ch = conn.create_channel().await?;
        ch.confirm_select(Default::default()).await?;
        let q = format!("queue-cost-{kind}-{}", std::process::id());
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        if kind == "classic" {
            args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(q.as_str().into(), durable, args).await?;

        let (cpu0, t0) = (broker_cpu()?, Instant::now());
        let mut pending = VecDeque::new();
        for _ in 0..n {
            let props = BasicProperties::default().with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    "".into(),
                    q.as_str().into(),
                    Default::default(),
                    &body,
                    props,
                )
                .await?;
            pending.push_back(confirm);
            if pending.len() >= window
                && let Some(c) = pending.pop_front()
            {
                c.await?;
            }
        }
        for c in pending {
            c.await?;
        }
        let (cpu1, publish) = (broker_cpu()?, t0.elapsed());

        let cch = conn.create_channel().await?;
        cch.basic_qos(100, BasicQosOptions::default()).await?;
        let mut cargs = FieldTable::default();
        if kind == "stream" {
            cargs.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
        }
        let mut consumer = cch
            .basic_consume(q.as_str().into(), "".into(), Default::default(), cargs)
            .await?;
        let t1 = Instant::now();
        for i in 0..n {
            let d = consumer.next().await.context("consumer cancelled")??;
            if i % ack_every == ack_every - 1 || i == n - 1 {
                d.acker.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        let (cpu2, consume) = (broker_cpu()?, t1.elapsed());
        let per_msg = |cpu: f64| cpu * 1e6 / n as f64;
        println!(
            "{kind:8} {n} × {size} B: publish {:.2} s, broker {:.2} cpu-s ({:.1} µs/msg) | consume {:.2} s, broker {:.2} cpu-s ({:.1} µs/msg)",
            publish.as_secs_f64(),
            cpu1 - cpu0,
            per_msg(cpu1 - cpu0),
            consume.as_secs_f64(),
            cpu2 - cpu1,
            per_msg(cpu2 - cpu1)
        );
        let _ = cch.close(200, "done".into()).await;
        ch.queue_delete(q.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}
