//! Reaching RabbitMQ: pooled connections, patient reconnection, confirmed publishing.
//!
//! Connections come from a [`deadpool`] pool, which hands back a live connection or makes a
//! new one when the old one died. Given several nodes of a cluster (`AMQP_URL` a comma-separated
//! list), there is a pool per node: a connection comes from the node that answered last, or else
//! from the next in the list that answers. Getting one retries the round of nodes with capped,
//! jittered exponential backoff ([`backon`]) and logs every failed try, until the configured
//! connect timeout; a wrong password or a TLS certificate problem is not retried. Publishing goes through publisher
//! confirms: [`ConfirmWindow`] keeps a bounded number outstanding, so throughput is not one
//! round trip per message and memory stays bounded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use deadpool::managed::{self, Metrics, Pool, PoolError, RecycleError, RecycleResult};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ConnectionProperties, options::BasicPublishOptions};
use lapin::{Confirmation, DefaultConnectionBuilder, PublisherConfirm};
use tracing::{info, warn};

use crate::config::{BrokerSettings, redact_url};
use crate::tls::TlsProblem;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot reach RabbitMQ at {url} (gave up after {waited:?}): {last}. Is the broker running? Start it (`rabbitmq-server -detached`, or `docker compose up -d rabbitmq`) or point AMQP_URL at it"
    )]
    Unreachable {
        url: String,
        waited: Duration,
        last: String,
    },
    #[error(
        "RabbitMQ at {url} refused the credentials: {message}. Check the user and password in AMQP_URL"
    )]
    AccessRefused { url: String, message: String },
    #[error("TLS with RabbitMQ at {url} failed: {advice} ({detail})")]
    Tls {
        url: String,
        problem: TlsProblem,
        advice: String,
        detail: String,
    },
    #[error("shutdown requested while connecting to RabbitMQ at {url}")]
    Interrupted { url: String },
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

impl BrokerError {
    /// Whether trying again cannot help: the broker stayed unreachable for the whole connect
    /// timeout, refused the credentials or the TLS handshake, or the pool could not be built.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, BrokerError::Amqp(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing {what}: {source}")]
    Amqp { what: String, source: lapin::Error },
    #[error("the broker refused {what} (nack): a queue is full or unavailable")]
    Nacked { what: String },
    #[error(
        "{what} could not be routed by exchange {exchange:?} ({code} {text}): its queue does not exist"
    )]
    Unroutable {
        what: String,
        /// The exchange that found no queue for it: tells what kind of message was lost
        /// without parsing `what`.
        exchange: String,
        code: u16,
        text: String,
    },
}

impl PublishError {
    /// Whether the message found no queue, as opposed to the broker or connection failing.
    pub fn is_unroutable(&self) -> bool {
        matches!(self, PublishError::Unroutable { .. })
    }
}

/// A name for this process, unique per host: `host-pid`. Containers get distinct host names.
pub fn default_worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(48)
        .collect();
    format!("{host}-{}", std::process::id())
}

/// A connection from the pool: back in the pool when dropped.
pub type PooledConnection = managed::Object<Manager>;

/// Makes the pool's connections to one node, with the TLS settings (deadpool-lapin's manager
/// cannot take them), and sends a dead one away instead of handing it out again.
pub struct Manager {
    url: String,
    name: String,
    tls: OwnedTLSConfig,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("url", &redact_url(&self.url))
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl managed::Manager for Manager {
    type Type = lapin::Connection;
    type Error = lapin::Error;

    async fn create(&self) -> Result<lapin::Connection, lapin::Error> {
        DefaultConnectionBuilder::new()?
            .with_uri_str(self.url.clone())
            .with_properties(
                ConnectionProperties::default().with_connection_name(self.name.clone().into()),
            )
            .with_tls_config(self.tls.clone())
            .connect()
            .await
    }

    async fn recycle(
        &self,
        conn: &mut lapin::Connection,
        _: &Metrics,
    ) -> RecycleResult<lapin::Error> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "the connection is not open: {:?}",
                conn.status()
            )))
        }
    }
}

