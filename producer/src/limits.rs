//! The limits a job must fit, checked before anything is made or published: a job that cannot
//! finish is refused at once (exit 2), naming the limit and the setting that moves it, instead
//! of failing hours in — or, as a 65536³ job once did, aborting on a 32 GiB allocation.

use anyhow::Result;
use gemmq::Plan;
use gemmq::config::ConfigError;
use gemmq::tiling::Operands;
use tracing::{debug, info};

use crate::Settings;

pub(crate) async fn check(s: &Settings, plan: &Plan) -> Result<()> {
    output(s, plan)?;
    if plan.operands == Operands::Stream {
        broker_disk(s, plan).await?;
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// C must fit the collector: it keeps C memory-mapped and refuses one over its
/// `--max-output-bytes`, which the producer reads from the same setting.
fn output(s: &Settings, plan: &Plan) -> Result<(), ConfigError> {
    // In u128: sides up to 2³¹ make products of three numbers that overflow u64.
    let c = u128::from(plan.m) * u128::from(plan.n) * plan.dtype.size() as u128;
    if c > u128::from(s.max_output_bytes) {
        let c = u64::try_from(c).unwrap_or(u64::MAX);
        return Err(ConfigError::invalid(
            "max-output-bytes",
            format!(
                "C would be {} ({}x{} {}), more than the {} a collector takes: raise --max-output-bytes (GEMMQ_MAX_OUTPUT_BYTES) for the producer and the collector, on a machine with that much disk for C, or multiply a smaller C",
                gib(c),
                plan.m,
                plan.n,
                plan.dtype,
                gib(s.max_output_bytes)
            ),
        ));
    }
    Ok(())
}

/// The job's streams (A and B in, C out) must fit the broker's disk above its free-disk limit, where
/// RabbitMQ blocks every publisher until space is freed. Asked of the management API; without
/// one (not enabled, or another port) the job goes ahead unchecked.
async fn broker_disk(s: &Settings, plan: &Plan) -> Result<()> {
    let size = plan.dtype.size() as u128;
    // A and B in the operand stream, and C (once per part of k) in the results stream: both
    // stay until the job is done.
    let need = (u128::from(plan.m) * u128::from(plan.k)
        + u128::from(plan.k) * u128::from(plan.n)
        + u128::from(plan.m) * u128::from(plan.n) * u128::from(plan.parts()))
        * size;
    let need = u64::try_from(need).unwrap_or(u64::MAX);
    let (broker, mgmt) = (s.broker.clone(), s.management_url.clone());
    let nodes = tokio::task::spawn_blocking(move || {
        gemmq::management::Management::get_from_any::<serde_json::Value>(
            &broker,
            mgmt.as_deref(),
            "/api/nodes",
        )
    })
    .await?;
    let nodes = match nodes {
        Ok(nodes) => nodes,
        Err(e) => {
            debug!(error = %e, "the management API did not answer; the broker's free disk is not checked");
            return Ok(());
        }
    };
    for node in nodes.as_array().into_iter().flatten() {
        let (Some(free), Some(limit)) =
            (node["disk_free"].as_u64(), node["disk_free_limit"].as_u64())
        else {
            continue;
        };
        let room = free.saturating_sub(limit);
        let name = node["name"].as_str().unwrap_or("?");
        if need > room {
            return Err(ConfigError::invalid(
                "m/k/n",
                format!(
                    "the job's operand and results streams need {} of the broker's disk, and node {name} has {} free above its limit of {}: free disk on the broker (or lower its disk_free_limit), or multiply smaller matrices",
                    gib(need),
                    gib(room),
                    gib(limit)
                ),
            )
            .into());
        }
        info!(node = %name, need = %gib(need), room = %gib(room), "the job's streams fit the broker's disk");
    }
    Ok(())
}
