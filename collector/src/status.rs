//! `gemmq-collector status`: the workers alive right now and the broker's queue figures.
//!
//! Workers are known from their heartbeats on the events exchange ([`gemmq::events`]): one that
//! stops cleanly leaves the table at once, one that is killed after missing
//! [`gemmq::events::EXPIRE_AFTER`] heartbeats. Queue figures (ready, unacked, consumers) come from
//! the management HTTP API, whose statistics lag by about five seconds, and so do the broker's
//! nodes and which of them run. In a cluster every node serves the API: the first in `AMQP_URL`
//! that answers is asked.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use gemmq::broker::Broker;
use gemmq::config::{BrokerSettings, CommonArgs};
use gemmq::events::{self, WorkerStatus};
use gemmq::management::Management;
use gemmq::shutdown::CancellationToken;
use lapin::Consumer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print one snapshot and exit (for scripts; add --json)
    #[arg(long)]
    pub once: bool,
    /// Print JSON: one object with --once, one line per refresh otherwise
    #[arg(long)]
    pub json: bool,
    /// With --once, how long to listen for heartbeats (at least one heartbeat interval)
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub listen: Duration,
    /// Management API base URL [default: http://<AMQP host>:15672, with the AMQP URL's user]
    #[arg(long, env = "GEMMQ_MANAGEMENT_URL", value_name = "URL")]
    pub management_url: Option<String>,
}

/// What a queue holds, as the management API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueFigures {
    pub name: String,
    #[serde(default)]
    pub messages_ready: u64,
    #[serde(default)]
    pub messages_unacknowledged: u64,
    #[serde(default)]
    pub consumers: u64,
    /// The nodes holding a replica of a quorum queue or stream (none for a classic queue).
    #[serde(default)]
    pub members: Vec<String>,
    /// Those of them that are up.
    #[serde(default)]
    pub online: Vec<String>,
    #[serde(default)]
    pub purpose: String,
}

impl QueueFigures {
    /// "online/replicas" for a replicated queue (`2/3`: one node holding a replica is down),
    /// "-" for a classic one.
    pub fn replicas(&self) -> String {
        if self.members.is_empty() {
            "-".into()
        } else {
            format!("{}/{}", self.online.len(), self.members.len())
        }
    }
}

/// A broker node, as the management API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeFigures {
    pub name: String,
    #[serde(default)]
    pub running: bool,
}

/// One view of the deployment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub namespace: String,
    pub taken_ms: u64,
    pub workers: Vec<WorkerStatus>,
    pub nodes: Vec<NodeFigures>,
    pub queues: Vec<QueueFigures>,
    /// Why queue figures are missing, if they are.
    pub management_error: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Follows the heartbeats of one namespace.
pub struct Watcher {
    events: Consumer,
    latest: BTreeMap<String, WorkerStatus>,
    _ch: lapin::Channel,
}

impl Watcher {
    pub async fn new(broker: &BrokerSettings) -> Result<Self> {
        let ch = Broker::new(broker, "gemmq-status")?.channel().await?;
        let topo = broker.topology();
        topo.declare_events(&ch).await?;
        let events = events::subscribe(&ch, &topo)
            .await
            .context("subscribing to worker events")?;
        Ok(Watcher {
            events,
            latest: BTreeMap::new(),
            _ch: ch,
        })
    }

    /// Takes the heartbeats that arrive within `window`.
    pub async fn pump(&mut self, window: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                d = self.events.next() => match d {
                    Some(Ok(d)) => {
                        if let Some(s) = events::parse(&d.data) {
                            self.latest.insert(s.worker.clone(), s);
                        }
                    }
                    Some(Err(e)) => return Err(e).context("reading worker events"),
                    None => anyhow::bail!("the events subscription was cancelled"),
                },
            }
        }
    }

    /// Workers whose last heartbeat says they are alive now.
    pub fn alive(&self) -> Vec<WorkerStatus> {
        let now = now_ms();
        self.latest
            .values()
            .filter(|s| s.is_alive(now))
            .cloned()
            .collect()
    }
}

