//! Checking C, and healing it: when Freivalds' check fails, the wrong tiles are found
//! ([`gemmq::verify::wrong_tiles`]), their tasks published again as a recompute round whose
//! results replace exactly those tiles, and C is checked again — up to [`MAX_RECOMPUTES`] times
//! per tile. Celery and Dask never check a result; a worker with bad memory, or a forged
//! result, would leave C wrong. Here it is named, and repaired.

use std::path::Path;

use anyhow::{Context, Result, bail};
use gemmq::TileId;
use gemmq::assembly::Assembly;
use gemmq::inputs::Operand;
use gemmq::message::{self, Header, Inputs, Manifest, TaskHeader, kind};
use gemmq::tiling::Operands;
use gemmq::verify::{self, Expected, Verdict};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::collect::Collection;

/// How many times a tile is computed again before the job ends unverified (exit 4): a tile
/// wrong three times over is not bad luck.
pub const MAX_RECOMPUTES: u32 = 3;

/// A tile that failed verification (summary.json's `wrong_tiles`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WrongTile {
    /// `C[row,col]`.
    pub tile: String,
    /// Who sent the wrong value (one per part of k that came from someone else).
    pub sent_by: Vec<String>,
    /// The recompute round that replaced it (1 for the first).
    pub recompute: u32,
}

/// What C·x must be, worked out from A and B while the workers compute C; and C·x itself,
/// summed as the tiles come in.
pub(crate) fn start(
    manifest: &Manifest,
    asm: &mut Assembly,
) -> tokio::task::JoinHandle<Result<Expected>> {
    // A manifest's check names its vectors; a malformed one (too many) is not trusted with
    // memory, and the check at the end then falls back to reading C.
    let (rounds, seed) = match &manifest.check {
        Some(c) if (1..=verify::MAX_ROUNDS as usize).contains(&c.abx.len()) => {
            (c.abx.len() as u32, c.seed)
        }
        _ => (verify::ROUNDS, verify::VECTOR_SEED),
    };
    asm.track_product(rounds, seed);
    let manifest = manifest.clone();
    tokio::task::spawn_blocking(move || expectation(&manifest))
}

/// Freivalds' expectation for the job's A and B: as the producer computed it and sent it with
/// the manifest; otherwise (a tall job, or the producer's expectation unreadable) walked from the
/// seed row by row (no A or B in memory), or computed from the input files.
fn expectation(manifest: &Manifest) -> Result<Expected> {
    let plan = &manifest.plan;
    let (m, k, n) = (plan.m as usize, plan.k as usize, plan.n as usize);
    if let Some(check) = &manifest.check {
        match Expected::from_check(check, m, k, n, plan.dtype) {
            Ok(e) => return Ok(e),
            Err(e) => {
                warn!(job = %manifest.job, error = %e, "the manifest's verification vectors are unusable; computing them here")
            }
        }
    }
    let (a, b) = inputs(manifest).context("re-reading A and B to verify C")?;
    Ok(verify::expect_rows(
        &a,
        &b,
        verify::ROUNDS,
        verify::VECTOR_SEED,
    )?)
}

/// The job's A and B, read a row at a time: from the seed, or from the files (which may be
/// larger than memory).
fn inputs(manifest: &Manifest) -> Result<(Operand, Operand)> {
    let plan = &manifest.plan;
    let (m, k, n) = (plan.m as usize, plan.k as usize, plan.n as usize);
    match &manifest.inputs {
        Inputs::Seed(s) => Ok(Operand::seeded_pair(m, k, n, plan.dtype, *s)),
        Inputs::Files { a, b } => {
            let a = Operand::open(Path::new(a)).with_context(|| format!("opening A ({a})"))?;
            let b = Operand::open(Path::new(b)).with_context(|| format!("opening B ({b})"))?;
            if a.shape() != (m, k) || b.shape() != (k, n) {
                bail!("A or B changed since the job was published");
            }
            Ok((a, b))
        }
    }
}

/// C against the expectation: from C·x summed as tiles were written when every tile was seen
/// written here, else by reading C.
fn check(asm: &Assembly, expected: &Expected) -> Result<Verdict> {
    Ok(
        match asm
            .running_product()
            .and_then(|r| expected.check_running(r))
        {
            Some(v) => v,
            None => asm.with_c(|c| expected.check(c))?,
        },
    )
}

