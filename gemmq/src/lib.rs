//! The contract that gemmq's three programs obey.
//!
//! gemmq computes `C = A·B` as a task queue on RabbitMQ (names shown in the default namespace,
//! `gemmq`):
//!
//! ```text
//!  gemmq-producer
//!    │ blocks of A and B, once ──▶ (gemmq.operands) ──▶ [gemmq.job.J.operands] stream ───────────┐
//!    │                                                  each worker reads the blocks its tasks need │
//!    │ tasks (confirmed), in rectangles of tiles that share blocks                                │
//!    ├────────▶ [gemmq.tasks] quorum ── prefetch = queue size ──▶ gemmq-consumer × N ◀──────────┘
//!    │                ▲                                            │  │ nack(requeue=false)
//!    │                └────── expires ────── [gemmq.retry] TTL ◀───┼──┘
//!    │                                                             │ result (confirmed), THEN ack
//!    │ manifest                                                    │ attempts exhausted ──▶ [gemmq.parked]
//!    ▼                                                             ▼
//!  [gemmq.jobs] + [gemmq.job.J.manifest] ──▶ gemmq-collector ◀── [gemmq.job.J.results] stream; one collector claims it
//!                                              └─▶ out/C.npy + out/summary.json, verified (Freivalds)
//! ```
//!
//! * The **producer** cuts C into tiles ([`tiling`]), publishes each block of A and B once as raw
//!   little-endian bytes ([`message`]) into the job's operand stream ([`topology`]), and the tasks
//!   — rectangles of tiles that share their blocks ([`Plan::groups`]), naming the blocks and where
//!   they are on the stream — with publisher confirms ([`broker::ConfirmWindow`]), after
//!   announcing the job's [`message::Manifest`].
//! * A **consumer** reads from the stream only the blocks its tasks need, each once while it
//!   caches it: the broker's egress grows with the work, not with the number of workers.
//! * A **consumer** takes tasks with a prefetch equal to its queue size, multiplies ([`kernel`]),
//!   publishes the result and only then acks. A failure is a `nack` without requeue: the broker
//!   dead-letters the task into the retry queue, whose TTL sends it back. The attempt number is read from the
//!   broker's own `x-death` bookkeeping ([`topology::prior_attempts`]).
//! * The **collector** reads the manifest, assembles every tile exactly once whatever duplicates
//!   arrive ([`assembly`]), writes C as `.npy` and checks it against A and B ([`verify`]).
//!
//! Every exchange, queue and argument is named in [`topology`], and only there: RabbitMQ refuses
//! (406) a redeclaration with different arguments, so one module owns them all. Settings are
//! layered flag > environment > `config/*.toml` > default by [`config`].

pub mod assembly;
pub mod broker;
pub mod config;
pub mod events;
pub mod http;
pub mod inputs;
pub mod job;
pub mod kernel;
pub mod management;
pub mod matrix;
pub mod message;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod tiling;
pub mod tls;
pub mod topology;
pub mod verify;

pub use message::{DType, Manifest, TileId};
pub use tiling::{Plan, TileSize};
pub use topology::Topology;
