//! A streamed message's tiles, each multiplied as soon as its two blocks have arrived.
//!
//! A group names up to 256 tiles that share their blocks. Waiting for all of them before
//! multiplying any left the worker idle for as long as the slowest took: at the start of a
//! 4096³ job, ~0.5 s for the 5 blocks (73 MiB) of a 2 × 3 group while the broker was still
//! busy taking the rest of the job in, when its first tile needs 2 of them. So the blocks are
//! fetched in an order that completes tiles early — a square of tiles grown a row and a column
//! at a time — a few at a time, and the tiles each arrival completes are multiplied (together,
//! in one go) while the next blocks come in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gemmq::matrix::Block;
use gemmq::message::{BlockId, Side, TaskHeader};
use tokio::sync::{SemaphorePermit, mpsc};

use crate::task::{Failure, multiply};
use crate::{Ctx, operands};

/// Block reads one message keeps in flight: the next block comes in while one arrives, and the
/// tiles that need the first come first (reads in flight share the link).
const FETCH_AHEAD: usize = 2;

/// What became of a message's tiles.
pub(crate) enum Multiplied {
    /// Each task's product in order, or why there are none; and the time spent multiplying.
    Done(Result<Vec<Vec<u8>>, Failure>, Duration),
    /// The worker is shutting down and nothing was multiplied yet: give the message back.
    Stopped,
}

