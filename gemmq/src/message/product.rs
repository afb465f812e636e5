//! A tile's product made where its result message will be.
//!
//! A worker's product used to pass through three buffers of fresh memory before lapin split it
//! into frames: the kernel's output array, its little-endian bytes, and the encoded message. On
//! the VMs gemmq is measured on, fresh memory is dear (BENCHMARKS.md, "The machine's phase is
//! fresh memory"): a 4096³ job's 16 products are 128 MiB. A [`Product`] is one buffer with room
//! kept in front of the numbers, the kernel writes into it, and the frame's prefix and header
//! go into the room once the result's header is known (after the multiplication, whose time it
//! reports). The producer does the same for its blocks with [`super::encode_header`].

use super::{Header, header_bytes};

/// Bytes kept in front of the numbers: a result's prefix and header take a few hundred.
const ROOM: usize = 1024;

/// A product's little-endian bytes, with room for its message's prefix and header in front.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    buf: Vec<u8>,
    /// Where the numbers start; the bytes before are the room for the frame's header.
    start: usize,
}

impl Product {
    /// A product of `len` zero bytes, for a kernel to write into. The allocator hands large
    /// zeroed buffers out as untouched pages, so the zeros cost nothing until written.
    pub fn zeroed(len: usize) -> Product {
        Product {
            buf: vec![0; ROOM + len],
            start: ROOM,
        }
    }

    /// A product holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Product {
        let mut buf = Vec::with_capacity(ROOM + bytes.len());
        buf.resize(ROOM, 0);
        buf.extend_from_slice(bytes);
        Product { buf, start: ROOM }
    }

    /// The numbers, 8-byte aligned when the allocator aligns its buffers so (every allocator
    /// gemmq runs on does: 16 bytes on 64-bit Linux).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message: `header`'s frame over these bytes, written into the room in front.
    /// The same bytes as [`super::encode`] of the header and the numbers. A header too big for
    /// the room (a result's never is) makes a new buffer instead.
    pub fn frame(&mut self, header: &Header) -> &[u8] {
        let head = header_bytes(header);
        if head.len() <= self.start {
            let at = self.start - head.len();
            self.buf[at..self.start].copy_from_slice(&head);
            return &self.buf[at..];
        }
        let mut whole = Vec::with_capacity(head.len() + self.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(self.bytes());
        self.buf = whole;
        self.start = head.len();
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DType, ResultHeader, TileId, decode, encode};

    fn result_header(worker: &str) -> Header {
        Header::TileResult(ResultHeader {
            job: "job-1".into(),
            run: "run-1".into(),
            tile: TileId {
                row: 1,
                col: 2,
                part: 0,
            },
            dtype: DType::F64,
            rows: 1,
            cols: 2,
            worker: worker.into(),
            attempt: 1,
            compute_micros: 42,
            recompute: 0,
        })
    }

    #[test]
    fn a_framed_product_is_the_message_encode_makes_and_decodes_to_its_numbers() {
        let numbers: Vec<u8> = [1.5f64, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let header = result_header("worker-a");
        let mut product = Product::from_bytes(&numbers);
        assert_eq!(product.bytes(), &numbers[..]);
        let body = product.frame(&header).to_vec();
        assert_eq!(body, encode(&header, &[&numbers]));
        let frame = decode(&body, 1 << 20).expect("a product's frame decodes");
        assert_eq!((frame.header, frame.payload), (header, &numbers[..]));
    }

    #[test]
    fn a_header_too_big_for_the_room_still_makes_the_same_message() {
        let numbers = vec![7u8; 16];
        let header = result_header(&"w".repeat(3 * ROOM));
        let mut product = Product::from_bytes(&numbers);
        let body = product.frame(&header).to_vec();
        assert_eq!(body, encode(&header, &[&numbers]));
        assert_eq!(product.bytes(), &numbers[..], "the numbers are still there");
    }

    #[test]
    fn a_zeroed_product_has_its_numbers_aligned_for_f64() {
        let mut product = Product::zeroed(8 * 100);
        assert_eq!(product.len(), 800);
        assert!(bytemuck::try_cast_slice_mut::<u8, f64>(product.bytes_mut()).is_ok());
    }
}
