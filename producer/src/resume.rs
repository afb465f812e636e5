//! What the producer does after a try at publishing was interrupted: which errors end it, and
//! how the next try goes on given what is left of the job's queues on the broker.
//!
//! Tasks are confirmed in publishing order, so a new try skips what was confirmed; a task
//! published twice is harmless (the collector keeps one result per tile). The operand stream is
//! the exception: when it is gone, the blocks it held are gone too and go out again.

use anyhow::{Context, Result};
use gemmq::broker::Broker;
use gemmq::job;
use gemmq::topology;

/// The job's operand stream was deleted while its blocks were being published: the blocks it
/// held are gone with it, and are published again (into the stream the next try declares)
/// before publishing carries on.
#[derive(Debug, thiserror::Error)]
#[error("the operand stream of job {0} vanished while publishing")]
pub(crate) struct StreamVanished(pub(crate) String);

/// Whether a try failed because the job's stream was gone: it was found missing, or a block
/// went unroutable (the operands exchange found no stream for it).
/// An unroutable task says nothing about the stream: it is published again like any
/// unconfirmed message.
pub(crate) fn stream_lost(e: &anyhow::Error, operands_exchange: &str) -> bool {
    e.chain().any(|c| {
        c.is::<StreamVanished>()
            || matches!(
                c.downcast_ref::<gemmq::broker::PublishError>(),
                Some(gemmq::broker::PublishError::Unroutable { exchange, .. }) if exchange == operands_exchange
            )
    })
}

/// How a try goes on after an interrupted one.
#[derive(Debug, PartialEq)]
pub(crate) enum Resuming {
    /// The job's queues are there: publish what was not confirmed.
    AsBefore,
    /// Everything was confirmed and a collector has finished the job and deleted its queues:
    /// declaring them again would bring a finished job back.
    Done,
    /// The stream is gone, and the blocks with it: declare it again and publish every block.
    WithEveryBlock,
}

pub(crate) fn resume_after(queues: JobQueues, confirmed: u64, messages: u64) -> Resuming {
    match queues {
        JobQueues::There => Resuming::AsBefore,
        JobQueues::Retired if confirmed == messages => Resuming::Done,
        JobQueues::StreamGone | JobQueues::Retired => Resuming::WithEveryBlock,
    }
}

/// What is left of a job's queues on the broker.
pub(crate) enum JobQueues {
    There,
    /// The operand stream is missing, the results queue is there.
    StreamGone,
    /// Both are missing: a collector finished the job and deleted them, or someone deleted
    /// the job by hand.
    Retired,
}

pub(crate) async fn job_queues(
    broker: &Broker,
    topo: &topology::Topology,
    job: &str,
) -> Result<JobQueues> {
    // A missing queue closes the channel it was asked on: one throwaway channel per question.
    let exists = |queue: String| async move {
        let ch = broker.channel().await.context("connecting to RabbitMQ")?;
        let found = topology::queue_exists(&ch, &queue).await;
        let _ = ch.close(200, "checked".into()).await;
        found.with_context(|| format!("checking that {queue} exists"))
    };
    if exists(topo.operands_queue(job)).await? {
        return Ok(JobQueues::There);
    }
    Ok(if exists(topo.results_queue(job)).await? {
        JobQueues::StreamGone
    } else {
        JobQueues::Retired
    })
}

/// Errors that reconnecting cannot fix.
pub(crate) fn is_fatal(e: &anyhow::Error) -> bool {
    use gemmq::broker::BrokerError;
    use gemmq::topology::TopologyError;
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<BrokerError>(),
            Some(
                BrokerError::Unreachable { .. }
                    | BrokerError::AccessRefused { .. }
                    | BrokerError::Pool(_)
            )
        ) || matches!(
            c.downcast_ref::<TopologyError>(),
            Some(TopologyError::Mismatch { .. } | TopologyError::Refused { .. })
        ) || matches!(
            c.downcast_ref::<job::JobError>(),
            Some(
                job::JobError::Conflict(_)
                    | job::JobError::BadManifest { .. }
                    | job::JobError::Topology(
                        TopologyError::Mismatch { .. } | TopologyError::Refused { .. }
                    )
            )
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_job_is_not_brought_back_and_a_lost_stream_gets_every_block_again() {
        use JobQueues::*;
        assert_eq!(resume_after(There, 10, 100), Resuming::AsBefore);
        // All confirmed, and the collector already deleted the job's queues: it is finished.
        assert_eq!(resume_after(Retired, 100, 100), Resuming::Done);
        // Not all confirmed: someone deleted a running job's queues; it is declared again.
        assert_eq!(resume_after(Retired, 99, 100), Resuming::WithEveryBlock);
        assert_eq!(resume_after(StreamGone, 100, 100), Resuming::WithEveryBlock);
        assert_eq!(resume_after(StreamGone, 5, 100), Resuming::WithEveryBlock);
    }

    #[test]
    fn only_a_vanished_stream_or_an_unroutable_block_means_the_blocks_are_lost() {
        let unroutable = |exchange: &str| {
            anyhow::Error::new(gemmq::broker::PublishError::Unroutable {
                what: "something".into(),
                exchange: exchange.into(),
                code: 312,
                text: "NO_ROUTE".into(),
            })
            .context("publishing")
        };
        let topo = topology::Topology::new("t", std::time::Duration::from_secs(1));
        let operands = topo.operands_exchange();
        assert!(stream_lost(&unroutable(&operands), &operands));
        assert!(!stream_lost(&unroutable(&topo.tasks_exchange()), &operands));
        let vanished = anyhow::Error::new(StreamVanished("j".into())).context("publishing");
        assert!(stream_lost(&vanished, &operands));
        assert!(!stream_lost(
            &anyhow::anyhow!("connection reset"),
            &operands
        ));
    }
}
