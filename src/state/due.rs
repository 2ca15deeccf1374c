//! Which active runs a supervise pass must look at, kept incrementally, so that the pass
//! costs what is due rather than every run that exists.
//!
//! What a pass does to a run depends only on the run itself and the time: it expires an
//! attempt whose lease ran out, places a task whose retry delay ended, marks a missed SLA,
//! places ready tasks that wait for a free slot, and moves a run with nothing in flight
//! (`advance` is idempotent on every stored run that has work in flight: each writer calls it
//! before it saves). So each run has a time from which a pass may change it
//! ([`due_at`]): before that time and until the run is written again, a pass leaves it
//! alone, and the pass visits only runs whose time has come — in the order a scan of the
//! active-runs table would, so it places tasks exactly as the full scan did.
//!
//! It also counts queued and running runs per DAG and keeps each DAG's queued runs in the
//! order they start in: starting queued runs (after every new run, finished run and pass)
//! reads a DAG's load and its next few queued runs instead of every active run of the DAG
//! (a backfill of n windows no longer costs n² reads); and the fair share of executor
//! slots reads which tenants have running runs from it.
//!
//! Pure: [`crate::raft::state_machine`] feeds it each run it writes; the store of the unit
//! tests rebuilds it from a scan ([`crate::state::machine::Kv::supervision`]).

use std::collections::{BTreeMap, BTreeSet};

use super::census::RunView;
use super::machine::keys;
use super::model::{Millis, RunState, TaskState};

/// A run with ready tasks (or nothing in flight) is due at once, whatever the clock.
const NOW: Millis = Millis::MIN;

/// The time from which a supervise pass may change `run`, or `None` if only a write can
/// (a finished run, or a queued run without an SLA deadline left to miss).
pub fn due_at(run: &RunView) -> Option<Millis> {
    let mut due: Option<Millis> = None;
    let mut at = |t: Millis| due = Some(due.map_or(t, |d| d.min(t)));
    if let (Some(deadline), false) = (run.sla_deadline_ms, run.sla_missed) {
        // Missed once the clock is past the deadline (`mark_sla_missed`).
        at(deadline.saturating_add(1));
    }
    match run.state {
        RunState::Running => {}
        RunState::Queued => return due,
        _ => return None,
    }
    let mut in_flight = false;
    for t in run.tasks.values() {
        match t.state {
            TaskState::Queued => {
                in_flight = true;
                at(NOW);
            }
            TaskState::Retrying => {
                in_flight = true;
                at(t.next_try_ms.unwrap_or(NOW));
            }
            TaskState::Running => {
                in_flight = true;
                // Expired once the clock is past the current attempt's lease.
                if let Some(a) = t.attempts.iter().find(|a| a.attempt == t.attempt) {
                    at(a.lease_until_ms.saturating_add(1));
                }
            }
            _ => {}
        }
    }
    if !in_flight {
        // Everything ended or waits on upstream: the pass advances (or finishes) it.
        at(NOW);
    }
    due
}

/// Where a queued run stands in its DAG's queue: `(window start, created, run id)`.
type QueuePlace = (Millis, Millis, String);

/// Queued and running runs of one DAG.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub queued: u32,
    pub running: u32,
}

/// What a pass at some time must look at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Supervision {
    /// Run ids, in the order of their keys in the active-runs table.
    pub runs: Vec<String>,
    /// `(tenant, dag_id)` of every DAG with queued runs, in key order, with its load.
    pub queued_dags: Vec<((String, String), Load)>,
}

/// The active runs by due time, and the load of each DAG with active runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DueIndex {
    /// `(due time, active-runs key, run id)`.
    due: BTreeSet<(Millis, Vec<u8>, String)>,
    loads: BTreeMap<(String, String), Load>,
    /// Each DAG's queued runs in the order they start: `(window start, created, run id)`
    /// (DAGs with none are absent).
    queues: BTreeMap<(String, String), BTreeSet<QueuePlace>>,
    /// Running runs per tenant (tenants with none are absent).
    running: BTreeMap<String, u32>,
    /// Tasks in `running` per tenant, over every stored run: the attempts the tenant
    /// holds executor slots with (a task runs exactly while it has an assignment).
    attempts: BTreeMap<String, u32>,
}

