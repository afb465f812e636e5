//! The journal: one line per applied result or parked tile, synced before the results are acked,
//! replayed when a collector resumes.

use super::position::StreamPosition;
use crate::message::{ParkedNotice, TileId};

/// One journal line: `T row col part attempt micros worker`, `C row col`,
/// `P row col part attempts worker reason…`, `F worker`, `O offset fingerprint` (the results
/// stream read through here), `H row col round` (a wrong tile is computed again) or
/// `R row col part round worker` (its new result applied). Collectors built before a kind of
/// line existed skip it.
pub(super) enum Record {
    Task {
        tile: TileId,
        attempt: u32,
        micros: u64,
        worker: String,
    },
    Complete {
        row: u32,
        col: u32,
    },
    Parked(ParkedNotice),
    Failed {
        worker: String,
    },
    Position(StreamPosition),
    /// A tile that failed verification is being computed again, in this round.
    Recompute {
        row: u32,
        col: u32,
        round: u32,
    },
    /// A task's result of a recompute round, applied over the wrong one.
    Recomputed {
        tile: TileId,
        round: u32,
        worker: String,
    },
}

impl Record {
    pub(super) fn to_line(&self) -> String {
        match self {
            Record::Task {
                tile,
                attempt,
                micros,
                worker,
            } => {
                format!(
                    "T {} {} {} {attempt} {micros} {worker}\n",
                    tile.row, tile.col, tile.part
                )
            }
            Record::Complete { row, col } => format!("C {row} {col}\n"),
            Record::Failed { worker } => format!("F {worker}\n"),
            Record::Position(p) => format!("O {} {:016x}\n", p.offset, p.fingerprint),
            Record::Recompute { row, col, round } => format!("H {row} {col} {round}\n"),
            Record::Recomputed {
                tile,
                round,
                worker,
            } => format!(
                "R {} {} {} {round} {worker}\n",
                tile.row, tile.col, tile.part
            ),
            Record::Parked(n) => format!(
                "P {} {} {} {} {} {}\n",
                n.tile.row,
                n.tile.col,
                n.tile.part,
                n.attempts,
                n.worker,
                n.reason.replace('\n', " ")
            ),
        }
    }

    pub(super) fn parse(line: &str) -> Option<Record> {
        let mut f = line.splitn(7, ' ');
        let kind = f.next()?;
        let mut num = || f.next()?.parse::<u64>().ok();
        match kind {
            "T" => {
                let tile = TileId {
                    row: num()? as u32,
                    col: num()? as u32,
                    part: num()? as u32,
                };
                let (attempt, micros) = (num()? as u32, num()?);
                let worker = f.next()?.to_string();
                Some(Record::Task {
                    tile,
                    attempt,
                    micros,
                    worker,
                })
            }
            "F" => Some(Record::Failed {
                worker: f.next()?.to_string(),
            }),
            "H" => Some(Record::Recompute {
                row: num()? as u32,
                col: num()? as u32,
                round: num()? as u32,
            }),
            "R" => {
                let tile = TileId {
                    row: num()? as u32,
                    col: num()? as u32,
                    part: num()? as u32,
                };
                let round = num()? as u32;
                Some(Record::Recomputed {
                    tile,
                    round,
                    worker: f.next()?.to_string(),
                })
            }
            "O" => Some(Record::Position(StreamPosition {
                offset: num()?,
                fingerprint: u64::from_str_radix(f.next()?, 16).ok()?,
            })),
            "C" => Some(Record::Complete {
                row: num()? as u32,
                col: num()? as u32,
            }),
            "P" => {
                let tile = TileId {
                    row: num()? as u32,
                    col: num()? as u32,
                    part: num()? as u32,
                };
                let attempts = num()? as u32;
                let worker = f.next()?.to_string();
                let reason = f.next().unwrap_or("").to_string();
                Some(Record::Parked(ParkedNotice {
                    job: String::new(),
                    run: String::new(),
                    tile,
                    reason,
                    attempts,
                    worker,
                }))
            }
            _ => None,
        }
    }
}
