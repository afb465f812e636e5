//! Before anything is published: A and B generated or loaded and checked, the plan, the
//! verification vectors and the job's manifest. A tile or group that cannot work is refused
//! here, before gigabytes are generated and before a byte reaches the broker.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gemmq::config::ConfigError;
use gemmq::inputs::Operand;
use gemmq::message::{self, Inputs, Manifest};
use gemmq::tiling::GroupSize;
use gemmq::verify;
use gemmq::{DType, Plan, TileSize};
use tracing::info;

use crate::{Settings, Source, unix_ms};

/// A job ready to publish: A and B are where their blocks come from, not numbers in memory.
pub(crate) struct Prepared {
    pub a: Operand,
    pub b: Operand,
    pub manifest: Manifest,
    /// Tasks per task message.
    pub group: usize,
    /// Whether `group` is `auto`'s, and so fitted to the workers consuming once the producer
    /// reaches the broker ([`Prepared::fit_group_to`]).
    pub group_is_auto: bool,
    /// The workers the group was fitted to, when counted.
    pub workers: Option<u32>,
}

impl Prepared {
    /// `auto`'s group for `workers` workers; true when that changed it.
    pub fn fit_group_to(&mut self, workers: u32, max_message_bytes: u64) -> bool {
        let plan = &self.manifest.plan;
        let group = gemmq::tiling::auto_group(plan, max_message_bytes, workers.into()) as usize;
        self.workers = Some(workers);
        if group == self.group {
            return false;
        }
        self.group = group;
        true
    }
}

pub(crate) async fn prepare(s: &Settings) -> Result<Prepared> {
    let Loaded {
        a,
        b,
        plan,
        inputs,
        stamp,
    } = load(s).await?;
    crate::limits::check(s, &plan).await?;
    if let Some(dir) = &s.save_inputs {
        save_inputs(dir, &a, &b)?;
    }
    let (a, b, check) = verification(a, b).await?;
    let run = message::run_of(&[
        s.job_id.as_bytes(),
        &serde_json::to_vec(&plan).context("describing the plan")?,
        &serde_json::to_vec(&inputs).context("describing the inputs")?,
        stamp.as_bytes(),
    ]);
    let manifest = Manifest {
        version: message::VERSION,
        job: s.job_id.clone(),
        plan,
        inputs,
        created_ms: unix_ms(),
        run,
        check,
    };
    let group = group_size(s, &manifest.plan)?;
    Ok(Prepared {
        a,
        b,
        manifest,
        group,
        group_is_auto: s.group == GroupSize::Auto,
        workers: None,
    })
}

/// A and B with their plan.
struct Loaded {
    a: Operand,
    b: Operand,
    plan: Plan,
    inputs: Inputs,
    /// What, besides the job id, plan and inputs, tells this job's data from another's: for
    /// files, their sizes and modification times (same paths, new contents: another run).
    stamp: String,
}

async fn load(s: &Settings) -> Result<Loaded> {
    match s.source.clone() {
        Source::Seed {
            m,
            k,
            n,
            dtype,
            seed,
        } => {
            let plan = plan_for(s, m, k, n, dtype)?;
            // Made a block at a time as they are published.
            let (a, b) = Operand::seeded_pair(m as usize, k as usize, n as usize, dtype, seed);
            Ok(Loaded {
                a,
                b,
                plan,
                inputs: Inputs::Seed(seed),
                stamp: String::new(),
            })
        }
        Source::Files { a, b } => {
            // Read a block at a time as they are published.
            let ma = Operand::open(&a).map_err(|e| ConfigError::invalid("a", e.to_string()))?;
            let mb = Operand::open(&b).map_err(|e| ConfigError::invalid("b", e.to_string()))?;
            check_shapes(&ma, &mb)?;
            let ((m, k), (_, n)) = (ma.shape(), mb.shape());
            let plan = plan_for(s, m as u64, k as u64, n as u64, ma.dtype())?;
            Ok(Loaded {
                a: ma,
                b: mb,
                plan,
                stamp: file_stamp(&[&a, &b]),
                inputs: Inputs::Files {
                    a: a.display().to_string(),
                    b: b.display().to_string(),
                },
            })
        }
    }
}

