//! The wire format: what a task, a result and a parked-tile notice look like on the broker.
//!
//! A frame is
//!
//! ```text
//! "GMQ" version(u8) │ header length (u32 LE) │ header (JSON) │ payload (raw little-endian numbers)
//! ```
//!
//! JSON carries the metadata because it is self-describing and readable in the management UI;
//! the matrix numbers travel as raw bytes because JSON is ~50× slower, 2.5× larger and not exact
//! for floats. Decoding checks everything a hostile or corrupted message could get wrong — the
//! magic, the version, the header's size and schema, and that the payload's length is exactly what
//! the header's dimensions imply — before any matrix is allocated.
//!
//! The job [`Manifest`] is plain JSON: it has no payload and people read it.
//!
//! Here: the frame ([`encode`], [`decode`]); then `ids` (dtypes, tiles, blocks), `header` (every
//! kind of header and the payload each implies), `manifest` (the job's manifest and runs) and
//! `product` (a tile's product computed into the room of its result message).

mod header;
mod ids;
mod manifest;
mod product;

pub use header::*;
pub use ids::*;
pub use manifest::*;
pub use product::Product;

const MAGIC: &[u8; 3] = b"GMQ";
/// The frame version this build writes and reads.
pub const VERSION: u8 = 1;
const PREFIX: usize = 8;
/// A header is a few hundred bytes; anything near this is garbage, not a header.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// AMQP `type` property of each kind of message, for people browsing queues.
pub mod kind {
    pub const TASK: &str = "gemmq.task";
    pub const RESULT: &str = "gemmq.result";
    pub const RESULTS: &str = "gemmq.results";
    pub const PARKED: &str = "gemmq.parked";
    pub const FAILED: &str = "gemmq.failed";
    pub const OPERAND: &str = "gemmq.operand";
    /// An empty message that ends a large block's chunk on the operand stream; readers pass it.
    pub const CHUNK_END: &str = "gemmq.chunk_end";
    pub const JOB_DONE: &str = "gemmq.job_done";
    pub const MANIFEST: &str = "gemmq.manifest";
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MessageError {
    #[error("not a gemmq message (no GMQ magic; {0} bytes)")]
    NotGemmq(usize),
    #[error(
        "unsupported message version {0} (this build reads version {VERSION}); upgrade the older program"
    )]
    Version(u8),
    #[error(
        "header length {0} exceeds the message ({1} bytes) or the {MAX_HEADER_BYTES}-byte limit"
    )]
    HeaderLength(usize, usize),
    #[error("malformed header: {0}")]
    Header(String),
    #[error("expected a {expected} message, got a {got}")]
    WrongKind {
        expected: &'static str,
        got: &'static str,
    },
    #[error("payload is {got} bytes but the header's dimensions need {expected}")]
    PayloadLength { expected: u64, got: u64 },
    #[error("dimensions {0} are invalid: {1}")]
    Dimensions(String, String),
    #[error("message of {got} bytes exceeds the {limit}-byte limit")]
    TooLarge { got: u64, limit: u64 },
    #[error("malformed manifest: {0}")]
    Manifest(String),
}

/// A decoded frame borrowing its payload from the message body.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

/// Encodes a frame; `payload` is written as given (already little-endian bytes).
pub fn encode(header: &Header, payload: &[&[u8]]) -> Vec<u8> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut out = encode_header(header, len);
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// The frame up to its payload, with room reserved for `payload_len` more bytes: for writers
/// that produce the payload straight into the message. The header is padded with spaces (still
/// JSON) so the payload starts 8-byte aligned, which lets a reader view f32 and f64 numbers in
/// the body it received instead of copying them out.
pub fn encode_header(header: &Header, payload_len: usize) -> Vec<u8> {
    let head = header_bytes(header);
    let mut out = Vec::with_capacity(head.len() + payload_len);
    out.extend_from_slice(&head);
    out
}

