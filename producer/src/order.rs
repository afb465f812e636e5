//! The messages of a job and the order they go out in.

use gemmq::Plan;
use gemmq::message::{BlockId, Side};
use gemmq::tiling::Operands;

/// One message the producer publishes.
pub(crate) enum Item {
    Block(BlockId),
    /// One task, or a group of them when tiles are tiny.
    Tasks(Vec<gemmq::TileId>),
}

/// The messages of a job, in the order they are published: one deterministic sequence — when
/// streamed, each task right after the blocks it is the first to need — so that workers start
/// while the rest is still being published, and resuming after a lost connection is "skip what
/// was confirmed".
pub(crate) fn items(plan: &Plan, group: usize) -> Vec<Item> {
    let streamed = plan.operands == Operands::Stream;
    let mut published = std::collections::HashSet::new();
    let mut items = Vec::new();
    let tiles: Vec<_> = plan.task_ids().collect();
    for tiles in tiles.chunks(group.max(1)) {
        if streamed {
            for tile in tiles {
                for block in [
                    BlockId {
                        side: Side::A,
                        index: tile.row,
                        part: tile.part,
                    },
                    BlockId {
                        side: Side::B,
                        index: tile.col,
                        part: tile.part,
                    },
                ] {
                    if published.insert(block) {
                        items.push(Item::Block(block));
                    }
                }
            }
        }
        items.push(Item::Tasks(tiles.to_vec()));
    }
    items
}