/// Fetches the blocks `tasks` name and multiplies each task once its blocks are in. `fetching`
/// (the worker's fetch permit) is given back once every block has arrived.
pub(crate) async fn multiply_as_blocks_arrive(
    ctx: &Ctx,
    tasks: &[TaskHeader],
    fetching: SemaphorePermit<'_>,
) -> Multiplied {
    let group = Group::of(tasks);
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let fetch = async {
        let first = &tasks[0];
        let mut reads = futures_util::stream::iter(group.blocks.clone().into_iter().enumerate())
            .map(|(i, want)| async move {
                let got = ctx
                    .operands
                    .get(
                        &ctx.conn,
                        operands::Wanted {
                            job: &first.job,
                            run: &first.run,
                            id: want.id,
                            dtype: first.dtype,
                            at: want.at,
                            bytes: want.bytes,
                        },
                    )
                    .await;
                (i, got)
            })
            .buffered(FETCH_AHEAD);
        while let Some(arrival) = reads.next().await {
            if arrived.send(arrival).is_err() {
                break;
            }
        }
        drop(fetching);
        // Done: the multiplications decide when this message is.
        std::future::pending::<()>().await
    };
    let mut took = Duration::ZERO;
    let mut started = false;
    let work = async {
        let mut have: Vec<Option<Arc<Block>>> = vec![None; group.blocks.len()];
        let mut products: Vec<Option<Vec<u8>>> = vec![None; tasks.len()];
        let mut left = tasks.len();
        while left > 0 {
            let Some((i, got)) = arrivals.recv().await else {
                return Err(Failure::Transient("the block reads stopped".into()));
            };
            have[i] = Some(got.map_err(Failure::from)?);
            // Every block already in, so that they are multiplied together.
            while let Ok((i, got)) = arrivals.try_recv() {
                have[i] = Some(got.map_err(Failure::from)?);
            }
            let ready = group.ready(&have, &products);
            if ready.is_empty() {
                continue;
            }
            let pairs = ready
                .iter()
                .map(|&t| {
                    let [a, b] = group.needs[t];
                    let block = |i: usize| have[i].clone().expect("ready");
                    check_shapes(&tasks[t], block(a), block(b))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let permit = if started {
                ctx.compute.acquire().await.expect("never closed")
            } else {
                tokio::select! {
                    p = ctx.compute.acquire() => p.expect("never closed"),
                    _ = ctx.shutdown.cancelled() => return Ok(None),
                }
            };
            let clock = Instant::now();
            if !started {
                started = true;
                crate::task::simulate(ctx).await?;
            }
            let ready_tasks: Vec<TaskHeader> = ready.iter().map(|&t| tasks[t].clone()).collect();
            let out = multiply(ctx, &ready_tasks, pairs).await;
            took += clock.elapsed();
            drop(permit);
            for (t, product) in ready.into_iter().zip(out?) {
                products[t] = Some(product);
                left -= 1;
            }
        }
        Ok(Some(
            products
                .into_iter()
                .map(|p| p.expect("every task multiplied"))
                .collect(),
        ))
    };
    let outcome = tokio::select! {
        biased;
        r = work => r,
        () = fetch => unreachable!("fetching never ends on its own"),
    };
    match outcome {
        Ok(None) => Multiplied::Stopped,
        Ok(Some(products)) => Multiplied::Done(Ok(products), took),
        Err(f) => Multiplied::Done(Err(f), took),
    }
}

/// One block a group needs: which, where the tasks say it is on the stream, and its size.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wanted {
    id: BlockId,
    at: Option<u64>,
    bytes: u64,
}

/// The distinct blocks of a message's tasks in the order they are fetched, and which two each
/// task needs.
#[derive(Debug)]
struct Group {
    blocks: Vec<Wanted>,
    needs: Vec<[usize; 2]>,
}

impl Group {
    /// Orders the tasks as a square grown a row and a column at a time (by the larger of the
    /// ranks of their A and B blocks in the message, then by A's, then B's), and the blocks in
    /// the order those tasks first need them: A0 B0 → 1 tile, B1 A1 → 3 more, B2 A2 → 5 more.
    /// Rows of tiles by rows of blocks would give 1, 1, 1, … and the whole row of the second.
    fn of(tasks: &[TaskHeader]) -> Group {
        let mut a_blocks: Vec<BlockId> = Vec::new();
        let mut b_blocks: Vec<BlockId> = Vec::new();
        let rank = |list: &mut Vec<BlockId>, id: BlockId| match list.iter().position(|&b| b == id) {
            Some(r) => r,
            None => {
                list.push(id);
                list.len() - 1
            }
        };
        let ranked: Vec<(usize, usize)> = tasks
            .iter()
            .map(|task| {
                let [(a, _), (b, _)] = blocks_of(task);
                (rank(&mut a_blocks, a), rank(&mut b_blocks, b))
            })
            .collect();
        let mut order: Vec<usize> = (0..tasks.len()).collect();
        order.sort_by_key(|&t| {
            let (a, b) = ranked[t];
            (a.max(b), a, b)
        });
        let mut blocks: Vec<Wanted> = Vec::new();
        let mut needs = vec![[0, 0]; tasks.len()];
        for t in order {
            let task = &tasks[t];
            let size = task.dtype.size() as u64;
            let (r, c, d) = (task.rows as u64, task.cols as u64, task.depth as u64);
            let [(a, a_at), (b, b_at)] = blocks_of(task);
            let wanted = [
                Wanted {
                    id: a,
                    at: a_at,
                    bytes: r * d * size,
                },
                Wanted {
                    id: b,
                    at: b_at,
                    bytes: d * c * size,
                },
            ];
            for (side, want) in wanted.into_iter().enumerate() {
                needs[t][side] = match blocks.iter().position(|w| w.id == want.id) {
                    Some(i) => i,
                    None => {
                        blocks.push(want);
                        blocks.len() - 1
                    }
                };
            }
        }
        Group { blocks, needs }
    }

    /// The tasks not multiplied yet whose blocks are both in.
    fn ready(&self, have: &[Option<Arc<Block>>], done: &[Option<Vec<u8>>]) -> Vec<usize> {
        (0..self.needs.len())
            .filter(|&t| done[t].is_none() && self.needs[t].iter().all(|&b| have[b].is_some()))
            .collect()
    }
}

/// A task's A and B blocks, with where the task says they are on the stream.
fn blocks_of(task: &TaskHeader) -> [(BlockId, Option<u64>); 2] {
    let t = task.tile;
    let at = |i: usize| task.at.map(|at| at[i]);
    [
        (
            BlockId {
                side: Side::A,
                index: t.row,
                part: t.part,
            },
            at(0),
        ),
        (
            BlockId {
                side: Side::B,
                index: t.col,
                part: t.part,
            },
            at(1),
        ),
    ]
}

pub(crate) type BlockPair = (Arc<Block>, Arc<Block>);

fn check_shapes(task: &TaskHeader, a: Arc<Block>, b: Arc<Block>) -> Result<BlockPair, Failure> {
    let (r, c, d) = (task.rows as usize, task.cols as usize, task.depth as usize);
    let (a_shape, b_shape) = (a.view().shape(), b.view().shape());
    if a_shape != (r, d) || b_shape != (d, c) {
        let t = task.tile;
        return Err(Failure::Permanent(format!(
            "the task {t} is {r}x{d} · {d}x{c} but its blocks are {a_shape:?} and {b_shape:?}"
        )));
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::DType;
    use gemmq::tiling::Plan;

    /// The tasks of one message of `plan`, as the producer makes them.
    fn group(rows: std::ops::Range<u32>, cols: std::ops::Range<u32>) -> Vec<TaskHeader> {
        let plan = Plan::new(64, 16, 64, DType::F64, 8, 16 << 20).unwrap();
        rows.flat_map(|row| cols.clone().map(move |col| (row, col)))
            .map(|(row, col)| plan.task("j", "r", gemmq::TileId { row, col, part: 0 }))
            .collect()
    }

    /// How many tasks are ready after each block arrives, in the group's order.
    fn completed_per_arrival(g: &Group) -> Vec<usize> {
        let mut have = vec![None; g.blocks.len()];
        let done = vec![None; g.needs.len()];
        let block = Arc::new(Block::from_body(vec![0; 8], 0, 1, 1, DType::F64).unwrap());
        let mut before = 0;
        (0..g.blocks.len())
            .map(|i| {
                have[i] = Some(block.clone());
                let now = g.ready(&have, &done).len();
                let new = now - before;
                before = now;
                new
            })
            .collect()
    }

    #[test]
    fn a_groups_blocks_come_in_the_order_that_completes_tiles_soonest() {
        // 2 rows × 3 columns of tiles: A0 B0 give the first tile, B1 A1 three more, B2 the rest.
        let g = Group::of(&group(0..2, 0..3));
        let names: Vec<String> = g.blocks.iter().map(|w| w.id.to_string()).collect();
        assert_eq!(
            names,
            ["A[0,k0]", "B[k0,0]", "B[k0,1]", "A[1,k0]", "B[k0,2]"]
        );
        assert_eq!(completed_per_arrival(&g), [0, 1, 1, 2, 2]);
        // 4 × 4: after 2k blocks, k² tiles.
        let g = Group::of(&group(0..4, 0..4));
        let done: Vec<usize> = completed_per_arrival(&g)
            .iter()
            .scan(0, |sum, n| {
                *sum += n;
                Some(*sum)
            })
            .collect();
        assert_eq!(done, [0, 1, 2, 4, 6, 9, 12, 16]);
    }

    #[test]
    fn each_block_is_fetched_once_and_each_task_names_its_own_two() {
        let tasks = group(1..4, 2..4);
        let g = Group::of(&tasks);
        assert_eq!(g.blocks.len(), 3 + 2);
        for (task, [a, b]) in tasks.iter().zip(&g.needs) {
            let [(a_id, a_at), (b_id, b_at)] = blocks_of(task);
            assert_eq!((g.blocks[*a].id, g.blocks[*a].at), (a_id, a_at));
            assert_eq!((g.blocks[*b].id, g.blocks[*b].at), (b_id, b_at));
            assert_eq!(g.blocks[*a].bytes, 8 * 16 * 8, "8 × 16 f64s");
        }
    }
}
