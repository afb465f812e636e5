//! Metrics for Prometheus: what a consumer or the collector serves on `--metrics-addr`.
//!
//! Each program keeps its own counters where its work happens (the consumer's `Stats`, the
//! collector's job figures) as plain atomics, and describes them to a
//! [`prometheus_client::registry::Registry`] as a `Collector` that reads them when scraped: the
//! task path pays a relaxed atomic add per event, nothing per scrape. [`MetricsServer`] serves
//! the registry as `GET /metrics` in the OpenMetrics text format, which Prometheus scrapes.
//!
//! Off by default: the figures are not secret, but an open port is a choice for the operator
//! (bind `127.0.0.1`, or a private network such as compose's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::http::HttpServer;

/// What Prometheus is told it gets: OpenMetrics 1.0 text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve metrics on {addr} (--metrics-addr): {source}; is the port in use, or the address not this machine's?"
)]
pub struct MetricsError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// `GET /metrics` on one address, until [`MetricsServer::close`] (or drop).
pub struct MetricsServer(HttpServer);

impl MetricsServer {
    /// Serves `registry` on `addr` (port 0 picks a free one; [`MetricsServer::addr`] says which).
    pub async fn start(addr: SocketAddr, registry: Registry) -> Result<Self, MetricsError> {
        let error = |source| MetricsError { addr, source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(error)?;
        let app = Router::new()
            .route("/metrics", get(scrape))
            .with_state(Arc::new(registry));
        let server = HttpServer::serve(
            listener,
            app,
            CancellationToken::new(),
            "the metrics endpoint",
        )
        .map_err(error)?;
        info!(url = %format!("http://{}/metrics", server.addr()), "serving metrics for Prometheus");
        Ok(MetricsServer(server))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    /// Stops serving, letting a scrape in progress finish.
    pub async fn close(self) {
        self.0.close(Duration::from_secs(5)).await;
    }
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry))
}

/// The registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// Helpers for a `Collector` that reads its figures when scraped. A counter's name is given
/// without `_total`: the encoder adds it.
pub struct Figures<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

impl<'a, 'e> Figures<'a, 'e> {
    pub fn new(encoder: &'a mut DescriptorEncoder<'e>) -> Self {
        Figures { encoder }
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> std::fmt::Result {
        let c = ConstCounter::new(value);
        c.encode(
            self.encoder
                .encode_descriptor(name, help, None, c.metric_type())?,
        )
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> std::fmt::Result {
        let g = ConstGauge::new(value);
        g.encode(
            self.encoder
                .encode_descriptor(name, help, None, g.metric_type())?,
        )
    }

    /// A counter with one sample per label set.
    pub fn counters<S: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(S, u64)],
    ) -> std::fmt::Result {
        let samples = samples.iter().map(|(l, v)| (l, ConstCounter::new(*v)));
        self.family(name, help, MetricType::Counter, samples)
    }

    /// A gauge with one sample per label set.
    pub fn gauges<S: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(S, i64)],
    ) -> std::fmt::Result {
        let samples = samples.iter().map(|(l, v)| (l, ConstGauge::new(*v)));
        self.family(name, help, MetricType::Gauge, samples)
    }

    fn family<'s, S: EncodeLabelSet + 's, M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl Iterator<Item = (&'s S, M)>,
    ) -> std::fmt::Result {
        let mut family = self.encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in samples {
            metric.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct Two;

    impl Collector for Two {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            let mut f = Figures::new(&mut encoder);
            f.counter("tasks_done", "Tasks done.", 7)?;
            f.gauges(
                "tiles",
                "Tiles.",
                &[([("job", "j1")], 3), ([("job", "j2")], 4)],
            )
        }
    }

    #[test]
    fn figures_read_at_scrape_time_come_out_as_openmetrics_text_under_the_prefix() {
        let mut registry = Registry::with_prefix("gemmq_test");
        registry.register_collector(Box::new(Two));
        let text = render(&registry);
        assert!(
            text.contains("# TYPE gemmq_test_tasks_done counter"),
            "{text}"
        );
        assert!(text.contains("gemmq_test_tasks_done_total 7"), "{text}");
        assert!(text.contains("gemmq_test_tiles{job=\"j1\"} 3"), "{text}");
        assert!(text.contains("gemmq_test_tiles{job=\"j2\"} 4"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn the_server_answers_a_scrape_and_names_a_taken_port() {
        let mut registry = Registry::with_prefix("gemmq_test");
        registry.register_collector(Box::new(Two));
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), registry)
            .await
            .unwrap();
        let url = format!("http://{}/metrics", server.addr());
        let body = tokio::task::spawn_blocking(move || {
            let mut resp = ureq::get(&url).call().unwrap();
            let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
            (ctype, resp.body_mut().read_to_string().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(body.0, CONTENT_TYPE);
        assert!(body.1.contains("gemmq_test_tasks_done_total 7"));

        let taken = MetricsServer::start(server.addr(), Registry::default())
            .await
            .err()
            .expect("a port in use is refused");
        let msg = taken.to_string();
        assert!(
            msg.contains(&server.addr().to_string()) && msg.contains("--metrics-addr"),
            "{msg}"
        );
        server.close().await;
    }
}