fn plan_for(s: &Settings, m: u64, k: u64, n: u64, dtype: DType) -> Result<Plan, ConfigError> {
    let max_bytes = s.broker.max_message_bytes;
    let tile = match s.tile {
        TileSize::Fixed(t) => t,
        TileSize::Auto => gemmq::tiling::auto_tile(m, k, n, dtype, max_bytes, s.operands),
    };
    Plan::with_operands(m, k, n, dtype, tile, max_bytes, s.operands)
        .map_err(|e| ConfigError::invalid("tile", e.to_string()))
}

/// Each file's size and modification time.
fn file_stamp(paths: &[&PathBuf]) -> String {
    let mut stamp = String::new();
    for path in paths {
        let meta = std::fs::metadata(path).ok();
        let len = meta.as_ref().map_or(0, |m| m.len());
        let modified = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        stamp.push_str(&format!("{len}:{modified};"));
    }
    stamp
}

/// A·B must be defined.
fn check_shapes(a: &Operand, b: &Operand) -> Result<(), ConfigError> {
    gemmq::matrix::check_conformable(a.describe(), b.describe())
        .map_err(|e| ConfigError::invalid("inputs", format!("A·B cannot be computed: {e}")))
}

fn save_inputs(dir: &Path, a: &Operand, b: &Operand) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    a.write_npy(&dir.join("A.npy"))?;
    b.write_npy(&dir.join("B.npy"))?;
    info!(dir = %dir.display(), "inputs saved as A.npy and B.npy");
    Ok(())
}

/// Freivalds' expectation, a row of B and then of A at a time (so the collector needs neither),
/// and for files the check that every number is finite, before anything is published.
async fn verification(
    a: Operand,
    b: Operand,
) -> Result<(Operand, Operand, Option<message::Check>)> {
    let (a, b, check) = tokio::task::spawn_blocking(move || {
        let tall = a.shape().0 * verify::ROUNDS as usize > verify::MAX_CHECK_VALUES;
        let check = if tall {
            // The collector works it out from the seed or the files; the numbers must still
            // be finite.
            a.check_finite("A")
                .and_then(|()| b.check_finite("B"))
                .map(|()| None)
        } else {
            verify::expect_rows(&a, &b, verify::ROUNDS, verify::VECTOR_SEED)
                .map(|e| Some(e.to_check(verify::VECTOR_SEED)))
        };
        (a, b, check)
    })
    .await
    .context("computing the verification vectors")?;
    let check = check.map_err(|e| match e {
        gemmq::matrix::MatrixError::NotFinite(_) => {
            anyhow::Error::from(ConfigError::invalid("inputs", e.to_string()))
        }
        e => anyhow::Error::from(e).context("computing the verification vectors"),
    })?;
    Ok((a, b, check))
}

/// Tasks per message: a fixed size whose results fit one message, or `auto`'s for an unknown
/// number of workers (fitted to those consuming once the broker is reached).
fn group_size(s: &Settings, plan: &Plan) -> Result<usize> {
    let max_bytes = s.broker.max_message_bytes;
    let most = gemmq::tiling::max_group(plan, max_bytes);
    Ok(match s.group {
        GroupSize::Auto => gemmq::tiling::auto_group(plan, max_bytes, 0),
        GroupSize::Fixed(g) if g > most => {
            let tile = plan.tile;
            return Err(ConfigError::invalid(
                "group",
                format!("the results of {g} tiles of {tile}x{tile} would not fit one {max_bytes}-byte message, as a group's must: use --group {most} or less"),
            )
            .into());
        }
        GroupSize::Fixed(g) => g,
    } as usize)
}
