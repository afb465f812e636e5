//! Measurements that run in a child process of the bench (`gemmq-bench __<name> ARGS...`).
//!
//! Linux carries a parent's peak RSS into the `ru_maxrss` of the children it spawns afterwards,
//! so the bench itself must never hold large buffers: whatever would (the reference's matrices,
//! the floor's blocks) runs in a child of its own, which prints its result as JSON.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

/// Runs the bench binary with `args` (the subcommand first) and `env`, and reads the JSON it
/// prints; `what` names the measurement in errors.
pub fn run<T: DeserializeOwned>(what: &str, args: &[String], env: &[(&str, String)]) -> Result<T> {
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let out = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running the {what}"))?;
    if !out.status.success() {
        bail!("the {what} process failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading the {what}'s result"))
}
