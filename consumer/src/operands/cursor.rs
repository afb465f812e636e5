//! A job's stream cursor: the consumer of the last read, kept open after its block, so that a
//! read a little further on costs an ack — one round trip — instead of a new consumer. For a new
//! consumer RabbitMQ looks the offset up in the stream's index and opens a segment reader, which
//! costs the broker more than sending a small block (tiny tiles read hundreds of them).

use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use gemmq::matrix::Block;
use gemmq::message::{BlockId, DType};
use lapin::Acker;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Consumer};

use super::job::JobOperands;
use super::stream::{Got, accept};
use super::{FetchError, ReadCtx, close_quietly};

/// How far past where a cursor stands a read may be to go through it: the blocks in between
/// come too (cached), so this is a few small blocks; large ones are read where they are.
pub(super) const REACH: i64 = 16;

pub(super) struct Cursor {
    ch: Channel,
    scan: Consumer,
    /// The offset after the last message delivered.
    pub(super) next: i64,
    /// The last delivery, not acked: acking it (and all before it) is the credit for more.
    held: Option<Acker>,
}

impl Cursor {
    pub(super) fn new(ch: Channel, scan: Consumer, at: i64) -> Self {
        Cursor {
            ch,
            scan,
            next: at,
            held: None,
        }
    }

    /// Whether block `at` is within reach ahead of the cursor: the very next message for a
    /// large block (passing others would send the worker megabytes it did not ask for), a few
    /// on for a small one.
    pub(super) fn reaches(&self, at: i64, small: bool) -> bool {
        let reach = if small { REACH } else { 0 };
        self.next <= at && at - self.next <= reach
    }

    /// Reads on until block `want` comes by, caching every block of the job on the way. What
    /// has already arrived is taken first; more is asked for only when nothing is waiting.
    pub(super) async fn read(
        &mut self,
        ctx: &ReadCtx,
        j: &JobOperands,
        dtype: DType,
        want: BlockId,
    ) -> Result<Arc<Block>, FetchError> {
        let mut found = None;
        loop {
            let next = match self.scan.next().now_or_never() {
                Some(d) => d,
                // Nothing waiting: the block asked for is in, or credit is needed for more.
                None if found.is_some() => break,
                None => {
                    if let Some(held) = self.held.take() {
                        let all = BasicAckOptions { multiple: true };
                        held.ack(all).await.map_err(|e| {
                            FetchError::Other(format!("reading the operand stream: {e}"))
                        })?;
                    }
                    self.scan.next().await
                }
            };
            let d = match next {
                None => {
                    return Err(FetchError::Other(
                        "the operand stream consumer was cancelled (is the job finished?)".into(),
                    ));
                }
                Some(Err(e)) => {
                    return Err(FetchError::Other(format!(
                        "reading the operand stream: {e}"
                    )));
                }
                Some(Ok(d)) => d,
            };
            self.held = Some(d.acker.clone());
            let got = accept(ctx, j, d, dtype, want)?;
            if let Some(offset) = got.offset {
                self.next = offset + 1;
            }
            if let Got::Wanted(m) = got.block {
                found = Some(m);
            }
        }
        Ok(found.expect("the loop ends once it is found"))
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        close_quietly(self.ch.clone(), self.scan.tag());
    }
}
