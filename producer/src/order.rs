//! The messages of a job and the order they go out in.

use std::collections::HashMap;

use gemmq::Plan;
use gemmq::message::{BlockId, Side};
use gemmq::tiling::Operands;

/// One message the producer publishes.
pub(crate) enum Item {
    Block(BlockId),
    /// One task, or a group of them (a rectangle of tiles that share their blocks).
    Tasks(Vec<gemmq::TileId>),
}

/// The messages of a job, in the order they are published, and where each block lands on the
/// job's operand stream.
pub(crate) struct Order {
    pub items: Vec<Item>,
    /// Each block's place among the blocks, which is its offset on a stream that holds each
    /// block once; tasks carry the places of their blocks, so that a worker reads just those.
    pub places: HashMap<BlockId, u64>,
}

impl Order {
    /// One deterministic sequence — when streamed, each task message right after the blocks it
    /// is the first to need — so that workers start while the rest is still being published,
    /// and resuming after a lost connection is "skip what was confirmed". Blocks published
    /// again (after a lost connection, or into a stream declared again) go out in the same
    /// order, so a block is never found before its place.
    pub(crate) fn of(plan: &Plan, group: usize) -> Order {
        let streamed = plan.operands == Operands::Stream;
        let mut places = HashMap::new();
        let mut items = Vec::new();
        for tiles in plan.groups(group.max(1) as u64) {
            if streamed {
                for tile in &tiles {
                    for block in blocks_of(*tile) {
                        if !places.contains_key(&block) {
                            places.insert(block, places.len() as u64);
                            items.push(Item::Block(block));
                        }
                    }
                }
            }
            items.push(Item::Tasks(tiles));
        }
        Order { items, places }
    }

    /// The stream places of a tile's A and B blocks.
    pub(crate) fn places_of(&self, tile: gemmq::TileId) -> Option<[u64; 2]> {
        let [a, b] = blocks_of(tile);
        Some([*self.places.get(&a)?, *self.places.get(&b)?])
    }
}

/// The A and B blocks a tile (or its slice of k) is the product of.
pub(crate) fn blocks_of(tile: gemmq::TileId) -> [BlockId; 2] {
    [
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
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::DType;

    #[test]
    fn every_task_follows_its_blocks_and_names_their_places_on_the_stream() {
        let plan =
            Plan::with_operands(64, 32, 64, DType::F64, 16, 16 << 20, Operands::Stream).unwrap();
        let order = Order::of(&plan, 4);
        let mut published = Vec::new();
        for item in &order.items {
            match item {
                Item::Block(b) => published.push(*b),
                Item::Tasks(tiles) => {
                    for &tile in tiles {
                        let [a, b] = order.places_of(tile).expect("placed");
                        assert_eq!(published[a as usize], blocks_of(tile)[0]);
                        assert_eq!(published[b as usize], blocks_of(tile)[1]);
                    }
                }
            }
        }
        assert_eq!(published.len(), 8, "4 blocks of A and 4 of B, once each");
        let messages = order.items.len() - published.len();
        assert_eq!(messages, 4, "4 × 4 tiles in 2 × 2 rectangles");
    }
}