/// Why no node gave a connection this round.
#[derive(Debug)]
enum Failure {
    /// Maybe not next time: the broker is down, restarting, overloaded.
    Passing(String),
    /// The same on every try: the credentials.
    AccessRefused(String),
    /// The same on every try: the certificates, or a port that does not speak TLS.
    Tls { problem: TlsProblem, detail: String },
}

impl Failure {
    fn of(err: PoolError<lapin::Error>) -> Failure {
        // lapin's own error, without the pool's "Error occurred while creating a new object".
        let (detail, problem) = match &err {
            PoolError::Backend(e) => (e.to_string(), TlsProblem::of(e)),
            other => (other.to_string(), None),
        };
        match problem {
            Some(problem) => Failure::Tls { problem, detail },
            None if is_access_refused(&detail) => Failure::AccessRefused(detail),
            None => Failure::Passing(detail),
        }
    }

    fn is_permanent(&self) -> bool {
        !matches!(self, Failure::Passing(_))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Passing(m) | Failure::AccessRefused(m) => f.write_str(m),
            Failure::Tls { detail, .. } => f.write_str(detail),
        }
    }
}

/// The longest one try at connecting may take, TCP and AMQP handshake together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool of connections for one program, named so the management UI shows who is who.
#[derive(Clone)]
pub struct Broker {
    /// One pool per node, in `settings.amqp_urls`' order.
    pools: Arc<[Pool<Manager>]>,
    /// The node that answered last: where the next connection is asked for first.
    current: Arc<AtomicUsize>,
    settings: BrokerSettings,
    /// When cancelled, a connection still being retried gives up at once with
    /// [`BrokerError::Interrupted`], instead of after the connect timeout: a program told to
    /// stop while the broker is down stops now.
    shutdown: Option<crate::shutdown::CancellationToken>,
}

