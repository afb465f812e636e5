//! `gemmq-collector cancel JOB`: a job given up on, removed from the broker.
//!
//! A job nobody finishes keeps its operand stream (all of A and B) on the broker's disk and its
//! tasks in the shared queue for ever, and its id cannot be used for another job. Cancelling
//! takes the job's claim as a collector does — so it is refused while a collector assembles the
//! job, and no collector can start on it meanwhile — then deletes the job's operand stream,
//! results stream and manifest and tells the workers. They drop the job's cached blocks, and a
//! task of the job they still receive finds no operand stream: acked and dropped with a log
//! line, not computed, not parked. (A task that carries its blocks, `--operands inline`, or whose
//! blocks a worker still holds, is computed, and its results, finding no results stream, are
//! dropped.) A checkpoint of C on a collector's disk is left alone, and so is the job's
//! announcement on the jobs queue, which the next collector skips.
//!
//! The cancel leaves a mark ([`Topology::mark_cancelled`], kept a week): a collector standing by
//! for the job says it was cancelled and exits [`crate::EXIT_CANCELLED`] rather than report it
//! collected elsewhere; one started for it afterwards says so and waits in case the job's
//! producer runs it again (which removes the mark), until its `--idle-timeout`, then exits
//! [`crate::EXIT_CANCELLED`] rather than with "not announced".

use anyhow::{Context, Result, bail};
use gemmq::Topology;
use gemmq::broker::Broker;
use gemmq::config::CommonArgs;
use gemmq::shutdown::CancellationToken;
use tracing::{info, warn};

use crate::collect::Claim;

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The job to cancel (the producer's --job-id)
    #[arg(value_name = "JOB")]
    pub job: String,
}

/// What a cancel found and removed.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The job's queues were there and are gone.
    Removed,
    /// No queue of the job was there: nothing to do.
    NoSuchJob,
}

pub async fn run(args: CancelArgs, shutdown: CancellationToken) -> Result<Cancelled> {
    let (_, settings) = args.common.load()?;
    gemmq::topology::check_name("job", &args.job)?;
    let broker = Broker::new(&settings, "gemmq-collector cancel")?.with_shutdown(shutdown);
    let topo = settings.topology();
    cancel(&broker, &topo, &args.job).await
}

/// Cancels `job` in `topo`'s namespace (see the module's docs).
pub async fn cancel(broker: &Broker, topo: &Topology, job: &str) -> Result<Cancelled> {
    // The claim belongs to the connection it is declared on: keep one connection throughout.
    let conn = broker.connection().await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    if !topo.claim_job(&ch, job).await? {
        bail!(
            "job {job} is held by a running collector (or another cancel): stop that collector (Ctrl-C or SIGTERM), and any standing by for the job, then cancel again; or let it finish"
        );
    }
    let run = match gemmq::job::peek_manifest(&ch, topo, job).await {
        Ok(manifest) => manifest.map(|m| m.run),
        // No manifest queue (the broker closed the channel): look for the rest of the job anyway.
        Err(gemmq::job::JobError::Amqp(e)) if gemmq::topology::is_queue_missing(&e) => None,
        Err(e) => {
            warn!(%job, error = %e, "could not read the job's manifest; the workers will not be told, and drop its blocks when they need the room");
            None
        }
    };
    let ch = conn.create_channel().await.context("opening a channel")?;
    let mut there = Vec::new();
    for queue in topo.job_queues(job) {
        let exists = gemmq::topology::queue_exists_on(&conn, &queue)
            .await
            .with_context(|| format!("looking for {queue}"))?;
        if exists {
            there.push(queue);
        }
    }
    let found = !there.is_empty();
    if found {
        // Marked first: a cancel interrupted halfway leaves a job marked, which only matters
        // once its queues are gone too (a collector looks at the mark then).
        topo.mark_cancelled(&ch, job)
            .await
            .context("marking the job cancelled")?;
    }
    for queue in there {
        ch.queue_delete(queue.as_str().into(), Default::default())
            .await
            .with_context(|| format!("deleting {queue}"))?;
        info!(%job, %queue, "deleted");
    }
    if let Some(run) = &run
        && let Err(e) = gemmq::job::announce_done(&ch, topo, job, run).await
    {
        warn!(%job, error = %e, "could not tell the workers; they drop the job's blocks when they need the room");
    }
    Claim::held(conn, topo.collector_queue(job)).release().await;
    Ok(if found {
        info!(%job, "job cancelled: its tasks still queued are dropped by the workers that take them");
        Cancelled::Removed
    } else {
        info!(%job, "no such job in this namespace: nothing to cancel");
        Cancelled::NoSuchJob
    })
}
