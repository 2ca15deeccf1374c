//! How many runs and task instances the replicated state holds in each state, kept
//! incrementally: every write to the runs table is a change from one stored run (or none)
//! to another (or none), and [`Change`] says what that change adds to the counts. A
//! scrape then reads a handful of counters, whatever the number of runs (only a node's
//! start and a snapshot install count them all, once).
//!
//! Pure: no clock, no storage; [`crate::raft::state_machine`] feeds it the runs it writes.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::model::{Millis, RunState, TaskState};

pub const RUN_STATES: [RunState; 5] = [
    RunState::Queued,
    RunState::Running,
    RunState::Done,
    RunState::Failed,
    RunState::Cancelled,
];

pub const TASK_STATES: [TaskState; 9] = [
    TaskState::Pending,
    TaskState::Queued,
    TaskState::Running,
    TaskState::Retrying,
    TaskState::Done,
    TaskState::Failed,
    TaskState::UpstreamFailed,
    TaskState::Skipped,
    TaskState::Cancelled,
];

/// The label value of a run state.
pub fn run_state_name(s: RunState) -> &'static str {
    match s {
        RunState::Queued => "queued",
        RunState::Running => "running",
        RunState::Done => "done",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    }
}

/// The label value of a task state.
pub fn task_state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Pending => "pending",
        TaskState::Queued => "queued",
        TaskState::Running => "running",
        TaskState::Retrying => "retrying",
        TaskState::Done => "done",
        TaskState::Failed => "failed",
        TaskState::UpstreamFailed => "upstream_failed",
        TaskState::Skipped => "skipped",
        TaskState::Cancelled => "cancelled",
    }
}

fn run_idx(s: RunState) -> usize {
    RUN_STATES.iter().position(|x| *x == s).unwrap_or(0)
}

fn task_idx(s: TaskState) -> usize {
    TASK_STATES.iter().position(|x| *x == s).unwrap_or(0)
}

/// The part of a stored run the counts and the due index ([`super::due`]) need (decoded
/// from its JSON, the rest skipped).
#[derive(Debug, Clone, Deserialize)]
pub struct RunView {
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub dag_id: String,
    pub state: RunState,
    pub created_ms: Millis,
    /// Where its window starts (queued runs start oldest window first).
    #[serde(default)]
    pub window: Option<super::model::Window>,
    #[serde(default)]
    pub ended_ms: Option<Millis>,
    #[serde(default)]
    pub sla_deadline_ms: Option<Millis>,
    #[serde(default)]
    pub sla_missed: bool,
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskView {
    pub state: TaskState,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub next_try_ms: Option<Millis>,
    #[serde(default)]
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub lease_until_ms: Millis,
    /// The node running it (the executor's fence reads its own attempts' leases).
    #[serde(default)]
    pub node: crate::raft::NodeId,
}

impl RunView {
    /// Decode a stored run; `None` for bytes that are not one (counted as no run).
    pub fn decode(bytes: &[u8]) -> Option<RunView> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What one write to the runs table adds to the counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub runs: [i64; 5],
    pub tasks: [i64; 9],
    /// Task instances that went to retrying.
    pub retries: u64,
    /// Set when the run just finished: its final state and creation → end in ms.
    pub finished: Option<(RunState, Millis)>,
}

impl Change {
    pub fn between(old: Option<&RunView>, new: Option<&RunView>) -> Change {
        let mut c = Change::default();
        if let Some(o) = old {
            c.runs[run_idx(o.state)] -= 1;
            for t in o.tasks.values() {
                c.tasks[task_idx(t.state)] -= 1;
            }
        }
        if let Some(n) = new {
            c.runs[run_idx(n.state)] += 1;
            for (id, t) in &n.tasks {
                c.tasks[task_idx(t.state)] += 1;
                let was = old.and_then(|o| o.tasks.get(id)).map(|t| t.state);
                if t.state == TaskState::Retrying && was != Some(TaskState::Retrying) {
                    c.retries += 1;
                }
            }
            let was_finished = old.is_some_and(|o| o.state.is_finished());
            if n.state.is_finished() && !was_finished {
                let ended = n.ended_ms.unwrap_or(n.created_ms);
                c.finished = Some((n.state, ended.saturating_sub(n.created_ms).max(0)));
            }
        }
        c
    }
}

/// Counts of runs and tasks by state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub runs: [i64; 5],
    pub tasks: [i64; 9],
}