impl Broker {
    /// `name` appears as the connection's name in the management UI, e.g. `gemmq-consumer w1`.
    pub fn new(settings: &BrokerSettings, name: &str) -> Result<Self, BrokerError> {
        warn_once(settings);
        let tls = settings.tls.amqp_config();
        let pools = settings
            .amqp_urls
            .iter()
            .map(|url| {
                let manager = Manager {
                    url: url.clone(),
                    name: name.to_string(),
                    tls: tls.clone(),
                };
                Pool::builder(manager)
                    .build()
                    .map_err(|e| BrokerError::Pool(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Broker {
            pools: pools.into(),
            current: Arc::new(AtomicUsize::new(0)),
            settings: settings.clone(),
            shutdown: None,
        })
    }

    /// Gives up connecting as soon as `shutdown` is cancelled (see [`BrokerError::Interrupted`]).
    pub fn with_shutdown(mut self, shutdown: crate::shutdown::CancellationToken) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// A live connection, retrying until the connect timeout.
    pub async fn connection(&self) -> Result<PooledConnection, BrokerError> {
        let url = self.settings.redacted_url();
        let started = std::time::Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.settings.connect_timeout));
        // A broker can take the TCP connection and never answer the AMQP handshake (seen here
        // when RabbitMQ had run out of file descriptors): bound each try, or it waits forever.
        let handshake =
            HANDSHAKE_TIMEOUT.min(self.settings.connect_timeout.max(Duration::from_secs(1)));
        let attempt = || self.round_of_nodes(handshake);
        let retried = attempt
            .retry(backoff)
            .when(|e| !e.is_permanent())
            .notify(|e, wait| {
                warn!(broker = %url, error = %e, retry_in = ?wait, "broker unreachable; retrying")
            });
        let result = match &self.shutdown {
            Some(shutdown) => tokio::select! {
                r = retried => r,
                _ = shutdown.cancelled() => return Err(BrokerError::Interrupted { url }),
            },
            None => retried.await,
        };
        result.map_err(|failure| match failure {
            Failure::AccessRefused(message) => BrokerError::AccessRefused { url, message },
            Failure::Tls { problem, detail } => BrokerError::Tls {
                url,
                problem,
                advice: problem.advice(&self.settings.tls),
                detail,
            },
            Failure::Passing(last) => BrokerError::Unreachable {
                url,
                waited: started.elapsed(),
                last,
            },
        })
    }

    /// One try at each node, from the one that answered last; every node's error when none did.
    async fn round_of_nodes(&self, handshake: Duration) -> Result<PooledConnection, Failure> {
        let n = self.pools.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in (0..n).map(|i| (first + i) % n) {
            let got = match tokio::time::timeout(handshake, self.pools[i].get()).await {
                Ok(got) => got.map_err(Failure::of),
                Err(_) => Err(Failure::Passing(format!(
                    "the broker took the TCP connection but did not answer the AMQP handshake within {handshake:?}; \
                     it may be overloaded or out of file descriptors (see `rabbitmq-diagnostics status`)"
                ))),
            };
            match got {
                Ok(conn) => {
                    if i != first {
                        info!(
                            node = %redact_url(&self.settings.amqp_urls[i]),
                            "connected to another broker node"
                        );
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(conn);
                }
                // A wrong password is wrong on every node, and a certificate problem is a
                // misconfiguration to fix, not to wait out on the other nodes.
                Err(e) if e.is_permanent() || n == 1 => return Err(e),
                Err(e) => errors.push(format!("{}: {e}", redact_url(&self.settings.amqp_urls[i]))),
            }
        }
        Err(Failure::Passing(errors.join("; ")))
    }

    /// A new channel on a live connection.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        let conn = self.connection().await?;
        Ok(conn.create_channel().await?)
    }

    /// A new channel with publisher confirms on.
    pub async fn confirm_channel(&self) -> Result<Channel, BrokerError> {
        let ch = self.channel().await?;
        ch.confirm_select(Default::default()).await?;
        Ok(ch)
    }
}

fn is_access_refused(message: &str) -> bool {
    message.contains("ACCESS_REFUSED") || message.contains("access refused")
}

/// Logs [`BrokerSettings::transport_warnings`] once per process and set of URLs: every program
/// makes its `Broker` at startup, some make more than one.
fn warn_once(settings: &BrokerSettings) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    for warning in settings.transport_warnings() {
        let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
        if !warned.contains(&warning) {
            warn!("{warning}");
            warned.push(warning);
        }
    }
}

/// Properties of a persistent gemmq message.
pub fn persistent(kind: &str, message_id: String) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(kind.into())
        .with_message_id(message_id.into())
        .with_app_id("gemmq".into())
}

/// Properties with extra string headers.
pub fn with_headers(props: BasicProperties, headers: &[(&str, String)]) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    for (k, v) in headers {
        table.insert(ShortString::from(*k), crate::topology::text(v));
    }
    props.with_headers(table)
}

/// Adds a numeric header.
pub fn with_int_header(props: BasicProperties, key: &str, v: i64) -> BasicProperties {
    let mut table: FieldTable = props.headers().clone().unwrap_or_default();
    table.insert(key.into(), AMQPValue::LongLongInt(v));
    props.with_headers(table)
}

/// Publishes one mandatory message and waits for the broker's confirm.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    what: impl Into<String>,
) -> Result<(), PublishError> {
    InFlight::publish(ch, exchange, key, body, props, what)
        .await?
        .confirmed()
        .await
}

/// A mandatory message the broker has been sent but not yet confirmed: a publisher that keeps
/// several of these in flight waits one confirm round trip for all of them, not one each.
pub struct InFlight {
    confirm: PublisherConfirm,
    what: String,
}