fn purpose(ns: &str, name: &str) -> String {
    let rest = name
        .strip_prefix(ns)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(name);
    match rest {
        "tasks" => "tasks waiting for a worker; unacked = held by workers".into(),
        "retry" => "failed tasks waiting out the retry delay".into(),
        "parked" => "tasks whose attempts ran out (see x-gemmq-reason)".into(),
        "jobs" => "job announcements for collectors without --job-id".into(),
        r if r.ends_with(".results") => format!(
            "results of job {} (a stream, kept until the job is done)",
            r.trim_start_matches("job.").trim_end_matches(".results")
        ),
        r if r.starts_with("job.") && r.ends_with(".collector") => format!(
            "claim of the collector assembling job {}",
            r.trim_start_matches("job.").trim_end_matches(".collector")
        ),
        r if r.ends_with(".manifest") => format!(
            "manifest of job {}",
            r.trim_start_matches("job.").trim_end_matches(".manifest")
        ),
        r if r.starts_with("job.") && r.ends_with(".operands") => format!(
            "blocks of A and B of job {} (workers read the ones they need)",
            r.trim_start_matches("job.").trim_end_matches(".operands")
        ),
        r if r.starts_with("job.") && r.ends_with(".cancelled") => format!(
            "mark of cancelled job {} (empty; the broker deletes it a week after)",
            r.trim_start_matches("job.").trim_end_matches(".cancelled")
        ),
        r if r.starts_with("notices.") => format!(
            "notices of finished jobs for worker {}",
            r.trim_start_matches("notices.")
                .rsplit_once('.')
                .map_or(r, |(worker, _)| worker)
        ),
        _ => String::new(),
    }
}

/// The broker's nodes and whether each runs.
pub async fn nodes(broker: &BrokerSettings, url: Option<&str>) -> Result<Vec<NodeFigures>> {
    let (broker, url) = (broker.clone(), url.map(String::from));
    tokio::task::spawn_blocking(move || {
        Ok(Management::get_from_any(
            &broker,
            url.as_deref(),
            "/api/nodes?columns=name,running",
        )?)
    })
    .await
    .context("the management API request failed")?
}

/// The namespace's queues from the management API.
pub async fn queue_figures(
    broker: &BrokerSettings,
    url: Option<&str>,
) -> Result<Vec<QueueFigures>> {
    let ns = broker.namespace.clone();
    let (broker, url) = (broker.clone(), url.map(String::from));
    tokio::task::spawn_blocking(move || -> Result<Vec<QueueFigures>> {
        let all: Vec<QueueFigures> = Management::get_from_any(
            &broker,
            url.as_deref(),
            "/api/queues/{vhost}?columns=name,messages_ready,messages_unacknowledged,consumers,members,online",
        )?;
        let prefix = format!("{ns}.");
        Ok(all
            .into_iter()
            .filter(|q| q.name.starts_with(&prefix))
            .map(|mut q| {
                q.purpose = purpose(&ns, &q.name);
                q
            })
            .collect())
    })
    .await
    .context("the management API request failed")?
}

/// Listens for `listen`, then reports the workers alive and the queue figures.
pub async fn snapshot(
    broker: &BrokerSettings,
    listen: Duration,
    url: Option<&str>,
) -> Result<Snapshot> {
    let mut w = Watcher::new(broker).await?;
    w.pump(listen).await?;
    Ok(take(broker, &w, url).await)
}

pub(crate) async fn take(broker: &BrokerSettings, w: &Watcher, url: Option<&str>) -> Snapshot {
    let figures = async {
        Ok::<_, anyhow::Error>((nodes(broker, url).await?, queue_figures(broker, url).await?))
    };
    let ((nodes, queues), management_error) = match figures.await {
        Ok(f) => (f, None),
        Err(e) => ((Vec::new(), Vec::new()), Some(format!("{e:#}"))),
    };
    Snapshot {
        namespace: broker.namespace.clone(),
        taken_ms: now_ms(),
        workers: w.alive(),
        nodes,
        queues,
        management_error,
    }
}

