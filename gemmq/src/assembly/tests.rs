//! Exactly once, whatever order and duplicates the results come in; resumed after a crash.
use super::*;
use crate::matrix::{Matrix, compute_tile, generate, task_payload};

fn results(plan: &Plan, a: &Array2<f64>, b: &Array2<f64>) -> Vec<(ResultHeader, Vec<u8>)> {
    plan.task_ids()
        .map(|tile| {
            let task = plan.task("j", "", tile);
            let bytes = compute_tile(
                &task,
                &task_payload(a, b, plan, tile),
                crate::kernel::Threads::Exactly(1),
            )
            .unwrap();
            let h = ResultHeader {
                job: "j".into(),
                run: String::new(),
                tile,
                dtype: DType::F64,
                rows: task.rows,
                cols: task.cols,
                worker: "w".into(),
                attempt: 1,
                compute_micros: 1,
                recompute: 0,
            };
            (h, bytes.bytes().to_vec())
        })
        .collect()
}

/// Tiles of 8 with a message limit so small that k is split into several parts.
fn split_plan(m: u64, k: u64, n: u64) -> Plan {
    Plan::new(m, k, n, DType::F64, 8, crate::tiling::HEADER_BUDGET + 2048).unwrap()
}

fn inputs(m: usize, k: usize, n: usize) -> (Array2<f64>, Array2<f64>) {
    let (Matrix::F64(a), Matrix::F64(b)) = generate(m, k, n, DType::F64, 5) else {
        unreachable!()
    };
    (a, b)
}

fn max_error(asm: &Assembly, want: &Array2<f64>) -> f64 {
    asm.with_c(|c| {
        let MatrixView::F64(c) = c else {
            unreachable!()
        };
        (&c - want).iter().fold(0.0f64, |m, d| m.max(d.abs()))
    })
    .unwrap()
}

#[test]
fn every_result_twice_in_reverse_order_still_gives_c_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(20, 90, 13);
    let plan = split_plan(20, 90, 13);
    assert!(plan.parts() > 1);
    let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    let rs = results(&plan, &a, &b);
    for (h, p) in rs.iter().rev().chain(rs.iter()) {
        asm.apply_result(h, p).unwrap();
    }
    asm.commit().unwrap();
    assert!(asm.is_complete() && asm.is_finished());
    assert_eq!(asm.duplicates, plan.tasks());
    assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
}

#[test]
fn c_x_summed_as_tiles_are_written_counts_each_tile_once_and_only_from_a_fresh_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(20, 90, 13);
    let plan = split_plan(20, 90, 13);
    let (av, bv) = (MatrixView::F64(a.view()), MatrixView::F64(b.view()));
    let expected = crate::verify::expect(av, bv, 2, 7).unwrap();
    let rs = results(&plan, &a, &b);
    {
        let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
        assert!(asm.track_product(2, 7));
        // Every result twice, k-split parts included: each tile is summed once.
        for (h, p) in rs.iter().rev().chain(rs.iter()) {
            asm.apply_result(h, p).unwrap();
        }
        asm.commit().unwrap();
        let running = asm.running_product().expect("every tile was written here");
        let v = expected.check_running(running).unwrap();
        assert!(v.passed, "{v:?}");
    }
    // Reopened, its tiles were written by an earlier run: nothing to sum from.
    let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
    assert!(!asm.track_product(2, 7));
    assert!(asm.running_product().is_none());
}

#[test]
fn a_collector_that_dies_resumes_from_its_checkpoint_without_doubling_a_part() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(24, 90, 16);
    let plan = split_plan(24, 90, 16);
    let rs = results(&plan, &a, &b);
    let half = rs.len() / 2;
    {
        let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
        for (h, p) in &rs[..half] {
            asm.apply_result(h, p).unwrap();
        }
        asm.commit().unwrap();
        // Applied after the last commit: never acked, so it will be delivered again.
        asm.apply_result(&rs[half].0, &rs[half].1).unwrap();
        // The process dies here: no commit, no finish.
    }
    let mut asm = Assembly::open(&plan, "j", "r1", &dir.path().join("ck")).unwrap();
    assert_eq!(asm.resumed, half as u64);
    // The broker redelivers what was not acked — and, being at-least-once, maybe more.
    for (h, p) in &rs[half - 3..] {
        asm.apply_result(h, p).unwrap();
    }
    asm.commit().unwrap();
    assert!(asm.is_complete());
    assert_eq!(asm.duplicates, 3);
    assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
    let out = dir.path().join("C-final.npy");
    asm.finish(&out).unwrap();
    assert!(out.exists());
}

