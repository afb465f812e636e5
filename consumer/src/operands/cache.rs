//! One job's cached blocks, least recently used first out, under a byte budget shared by every
//! job's cache (`total`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gemmq::matrix::Block;
use gemmq::message::BlockId;
use lru::LruCache;

pub(super) struct Cache {
    blocks: LruCache<BlockId, Arc<Block>>,
    /// This cache's share of `total`.
    pub(super) bytes: u64,
    total: Arc<AtomicU64>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Cache {
    pub(super) fn new(total: Arc<AtomicU64>) -> Self {
        Cache {
            blocks: LruCache::unbounded(),
            bytes: 0,
            total,
        }
    }

    /// The block, now the most recently used.
    pub(super) fn get(&mut self, id: &BlockId) -> Option<Arc<Block>> {
        self.blocks.get(id).cloned()
    }

    /// Caches a block, first dropping this job's least recently used blocks until every job's
    /// blocks together fit `budget` with it.
    pub(super) fn insert(&mut self, id: BlockId, m: Arc<Block>, budget: u64) {
        let size = m.memory();
        while self.total.load(Ordering::Relaxed) + size > budget {
            let Some((_, old)) = self.blocks.pop_lru() else {
                break;
            };
            self.forget(&old);
        }
        if let Some(old) = self.blocks.put(id, m) {
            self.forget(&old);
        }
        self.bytes += size;
        self.total.fetch_add(size, Ordering::Relaxed);
    }

    fn forget(&mut self, old: &Block) {
        self.bytes -= old.memory();
        self.total.fetch_sub(old.memory(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemmq::message::{DType, Side};

    fn block(n: usize) -> Arc<Block> {
        Arc::new(Block::from_body(vec![0; n * n * 8], 0, n, n, DType::F64).unwrap())
    }

    #[test]
    fn the_budget_holds_across_jobs_and_the_least_recently_used_block_goes_first() {
        let total = Arc::new(AtomicU64::new(0));
        let (mut one, mut two) = (Cache::new(total.clone()), Cache::new(total.clone()));
        let id = |index| BlockId {
            side: Side::A,
            index,
            part: 0,
        };
        let budget = 3 * 8 * 8 * 8; // three 8x8 f64 blocks
        one.insert(id(0), block(8), budget);
        one.insert(id(1), block(8), budget);
        two.insert(id(0), block(8), budget);
        assert!(one.get(&id(0)).is_some()); // 0 is now more recent than 1
        one.insert(id(2), block(8), budget);
        assert!(
            one.get(&id(1)).is_none(),
            "the least recently used block was dropped"
        );
        assert!(one.get(&id(0)).is_some() && one.get(&id(2)).is_some());
        assert_eq!(total.load(Ordering::Relaxed), budget);
        drop(two);
        assert_eq!(total.load(Ordering::Relaxed), 2 * 8 * 8 * 8);
    }
}
