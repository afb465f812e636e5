//! What the live page shows, kept as the collector applies results, and sent to every page
//! as server-sent events: a snapshot when a page connects, then each change once.

use std::collections::HashMap;
use std::sync::Mutex;

use gemmq::TileId;
use gemmq::message::Manifest;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;

/// Events a page may fall behind by before it is sent a fresh snapshot: a 64×64 job split in
/// four parts of k is 16,384 tasks.
const BACKLOG: usize = 32 * 1024;

/// One change, as an SSE event: its name and its JSON.
#[derive(Debug, Clone)]
pub struct Change {
    pub event: &'static str,
    pub data: String,
}

/// A task's result as the map draws it: worker (an index into the workers), attempt, recompute.
#[derive(Debug, Clone, Copy, Serialize)]
struct Cell {
    w: u32,
    a: u32,
    x: u32,
}

#[derive(Default)]
struct State {
    job: serde_json::Value,
    workers: Vec<String>,
    tasks: HashMap<TileId, Cell>,
    parked: Vec<TileId>,
    wrong: Vec<(u32, u32)>,
    status: Option<serde_json::Value>,
    done: Option<String>,
}

/// The job as the page sees it, and the pages listening.
pub struct Live {
    state: Mutex<State>,
    tx: broadcast::Sender<Change>,
}

impl Live {
    pub fn new(manifest: &Manifest) -> Self {
        let plan = &manifest.plan;
        let job = json!({
            "job": manifest.job, "m": plan.m, "k": plan.k, "n": plan.n, "dtype": plan.dtype.to_string(),
            "tile": plan.tile, "rows": plan.row_blocks(), "cols": plan.col_blocks(),
            "parts": plan.parts(), "tasks": plan.tasks(), "created_ms": manifest.created_ms,
        });
        Live {
            state: Mutex::new(State {
                job,
                ..State::default()
            }),
            tx: broadcast::channel(BACKLOG).0,
        }
    }

    /// Changes the state and tells the pages, under one lock: a page that subscribes gets each
    /// change either in its snapshot or as an event, never both, never neither.
    fn change(&self, f: impl FnOnce(&mut State) -> Option<Change>) {
        let mut st = self.state.lock().expect("the live state is never poisoned");
        if let Some(c) = f(&mut st) {
            let _ = self.tx.send(c);
        }
    }

    /// A task's result was applied (the first for its task, or its recompute).
    pub fn task(&self, tile: TileId, worker: &str, attempt: u32, recompute: u32) {
        self.change(|st| {
            let w = match st.workers.iter().position(|n| n == worker) {
                Some(i) => i as u32,
                None => {
                    st.workers.push(worker.to_string());
                    let _ = self.tx.send(Change {
                        event: "worker",
                        data: json!({ "i": st.workers.len() - 1, "name": worker }).to_string(),
                    });
                    (st.workers.len() - 1) as u32
                }
            };
            let cell = Cell {
                w,
                a: attempt,
                x: recompute,
            };
            st.tasks.insert(tile, cell);
            st.wrong
                .retain(|&rc| rc != (tile.row, tile.col) || recompute == 0);
            Some(Change {
                event: "task",
                data: json!([tile.row, tile.col, tile.part, cell.w, cell.a, cell.x]).to_string(),
            })
        });
    }

    pub fn parked(&self, tile: TileId) {
        self.change(|st| {
            st.parked.push(tile);
            Some(Change {
                event: "parked",
                data: json!([tile.row, tile.col, tile.part]).to_string(),
            })
        });
    }

    /// A tile failed verification and is being computed again.
    pub fn wrong(&self, row: u32, col: u32) {
        self.change(|st| {
            st.wrong.push((row, col));
            Some(Change {
                event: "wrong",
                data: json!([row, col]).to_string(),
            })
        });
    }

    /// The workers' heartbeats and the queues (`gemmq-collector status`'s snapshot).
    pub fn status(&self, snapshot: &crate::status::Snapshot) {
        let value = serde_json::to_value(snapshot).unwrap_or_default();
        self.change(|st| {
            st.status = Some(value.clone());
            Some(Change {
                event: "status",
                data: value.to_string(),
            })
        });
    }

    /// The job ended: `outcome` as summary.json says it.
    pub fn done(&self, outcome: &str) {
        self.change(|st| {
            st.done = Some(outcome.to_string());
            Some(Change {
                event: "done",
                data: json!(outcome).to_string(),
            })
        });
    }

    /// Everything so far, and the changes from here on.
    pub fn subscribe(&self) -> (Change, broadcast::Receiver<Change>) {
        let st = self.state.lock().expect("the live state is never poisoned");
        let rx = self.tx.subscribe();
        let tasks: Vec<_> = st
            .tasks
            .iter()
            .map(|(t, c)| json!([t.row, t.col, t.part, c.w, c.a, c.x]))
            .collect();
        let parked: Vec<_> = st
            .parked
            .iter()
            .map(|t| json!([t.row, t.col, t.part]))
            .collect();
        let snapshot = json!({
            "job": st.job, "workers": st.workers, "tasks": tasks, "parked": parked,
            "wrong": st.wrong, "status": st.status, "done": st.done,
        });
        (
            Change {
                event: "snapshot",
                data: snapshot.to_string(),
            },
            rx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: gemmq::message::VERSION,
            job: "j".into(),
            plan: gemmq::Plan::new(64, 8, 64, gemmq::DType::F64, 32, 1 << 20).unwrap(),
            inputs: gemmq::message::Inputs::Seed(1),
            created_ms: 0,
            run: String::new(),
            check: None,
        }
    }

    fn tile(row: u32, col: u32) -> TileId {
        TileId { row, col, part: 0 }
    }

    #[test]
    fn a_page_gets_each_task_once_in_its_snapshot_or_as_an_event() {
        let live = Live::new(&manifest());
        live.task(tile(0, 0), "w1", 1, 0);
        let (snapshot, mut rx) = live.subscribe();
        live.task(tile(0, 1), "w2", 2, 0);
        let v: serde_json::Value = serde_json::from_str(&snapshot.data).unwrap();
        assert_eq!(v["tasks"], json!([[0, 0, 0, 0, 1, 0]]));
        assert_eq!(v["workers"], json!(["w1"]));
        assert_eq!(rx.try_recv().unwrap().event, "worker");
        let task = rx.try_recv().unwrap();
        assert_eq!((task.event, task.data.as_str()), ("task", "[0,1,0,1,2,0]"));
        assert!(rx.try_recv().is_err(), "nothing else");
    }
}
