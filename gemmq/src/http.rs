//! A small HTTP server for what the programs show about themselves (the collector's live page,
//! the metrics endpoint): an axum router served on a bound listener in a task of its own until
//! its stop token is cancelled — by [`HttpServer::close`], by dropping it, or by whoever else
//! holds the token (the live page ends its event streams with it too).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub struct HttpServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `app` on `listener` until `stop` is cancelled; `what` names it in the log line
    /// of a server that failed.
    pub fn serve(
        listener: TcpListener,
        app: Router,
        stop: CancellationToken,
        what: &'static str,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "{what} stopped");
            }
        });
        Ok(HttpServer {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// Where it listens (the port chosen when it was bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving, giving requests in progress up to `within` to finish.
    pub async fn close(mut self, within: Duration) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(within, task).await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