/// The prefix and the padded header: everything a frame holds before its payload.
fn header_bytes(header: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("headers are plain data and always serialize");
    let padded = json.len().next_multiple_of(8);
    let mut out = Vec::with_capacity(PREFIX + padded);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(padded as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(PREFIX + padded, b' ');
    out
}

/// Decodes and validates a frame. `limit` is the largest payload this process accepts.
pub fn decode(body: &[u8], limit: u64) -> Result<Frame<'_>, MessageError> {
    if body.len() as u64 > limit + MAX_HEADER_BYTES as u64 + PREFIX as u64 {
        return Err(MessageError::TooLarge {
            got: body.len() as u64,
            limit,
        });
    }
    if body.len() < PREFIX || &body[..3] != MAGIC {
        return Err(MessageError::NotGemmq(body.len()));
    }
    if body[3] != VERSION {
        return Err(MessageError::Version(body[3]));
    }
    let hlen = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
    if hlen > MAX_HEADER_BYTES || PREFIX + hlen > body.len() {
        return Err(MessageError::HeaderLength(hlen, body.len()));
    }
    let header: Header = serde_json::from_slice(&body[PREFIX..PREFIX + hlen])
        .map_err(|e| MessageError::Header(e.to_string()))?;
    header.check_names()?;
    let payload = &body[PREFIX + hlen..];
    let expected = header.payload_len(limit)?;
    if payload.len() as u64 != expected {
        return Err(MessageError::PayloadLength {
            expected,
            got: payload.len() as u64,
        });
    }
    Ok(Frame { header, payload })
}

/// What a task message asks for: one task with its blocks inline, or one or more whose blocks
/// are on the job's operand stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Work<'a> {
    /// A [`Header::InlineTask`] and its payload: the A block then the B block.
    Inline(TaskHeader, &'a [u8]),
    /// A [`Header::StreamedTask`] (one task) or a [`Header::TaskGroup`] group, in order.
    Streamed(Vec<TaskHeader>),
}

impl Work<'_> {
    pub fn tasks(&self) -> &[TaskHeader] {
        match self {
            Work::Inline(t, _) => std::slice::from_ref(t),
            Work::Streamed(ts) => ts,
        }
    }
}

impl<'a> Frame<'a> {
    /// A task, with its blocks inline (a payload) or on the operand stream (`StreamedTask`, empty).
    pub fn into_task(self) -> Result<(TaskHeader, &'a [u8]), MessageError> {
        match self.header {
            Header::InlineTask(h) | Header::StreamedTask(h) => Ok((h, self.payload)),
            other => Err(MessageError::WrongKind {
                expected: "task",
                got: other.name(),
            }),
        }
    }