#[test]
fn a_torn_journal_line_from_a_crash_is_cut_off_and_never_glued_to_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(16, 8, 16);
    let plan = Plan::new(16, 8, 16, DType::F64, 8, 16 << 20).unwrap();
    let rs = results(&plan, &a, &b);
    {
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        asm.apply_result(&rs[0].0, &rs[0].1).unwrap();
        asm.commit().unwrap();
    }
    // Half a record, as a crash mid-write leaves it.
    let mut j = OpenOptions::new()
        .append(true)
        .open(dir.path().join(JOURNAL))
        .unwrap();
    j.write_all(b"T 1 1 0 1 5 wor").unwrap();
    drop(j);
    {
        let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
        assert_eq!(asm.resumed, 1);
        asm.apply_result(&rs[1].0, &rs[1].1).unwrap();
        asm.commit().unwrap();
    }
    let asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    assert_eq!(asm.resumed, 2, "the record after the torn one survived");
    assert_eq!(asm.tiles_complete(), 2);
}

/// An 8×8 job of run r1 collected in full into `ck`, its C written to `out`.
fn finished_r1(ck: &Path, out: &Path) -> Plan {
    let (a, b) = inputs(8, 8, 8);
    let plan = Plan::new(8, 8, 8, DType::F64, 8, 16 << 20).unwrap();
    let mut asm = Assembly::open(&plan, "j", "r1", ck).unwrap();
    for (h, p) in results(&plan, &a, &b) {
        asm.apply_result(&h, &p).unwrap();
    }
    asm.finish(out).unwrap();
    plan
}

#[test]
fn a_finished_checkpoint_says_so_instead_of_starting_over() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, out) = (dir.path().join("ck"), dir.path().join("C.npy"));
    let plan = finished_r1(&ck, &out);
    match Assembly::open(&plan, "j", "r1", &ck) {
        Err(AssemblyError::AlreadyFinished { output }) => assert_eq!(output, out),
        other => panic!("{:?}", other.err()),
    }
    assert!(out.exists());
}

#[test]
fn a_finished_checkpoint_of_an_earlier_run_is_started_over_for_the_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let plan = finished_r1(&ck, &dir.path().join("C.npy"));

    // The same job id and plan, other inputs: a new run, collected afresh.
    let asm = Assembly::open(&plan, "j", "r2", &ck).expect("a fresh checkpoint");
    assert_eq!(asm.resumed, 0);
    drop(asm);
    // ... and once it is under way, it is resumed, not taken for the finished r1.
    assert!(Assembly::open(&plan, "j", "r2", &ck).is_ok());
}

#[test]
fn a_checkpoint_written_before_runs_existed_is_resumed_by_any_run_of_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
    drop(Assembly::open(&plan, "j", "", dir.path()).unwrap());
    let legacy = serde_json::json!({ "job": "j", "plan": plan });
    fs::write(dir.path().join(PLAN_FILE), legacy.to_string()).unwrap();
    let asm = Assembly::open(&plan, "j", "r1", dir.path());
    assert!(asm.is_ok(), "{:?}", asm.err());
}

#[test]
fn a_second_collector_on_the_same_checkpoint_waits_for_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
    let first = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    let err = Assembly::open(&plan, "j", "r1", dir.path()).err().unwrap();
    assert!(Assembly::is_locked(&err), "{err}");
    drop(first);
    assert!(Assembly::open(&plan, "j", "r1", dir.path()).is_ok());
    let other = Plan::new(8, 8, 9, DType::F64, 4, 16 << 20).unwrap();
    assert!(matches!(
        Assembly::open(&other, "j", "r1", dir.path()),
        Err(AssemblyError::Mismatch { .. })
    ));
}

