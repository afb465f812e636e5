//! The messages of a job and the order they go out in.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use gemmq::Plan;
use gemmq::message::{BlockId, Side};
use gemmq::tiling::Operands;

/// One message the producer publishes.
pub(crate) enum Item {
    Block(BlockId),
    /// An empty message on the stream right after a large block, in a chunk of its own. A
    /// consumer that RabbitMQ starts at an offset is read one chunk ahead of what it is sent:
    /// after a block read on its own, the broker reads (from disk, CRC32 checked) the chunk
    /// that follows too, and drops it when the worker cancels. Without the marker that is the
    /// next block, and every block read costs the broker two; with it, a few bytes.
    ChunkEnd,
    /// One task, or a group of them (a rectangle of tiles that share their blocks).
    Tasks(Vec<gemmq::TileId>),
}

/// The messages of a job, in the order they are published, and where each block lands on the
/// job's operand stream.
pub(crate) struct Order {
    pub items: Vec<Item>,
    /// Each block's place among the stream's messages (blocks and chunk ends), which is its
    /// offset on a stream that holds each once; tasks carry the places of their blocks, so
    /// that a worker reads just those.
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
        let mut on_stream = 0;
        for tiles in plan.groups(group.max(1) as u64) {
            if streamed {
                for tile in &tiles {
                    for block in blocks_of(*tile) {
                        if let Entry::Vacant(place) = places.entry(block) {
                            place.insert(on_stream);
                            items.push(Item::Block(block));
                            on_stream += 1;
                            if is_large(plan, block) {
                                items.push(Item::ChunkEnd);
                                on_stream += 1;
                            }
                        }
                    }
                }
            }
            items.push(Item::Tasks(tiles));
        }
        Order { items, places }
    }

    /// Task messages: fewer than tasks when tiny tiles travel in groups.
    pub(crate) fn task_messages(&self) -> u64 {
        self.items
            .iter()
            .filter(|i| matches!(i, Item::Tasks(_)))
            .count() as u64
    }

    /// The stream places of a tile's A and B blocks.
    pub(crate) fn places_of(&self, tile: gemmq::TileId) -> Option<[u64; 2]> {
        let [a, b] = blocks_of(tile);
        Some([*self.places.get(&a)?, *self.places.get(&b)?])
    }
}

impl Item {
    /// Whether it goes to the job's operand stream (a block or a chunk end), not to the tasks.
    pub(crate) fn on_stream(&self) -> bool {
        matches!(self, Item::Block(_) | Item::ChunkEnd)
    }
}

/// Whether `block` is written to the stream alone (see [`gemmq::tiling::LARGE_BLOCK_BYTES`]).
pub(crate) fn is_large(plan: &Plan, block: BlockId) -> bool {
    plan.block_bytes(block) >= gemmq::tiling::LARGE_BLOCK_BYTES
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
                Item::ChunkEnd => panic!("a chunk end after a block of 16 × 32 f64s"),
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

    #[test]
    fn a_large_block_is_followed_by_a_chunk_end_and_places_count_both() {
        // A's blocks are 512 × 512 f64s (2 MiB), B's one 512 × 256 (exactly 1 MiB): all large.
        let plan = Plan::with_operands(1024, 512, 256, DType::F64, 512, 64 << 20, Operands::Stream)
            .unwrap();
        let order = Order::of(&plan, 1);
        let mut stream = Vec::new();
        for (i, item) in order.items.iter().enumerate() {
            match item {
                Item::Block(b) => {
                    assert!(is_large(&plan, *b));
                    assert!(matches!(order.items.get(i + 1), Some(Item::ChunkEnd)));
                    stream.push(Some(*b));
                }
                Item::ChunkEnd => stream.push(None),
                Item::Tasks(tiles) => {
                    for &tile in tiles {
                        let [a, b] = order.places_of(tile).expect("placed");
                        assert_eq!(stream[a as usize], Some(blocks_of(tile)[0]));
                        assert_eq!(stream[b as usize], Some(blocks_of(tile)[1]));
                    }
                }
            }
        }
        assert_eq!(
            stream.len(),
            2 * 3,
            "2 blocks of A, 1 of B, each with its chunk end"
        );
    }
}
