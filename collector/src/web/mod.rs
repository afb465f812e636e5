//! The live page of a job (`--web ADDR`): while the collector collects, a browser at
//! `http://ADDR/` watches the tile map fill in — each tile coloured by the worker that computed
//! it, retried ones marked, parked ones red, the parts of a k-split tile filling it by fractions —
//! with progress, throughput and ETA, and the workers (their heartbeats) and queues (the
//! management API) as `gemmq-collector status` shows them. Read-only: the page cannot act.
//!
//! `GET /` is the page (one file, its own script: no CDN, works offline); `GET /events` is the
//! job as server-sent events: a `snapshot` first, then `task`, `worker`, `parked`, `wrong`,
//! `status` and `done` events, each change once ([`live::Live`]).

pub mod live;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use futures_util::Stream;
use gemmq::config::BrokerSettings;
use gemmq::http::HttpServer;
use gemmq::message::Manifest;
use gemmq::shutdown::CancellationToken;
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

pub use live::Live;

const PAGE: &str = include_str!("page.html");

/// How often the workers and queues are sent to the pages.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// The page, served while the collector collects.
pub struct Page {
    pub live: Arc<Live>,
    pub addr: SocketAddr,
    /// Its token also ends the event streams and the status pump: dropping the page stops all.
    server: HttpServer,
}

impl Page {
    /// Serves the page of `manifest`'s job on `addr` (port 0 picks one) until [`Page::close`],
    /// and sends the workers and queues every two seconds.
    pub async fn start(
        addr: SocketAddr,
        manifest: &Manifest,
        broker: BrokerSettings,
        management_url: Option<String>,
    ) -> Result<Page> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot serve the live page on {addr} (--web): is the address in use, or not this machine's?")
        })?;
        let live = Arc::new(Live::new(manifest));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/", get(page))
            .route("/events", get(events))
            .with_state((live.clone(), stop.clone()));
        let server = HttpServer::serve(listener, app, stop.clone(), "the live page")
            .context("the live page's address")?;
        tokio::spawn(status_pump(
            live.clone(),
            broker,
            management_url,
            stop.clone(),
        ));
        info!(url = %format!("http://{}/", server.addr()), "live page of the job");
        Ok(Page {
            live,
            addr: server.addr(),
            server,
        })
    }

    /// Ends every page's event stream after what was sent (the `done` event), and waits a
    /// moment for them to go out before the collector exits.
    pub async fn close(self) {
        self.server.close(Duration::from_secs(2)).await;
    }
}

async fn page() -> impl IntoResponse {
    Html(PAGE)
}

type PageState = (Arc<Live>, CancellationToken);

async fn events(
    State((live, stop)): State<PageState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (snapshot, rx) = live.subscribe();
    let start = (Some(snapshot), rx, live, stop);
    let stream = futures_util::stream::unfold(start, |(first, mut rx, live, stop)| async move {
        if let Some(c) = first {
            return Some((Ok(event(c)), (None, rx, live, stop)));
        }
        // What was sent before the page closed goes out first (the `done` event).
        let next = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = stop.cancelled() => return None,
        };
        match next {
            Ok(c) => Some((Ok(event(c)), (None, rx, live, stop))),
            // Fell behind: start it over from a fresh snapshot.
            Err(RecvError::Lagged(_)) => {
                let (snapshot, rx) = live.subscribe();
                Some((Ok(event(snapshot)), (None, rx, live, stop)))
            }
            Err(RecvError::Closed) => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn event(c: live::Change) -> Event {
    Event::default().event(c.event).data(c.data)
}

/// The workers' heartbeats and the queues, every [`STATUS_EVERY`], as `status` shows them.
async fn status_pump(
    live: Arc<Live>,
    broker: BrokerSettings,
    management_url: Option<String>,
    stop: CancellationToken,
) {
    let mut watcher = match crate::status::Watcher::new(&broker).await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "the live page shows no workers: cannot follow their heartbeats");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            pumped = watcher.pump(STATUS_EVERY) => if let Err(e) = pumped {
                warn!(error = %format!("{e:#}"), "the live page stopped following the workers");
                return;
            }
        }
        let snapshot = crate::status::take(&broker, &watcher, management_url.as_deref()).await;
        live.status(&snapshot);
    }
}