#[test]
fn a_parked_task_finishes_the_job_incomplete_until_its_result_comes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
    let (a, b) = inputs(8, 8, 8);
    let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    let rs = results(&plan, &a, &b);
    for (h, p) in &rs[1..] {
        asm.apply_result(h, p).unwrap();
    }
    let notice = ParkedNotice {
        job: "j".into(),
        run: String::new(),
        tile: rs[0].0.tile,
        reason: "boom: twice".into(),
        attempts: 3,
        worker: "w".into(),
    };
    assert_eq!(asm.apply_parked(&notice).unwrap(), Applied::Parked);
    assert_eq!(asm.apply_parked(&notice).unwrap(), Applied::Duplicate);
    asm.commit().unwrap();
    assert!(asm.is_finished() && !asm.is_complete());
    drop(asm);
    let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    assert_eq!(
        asm.parked().next().map(|p| p.reason.as_str()),
        Some("boom: twice")
    );
    assert_eq!(
        asm.apply_result(&rs[0].0, &rs[0].1).unwrap(),
        Applied::TileComplete
    );
    assert!(asm.is_complete() && asm.parked().next().is_none());
}

#[test]
fn results_that_do_not_fit_the_plan_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::new(8, 8, 8, DType::F64, 4, 16 << 20).unwrap();
    let mut asm = Assembly::open(&plan, "j", "r1", dir.path()).unwrap();
    let mut h = ResultHeader {
        job: "j".into(),
        run: String::new(),
        tile: TileId {
            row: 5,
            col: 0,
            part: 0,
        },
        dtype: DType::F64,
        rows: 4,
        cols: 4,
        worker: "w".into(),
        attempt: 1,
        compute_micros: 0,
        recompute: 0,
    };
    assert!(matches!(
        asm.apply_result(&h, &[0; 128]),
        Err(AssemblyError::UnknownTile { .. })
    ));
    h.tile.row = 0;
    h.rows = 3;
    assert!(matches!(
        asm.apply_result(&h, &[0; 96]),
        Err(AssemblyError::Shape { .. })
    ));
    assert_eq!(asm.tasks_done(), 0);
}

#[test]
fn the_checkpoint_remembers_how_far_it_read_the_results_stream_once_committed() {
    let plan = Plan::new(16, 8, 16, DType::F64, 8, 1 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(16, 8, 16);
    let rs = results(&plan, &a, &b);
    let at = |i: u64| StreamPosition::of(i, &[i as u8; 3]);
    {
        let mut asm = Assembly::open(&plan, "j", "", dir.path()).unwrap();
        assert_eq!(asm.position(), None, "a new checkpoint has read nothing");
        asm.apply_result(&rs[0].0, &rs[0].1).unwrap();
        asm.read_through(at(0));
        asm.commit().unwrap();
        asm.apply_result(&rs[1].0, &rs[1].1).unwrap();
        asm.read_through(at(5));
        // Killed before committing: offset 5 was never acknowledged as held.
    }
    let asm = Assembly::open(&plan, "j", "", dir.path()).unwrap();
    assert_eq!(asm.position(), Some(at(0)));
    assert_eq!(asm.tasks_done(), 1);
}

/// A result for `tile` from `worker`, of recompute `round`, carrying `bytes`.
fn from(
    rs: &[(ResultHeader, Vec<u8>)],
    tile: TileId,
    worker: &str,
    round: u32,
    bytes: Option<Vec<u8>>,
) -> (ResultHeader, Vec<u8>) {
    let (h, p) = rs.iter().find(|(h, _)| h.tile == tile).unwrap();
    let h = ResultHeader {
        worker: worker.into(),
        recompute: round,
        ..h.clone()
    };
    (h, bytes.unwrap_or_else(|| p.clone()))
}

#[test]
fn a_wrong_tile_is_replaced_by_its_recompute_and_by_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(16, 8, 16);
    let plan = Plan::new(16, 8, 16, DType::F64, 8, 1 << 20).unwrap();
    let rs = results(&plan, &a, &b);
    let t = TileId {
        row: 1,
        col: 0,
        part: 0,
    };
    let forged = from(&rs, t, "forger", 0, Some(vec![0u8; 8 * 8 * 8]));
    let mut asm = Assembly::open(&plan, "j", "", dir.path()).unwrap();
    // The forged result comes first: first-result-wins keeps it.
    asm.apply_result(&forged.0, &forged.1).unwrap();
    for (h, p) in &rs {
        asm.apply_result(h, p).unwrap();
    }
    assert!(asm.is_finished());
    assert!(max_error(&asm, &a.dot(&b)) > 0.1, "C holds the forged tile");
    assert_eq!(asm.senders_of(1, 0), ["forger"]);

    assert_eq!(asm.recompute(1, 0), 1);
    assert!(!asm.is_finished(), "waiting for the recompute");
    // A right result of no round, or of a round nobody asked for, changes nothing.
    for round in [0, 2] {
        let (h, p) = from(&rs, t, "w", round, None);
        assert_eq!(asm.apply_result(&h, &p).unwrap(), Applied::Duplicate);
    }
    let (h, p) = from(&rs, t, "w2", 1, None);
    assert_eq!(asm.apply_result(&h, &p).unwrap(), Applied::TileComplete);
    let again = from(&rs, t, "forger", 1, Some(vec![0u8; 8 * 8 * 8]));
    assert_eq!(
        asm.apply_result(&again.0, &again.1).unwrap(),
        Applied::Duplicate,
        "the round's first result wins, as any other"
    );
    assert!(asm.is_finished());
    assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
    assert_eq!(asm.senders_of(1, 0), ["w2"]);
    assert_eq!(asm.round_of(1, 0), 1);
}

