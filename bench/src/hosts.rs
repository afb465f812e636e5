//! Emulated hosts for the scaling scenario (`--hosts`): every consumer on a machine of its own,
//! joined to the broker by a link of a set rate.
//!
//! Linux network namespaces stand in for machines. A switch namespace holds a bridge; every host
//! plugs into it with a veth pair, both ends shaped with tc's token bucket (`tbf`), so that each
//! host has a link of `rate` in each direction:
//!
//! ```text
//!   gqh-broker (10.77.0.2)   gqh-w1 (10.77.0.11) … gqh-wN          this machine (10.77.0.1)
//!    RabbitMQ node             one consumer each                     producer, collector
//!        │ broker link            │ worker links                       │ client link
//!        └────────────── bridge in gqh-switch ──────────────────────────┘
//! ```
//!
//! The broker's host runs a RabbitMQ node of its own — the machine's `rabbitmq-server` with its
//! own node name, data directory and config, listening on its host's address — because the
//! machine's node listens on 127.0.0.1 only and its traffic could not be shaped. The bridge lives
//! in its own namespace so that this machine's firewall (Docker sets FORWARD to DROP) never sees
//! the hosts' traffic. Each link's byte counters are the kernel's, read on the host's end.
//!
//! The hosts share this machine's cores: what is emulated is the network, not the compute.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Every name this module creates starts with it, so a run cleans up what a crashed one left.
const PREFIX: &str = "gqh";
const SWITCH: &str = "gqh-switch";
const BROKER: &str = "gqh-broker";
/// This machine's end of its link (the producer's and the collector's host).
const CLIENT_DEV: &str = "gqh-client";
const CLIENT_IP: &str = "10.77.0.1";
const BROKER_IP: &str = "10.77.0.2";
/// The node's own name keeps it apart from the machine's node (epmd runs in its namespace).
const NODE: &str = "gqhosts@localhost";
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Most workers: their addresses are 10.77.0.11 upwards in one /24.
pub const MAX_WORKERS: usize = 200;

/// A link rate as tc writes it ("1gbit", "500mbit").
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Rate {
    pub bits_per_second: f64,
}

impl Rate {
    pub fn bytes_per_second(self) -> f64 {
        self.bits_per_second / 8.0
    }

    fn tc(self) -> String {
        format!("{}bit", self.bits_per_second.round() as u64)
    }

    /// tbf's bucket: a millisecond at this rate, and never less than two 64 KiB segments
    /// (veth hands tc whole GSO segments; a bucket smaller than one drops it).
    fn burst_bytes(self) -> u64 {
        ((self.bytes_per_second() / 1000.0) as u64).max(128 << 10)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)];
        let (number, scale) = units
            .iter()
            .find_map(|(u, scale)| lower.strip_suffix(u).map(|n| (n, *scale)))
            .ok_or_else(|| format!("{s:?}: write a rate as tc does, e.g. 1gbit or 500mbit"))?;
        let n: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {number:?} is not a number"))?;
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("{s:?}: a rate must be positive"));
        }
        Ok(Rate {
            bits_per_second: n * scale,
        })
    }
}

/// The hosts to make.
pub struct Spec {
    pub workers: usize,
    /// Each worker's link.
    pub link: Rate,
    /// This machine's link (the producer's and the collector's host).
    pub client_link: Rate,
    /// The broker host's link.
    pub broker_link: Rate,
    /// Where the broker node keeps its data and log.
    pub dir: PathBuf,
}

/// Bytes a host's link carried, as its own end counts them (IP packets, headers included).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LinkBytes {
    pub received: u64,
    pub sent: u64,
}

impl std::ops::Sub for LinkBytes {
    type Output = LinkBytes;

    fn sub(self, before: LinkBytes) -> LinkBytes {
        LinkBytes {
            received: self.received.saturating_sub(before.received),
            sent: self.sent.saturating_sub(before.sent),
        }
    }
}

/// Every link's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub broker: LinkBytes,
    pub client: LinkBytes,
    pub workers: Vec<LinkBytes>,
}

impl std::ops::Sub for &Counters {
    type Output = Counters;

    fn sub(self, before: &Counters) -> Counters {
        Counters {
            broker: self.broker - before.broker,
            client: self.client - before.client,
            workers: (self.workers.iter().zip(&before.workers))
                .map(|(a, b)| *a - *b)
                .collect(),
        }
    }
}

