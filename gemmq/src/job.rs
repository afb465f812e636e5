//! A job's life on the broker: announced by its manifest, found by collectors, retired when done.
//!
//! The manifest sits in the job's own manifest queue, where any collector can read it without
//! consuming it (get, then reject with requeue), and a copy is put on the shared jobs queue for a
//! collector started without `--job-id` to take the next job. Announcing is idempotent: a
//! producer run again with the same job id finds the manifest already there and, if it is the
//! same job, does not announce it twice; if it is a different job under the same id, it refuses.

use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicGetOptions, BasicRejectOptions};

use crate::broker::{PublishError, persistent, publish_confirmed};
use crate::message::{Header, JobDone, Manifest, MessageError, kind};
use crate::topology::{Topology, TopologyError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(
        "job {0} already exists with a different plan or inputs; choose another --job-id, or cancel the job (gemmq-collector cancel JOB) to start it over"
    )]
    Conflict(String),
    #[error("job {job}'s manifest is unreadable: {source}")]
    BadManifest { job: String, source: MessageError },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Whether [`announce`] published the manifest or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    New,
    AlreadyThere,
}

/// Whether a job's manifest queue was on the broker before [`announce`] declares it
/// ([`Topology::has_manifest_queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestQueue {
    /// A new job: it has no manifest to find.
    Absent,
    /// The job was announced before (or is being announced): look for its manifest.
    Present,
}

/// Declares the job's queues and publishes its manifest, unless the same one is already there:
/// then `manifest` takes that one's run, so a resumed job keeps the run its workers know. A
/// cancelled job announced again is a job again: its cancel's mark goes.
///
/// `before` is what the caller found of the manifest queue. A job whose manifest queue was absent
/// has no manifest to look for, and the look is worth sparing: it tries three times (~12 ms
/// in all) in case a collector holds the manifest for the instant of its own look. (Two
/// producers announcing one new job at the same instant can each miss the other's manifest,
/// as they could when both looked.)
pub async fn announce(
    ch: &Channel,
    topo: &Topology,
    manifest: &mut Manifest,
    before: ManifestQueue,
) -> Result<Announced, JobError> {
    // Announced again after a cancel: no longer cancelled.
    topo.clear_cancelled(ch, &manifest.job).await?;
    topo.declare_job(ch, &manifest.job).await?;
    let existing = match before {
        ManifestQueue::Absent => None,
        ManifestQueue::Present => peek_manifest(ch, topo, &manifest.job).await?,
    };
    if let Some(existing) = existing {
        return if existing.plan == manifest.plan && existing.inputs == manifest.inputs {
            manifest.run = existing.run;
            Ok(Announced::AlreadyThere)
        } else {
            Err(JobError::Conflict(manifest.job.clone()))
        };
    }
    let body = manifest.to_json();
    let props = persistent(kind::MANIFEST, manifest.job.clone())
        .with_content_type("application/json".into());
    // The announcement first: a manifest in place then means the job was announced, so a
    // producer that died in between and runs again announces it again rather than never.
    publish_confirmed(
        ch,
        "",
        &topo.jobs_queue(),
        &body,
        props.clone(),
        "the job announcement",
    )
    .await?;
    publish_confirmed(
        ch,
        "",
        &topo.manifest_queue(&manifest.job),
        &body,
        props,
        "the job manifest",
    )
    .await?;
    Ok(Announced::New)
}

/// Reads a job's manifest without consuming it; `None` if the job has no manifest (yet).
pub async fn peek_manifest(
    ch: &Channel,
    topo: &Topology,
    job: &str,
) -> Result<Option<Manifest>, JobError> {
    let queue = topo.manifest_queue(job);
    // Another collector may hold the message for the instant of its own peek (a get and a
    // reject: about a millisecond): look again shortly. Not longer: every new job's producer
    // comes through here finding nothing.
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(msg) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await?
        {
            let parsed = Manifest::from_json(&msg.delivery.data);
            msg.delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await?;
            return parsed.map(Some).map_err(|source| JobError::BadManifest {
                job: job.into(),
                source,
            });
        }
    }
    Ok(None)
}

/// Tells the running workers (their notice queues) that a finished job's blocks can go.
/// Best effort: unconfirmed and not mandatory, since no worker may be running; a worker that
/// misses it drops the blocks when its cache needs the room.
pub async fn announce_done(
    ch: &Channel,
    topo: &Topology,
    job: &str,
    run: &str,
) -> Result<(), JobError> {
    let done = JobDone {
        job: job.into(),
        run: run.into(),
    };
    let body = crate::message::encode(&Header::JobDone(done), &[]);
    ch.basic_publish(
        topo.operands_exchange().as_str().into(),
        Topology::done_key(job).as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        &body,
        lapin::BasicProperties::default().with_type(kind::JOB_DONE.into()),
    )
    .await?;
    Ok(())
}