impl InFlight {
    /// Publishes one mandatory message; [`InFlight::confirmed`] waits for the broker's confirm.
    pub async fn publish(
        ch: &Channel,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        what: impl Into<String>,
    ) -> Result<InFlight, PublishError> {
        let what = what.into();
        let confirm = publish(ch, exchange, key, body, props, &what).await?;
        Ok(InFlight { confirm, what })
    }

    /// Waits for the confirm: an error if the broker nacked the message, no queue took it, or
    /// the channel closed first.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        settle(self.confirm, self.what).await
    }
}

async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    what: &str,
) -> Result<PublisherConfirm, PublishError> {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        props,
    )
    .await
    .map_err(|source| PublishError::Amqp {
        what: what.to_string(),
        source,
    })
}

async fn settle(confirm: PublisherConfirm, what: String) -> Result<(), PublishError> {
    // A mandatory message that no queue takes is still confirmed with Ack, carrying the
    // returned message: that is a failure too.
    match confirm.await {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
            Err(PublishError::Unroutable {
                what,
                exchange: returned.delivery.exchange.to_string(),
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            })
        }
        Ok(Confirmation::Nack(None)) => Err(PublishError::Nacked { what }),
        Err(source) => Err(PublishError::Amqp { what, source }),
    }
}

/// Pauses between tries of something the broker refused for now (a queue still starting after a
/// restart, or being created by another program at the same moment): 250 ms doubling to 5 s,
/// jittered, 10 tries (~35 s), then `None`.
pub fn retry_pauses() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(10)
        .with_jitter()
        .build()
}

/// The producer's confirm window: enough unconfirmed messages to keep a local link busy while
/// the broker writes them to disk. Not more: measured with 16,384 tiny tiles (256 KiB blocks),
/// a window of 256 let the producer put the whole 64 MiB stream in flight at once, the tasks
/// between the blocks waited behind it, and RabbitMQ spent 0.8–1.0 core-s instead of 0.5–0.6
/// (e2e 0.91–1.04 s against 0.72–0.85 s with 32 to 128). Big blocks are never this many.
pub const DEFAULT_CONFIRM_WINDOW: usize = 64;

/// Publishes with at most `limit` confirms outstanding.
pub struct ConfirmWindow {
    ch: Channel,
    pending: VecDeque<InFlight>,
    limit: usize,
    confirmed: u64,
}

impl ConfirmWindow {
    pub fn new(ch: Channel, limit: usize) -> Self {
        ConfirmWindow {
            ch,
            pending: VecDeque::new(),
            limit: limit.max(1),
            confirmed: 0,
        }
    }

    /// Publishes; waits for the oldest confirm first when the window is full.
    pub async fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        what: String,
    ) -> Result<(), PublishError> {
        while self.pending.len() >= self.limit {
            let oldest = self.pending.pop_front().expect("window is not empty");
            oldest.confirmed().await?;
            self.confirmed += 1;
        }
        let sent = InFlight::publish(&self.ch, exchange, key, body, props, what).await?;
        self.pending.push_back(sent);
        Ok(())
    }

    /// Waits for every outstanding confirm.
    pub async fn flush(&mut self) -> Result<(), PublishError> {
        while let Some(oldest) = self.pending.pop_front() {
            oldest.confirmed().await?;
            self.confirmed += 1;
        }
        Ok(())
    }

    /// Waits until the first `n` messages published are confirmed (and those after them may
    /// still be in flight).
    pub async fn settle_through(&mut self, n: u64) -> Result<(), PublishError> {
        while self.confirmed < n {
            let Some(oldest) = self.pending.pop_front() else {
                break;
            };
            oldest.confirmed().await?;
            self.confirmed += 1;
        }
        Ok(())
    }

    /// How many messages this window has published.
    pub fn published(&self) -> u64 {
        self.confirmed + self.pending.len() as u64
    }

    /// How many messages, in publishing order, the broker has confirmed: after a failure,
    /// everything from this index on must be published again.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }
}