impl Counts {
    pub fn add(&mut self, c: &Change) {
        for (a, d) in self.runs.iter_mut().zip(c.runs) {
            *a += d;
        }
        for (a, d) in self.tasks.iter_mut().zip(c.tasks) {
            *a += d;
        }
    }

    /// Count every run of `runs` from scratch.
    pub fn of<'a>(runs: impl IntoIterator<Item = &'a RunView>) -> Counts {
        let mut c = Counts::default();
        for r in runs {
            c.add(&Change::between(None, Some(r)));
        }
        c
    }

    pub fn run(&self, s: RunState) -> i64 {
        self.runs[run_idx(s)]
    }

    pub fn task(&self, s: TaskState) -> i64 {
        self.tasks[task_idx(s)]
    }
}

/// The part of a stored DAG the tenant counts need.
#[derive(Debug, Clone, Deserialize)]
pub struct DagView {
    pub tenant: String,
    #[serde(default)]
    pub deleted: bool,
}

impl DagView {
    pub fn decode(bytes: &[u8]) -> Option<DagView> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What the tenant quotas read, kept incrementally like [`Counts`]: live DAGs and
/// unfinished runs per tenant, queued runs per DAG. A quota check is then a map lookup,
/// not a scan of the tenant's DAGs or runs on every request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TenantCounts {
    dags: HashMap<String, i64>,
    active: HashMap<String, i64>,
    queued: HashMap<(String, String), i64>,
}

fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, i64>, k: K, d: i64) {
    match m.get_mut(&k) {
        Some(v) => {
            *v += d;
            if *v == 0 {
                // No entry for a tenant or DAG with nothing: the maps follow what exists.
                m.remove(&k);
            }
        }
        None => {
            m.insert(k, d);
        }
    }
}

impl TenantCounts {
    /// One write to the runs table: from `old` (or none) to `new` (or none).
    pub fn run_change(&mut self, old: Option<&RunView>, new: Option<&RunView>) {
        for (view, d) in [(old, -1), (new, 1)] {
            let Some(r) = view else { continue };
            if !r.state.is_finished() {
                bump(&mut self.active, r.tenant.clone(), d);
            }
            if r.state == RunState::Queued {
                bump(&mut self.queued, (r.tenant.clone(), r.dag_id.clone()), d);
            }
        }
    }

    /// One write to the DAGs table.
    pub fn dag_change(&mut self, old: Option<&DagView>, new: Option<&DagView>) {
        for (view, d) in [(old, -1), (new, 1)] {
            if let Some(v) = view.filter(|v| !v.deleted) {
                bump(&mut self.dags, v.tenant.clone(), d);
            }
        }
    }

    /// Add the changes counted in `delta` (counts kept by another [`TenantCounts`] over
    /// writes not yet in these).
    pub fn merge(&mut self, delta: &TenantCounts) {
        for (k, d) in &delta.dags {
            bump(&mut self.dags, k.clone(), *d);
        }
        for (k, d) in &delta.active {
            bump(&mut self.active, k.clone(), *d);
        }
        for (k, d) in &delta.queued {
            bump(&mut self.queued, k.clone(), *d);
        }
    }

    /// Tenants with live DAGs or unfinished runs by these counts plus the changes in
    /// `delta` (a tenant whose DAG was deleted still has the runs it left).
    pub fn present_tenants_with(&self, delta: &TenantCounts) -> std::collections::BTreeSet<String> {
        let has = |mine: &HashMap<String, i64>, theirs: &HashMap<String, i64>, t: &String| {
            mine.get(t).copied().unwrap_or(0) + theirs.get(t).copied().unwrap_or(0) > 0
        };
        let dags = self.dags.keys().chain(delta.dags.keys());
        let runs = self.active.keys().chain(delta.active.keys());
        dags.filter(|t| has(&self.dags, &delta.dags, t))
            .chain(runs.filter(|t| has(&self.active, &delta.active, t)))
            .cloned()
            .collect()
    }