fn render(s: &Snapshot) -> String {
    let mut out = format!(
        "gemmq namespace {} — {} worker(s)\n\n",
        s.namespace,
        s.workers.len()
    );
    out += &format!(
        "{:<28} {:<9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>8} {:>9} {:>7} {:>8}\n",
        "WORKER",
        "STATE",
        "QUEUE",
        "IN-FLT",
        "DONE",
        "FAILED",
        "RETRIED",
        "PARKED",
        "GFLOP/s",
        "OPER-MiB",
        "REREAD",
        "UPTIME"
    );
    for w in &s.workers {
        out += &format!(
            "{:<28} {:<9} {:>6} {:>8} {:>7} {:>7} {:>7} {:>6} {:>8.2} {:>9.1} {:>7} {:>7.0}s\n",
            w.worker,
            format!("{:?}", w.state).to_lowercase(),
            w.queue_size,
            w.in_flight,
            w.done,
            w.failed,
            w.retried,
            w.parked,
            w.gflops,
            w.operand_mib,
            w.operand_rereads,
            w.uptime_s
        );
    }
    if !s.nodes.is_empty() {
        out += &format!("\n{:<44} STATE\n", "BROKER NODE");
        for n in &s.nodes {
            let state = if n.running { "up" } else { "DOWN" };
            out += &format!("{:<44} {state}\n", n.name);
        }
    }
    out += &format!(
        "\n{:<44} {:>8} {:>8} {:>9} {:>8}  {}\n",
        "QUEUE", "READY", "UNACKED", "CONSUMERS", "REPLICAS", "WHAT"
    );
    for q in &s.queues {
        out += &format!(
            "{:<44} {:>8} {:>8} {:>9} {:>8}  {}\n",
            q.name,
            q.messages_ready,
            q.messages_unacknowledged,
            q.consumers,
            q.replicas(),
            q.purpose
        );
    }
    if let Some(e) = &s.management_error {
        out += &format!("(queue figures unavailable: {e})\n");
    }
    out
}

/// The `status` command.
pub async fn run(args: StatusArgs, shutdown: CancellationToken) -> Result<()> {
    let (_, broker) = args.common.load()?;
    let url = args.management_url.as_deref();
    if args.once {
        let snap = snapshot(&broker, args.listen, url).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            print!("{}", render(&snap));
        }
        return Ok(());
    }
    let mut w = Watcher::new(&broker).await?;
    let terminal = gemmq::telemetry::stderr_is_terminal();
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = w.pump(Duration::from_secs(2)) => r?,
        }
        let snap = take(&broker, &w, url).await;
        let mut stdout = std::io::stdout().lock();
        if args.json {
            writeln!(stdout, "{}", serde_json::to_string(&snap)?)?;
        } else {
            if terminal {
                write!(stdout, "\x1b[2J\x1b[H")?;
            }
            write!(stdout, "{}", render(&snap))?;
        }
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_read_online_over_members_and_a_dash_for_a_classic_queue() {
        let q = |members: &[&str], online: &[&str]| QueueFigures {
            name: "gemmq.tasks".into(),
            messages_ready: 0,
            messages_unacknowledged: 0,
            consumers: 0,
            members: members.iter().map(|s| s.to_string()).collect(),
            online: online.iter().map(|s| s.to_string()).collect(),
            purpose: String::new(),
        };
        assert_eq!(q(&["n1", "n2", "n3"], &["n2", "n3"]).replicas(), "2/3");
        assert_eq!(q(&[], &[]).replicas(), "-");
        let rendered = render(&Snapshot {
            namespace: "gemmq".into(),
            taken_ms: 0,
            workers: Vec::new(),
            nodes: Vec::new(),
            queues: vec![q(&["n1", "n2", "n3"], &["n2", "n3"])],
            management_error: None,
        });
        assert!(
            rendered.contains("REPLICAS") && rendered.contains(" 2/3 "),
            "{rendered}"
        );
    }

    #[test]
    fn queues_are_explained() {
        assert!(purpose("gemmq", "gemmq.retry").contains("retry delay"));
        assert_eq!(
            purpose("gemmq", "gemmq.job.j1.results"),
            "results of job j1 (a stream, kept until the job is done)"
        );
        assert!(purpose("gemmq", "gemmq.job.j1.operands").contains("of job j1"));
        assert!(purpose("gemmq", "gemmq.job.j1.cancelled").contains("cancelled job j1"));
        assert_eq!(
            purpose("gemmq", "gemmq.notices.host.example-42.0a1b2c3d"),
            "notices of finished jobs for worker host.example-42"
        );
    }
}