    /// Whatever kind of task message this is, the work it asks for.
    pub fn into_work(self) -> Result<Work<'a>, MessageError> {
        match self.header {
            Header::InlineTask(h) => Ok(Work::Inline(h, self.payload)),
            Header::StreamedTask(h) => Ok(Work::Streamed(vec![h])),
            Header::TaskGroup(g) => Ok(Work::Streamed(g.tasks().collect())),
            other => Err(MessageError::WrongKind {
                expected: "task",
                got: other.name(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_names_of_the_header_kinds_never_change() {
        // Renaming a variant must not rename it on the wire: older workers and collectors read
        // these names.
        let tile = TileId {
            row: 0,
            col: 0,
            part: 0,
        };
        let result = Header::TileResult(ResultHeader {
            job: "j".into(),
            run: String::new(),
            tile,
            dtype: DType::F64,
            rows: 1,
            cols: 1,
            worker: "w".into(),
            attempt: 1,
            compute_micros: 1,
            recompute: 0,
        });
        let failed = Header::Failed(FailureNotice {
            job: "j".into(),
            run: String::new(),
            tile,
            reason: "r".into(),
            attempt: 1,
            worker: "w".into(),
        });
        let done = Header::JobDone(JobDone {
            job: "j".into(),
            run: String::new(),
        });
        let mut headers: Vec<Header> = every_kind_of_message()
            .iter()
            .map(|body| decode(body, 1 << 24).expect("a valid message").header)
            .collect();
        headers.extend([result, failed, done]);
        let kinds: std::collections::BTreeSet<String> = headers
            .iter()
            .map(|h| {
                serde_json::to_value(h).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let want = [
            "failed", "job_done", "operand", "parked", "result", "results", "task", "task_ref",
            "tasks",
        ];
        assert_eq!(kinds, want.iter().map(|k| k.to_string()).collect());
    }

    #[test]
    fn runs_differ_only_when_both_are_named_and_unequal() {
        assert!(other_run("a1", "b2"));
        assert!(!other_run("a1", "a1"));
        assert!(!other_run("", "a1") && !other_run("a1", "") && !other_run("", ""));
    }

    fn task(rows: u32, cols: u32, depth: u32) -> Header {
        Header::InlineTask(TaskHeader {
            job: "j".into(),
            run: String::new(),
            tile: TileId {
                row: 1,
                col: 2,
                part: 0,
            },
            dtype: DType::F64,
            rows,
            cols,
            depth,
            at: None,
            recompute: 0,
        })
    }

    #[test]
    fn a_task_round_trips_with_its_payload_untouched() {
        let payload = vec![7u8; (2 * 3 + 3 * 4) * 8];
        let body = encode(&task(2, 4, 3), &[&payload]);
        let frame = decode(&body, 1 << 20).unwrap();
        assert_eq!(frame.header, task(2, 4, 3));
        assert_eq!(frame.payload, &payload[..]);
    }

    #[test]
    fn runs_are_16_hex_digits_the_same_for_the_same_job_and_messages_that_name_none_decode() {
        let (one, two) = (run_of(&[b"job", b"seed 7"]), run_of(&[b"job", b"seed 8"]));
        assert_ne!(one, two);
        assert_eq!(one, run_of(&[b"job", b"seed 7"]));
        assert_ne!(
            run_of(&[b"ab", b"c"]),
            run_of(&[b"a", b"bc"]),
            "parts are delimited"
        );
        for r in [&one, &two] {
            assert_eq!(r.len(), 16, "{r}");
            assert!(r.chars().all(|c| c.is_ascii_hexdigit()), "{r}");
        }
        // As an earlier gemmq wrote them: the run is then empty, which matches only itself.
        let old = br#"{"job":"j","tile":{"row":0,"col":1,"part":0},"dtype":"f64","rows":2,"cols":2,"depth":2}"#;
        let t: TaskHeader = serde_json::from_slice(old).expect("an older task decodes");
        assert_eq!(t.run, "");
        let done: JobDone = serde_json::from_slice(br#"{"job":"j"}"#).expect("decodes");
        assert_eq!(done.run, "");
    }

    #[test]
    fn payloads_start_8_byte_aligned_in_the_body_whatever_the_header_length() {
        for job in ["j", "jo", "job-1234", "a-much-longer-job-id_7"] {
            let mut h = task(2, 4, 3);
            if let Header::InlineTask(t) = &mut h {
                t.job = job.into();
            }
            let payload = vec![1u8; (2 * 3 + 3 * 4) * 8];
            let body = encode(&h, &[&payload]);
            let frame = decode(&body, 1 << 20).unwrap();
            assert_eq!(frame.header, h, "the padding is JSON whitespace");
            assert_eq!((body.len() - frame.payload.len()) % 8, 0, "job {job:?}");
        }
    }

    fn group(tasks: usize) -> Header {
        let ts: Vec<TaskHeader> = (0..tasks as u32)
            .map(|col| TaskHeader {
                job: "j".into(),
                run: "r".into(),
                tile: TileId {
                    row: 0,
                    col,
                    part: 0,
                },
                dtype: DType::F32,
                rows: 16,
                cols: 16,
                depth: 1024,
                at: None,
                recompute: 0,
            })
            .collect();
        match TaskGroup::of(&ts) {
            Some(g) => Header::TaskGroup(g),
            None => Header::TaskGroup(TaskGroup {
                job: "j".into(),
                run: "r".into(),
                dtype: DType::F32,
                tasks: Vec::new(),
            }),
        }
    }

    #[test]
    fn a_task_group_decodes_to_its_tasks_in_order_each_with_the_shared_fields() {
        let body = encode(&group(3), &[]);
        let work = decode(&body, 1 << 20).unwrap().into_work().unwrap();
        let Work::Streamed(tasks) = work else {
            panic!("a group is streamed work")
        };
        let cols: Vec<u32> = tasks.iter().map(|t| t.tile.col).collect();
        assert_eq!(cols, [0, 1, 2]);
        assert!(tasks.iter().all(|t| t.job == "j" && t.run == "r"));
        assert!(
            tasks
                .iter()
                .all(|t| t.dtype == DType::F32 && t.depth == 1024)
        );
        assert_eq!(Tiles(&tasks).to_string(), "C[0,0]..C[0,2] (3 tiles)");
        assert_eq!(Tiles(&tasks[..1]).to_string(), "C[0,0]");
    }

    #[test]
    fn an_empty_or_oversized_task_group_is_refused() {
        for n in [0, MAX_GROUP + 1] {
            let body = encode(&group(n), &[]);
            let err = decode(&body, 1 << 20).unwrap_err();
            assert!(
                matches!(&err, MessageError::Dimensions(d, _) if d == &format!("{n} tasks")),
                "{err}"
            );
        }
        let body = encode(&group(MAX_GROUP), &[]);
        assert!(body.len() < MAX_HEADER_BYTES / 2, "{} bytes", body.len());
        assert!(decode(&body, 1 << 20).is_ok());
        // Each 16×16 f32 result is 1 KiB; the group's 8 KiB of results must fit one message too.
        let limit = crate::tiling::HEADER_BUDGET + 4096;
        let err = decode(&encode(&group(8), &[]), limit).unwrap_err();
        assert!(
            matches!(&err, MessageError::Dimensions(d, why) if d == "8 tasks" && why.contains("results")),
            "{err}"
        );
        assert!(decode(&encode(&group(4), &[]), limit).is_ok());
    }

    #[test]
    fn a_payload_that_does_not_match_the_shape_is_refused() {
        let body = encode(&task(2, 4, 3), &[&[0u8; 10]]);
        assert_eq!(
            decode(&body, 1 << 20).unwrap_err(),
            MessageError::PayloadLength {
                expected: 144,
                got: 10
            }
        );
    }

    #[test]
    fn huge_declared_dimensions_are_refused_before_allocating() {
        // A 4-billion-square result from a tiny message: the shape alone must be rejected.
        let body = encode(&task(u32::MAX, u32::MAX, 1), &[]);
        assert!(matches!(
            decode(&body, 16 << 20),
            Err(MessageError::Dimensions(..))
        ));
        let body = encode(&task(0, 4, 3), &[]);
        assert!(matches!(
            decode(&body, 16 << 20),
            Err(MessageError::Dimensions(..))
        ));
    }

    #[test]
    fn garbage_wrong_versions_and_unknown_fields_get_clear_errors() {
        assert_eq!(
            decode(b"{\"hello\":1}", 1024).unwrap_err(),
            MessageError::NotGemmq(11)
        );
        let mut body = encode(&task(1, 1, 1), &[&[0u8; 16]]);
        body[3] = 9;
        assert_eq!(decode(&body, 1024).unwrap_err(), MessageError::Version(9));
        let mut body = encode(&task(1, 1, 1), &[&[0u8; 16]]);
        body[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&body, 1024),
            Err(MessageError::HeaderLength(..))
        ));
        let json = br#"{"kind":"task","job":"j","tile":{"row":0,"col":0,"part":0},"dtype":"f64","rows":1,"cols":1,"depth":1,"extra":1}"#;
        let mut body = b"GMQ\x01".to_vec();
        body.extend_from_slice(&(json.len() as u32).to_le_bytes());
        body.extend_from_slice(json);
        assert!(matches!(decode(&body, 1024), Err(MessageError::Header(_))));
    }

    fn batch(shapes: &[(u32, u32)]) -> ResultBatch {
        ResultBatch {
            job: "j".into(),
            run: String::new(),
            dtype: DType::F64,
            worker: "w".into(),
            tiles: shapes
                .iter()
                .enumerate()
                .map(|(i, &(rows, cols))| BatchedTile {
                    tile: TileId {
                        row: i as u32,
                        col: 0,
                        part: 0,
                    },
                    rows,
                    cols,
                    attempt: 1,
                    compute_micros: 5,
                    recompute: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_result_batch_splits_into_its_tiles_with_their_own_bytes() {
        let b = batch(&[(1, 2), (2, 1), (1, 1)]);
        let payload: Vec<u8> = (0..5 * 8).map(|i| i as u8).collect();
        let body = encode(&Header::ResultBatch(b), &[&payload]);
        let frame = decode(&body, 1 << 20).unwrap();
        let Header::ResultBatch(b) = &frame.header else {
            panic!("not a batch")
        };
        let tiles: Vec<_> = b.results(frame.payload).collect();
        assert_eq!(tiles.len(), 3);
        assert_eq!(tiles[0].1, &payload[..16]);
        assert_eq!(tiles[1].1, &payload[16..32]);
        assert_eq!(tiles[2].1, &payload[32..]);
        assert_eq!(
            (
                tiles[1].0.tile.row,
                tiles[1].0.rows,
                tiles[1].0.worker.as_str()
            ),
            (1, 2, "w")
        );
    }

    #[test]
    fn a_result_batch_must_match_its_payload_and_stay_under_the_limit() {
        let body = encode(&Header::ResultBatch(batch(&[(2, 2)])), &[&[0u8; 8]]);
        assert_eq!(
            decode(&body, 1 << 20).unwrap_err(),
            MessageError::PayloadLength {
                expected: 32,
                got: 8
            }
        );
        let empty = encode(&Header::ResultBatch(batch(&[])), &[]);
        assert!(matches!(
            decode(&empty, 1 << 20),
            Err(MessageError::Dimensions(..))
        ));
        // Many huge tiles declared in a small message: refused from the header alone.
        let body = encode(&Header::ResultBatch(batch(&[(u32::MAX, u32::MAX); 8])), &[]);
        assert!(matches!(
            decode(&body, 16 << 20),
            Err(MessageError::Dimensions(..))
        ));
    }

    /// Valid messages of every kind a program decodes, with their payloads.
    fn every_kind_of_message() -> Vec<Vec<u8>> {
        let Header::InlineTask(one) = task(2, 3, 4) else {
            unreachable!()
        };
        let group = TaskGroup::of(&[one.clone(), one.clone(), one.clone()]).expect("3 tasks");
        let operand = Header::Operand(OperandHeader {
            job: "j".into(),
            run: "0123456789abcdef".into(),
            block: BlockId {
                side: Side::B,
                index: 1,
                part: 0,
            },
            dtype: DType::F64,
            rows: 4,
            cols: 3,
        });
        let parked = Header::Parked(ParkedNotice {
            job: "j".into(),
            run: String::new(),
            tile: one.tile,
            reason: "r".into(),
            attempts: 5,
            worker: "w".into(),
        });
        vec![
            encode(&task(2, 3, 4), &[&[1u8; (2 * 4 + 4 * 3) * 8]]),
            encode(&Header::StreamedTask(one), &[]),
            encode(&Header::TaskGroup(group), &[]),
            encode(&operand, &[&[2u8; 4 * 3 * 8]]),
            encode(
                &Header::ResultBatch(batch(&[(1, 2), (2, 1)])),
                &[&[3u8; 4 * 8]],
            ),
            encode(&parked, &[]),
        ]
    }

    /// One change to a message's bytes, as corruption or a hostile sender would make it.
    /// Positions are fractions of the body's length, so that proptest can shrink them.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip {
            at: f64,
            xor: u8,
        },
        Truncate {
            at: f64,
        },
        Insert {
            at: f64,
            bytes: Vec<u8>,
        },
        /// A number in the JSON header replaced by an extreme one.
        Number {
            nth: usize,
            with: usize,
        },
        /// The header length field.
        HeaderLen(u32),
        /// A job id no queue may be named after.
        BadJob(usize),
    }

    const NUMBERS: [&[u8]; 7] = [
        b"0",
        b"-1",
        b"4294967295",
        b"4294967296",
        b"2147483648",
        b"18446744073709551615",
        b"1e300",
    ];

    fn mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
        use proptest::prelude::*;
        prop_oneof![
            (0.0..1.0f64, 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
            (0.0..1.0f64).prop_map(|at| Mutation::Truncate { at }),
            (0.0..=1.0f64, proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            (0..512usize, 0..NUMBERS.len()).prop_map(|(nth, with)| Mutation::Number { nth, with }),
            prop_oneof![any::<u32>(), Just(u32::MAX), 0..4096u32].prop_map(Mutation::HeaderLen),
            (0..3usize).prop_map(Mutation::BadJob),
        ]
    }

    fn mutate(body: &mut Vec<u8>, m: &Mutation) {
        let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
        if body.is_empty() {
            body.push(0x47);
            return;
        }
        match m {
            Mutation::Flip { at: f, xor } => {
                let i = at(*f, body.len());
                body[i] ^= xor;
            }
            Mutation::Truncate { at: f } => body.truncate(at(*f, body.len())),
            Mutation::Insert { at: f, bytes } => {
                let i = ((f * body.len() as f64) as usize).min(body.len());
                body.splice(i..i, bytes.iter().copied());
            }
            Mutation::Number { nth, with } => {
                let digits: Vec<usize> = (0..body.len().min(PREFIX + 512))
                    .filter(|&i| body[i].is_ascii_digit())
                    .collect();
                if let Some(&i) = digits.get(nth % digits.len().max(1)) {
                    let end = (i..body.len())
                        .find(|&j| !body[j].is_ascii_digit())
                        .unwrap_or(body.len());
                    body.splice(i..end, NUMBERS[*with].iter().copied());
                }
            }
            Mutation::HeaderLen(len) if body.len() >= PREFIX => {
                body[4..8].copy_from_slice(&len.to_le_bytes());
            }
            Mutation::HeaderLen(_) => {}
            Mutation::BadJob(which) => {
                let bad: &[u8] = [&b"../../etc"[..], b"", b"a b\\u0000c"][*which];
                if let Some(i) = body.windows(3).position(|w| w == b"\"j\"") {
                    body.splice(i + 1..i + 2, bad.iter().copied());
                }
            }
        }
    }

    /// Runs `check` on `cases` mutations of `seeds` (one to `most` changes each) with
    /// proptest's runner: a failure is shrunk to the fewest, smallest changes that still fail.
    fn for_mutations(seeds: &[Vec<u8>], cases: u32, most: usize, check: impl FnMut(Vec<u8>)) {
        use proptest::test_runner::{Config, TestRunner};
        // The runner takes an Fn; the checks count what they see.
        let check = std::cell::RefCell::new(check);
        // Seeded afresh each run, so every run explores other mutations; the counts the tests
        // assert on leave wide margins (about 29,500 refused and 450 accepted of 30,000).
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            0..seeds.len(),
            proptest::collection::vec(mutation(), 1..=most),
        );
        let result = runner.run(&strategy, |(seed, changes)| {
            let mut body = seeds[seed].clone();
            for m in &changes {
                mutate(&mut body, m);
            }
            (check.borrow_mut())(body);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    #[test]
    fn no_mutation_of_a_valid_message_makes_decoding_panic_or_oversize() {
        let limit = 1 << 20;
        let (mut refused, mut accepted) = (0u32, 0u32);
        for_mutations(&every_kind_of_message(), 30_000, 3, |body| {
            match decode(&body, limit) {
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                }
                Ok(frame) => {
                    accepted += 1;
                    // What the programs do next with an accepted message must hold too.
                    assert!(frame.payload.len() as u64 <= limit);
                    let _ = (frame.header.job(), frame.header.run());
                    match &frame.header {
                        Header::ResultBatch(b) => {
                            let bytes: usize = b.results(frame.payload).map(|(_, p)| p.len()).sum();
                            assert_eq!(bytes, frame.payload.len());
                        }
                        Header::Operand(h) => {
                            let shape = (h.rows as usize, h.cols as usize);
                            let start = body.len() - frame.payload.len();
                            let block = crate::matrix::Block::from_body(
                                body.clone(),
                                start,
                                shape.0,
                                shape.1,
                                h.dtype,
                            )
                            .expect("decode checked the payload's length");
                            assert_eq!(block.view().shape(), shape);
                        }
                        _ => {}
                    }
                    if let Ok(work) = frame.into_work() {
                        assert!(!work.tasks().is_empty() && work.tasks().len() <= MAX_GROUP);
                    }
                }
            }
        });
        // The mutations must reach past the first check, or this tests nothing.
        assert!(
            refused > 10_000 && accepted > 200,
            "{refused} refused, {accepted} accepted"
        );
    }

    #[test]
    fn no_mutation_of_a_valid_manifest_makes_reading_it_panic() {
        let plan = crate::Plan::new(8, 4, 6, DType::F64, 4, 1 << 20).expect("a small plan");
        let check = crate::verify::expect_seeded(8, 4, 6, DType::F64, 1, 2, 7).to_check(7);
        let manifest = Manifest {
            version: VERSION,
            job: "j".into(),
            plan,
            inputs: Inputs::Seed(1),
            created_ms: 1,
            run: "0123456789abcdef".into(),
            check: Some(check),
        };
        let json = manifest.to_json();
        assert_eq!(Manifest::from_json(&json).expect("valid"), manifest);
        let mut accepted = 0;
        for_mutations(std::slice::from_ref(&json), 5_000, 2, |body| {
            let Ok(m) = Manifest::from_json(&body) else {
                return;
            };
            accepted += 1;
            let p = &m.plan;
            let _ = (p.tiles(), p.tasks(), p.task_ids().take(1_000).count());
            // The collector sizes C (and so the check's vectors) only up to --max-output-bytes.
            let small = p.m.saturating_mul(p.n) <= 1 << 20;
            if let (Some(c), true) = (&m.check, small) {
                let _ = crate::verify::Expected::from_check(
                    c,
                    p.m as usize,
                    p.k as usize,
                    p.n as usize,
                    p.dtype,
                );
            }
        });
        assert!(accepted > 100, "{accepted} accepted");
    }

    #[test]
    fn a_result_is_not_a_task() {
        let h = Header::Parked(ParkedNotice {
            job: "j".into(),
            run: String::new(),
            tile: TileId {
                row: 0,
                col: 0,
                part: 0,
            },
            reason: "r".into(),
            attempts: 1,
            worker: "w".into(),
        });
        let body = encode(&h, &[]);
        let err = decode(&body, 1024).unwrap().into_task().unwrap_err();
        assert!(err.to_string().contains("expected a task"));
    }
}