    /// What `tenant` (and its DAG `dag_id`) holds.
    pub fn usage(&self, tenant: &str, dag_id: &str) -> Usage {
        self.usage_with(&TenantCounts::default(), tenant, dag_id)
    }

    /// What `tenant` holds by these counts plus the changes in `delta`.
    pub fn usage_with(&self, delta: &TenantCounts, tenant: &str, dag_id: &str) -> Usage {
        let dag = (tenant.to_string(), dag_id.to_string());
        let sum = |a: Option<&i64>, b: Option<&i64>| {
            (a.copied().unwrap_or(0) + b.copied().unwrap_or(0)).max(0) as u64
        };
        Usage {
            live_dags: sum(self.dags.get(tenant), delta.dags.get(tenant)),
            active_runs: sum(self.active.get(tenant), delta.active.get(tenant)),
            queued_runs: sum(self.queued.get(&dag), delta.queued.get(&dag)),
        }
    }
}

/// What one tenant holds against its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub live_dags: u64,
    /// Unfinished (queued or running) runs of the tenant.
    pub active_runs: u64,
    /// Queued runs of one DAG.
    pub queued_runs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(state: RunState, tasks: &[TaskState]) -> RunView {
        RunView {
            run_id: "r".into(),
            tenant: "acme".into(),
            dag_id: "d".into(),
            state,
            created_ms: 1_000,
            window: None,
            ended_ms: state.is_finished().then_some(4_500),
            sla_deadline_ms: None,
            sla_missed: false,
            tasks: tasks
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = TaskView {
                        state: *s,
                        attempt: 0,
                        next_try_ms: None,
                        attempts: Vec::new(),
                    };
                    (format!("t{i}"), t)
                })
                .collect(),
        }
    }

    #[test]
    fn tenant_counts_follow_runs_and_dags_through_their_lives() {
        let mut t = TenantCounts::default();
        let q = run(RunState::Queued, &[]);
        let r = run(RunState::Running, &[]);
        let d = run(RunState::Done, &[]);
        let runs = |t: &TenantCounts| {
            let u = t.usage("acme", "d");
            (u.active_runs, u.queued_runs)
        };
        t.run_change(None, Some(&q));
        assert_eq!(runs(&t), (1, 1));
        t.run_change(Some(&q), Some(&r));
        assert_eq!(runs(&t), (1, 0));
        t.run_change(Some(&r), Some(&d));
        t.run_change(Some(&d), None);
        assert_eq!(runs(&t), (0, 0));
        assert_eq!(t.usage("other", "d"), Usage::default());
        let live = DagView {
            tenant: "acme".into(),
            deleted: false,
        };
        let gone = DagView {
            tenant: "acme".into(),
            deleted: true,
        };
        t.dag_change(None, Some(&live));
        t.dag_change(Some(&live), Some(&live)); // an update
        assert_eq!(t.usage("acme", "d").live_dags, 1);
        t.dag_change(Some(&live), Some(&gone)); // a delete keeps a tombstone
        assert_eq!(t.usage("acme", "d").live_dags, 0);
        t.dag_change(Some(&gone), Some(&live)); // re-created
        assert_eq!(t.usage("acme", "d").live_dags, 1);
        t.dag_change(Some(&live), None);
        assert_eq!(t, TenantCounts::default(), "nothing left, no entry left");
    }

    #[test]
    fn counts_plus_a_delta_read_as_the_merged_counts() {
        let (q, r) = (run(RunState::Queued, &[]), run(RunState::Running, &[]));
        let mut base = TenantCounts::default();
        base.run_change(None, Some(&q));
        base.run_change(None, Some(&q));
        // Pending writes: one queued run starts, another run is created queued.
        let mut delta = TenantCounts::default();
        delta.run_change(Some(&q), Some(&r));
        delta.run_change(None, Some(&q));
        let seen = base.usage_with(&delta, "acme", "d");
        assert_eq!((seen.active_runs, seen.queued_runs), (3, 2));
        base.merge(&delta);
        assert_eq!(base.usage("acme", "d"), seen);
    }

    #[test]
    fn a_new_run_adds_itself_and_its_tasks() {
        let r = run(RunState::Queued, &[TaskState::Pending, TaskState::Pending]);
        let c = Change::between(None, Some(&r));
        let mut counts = Counts::default();
        counts.add(&c);
        assert_eq!(counts.run(RunState::Queued), 1);
        assert_eq!(counts.task(TaskState::Pending), 2);
        assert_eq!(c.finished, None);
    }

    #[test]
    fn finishing_moves_the_counts_and_reports_the_duration_once() {
        let a = run(RunState::Running, &[TaskState::Running]);
        let b = run(RunState::Done, &[TaskState::Done]);
        let c = Change::between(Some(&a), Some(&b));
        assert_eq!(c.runs[run_idx(RunState::Running)], -1);
        assert_eq!(c.runs[run_idx(RunState::Done)], 1);
        assert_eq!(c.finished, Some((RunState::Done, 3_500)));
        // Written again while finished (e.g. a notification update): not a second finish.
        assert_eq!(Change::between(Some(&b), Some(&b)).finished, None);
    }

    #[test]
    fn retries_are_counted_on_entering_retrying() {
        let a = run(
            RunState::Running,
            &[TaskState::Running, TaskState::Retrying],
        );
        let b = run(
            RunState::Running,
            &[TaskState::Retrying, TaskState::Retrying],
        );
        assert_eq!(Change::between(Some(&a), Some(&b)).retries, 1);
    }

    #[test]
    fn a_purged_run_leaves_the_counts() {
        let a = run(RunState::Done, &[TaskState::Done, TaskState::Skipped]);
        let mut counts = Counts::of([&a]);
        counts.add(&Change::between(Some(&a), None));
        assert_eq!(counts, Counts::default());
    }

    #[test]
    fn decodes_a_stored_run_and_refuses_garbage() {
        let stored = serde_json::json!({
            "run_id": "r1", "tenant": "t", "dag_id": "d", "dag_version": 1,
            "run_type": "manual", "window": {"start_ms": 0, "end_ms": 0},
            "state": "running", "created_ms": 5, "started_ms": 6, "ended_ms": null,
            "sla_deadline_ms": null, "sla_missed": false,
            "tasks": {"a": {"state": "upstream_failed", "attempt": 0, "attempts": [],
                            "next_try_ms": null}}
        });
        let v = RunView::decode(stored.to_string().as_bytes()).expect("decodes");
        assert_eq!(v.state, RunState::Running);
        assert_eq!(v.tasks["a"].state, TaskState::UpstreamFailed);
        assert!(RunView::decode(b"not json").is_none());
    }

    fn any_run_state() -> impl Strategy<Value = RunState> {
        prop::sample::select(RUN_STATES.to_vec())
    }
    fn any_task_state() -> impl Strategy<Value = TaskState> {
        prop::sample::select(TASK_STATES.to_vec())
    }
    fn any_run() -> impl Strategy<Value = RunView> {
        (
            any_run_state(),
            prop::collection::vec(any_task_state(), 0..5),
        )
            .prop_map(|(s, t)| run(s, &t))
    }

    proptest! {
        /// Keeping the counts incrementally through any sequence of writes gives the
        /// same counts as counting the final runs from scratch.
        #[test]
        fn incremental_counts_equal_a_recount(
            writes in prop::collection::vec((0usize..4, prop::option::of(any_run())), 0..40)
        ) {
            let mut table: BTreeMap<usize, RunView> = BTreeMap::new();
            let mut counts = Counts::default();
            for (key, new) in writes {
                let old = table.get(&key).cloned();
                counts.add(&Change::between(old.as_ref(), new.as_ref()));
                match new {
                    Some(n) => { table.insert(key, n); }
                    None => { table.remove(&key); }
                }
            }
            prop_assert_eq!(counts, Counts::of(table.values()));
        }
    }
}