impl DueIndex {
    /// A stored run changed from `old` to `new` (either may be absent).
    pub fn run_change(&mut self, old: Option<&RunView>, new: Option<&RunView>) {
        if let Some(o) = old {
            if let Some(t) = due_at(o) {
                self.due.remove(&(t, Self::key(o), o.run_id.clone()));
            }
            self.count(o, false);
        }
        if let Some(n) = new {
            if let Some(t) = due_at(n) {
                self.due.insert((t, Self::key(n), n.run_id.clone()));
            }
            self.count(n, true);
        }
    }

    fn key(r: &RunView) -> Vec<u8> {
        keys::active(&r.tenant, &r.dag_id, &r.run_id)
    }

    fn count(&mut self, r: &RunView, add: bool) {
        let attempts = r
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .count() as u32;
        if attempts > 0 {
            let n = self.attempts.entry(r.tenant.clone()).or_default();
            *n = if add {
                *n + attempts
            } else {
                n.saturating_sub(attempts)
            };
            if *n == 0 {
                self.attempts.remove(&r.tenant);
            }
        }
        if !matches!(r.state, RunState::Queued | RunState::Running) {
            return;
        }
        let field = |l: &mut Load| {
            match r.state {
                RunState::Queued => Some(&mut l.queued),
                RunState::Running => Some(&mut l.running),
                _ => None,
            }
            .map(|n| *n = if add { *n + 1 } else { n.saturating_sub(1) })
        };
        if r.state == RunState::Running {
            if add {
                *self.running.entry(r.tenant.clone()).or_default() += 1;
            } else if let Some(n) = self.running.get_mut(&r.tenant) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.running.remove(&r.tenant);
                }
            }
        }
        let k = (r.tenant.clone(), r.dag_id.clone());
        if r.state == RunState::Queued {
            let place = (
                r.window.map_or(0, |w| w.start_ms),
                r.created_ms,
                r.run_id.clone(),
            );
            if add {
                self.queues.entry(k.clone()).or_default().insert(place);
            } else if let Some(q) = self.queues.get_mut(&k) {
                q.remove(&place);
                if q.is_empty() {
                    self.queues.remove(&k);
                }
            }
        }
        if add {
            field(self.loads.entry(k).or_default());
        } else if let Some(l) = self.loads.get_mut(&k) {
            field(l);
            if *l == Load::default() {
                self.loads.remove(&k);
            }
        }
    }

    /// The runs due at `now` and the DAGs with queued runs.
    pub fn supervision(&self, now: Millis) -> Supervision {
        let mut runs: Vec<(&[u8], &str)> = self
            .due
            .range(..(now.saturating_add(1), Vec::new(), String::new()))
            .map(|(_, k, id)| (k.as_slice(), id.as_str()))
            .collect();
        runs.sort_unstable();
        Supervision {
            runs: runs.into_iter().map(|(_, id)| id.to_string()).collect(),
            queued_dags: self
                .loads
                .iter()
                .filter(|(_, l)| l.queued > 0)
                .map(|(k, l)| (k.clone(), *l))
                .collect(),
        }
    }

    /// Up to `limit` runs due whatever the clock (ready tasks waiting for a slot, or
    /// nothing in flight), in the order of [`DueIndex::supervision`].
    pub fn waiting(&self, limit: usize) -> Vec<String> {
        self.due
            .range(..(NOW.saturating_add(1), Vec::new(), String::new()))
            .take(limit)
            .map(|(_, _, id)| id.clone())
            .collect()
    }

    /// A DAG's queued and running runs, and its first `limit` queued runs in the order
    /// they start (oldest window, then oldest run).
    pub fn queue(&self, tenant: &str, dag_id: &str, limit: usize) -> (Load, Vec<String>) {
        let k = (tenant.to_string(), dag_id.to_string());
        let load = self.loads.get(&k).copied().unwrap_or_default();
        let next = self
            .queues
            .get(&k)
            .map(|q| q.iter().take(limit).map(|(_, _, id)| id.clone()).collect())
            .unwrap_or_default();
        (load, next)
    }

    /// Running attempts per tenant (tenants with none are absent).
    pub fn attempts_by_tenant(&self) -> BTreeMap<String, u32> {
        self.attempts.clone()
    }

    /// Tenants with running runs.
    pub fn working_tenants(&self) -> BTreeSet<String> {
        self.running.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::state::census::{AttemptView, TaskView};

    fn task(state: TaskState, next_try_ms: Option<Millis>, lease: Option<Millis>) -> TaskView {
        TaskView {
            state,
            attempt: u32::from(lease.is_some()),
            next_try_ms,
            attempts: lease
                .map(|l| AttemptView {
                    attempt: 1,
                    lease_until_ms: l,
                    node: 0,
                })
                .into_iter()
                .collect(),
        }
    }

    fn run(id: &str, dag: &str, state: RunState, tasks: Vec<TaskView>) -> RunView {
        RunView {
            run_id: id.into(),
            tenant: "acme".into(),
            dag_id: dag.into(),
            state,
            created_ms: 0,
            window: None,
            ended_ms: None,
            sla_deadline_ms: None,
            sla_missed: false,
            tasks: tasks
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("t{i}"), t))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn a_run_is_due_when_its_first_lease_retry_or_deadline_comes() {
        use TaskState::*;
        let leased = run(
            "a",
            "d",
            RunState::Running,
            vec![
                task(Running, None, Some(5_000)),
                task(Running, None, Some(3_000)),
                task(Pending, None, None),
            ],
        );
        assert_eq!(due_at(&leased), Some(3_001));
        let retry = run(
            "b",
            "d",
            RunState::Running,
            vec![task(Retrying, Some(2_000), None), task(Done, None, None)],
        );
        assert_eq!(due_at(&retry), Some(2_000));
        let ready = run("c", "d", RunState::Running, vec![task(Queued, None, None)]);
        assert_eq!(due_at(&ready), Some(NOW));
        let stalled = run("e", "d", RunState::Running, vec![task(Pending, None, None)]);
        assert_eq!(due_at(&stalled), Some(NOW), "advance moves it");
        let mut queued = run("f", "d", RunState::Queued, vec![task(Pending, None, None)]);
        assert_eq!(due_at(&queued), None, "only a start changes it");
        queued.sla_deadline_ms = Some(9_000);
        assert_eq!(due_at(&queued), Some(9_001));
        queued.sla_missed = true;
        assert_eq!(due_at(&queued), None);
        let done = run("g", "d", RunState::Done, vec![task(Done, None, None)]);
        assert_eq!(due_at(&done), None);
    }

    #[test]
    fn supervision_lists_due_runs_in_key_order_and_dags_with_queues() {
        use TaskState::*;
        let mut ix = DueIndex::default();
        let late = run(
            "r1",
            "b",
            RunState::Running,
            vec![task(Running, None, Some(10))],
        );
        let soon = run(
            "r2",
            "a",
            RunState::Running,
            vec![task(Running, None, Some(50))],
        );
        let q = run("r3", "a", RunState::Queued, vec![task(Pending, None, None)]);
        for r in [&late, &soon, &q] {
            ix.run_change(None, Some(r));
        }
        assert!(
            ix.supervision(10).runs.is_empty(),
            "a lease ends after its last ms"
        );
        assert_eq!(ix.supervision(11).runs, vec!["r1"]);
        // Key order (tenant, dag, run), not due order.
        assert_eq!(ix.supervision(60).runs, vec!["r2", "r1"]);
        let load = Load {
            queued: 1,
            running: 1,
        };
        assert_eq!(
            ix.supervision(0).queued_dags,
            vec![(("acme".to_string(), "a".to_string()), load)]
        );
        // A heartbeat renews r1's lease; r3 starts.
        let renewed = run(
            "r1",
            "b",
            RunState::Running,
            vec![task(Running, None, Some(90))],
        );
        ix.run_change(Some(&late), Some(&renewed));
        let started = run("r3", "a", RunState::Running, vec![task(Queued, None, None)]);
        ix.run_change(Some(&q), Some(&started));
        assert_eq!(ix.supervision(60).runs, vec!["r2", "r3"]);
        assert!(ix.supervision(60).queued_dags.is_empty());
        assert_eq!(ix.working_tenants(), BTreeSet::from(["acme".to_string()]));
        for (o, n) in [(&renewed, None), (&soon, None), (&started, None)] {
            ix.run_change(Some(o), n);
        }
        assert_eq!(ix, DueIndex::default(), "nothing left behind");
    }

    fn arb_run() -> impl Strategy<Value = RunView> {
        let state = prop_oneof![
            Just(RunState::Queued),
            Just(RunState::Running),
            Just(RunState::Done),
            Just(RunState::Failed),
        ];
        let tstate = prop_oneof![
            Just(TaskState::Pending),
            Just(TaskState::Queued),
            Just(TaskState::Running),
            Just(TaskState::Retrying),
            Just(TaskState::Done),
        ];
        let t = (tstate, proptest::option::of(0i64..100), 0i64..100)
            .prop_map(|(s, next, lease)| task(s, next, Some(lease)));
        (
            0u8..6,
            0u8..3,
            state,
            proptest::collection::vec(t, 0..4),
            proptest::option::of(0i64..100),
            (0i64..4, 0i64..4),
        )
            .prop_map(|(id, dag, state, tasks, sla, (start, created))| {
                let mut r = run(&format!("r{id}"), &format!("d{dag}"), state, tasks);
                r.sla_deadline_ms = sla;
                r.window = Some(crate::state::model::Window {
                    start_ms: start,
                    end_ms: start + 1,
                });
                r.created_ms = created;
                r
            })
    }

    proptest! {
        /// Fed write by write, the index answers what one built from the final runs
        /// answers, and that is every run whose due time has come.
        #[test]
        fn incremental_equals_rebuilt(writes in proptest::collection::vec((arb_run(), any::<bool>()), 0..40), now in 0i64..120) {
            let mut ix = DueIndex::default();
            let mut stored: BTreeMap<String, RunView> = BTreeMap::new();
            for (r, delete) in writes {
                let old = stored.get(&r.run_id).cloned();
                let new = (!delete).then_some(r.clone());
                ix.run_change(old.as_ref(), new.as_ref());
                match new {
                    Some(n) => stored.insert(r.run_id.clone(), n),
                    None => stored.remove(&r.run_id),
                };
            }
            let mut rebuilt = DueIndex::default();
            for r in stored.values() {
                rebuilt.run_change(None, Some(r));
            }
            prop_assert_eq!(&ix, &rebuilt);
            let mut want: Vec<(Vec<u8>, String)> = stored
                .values()
                .filter(|r| due_at(r).is_some_and(|t| t <= now))
                .map(|r| (DueIndex::key(r), r.run_id.clone()))
                .collect();
            want.sort();
            // Each DAG's queue: its queued runs by window start, creation, id; and its load.
            for dag in ["d0", "d1", "d2"] {
                let mut queued: Vec<(Millis, Millis, String)> = stored
                    .values()
                    .filter(|r| r.dag_id == dag && r.state == RunState::Queued)
                    .map(|r| (r.window.map_or(0, |w| w.start_ms), r.created_ms, r.run_id.clone()))
                    .collect();
                queued.sort();
                let running = stored
                    .values()
                    .filter(|r| r.dag_id == dag && r.state == RunState::Running)
                    .count() as u32;
                let (load, next) = ix.queue("acme", dag, 2);
                prop_assert_eq!(load, Load { queued: queued.len() as u32, running });
                prop_assert_eq!(next, queued.into_iter().take(2).map(|(_, _, id)| id).collect::<Vec<_>>());
            }
            let got = ix.supervision(now).runs;
            prop_assert_eq!(got, want.into_iter().map(|(_, id)| id).collect::<Vec<_>>());
        }
    }
}
