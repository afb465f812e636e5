//! Where in the job's results stream a checkpoint has read to.
//!
//! Results are kept in a stream (see [`crate::topology`]), so a collector on any machine can
//! read them all again. A checkpoint records the offset of the last message it applied, and a
//! fingerprint of that message: a collector that resumes reads from that offset and checks the
//! first message it gets is the one recorded. If it is not (the stream was deleted and declared
//! again, so its offsets start over), the checkpoint's offset means nothing there and the
//! collector reads the stream from its start instead — re-reading costs time; skipping a
//! result would lose a tile.

/// A message of the results stream: its offset and a fingerprint of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    pub offset: u64,
    pub fingerprint: u64,
}

/// Enough of a message to tell it from any other of its stream: its header (job, run, tile,
/// worker, attempt) sits in the first bytes, and the length covers the rest.
const FINGERPRINTED_BYTES: usize = 4096;

impl StreamPosition {
    pub fn of(offset: u64, body: &[u8]) -> Self {
        StreamPosition {
            offset,
            fingerprint: fingerprint(body),
        }
    }

    /// Whether the message at `offset` with `body` is this one.
    pub fn is(&self, offset: u64, body: &[u8]) -> bool {
        *self == Self::of(offset, body)
    }
}

/// FNV-1a over the first bytes and the length: stable across builds and platforms (the
/// journal outlives the binary that wrote it), and cheap.
fn fingerprint(body: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let head = &body[..body.len().min(FINGERPRINTED_BYTES)];
    for &b in head.iter().chain(&(body.len() as u64).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_matches_only_the_same_message_at_the_same_offset() {
        let p = StreamPosition::of(7, b"result of tile (1, 2)");
        assert!(p.is(7, b"result of tile (1, 2)"));
        assert!(!p.is(8, b"result of tile (1, 2)"), "another offset");
        assert!(!p.is(7, b"result of tile (1, 3)"), "another message");
    }

    #[test]
    fn bodies_that_differ_only_past_the_fingerprinted_head_differ_by_length() {
        let long = vec![1u8; FINGERPRINTED_BYTES + 10];
        let longer = vec![1u8; FINGERPRINTED_BYTES + 11];
        assert_ne!(fingerprint(&long), fingerprint(&longer));
    }

    #[test]
    fn the_fingerprint_is_the_same_in_every_build() {
        // Written into checkpoints: a change would make every resumed collector re-read.
        assert_eq!(fingerprint(b"gemmq"), 0x3e0b_8bde_7b99_6bd3);
    }
}
