//! The worker's notice queue: the collectors' word that a job is done, so its cached blocks go
//! at once instead of when the cache needs the room.

use std::sync::Arc;

use futures_util::StreamExt;
use gemmq::message::Header;
use lapin::Connection;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::job::{Jobs, forget_job};
use super::{OperandBlocks, ReadCtx, decode_frame};

impl OperandBlocks {
    /// Declares this connection's notice queue and starts consuming it. Returns the loop that
    /// acts on the notices, to be run for as long as the connection lives.
    pub async fn start_notices(
        &self,
        conn: &Connection,
        worker: &str,
        tag: &str,
    ) -> Result<impl std::future::Future<Output = ()> + use<>, String> {
        let err = |e: &dyn std::fmt::Display| format!("starting the notice queue: {e}");
        let ch = conn.create_channel().await.map_err(|e| err(&e))?;
        ch.basic_qos(16, BasicQosOptions { global: false })
            .await
            .map_err(|e| err(&e))?;
        let queue = self
            .topo
            .declare_notices(&ch, worker)
            .await
            .map_err(|e| err(&e))?;
        let mut feed = ch
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| err(&e))?;
        tracing::debug!(%queue, "consuming the notice queue");
        let (ctx, jobs) = (self.read.clone(), self.jobs.clone());
        Ok(async move {
            while let Some(Ok(d)) = feed.next().await {
                accept_notice(&ctx, &jobs, &d.data);
            }
            tracing::debug!("the notice queue stopped");
            let _ = ch.close(200, "notice queue done".into()).await;
        })
    }
}

fn accept_notice(ctx: &ReadCtx, jobs: &Arc<Jobs>, body: &[u8]) {
    match decode_frame(ctx, "?", body, "notice queue") {
        // decode checked the job id.
        Some((Header::JobDone(notice), _)) => forget_job(jobs, &notice),
        Some(_) => tracing::warn!("a message that is not a job notice on the notice queue skipped"),
        None => {}
    }
}