/// Checks the complete C and heals it while it fails: the final verdict, and the tiles that
/// were wrong on the way.
pub(crate) async fn verify_and_heal(
    job: &mut Collection<'_>,
    expected: &Expected,
) -> Result<(Verdict, Vec<WrongTile>)> {
    let mut healed = Vec::new();
    loop {
        let verdict = check(&job.asm, expected)?;
        if verdict.passed {
            return Ok((verdict, healed));
        }
        let wrong = match locate(job, expected) {
            Ok(w) if !w.is_empty() => w,
            Ok(_) => {
                warn!("C failed verification but no single tile was found wrong");
                return Ok((verdict, healed));
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "C failed verification; the wrong tiles cannot be found");
                return Ok((verdict, healed));
            }
        };
        if let Some(&(row, col)) = wrong
            .iter()
            .find(|&&(r, c)| job.asm.recomputes(r, c) >= MAX_RECOMPUTES)
        {
            let tile = TileId { row, col, part: 0 };
            error!(%tile, recomputes = MAX_RECOMPUTES, sent_by = ?job.asm.senders_of(row, col),
                "tile still wrong after every recompute: giving up");
            return Ok((verdict, healed));
        }
        for &(row, col) in &wrong {
            healed.push(recompute(job, row, col).await?);
        }
        job.asm.commit().context("saving the checkpoint")?;
        job.until_done().await?;
    }
}

/// The wrong tiles of C, as (block row, block column).
fn locate(job: &Collection<'_>, expected: &Expected) -> Result<Vec<(u32, u32)>> {
    let rows = job.asm.with_c(|c| expected.failing_rows(c))?;
    let (a, b) = inputs(job.manifest)?;
    let plan = &job.manifest.plan;
    // Fresh vectors: the ones that found the failure could have cancelled a wrong tile's error
    // in another row; two independent ones will not.
    let seed = verify::VECTOR_SEED ^ 0x7e11;
    Ok(job
        .asm
        .with_c(|c| verify::wrong_tiles(&a, &b, c, plan, &rows, verify::ROUNDS, seed))??)
}

/// Names the tile's senders, and has it computed again: every part of it, in a new round.
async fn recompute(job: &mut Collection<'_>, row: u32, col: u32) -> Result<WrongTile> {
    let sent_by = job.asm.senders_of(row, col);
    for w in &sent_by {
        job.asm.workers.entry(w.clone()).or_default().wrong_tiles += 1;
    }
    let round = job.asm.recompute(row, col);
    if let Some(live) = &job.live {
        live.wrong(row, col);
    }
    let tile = TileId { row, col, part: 0 };
    warn!(%tile, ?sent_by, round, "wrong tile: computing it again");
    let (plan, m) = (&job.manifest.plan, job.manifest);
    let ch = job
        .broker
        .confirm_channel()
        .await
        .context("connecting to RabbitMQ to publish a recompute")?;
    let inline = (plan.operands == Operands::Inline)
        .then(|| inputs(m))
        .transpose()?;
    for part in 0..plan.parts() {
        let id = TileId { row, col, part };
        let task = TaskHeader {
            recompute: round,
            ..plan.task(&m.job, &m.run, id)
        };
        // No place on the operand stream: the worker reads it from the start (or finds the
        // blocks in its cache), as it would for a producer that gives none.
        let body = match &inline {
            None => message::encode(&Header::StreamedTask(task), &[]),
            Some((a, b)) => {
                let mut payload = Vec::new();
                a.append_le(plan.rows(row), plan.depth(part), &mut payload)?;
                b.append_le(plan.depth(part), plan.cols(col), &mut payload)?;
                message::encode(&Header::InlineTask(task), &[&payload])
            }
        };
        let props = gemmq::broker::persistent(
            kind::TASK,
            format!("{}/{row}/{col}/{part}/recompute-{round}", m.job),
        );
        gemmq::broker::publish_confirmed(
            &ch,
            &job.topo.tasks_exchange(),
            gemmq::topology::TASK_KEY,
            &body,
            props,
            format!("the recompute of {id}"),
        )
        .await
        .with_context(|| format!("publishing the recompute of {id}"))?;
        info!(job = %m.job, tile = %id, round, "task published (recompute)");
    }
    let _ = ch.close(200, "published".into()).await;
    Ok(WrongTile {
        tile: tile.to_string(),
        sent_by,
        recompute: round,
    })
}
