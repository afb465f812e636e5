//! gemmq over TLS against a RabbitMQ whose TLS listener uses certificates made for the test: a
//! job completes over amqps://; a wrong CA, a host the certificate does not name, a refused client
//! certificate and the plaintext port each fail at once with a message that says what is wrong,
//! never by falling back to plaintext nor by retrying until the connect timeout.
//!
//! Needs the broker of `scripts/tls-broker.sh up` and these variables, which it prints and
//! `.ci/run` sets; without them the tests say so and pass:
//!
//! | variable | what |
//! |---|---|
//! | `GEMMQ_TLS_URL` | the amqps:// URL of the TLS listener (on 127.0.0.1) |
//! | `GEMMQ_TLS_DIR` | the certificates of `scripts/tls-certs.sh` |
//! | `GEMMQ_TLS_PLAIN_PORT` | the same broker's plaintext AMQP port |
//! | `GEMMQ_TLS_MANAGEMENT_URL` | its management API over https |

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::Env;
use gemmq::broker::{Broker, BrokerError};
use gemmq::config::BrokerOptions;
use gemmq::tls::TlsProblem;

const TOLERANCE: f64 = 1e-10;

/// A refusal must come this fast: well under the connect timeout the tests set (60 s).
const AT_ONCE: Duration = Duration::from_secs(10);

struct TlsBroker {
    url: String,
    dir: PathBuf,
    plain_port: u16,
    management_url: String,
}

impl TlsBroker {
    fn from_env() -> Option<TlsBroker> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let Some(url) = var("GEMMQ_TLS_URL") else {
            eprintln!(
                "skipped: GEMMQ_TLS_URL and friends are not set (scripts/tls-broker.sh up prints them; .ci/run sets them)"
            );
            return None;
        };
        Some(TlsBroker {
            url,
            dir: var("GEMMQ_TLS_DIR")?.into(),
            plain_port: var("GEMMQ_TLS_PLAIN_PORT")?
                .parse()
                .expect("GEMMQ_TLS_PLAIN_PORT is a port"),
            management_url: var("GEMMQ_TLS_MANAGEMENT_URL")?,
        })
    }

    fn file(&self, name: &str) -> Option<PathBuf> {
        Some(self.dir.join(name))
    }

    /// Settings for this broker at `url`, trusting the CA file `ca` and presenting the client
    /// certificate `client` (`client.pem` and `client.key` in the directory).
    fn options(&self, url: &str, ca: &str, client: Option<&str>) -> BrokerOptions {
        BrokerOptions {
            amqp_url: Some(url.into()),
            tls_ca_file: self.file(ca),
            tls_cert_file: client.and_then(|c| self.file(&format!("{c}.pem"))),
            tls_key_file: client.and_then(|c| self.file(&format!("{c}.key"))),
            connect_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        }
    }

    /// The URL with its host and port replaced.
    fn url_at(&self, host_port: &str) -> String {
        let (head, tail) = self.url.rsplit_once('@').expect("the URL has an account");
        let vhost = tail.split_once('/').map_or("", |(_, v)| v);
        format!("{head}@{host_port}/{vhost}")
    }

    /// How connecting with `opts` fails, and how long it took.
    async fn refusal(&self, opts: BrokerOptions) -> (BrokerError, Duration) {
        let settings = opts.resolve().expect("the TLS settings are valid");
        let started = Instant::now();
        let err = Broker::new(&settings, "gemmq-tls-test")
            .expect("a broker handle")
            .connection()
            .await
            .expect_err("the connection is refused");
        let took = started.elapsed();
        eprintln!("refused after {took:?}: {err}");
        (err, took)
    }
}

/// Env for a test on the TLS broker: its namespace, these broker settings.
fn env_on(name: &str, opts: BrokerOptions) -> Env {
    let mut env = Env::new(name);
    let mut opts = opts;
    opts.namespace = Some(env.ns.clone());
    opts.retry_delay = Some(env.broker.retry_delay);
    opts.connect_timeout = Some(Duration::from_secs(20));
    env.broker = opts.resolve().expect("the TLS settings are valid");
    env
}

