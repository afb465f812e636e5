//! The names of things in messages: element types, tiles of C, blocks of A and B.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::TaskHeader;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    #[default]
    F64,
}

impl DType {
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "f64" => Ok(DType::F64),
            _ => Err(format!("unknown dtype {s:?}: use f32 or f64")),
        }
    }
}

/// A tile of C by its block coordinates; `part` indexes the slice of k when k is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TileId {
    pub row: u32,
    pub col: u32,
    pub part: u32,
}

impl fmt::Display for TileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "C[{},{}]", self.row, self.col)?;
        if self.part > 0 {
            write!(f, "/k{}", self.part)?;
        }
        Ok(())
    }
}

/// The tiles of a task message, for logs: `C[0,1]`, or `C[0,1]..C[0,16] (16 tiles)` for a group
/// (its tiles are consecutive in plan order).
pub struct Tiles<'a>(pub &'a [TaskHeader]);

impl fmt::Display for Tiles<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => f.write_str("no tiles"),
            [one] => write!(f, "{}", one.tile),
            [first, .., last] => {
                write!(f, "{}..{} ({} tiles)", first.tile, last.tile, self.0.len())
            }
        }
    }
}

/// Which operand a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    A,
    B,
}

/// A block of A (block row `index`, slice `part` of k) or of B (slice `part` of k, block column
/// `index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockId {
    pub side: Side,
    pub index: u32,
    pub part: u32,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.side {
            Side::A => write!(f, "A[{},k{}]", self.index, self.part),
            Side::B => write!(f, "B[k{},{}]", self.part, self.index),
        }
    }
}