#[test]
fn a_k_split_recompute_takes_every_part_of_its_round_and_survives_a_crash_halfway() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(20, 90, 13);
    let plan = split_plan(20, 90, 13);
    let parts = plan.parts();
    assert!(parts > 2);
    let rs = results(&plan, &a, &b);
    let part = |p| TileId {
        row: 0,
        col: 1,
        part: p,
    };
    {
        let mut asm = Assembly::open(&plan, "j", "", &dir.path().join("ck")).unwrap();
        let forged = from(&rs, part(0), "forger", 0, None);
        let mut wrong = forged.1.clone();
        wrong[7] ^= 0x40; // the exponent of the first number
        asm.apply_result(&forged.0, &wrong).unwrap();
        for (h, p) in &rs {
            asm.apply_result(h, p).unwrap();
        }
        assert!(max_error(&asm, &a.dot(&b)) > 1e-6);
        assert_eq!(asm.recompute(0, 1), 1);
        // Half the parts of the round come in; then the collector dies.
        for p in 0..parts / 2 {
            let (h, bytes) = from(&rs, part(p), "w", 1, None);
            assert_eq!(asm.apply_result(&h, &bytes).unwrap(), Applied::Part);
        }
        asm.commit().unwrap();
    }
    let mut asm = Assembly::open(&plan, "j", "", &dir.path().join("ck")).unwrap();
    assert!(!asm.is_finished(), "the recompute is still to finish");
    for p in 0..parts {
        let (h, bytes) = from(&rs, part(p), "w", 1, None);
        let applied = asm.apply_result(&h, &bytes).unwrap();
        let want = if p < parts / 2 {
            Applied::Duplicate
        } else if p + 1 < parts {
            Applied::Part
        } else {
            Applied::TileComplete
        };
        assert_eq!(applied, want, "part {p}");
    }
    asm.commit().unwrap();
    assert!(asm.is_finished());
    assert!(max_error(&asm, &a.dot(&b)) < 1e-12);
}

#[test]
fn a_recompute_whose_task_is_parked_is_given_up_but_still_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = inputs(16, 8, 16);
    let plan = Plan::new(16, 8, 16, DType::F64, 8, 1 << 20).unwrap();
    let mut asm = Assembly::open(&plan, "j", "", dir.path()).unwrap();
    for (h, p) in results(&plan, &a, &b) {
        asm.apply_result(&h, &p).unwrap();
    }
    assert_eq!(asm.recompute(0, 0), 1);
    let notice = ParkedNotice {
        job: "j".into(),
        run: String::new(),
        tile: TileId {
            row: 0,
            col: 0,
            part: 0,
        },
        reason: "attempts ran out".into(),
        attempts: 3,
        worker: "w".into(),
    };
    assert_eq!(asm.apply_parked(&notice).unwrap(), Applied::Parked);
    assert!(asm.is_finished(), "nothing left to wait for");
    assert_eq!(asm.parked().count(), 0, "the tile itself is not missing");
    assert_eq!(asm.round_of(0, 0), 0, "its value is still the first one");
    assert_eq!(asm.recomputes(0, 0), 1, "but the recompute was asked for");
    asm.commit().unwrap();
    drop(asm);
    let mut asm = Assembly::open(&plan, "j", "", dir.path()).unwrap();
    assert!(asm.is_finished());
    assert_eq!(
        asm.recompute(0, 0),
        2,
        "the next round, after a restart too"
    );
}