#[tokio::test]
async fn a_job_completes_over_amqps_and_the_management_api_answers_over_https() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let mut env = env_on("tls-job", tls.options(&tls.url, "ca.pem", None));
    env.spawn_consumer(env.consumer("w1"));
    env.spawn_consumer(env.consumer("w2"));
    let shape = (96, 64, 80);
    let mut producer = env.producer("tlsjob", shape, 16);
    producer.management_url = Some(tls.management_url.clone());
    let (_, summary) = common::run_job_with(&env, producer, env.collector("tlsjob")).await;
    assert_eq!(summary.tiles, 30);
    let err = common::max_error_against_local_product(&env, "tlsjob", shape);
    assert!(err <= TOLERANCE, "max |C - A·B| = {err:e}");

    // The management API over https, trusting the same CA file: every connection of this test
    // is a TLS one.
    // The figures lag the broker by a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = loop {
        let broker = env.broker.clone();
        let url = tls.management_url.clone();
        let connections: serde_json::Value = tokio::task::spawn_blocking(move || {
            gemmq::management::Management::get_from_any(&broker, Some(&url), "/api/connections")
        })
        .await
        .expect("the request ran")
        .expect("the management API answers over https with the CA file");
        let ours: Vec<serde_json::Value> = connections
            .as_array()
            .expect("a list of connections")
            .iter()
            .filter(|c| {
                c["client_properties"]["connection_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("gemmq-consumer w"))
            })
            .cloned()
            .collect();
        if ours.len() >= 2 || Instant::now() > deadline {
            break ours;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(ours.len(), 2, "the two workers' connections are listed");
    assert!(
        ours.iter().all(|c| c["ssl"] == true),
        "every worker connection is TLS: {ours:?}"
    );

    // `gemmq-collector status` as an operator runs it on another machine: the workers'
    // heartbeats over amqps:// and the queues from the management API over https, both trusting
    // the CA file.
    let ca = tls.file("ca.pem").expect("the CA file");
    let (url, mgmt, ns) = (tls.url.clone(), tls.management_url.clone(), env.ns.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::bin("gemmq-collector"))
            .args(["status", "--once", "--json", "--management-url", &mgmt])
            .env("AMQP_URL", url)
            .env("GEMMQ_TLS_CA_FILE", ca)
            .env("GEMMQ_NAMESPACE", ns)
            .env_remove("GEMMQ_CONFIG")
            .output()
            .expect("gemmq-collector status runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status over TLS failed: {stderr}");
    let snap: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let mut workers: Vec<&str> = snap["workers"]
        .as_array()
        .expect("a list of workers")
        .iter()
        .filter_map(|w| w["worker"].as_str())
        .collect();
    workers.sort();
    assert_eq!(
        workers,
        ["w1", "w2"],
        "both workers' heartbeats came over amqps://"
    );
    assert!(
        snap["management_error"].is_null(),
        "the management API answered over https: {}",
        snap["management_error"]
    );
    assert!(
        snap["queues"].as_array().is_some_and(|q| !q.is_empty()),
        "queue figures over https: {snap}"
    );

    env.stop_consumers().await;
    env.cleanup(&["tlsjob"]).await;
}

#[tokio::test]
async fn a_wrong_ca_fails_at_once_saying_the_certificate_is_not_trusted() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let (err, took) = tls
        .refusal(tls.options(&tls.url, "wrong-ca.pem", None))
        .await;
    assert!(
        matches!(
            err,
            BrokerError::Tls {
                problem: TlsProblem::Untrusted,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < AT_ONCE, "took {took:?}: {err}");
    let message = err.to_string();
    for words in ["not trusted", "GEMMQ_TLS_CA_FILE", "wrong-ca.pem"] {
        assert!(message.contains(words), "{words:?} not in: {message}");
    }
    assert!(err.is_permanent());
    assert!(
        !message.contains(":gemmq-tls@"),
        "the password is shown: {message}"
    );
}

#[tokio::test]
async fn a_worker_given_a_wrong_ca_exits_with_the_reason_instead_of_retrying() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let consumer = common::bin("gemmq-consumer");
    let started = Instant::now();
    let out = std::process::Command::new(consumer)
        .env("AMQP_URL", &tls.url)
        .env("GEMMQ_TLS_CA_FILE", tls.dir.join("wrong-ca.pem"))
        .env("GEMMQ_CONNECT_TIMEOUT", "60s")
        .env_remove("GEMMQ_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the consumer runs");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(took < AT_ONCE, "took {took:?}: {stderr}");
    assert!(stderr.contains("not trusted"), "{stderr}");
    assert!(!stderr.contains("retrying"), "it retried: {stderr}");
    assert!(
        !stderr.contains(":gemmq-tls@"),
        "the password is shown: {stderr}"
    );
}

#[tokio::test]
async fn a_host_the_certificate_does_not_name_fails_at_once() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    // The same listener on another loopback address, which the certificate does not list.
    let port = tls
        .url
        .rsplit_once(':')
        .and_then(|(_, p)| p.split('/').next())
        .expect("the URL has a port")
        .to_string();
    let url = tls.url_at(&format!("127.0.0.2:{port}"));
    let (err, took) = tls.refusal(tls.options(&url, "ca.pem", None)).await;
    assert!(
        matches!(
            err,
            BrokerError::Tls {
                problem: TlsProblem::WrongHost,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < AT_ONCE, "took {took:?}: {err}");
    assert!(err.to_string().contains("not valid for the host"), "{err}");
}

#[tokio::test]
async fn an_amqps_url_to_the_plaintext_port_fails_and_never_falls_back_to_plaintext() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let url = tls.url_at(&format!("127.0.0.1:{}", tls.plain_port));
    let (err, took) = tls.refusal(tls.options(&url, "ca.pem", None)).await;
    assert!(
        matches!(
            err,
            BrokerError::Tls {
                problem: TlsProblem::NotTls,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < AT_ONCE, "took {took:?}: {err}");
    assert!(err.to_string().contains("does not speak TLS"), "{err}");
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_one_from_another_ca_is_refused() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let settings = tls
        .options(&tls.url, "ca.pem", Some("client"))
        .resolve()
        .expect("the client certificate and key are valid");
    Broker::new(&settings, "gemmq-tls-test client-cert")
        .expect("a broker handle")
        .channel()
        .await
        .expect("the broker takes the client certificate its CA signed");

    let (err, took) = tls
        .refusal(tls.options(&tls.url, "ca.pem", Some("wrong-client")))
        .await;
    assert!(
        matches!(
            err,
            BrokerError::Tls {
                problem: TlsProblem::ClientCertificateRefused,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < AT_ONCE, "took {took:?}: {err}");
    assert!(err.to_string().contains("wrong-client.pem"), "{err}");
}

#[tokio::test]
async fn a_key_that_is_not_the_certificates_is_a_config_error() {
    let Some(tls) = TlsBroker::from_env() else {
        return;
    };
    let opts = BrokerOptions {
        amqp_url: Some(tls.url.clone()),
        tls_cert_file: tls.file("client.pem"),
        tls_key_file: tls.file("wrong-client.key"),
        ..Default::default()
    };
    let err = opts.resolve().expect_err("the key does not match");
    assert!(err.to_string().contains("tls-key-file"), "{err}");
    assert!(err.to_string().contains("wrong-client.key"), "{err}");
}

/// Needs no broker: the warning is logged before the first try.
#[test]
fn plaintext_amqp_to_another_machine_is_warned_about_once_without_the_password() {
    let out = std::process::Command::new(common::bin("gemmq-consumer"))
        // TEST-NET-1: never answers, so the worker gives up after the connect timeout.
        .env("AMQP_URL", "amqp://gemmq:hunter2@192.0.2.1:5672/%2f")
        .env("GEMMQ_CONNECT_TIMEOUT", "1s")
        .env("RUST_LOG", "warn")
        .env_remove("GEMMQ_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the consumer runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("not encrypted").count(),
        1,
        "one warning: {stderr}"
    );
    assert!(stderr.contains("192.0.2.1"), "{stderr}");
    assert!(stderr.contains("amqps://"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password is shown: {stderr}"
    );
}