/// The emulated hosts and the broker node; all torn down on drop.
pub struct Hosts {
    workers: usize,
    dir: PathBuf,
}

impl Hosts {
    /// Makes the switch, the broker's host with its node running, this machine's link and
    /// `spec.workers` worker hosts. Tears down what an earlier run left first.
    pub fn up(spec: &Spec) -> Result<Hosts> {
        preflight(spec)?;
        teardown();
        let hosts = Hosts {
            workers: spec.workers,
            dir: spec.dir.clone(),
        };
        hosts.make_switch()?;
        add_netns(BROKER)?;
        plug(BROKER, "eth0", "gqh-p-broker", BROKER_IP, spec.broker_link)?;
        plug_client(spec.client_link)?;
        for w in 1..=spec.workers {
            let ns = worker_netns(w);
            add_netns(&ns)?;
            plug(
                &ns,
                "eth0",
                &format!("gqh-p-w{w}"),
                &worker_ip(w),
                spec.link,
            )?;
        }
        hosts.start_broker()?;
        Ok(hosts)
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{BROKER_IP}:5672/%2f")
    }

    pub fn management_url(&self) -> String {
        format!("http://{BROKER_IP}:15672")
    }

    /// Every link's byte counters now.
    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            broker: link_bytes(Some(BROKER), "eth0")?,
            client: link_bytes(None, CLIENT_DEV)?,
            workers: (1..=self.workers)
                .map(|w| link_bytes(Some(&worker_netns(w)), "eth0"))
                .collect::<Result<_>>()?,
        })
    }

    /// CPU seconds the broker's host has used (its RabbitMQ node and epmd).
    pub fn broker_cpu_seconds(&self) -> f64 {
        netns_pids(BROKER)
            .iter()
            .filter_map(|&pid| crate::machine::process_cpu_seconds(pid))
            .sum()
    }

    fn make_switch(&self) -> Result<()> {
        add_netns(SWITCH)?;
        ip(&["-n", SWITCH, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", SWITCH, "link", "set", "br0", "up"])
    }

    /// Starts the broker host's RabbitMQ node and waits until its management API answers.
    fn start_broker(&self) -> Result<()> {
        let d = self.dir.join("broker");
        let _ = std::fs::remove_dir_all(&d);
        for sub in ["home", "log", "mnesia"] {
            std::fs::create_dir_all(d.join(sub))
                .with_context(|| format!("creating {}", d.join(sub).display()))?;
        }
        // guest may connect from other hosts: this node is reachable only from the hosts.
        std::fs::write(
            d.join("rabbitmq.conf"),
            "listeners.tcp.default = 5672\nloopback_users = none\nmanagement.tcp.port = 15672\n",
        )?;
        std::fs::write(d.join("enabled_plugins"), "[rabbitmq_management].\n")?;
        let log = std::fs::File::create(d.join("server.log"))?;
        let path = |sub: &str| d.join(sub).display().to_string();
        Command::new("ip")
            .args(["netns", "exec", BROKER, RABBITMQ_SERVER])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", path("home"))
            .env("RABBITMQ_NODENAME", NODE)
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            // Not the machine's rabbitmq-env.conf, which pins its node to 127.0.0.1.
            .env("RABBITMQ_CONF_ENV_FILE", path("no-env.conf"))
            .current_dir(&d)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {RABBITMQ_SERVER} in {BROKER}"))?;
        let management = gemmq::management::Management::new(
            &self.amqp_url(),
            Some(self.management_url().as_str()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if management.get("/api/overview").is_ok() {
                eprintln!(
                    "hosts: RabbitMQ node {NODE} is up on {BROKER_IP} (its log: {})",
                    d.join("server.log").display()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the broker host's RabbitMQ node did not answer on {} within 90 s; see {}",
                    self.management_url(),
                    d.join("server.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        teardown();
    }
}

pub fn worker_netns(w: usize) -> String {
    format!("{PREFIX}-w{w}")
}

fn worker_ip(w: usize) -> String {
    format!("10.77.0.{}", 10 + w)
}

/// Refuses to start without what the hosts need, saying what to do.
fn preflight(spec: &Spec) -> Result<()> {
    if !(1..=MAX_WORKERS).contains(&spec.workers) {
        bail!("--hosts: 1 to {MAX_WORKERS} workers");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("--hosts makes network namespaces and shapes links with tc: run the bench as root");
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("--hosts needs `{tool}` (Debian's iproute2): apt-get install iproute2");
        }
    }
    if !Path::new(RABBITMQ_SERVER).exists() {
        bail!(
            "--hosts runs a RabbitMQ node of its own from {RABBITMQ_SERVER}, which is missing: apt-get install rabbitmq-server"
        );
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

fn add_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Joins host `ns` to the switch: `dev` (with `addr`) in the host, `port` on the bridge, each
/// end's sending shaped to `rate` — the port's is what the host receives.
fn plug(ns: &str, dev: &str, port: &str, addr: &str, rate: Rate) -> Result<()> {
    ip(&[
        "link", "add", port, "netns", SWITCH, "type", "veth", "peer", "name", dev, "netns", ns,
    ])?;
    ip(&["-n", SWITCH, "link", "set", port, "master", "br0", "up"])?;
    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
    ip(&["-n", ns, "link", "set", dev, "up"])?;
    shape(Some(SWITCH), port, rate)?;
    shape(Some(ns), dev, rate)
}

/// This machine's own link to the switch (the producer's and collector's host).
fn plug_client(rate: Rate) -> Result<()> {
    let port = "gqh-p-client";
    ip(&[
        "link", "add", CLIENT_DEV, "type", "veth", "peer", "name", port, "netns", SWITCH,
    ])?;
    ip(&["-n", SWITCH, "link", "set", port, "master", "br0", "up"])?;
    ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", CLIENT_DEV])?;
    ip(&["link", "set", CLIENT_DEV, "up"])?;
    shape(Some(SWITCH), port, rate)?;
    shape(None, CLIENT_DEV, rate)
}

fn shape(ns: Option<&str>, dev: &str, rate: Rate) -> Result<()> {
    let mut args: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n".into(), ns.into()]);
    }
    args.extend(
        [
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &rate.tc(),
            "burst",
            &rate.burst_bytes().to_string(),
            "latency",
            "50ms",
        ]
        .map(String::from),
    );
    run("tc", &args.iter().map(String::as_str).collect::<Vec<_>>()).map(drop)
}

fn link_bytes(ns: Option<&str>, dev: &str) -> Result<LinkBytes> {
    let mut args = vec![];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-s", "-j", "link", "show", "dev", dev]);
    let out = run("ip", &args)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j` output")?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str| {
        stats[dir]["bytes"]
            .as_u64()
            .with_context(|| format!("`ip -s -j link show dev {dev}` has no {dir} bytes"))
    };
    Ok(LinkBytes {
        received: get("rx")?,
        sent: get("tx")?,
    })
}

fn netns_pids(ns: &str) -> Vec<i32> {
    run("ip", &["netns", "pids", ns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what runs in the hosts (the broker node, epmd, stray consumers) and deletes their
/// namespaces, which deletes their veths.
fn teardown() {
    let names = run("ip", &["netns", "list"]).unwrap_or_default();
    let ours: Vec<&str> = names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    for ns in &ours {
        for pid in netns_pids(ns) {
            // SAFETY: kill(2); these processes run in namespaces this module owns.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    // Deleting a namespace while its processes are still dying leaves it mounted until they
    // are gone; give them a moment.
    if !ours.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
    }
    for ns in ours {
        let _ = ip(&["netns", "del", ns]);
    }
    let _ = ip(&["link", "del", CLIENT_DEV]);
}

#[cfg(test)]
mod tests {
    use super::Rate;

    #[test]
    fn rates_read_as_tc_writes_them() {
        let r: Rate = "1gbit".parse().unwrap();
        assert_eq!(r.bits_per_second, 1e9);
        assert_eq!(r.bytes_per_second(), 125e6);
        assert_eq!("2.5Gbit".parse::<Rate>().unwrap().bits_per_second, 2.5e9);
        assert_eq!("500mbit".parse::<Rate>().unwrap().tc(), "500000000bit");
        assert!("1gb".parse::<Rate>().is_err(), "bytes are not bits");
        assert!("0mbit".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn a_bucket_holds_at_least_two_segments_and_a_millisecond_of_the_rate() {
        assert_eq!("1mbit".parse::<Rate>().unwrap().burst_bytes(), 128 << 10);
        assert_eq!("10gbit".parse::<Rate>().unwrap().burst_bytes(), 1_250_000);
    }
}
