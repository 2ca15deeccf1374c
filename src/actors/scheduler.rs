//! The scheduler actor (leader only). While this node is the serving leader it ticks
//! every `scheduler.tick_ms`: for each live, unpaused DAG with a schedule it computes the
//! due windows from the DAG's replicated cursor ([`crate::schedule::due_windows`]) and
//! proposes `FireWindow` commands carrying its term. The state machine dedups windows and
//! rejects commands from a stale term, so a window fires at most once cluster-wide
//! whatever leaders come and go; the replicated cursor means a new leader resumes where
//! the old one stopped. Fire lag (commit time − window end) is measured.
//!
//! A pass costs a walk of what the scheduler remembers, not a decode and a cron parse of
//! every DAG: within a term the scheduler remembers each DAG's parsed plan (until its
//! stored value changes) and the time before which it has nothing due (until this leader
//! fires it; no one else moves its cursor in this term), and only the DAGs that have
//! something to fire. A pass reads only the DAGs written since the last one (the state
//! machine's [`crate::state::dag_changes`] log); it reads the whole table only at the start
//! of a term, after a snapshot install, or when more DAGs were written than the log keeps.
//!
//! Between ticks the scheduler also wakes at the next moment a window is due: a pass
//! knows the earliest end of a window after the DAGs' cursors, and a DAG whose windows
//! have all fired knows its next one. So a window fires when it ends, not up to a tick
//! later; the tick only finds what changed (a new or edited DAG, a quota freed).
//!
//! A pass does not wait for what it proposes. Each DAG's due windows fire one after
//! another in a task of their own, and later passes leave that DAG alone until its chain
//! ends; so a DAG catching up a hundred windows delays no other DAG's next window.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, info, warn};

use super::{system_request, LeaderGate, Leadership, ProposerHandle};
use crate::config::SchedulerConfig;
use crate::raft::db::DbError;
use crate::raft::RaftNode;
use crate::schedule::{due_windows, next_due_ms, Policy, Schedule};
use crate::state::command::Quota;
use crate::state::dag_changes::DagsSince;
use crate::state::machine::keys;
use crate::state::model::{Dag, Millis, Window};
use crate::state::{Command, Outcome, Request, Table};

/// Figures the scheduler exports.
#[derive(Debug, Default)]
pub struct Stats {
    pub windows_fired: AtomicU64,
    pub last_lag_ms: AtomicI64,
    pub max_lag_ms: AtomicI64,
    pub lag_sum_ms: AtomicI64,
}

pub struct Scheduler {
    node: RaftNode,
    proposer: ProposerHandle,
    rt: tokio::runtime::Handle,
    config: SchedulerConfig,
    gate: LeaderGate,
    /// A pass (the scan and the spawning of its chains) is running.
    busy: bool,
    /// A wake came while a pass ran: run another as soon as it ends.
    again: bool,
    /// The wake at the next due window (cluster-clock ms), if one is set.
    wake: Option<(Millis, SpawnHandle)>,
    stats: Arc<Stats>,
    memory: Arc<Mutex<Memory>>,
    /// The DAGs (by their `Dags` key) whose windows are being proposed.
    in_flight: Arc<Mutex<HashSet<Vec<u8>>>>,
}

/// What the scheduler knows of one DAG with something to fire, in the term it learnt it.
/// (A DAG deleted, paused, unscheduled, or with a cron that does not parse is not
/// remembered at all.)
struct Known {
    /// A hash of the stored DAG this was computed from.
    fingerprint: u64,
    plan: Plan,
    /// Nothing is due before this (cluster-clock ms).
    quiet_until: Millis,
}

/// The parts of a DAG that decide its windows.
struct Plan {
    tenant: String,
    dag_id: String,
    schedule: Schedule,
    anchor: Millis,
    end_date_ms: Option<Millis>,
    catchup: bool,
}

impl Plan {
    fn of(dag: &Dag) -> Option<Plan> {
        if dag.deleted || dag.spec.paused {
            return None;
        }
        let expr = dag.spec.schedule.as_deref()?;
        let schedule = Schedule::parse(expr, &dag.spec.timezone).ok()?;
        Some(Plan {
            tenant: dag.tenant.clone(),
            dag_id: dag.spec.dag_id.clone(),
            schedule,
            // From start_date if given (catchup may then backfill), else from creation.
            anchor: dag.spec.start_date_ms.unwrap_or(dag.created_ms),
            end_date_ms: dag.spec.end_date_ms,
            catchup: dag.spec.catchup,
        })
    }
}

/// One DAG's due windows, oldest first, each with the request that fires it.
struct DagFires {
    /// The DAG's key in the `Dags` table.
    key: Vec<u8>,
    dag_id: String,
    windows: Vec<(Window, Request)>,
}

/// The scheduler's memory of the DAGs, valid for one term.
#[derive(Default)]
struct Memory {
    term: u64,
    dags: HashMap<Vec<u8>, Known>,
    /// The change-log version ([`Read::version`]) `dags` was last brought up to.
    seen: Option<u64>,
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Scheduler {
    pub fn new(
        node: RaftNode,
        proposer: ProposerHandle,
        rt: tokio::runtime::Handle,
        config: SchedulerConfig,
        stats: Arc<Stats>,
    ) -> Self {
        Scheduler {
            node,
            proposer,
            rt,
            config,
            gate: LeaderGate::new(),
            busy: false,
            again: false,
            wake: None,
            stats,
            memory: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !self.gate.leadership.serving {
            return;
        }
        if self.busy {
            self.again = true;
            return;
        }
        self.busy = true;
        let pass = Pass {
            scheduler: ctx.address(),
            node: self.node.clone(),
            proposer: self.proposer.clone(),
            term: self.gate.leadership.term,
            config: self.config.clone(),
            stats: self.stats.clone(),
            memory: self.memory.clone(),
            in_flight: self.in_flight.clone(),
        };
        let job = self.rt.spawn(fire_due(pass));
        ctx.spawn(
            async move {
                match job.await {
                    Ok(next) => next,
                    Err(e) => {
                        warn!(error = %e, "scheduler pass panicked");
                        None
                    }
                }
            }
            .into_actor(self)
            .map(|next, act, ctx| {
                act.busy = false;
                if std::mem::take(&mut act.again) {
                    act.tick(ctx);
                } else if let Some(at) = next {
                    act.wake_at(at, ctx);
                }
            }),
        );
    }

    /// Run a pass at `at` (cluster clock) if that comes before the next tick and before
    /// the wake already set: one wake at a time, the earliest.
    fn wake_at(&mut self, at: Millis, ctx: &mut Context<Self>) {
        if self.wake.as_ref().is_some_and(|(set, _)| *set <= at) {
            return;
        }
        // One millisecond late rather than early: a pass before the end finds nothing
        // due. The cluster clock and this node's timer move together between calls.
        let delay =
            Duration::from_millis(u64::try_from(at - self.node.clock.now_ms()).unwrap_or(0) + 1);
        if delay >= Duration::from_millis(self.config.tick_ms) {
            return;
        }
        if let Some((_, w)) = self.wake.take() {
            ctx.cancel_future(w);
        }
        let handle = ctx.run_later(delay, |act, ctx| {
            act.wake = None;
            act.tick(ctx);
        });
        self.wake = Some((at, handle));
    }
}

/// Takes a DAG out of the in-flight set when its chain ends, however it ends.
struct InFlight {
    set: Arc<Mutex<HashSet<Vec<u8>>>>,
    key: Vec<u8>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.key);
    }
}

/// The set's contents stay valid whatever a panicking holder left half done (inserts
/// and removes of whole keys), so a poisoned lock is taken as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a pass works with: the actor's shared parts and its term.
struct Pass {
    scheduler: Addr<Scheduler>,
    node: RaftNode,
    proposer: ProposerHandle,
    term: u64,
    config: SchedulerConfig,
    stats: Arc<Stats>,
    memory: Arc<Mutex<Memory>>,
    in_flight: Arc<Mutex<HashSet<Vec<u8>>>>,
}

/// One pass: start proposing the due windows of every scheduled DAG that is not still
/// proposing earlier ones. Returns when (cluster clock) the next window of a DAG that
/// is not proposing becomes due, if any is known.
async fn fire_due(pass: Pass) -> Option<Millis> {
    let Pass {
        scheduler,
        node,
        proposer,
        term,
        config,
        stats,
        memory,
        in_flight,
    } = pass;
    // The voters' median clock: a leader whose own clock runs fast fires nothing early.
    if !node.clock_calibrated() {
        return None;
    }
    let now = node.clock.now_ms();
    // Only the DAGs written since the last pass are read (all of them in a new term): a
    // pass otherwise costs a walk of what the scheduler remembers.
    let seen = lock(&memory).seen_in(term);
    let read = match read_changed(&node, seen) {
        Ok(read) => read,
        Err(e) => {
            warn!(error = %e, "scheduler cannot read dags");
            return None;
        }
    };
    let busy = lock(&in_flight).clone();
    let (fires, next_due) = due_fires(&node, read, &busy, now, term, &config, &memory);
    // DAGs fire side by side; one DAG's windows fire one after another, and a window not
    // fired (a quota, an error) stops its DAG's later windows until a later pass. A later
    // window applied first would move the cursor past the earlier one, which would never
    // fire.
    for dag in fires {
        lock(&in_flight).insert(dag.key.clone());
        let guard = InFlight {
            set: in_flight.clone(),
            key: dag.key,
        };
        let (proposer, node, stats) = (proposer.clone(), node.clone(), stats.clone());
        let (scheduler, memory) = (scheduler.clone(), memory.clone());
        tokio::spawn(async move {
            let mut last = None;
            for (window, req) in dag.windows {
                if !fire_one(&proposer, &node, &stats, &dag.dag_id, window, req, term).await {
                    // Retried at the next tick, not at once: a failing proposal must
                    // not spin.
                    return;
                }
                last = Some(window);
            }
            // Every window fired, so the cursor is at the last one's end (or past it):
            // the DAG's next window is known without a pass reading it.
            let next = last.and_then(|w| after_fired(&memory, &guard.key, term, w.end_ms));
            drop(guard);
            if let Some(at) = next {
                scheduler.do_send(WakeAt(at));
            }
        });
    }
    next_due
}

/// Record that a DAG fired every window up to the one ending at `end` in `term`: nothing
/// is due before its next window's end, which is returned. (A cursor already past `end`
/// only makes that earlier than the truth: a pass then reads the cursor and finds
/// nothing due.)
fn after_fired(memory: &Mutex<Memory>, key: &[u8], term: u64, end: Millis) -> Option<Millis> {
    let mut memory = lock(memory);
    if memory.term != term {
        return None;
    }
    let known = memory.dags.get_mut(key)?;
    let plan = &known.plan;
    let next = next_due_ms(&plan.schedule, Some(end), plan.anchor, plan.end_date_ms)
        .unwrap_or(Millis::MAX);
    known.quiet_until = next;
    (next < Millis::MAX).then_some(next)
}

/// Propose one window; whether it fired (or had fired before).
async fn fire_one(
    proposer: &ProposerHandle,
    node: &RaftNode,
    stats: &Stats,
    dag_id: &str,
    window: Window,
    req: Request,
    term: u64,
) -> bool {
    match proposer.propose(req).await {
        Ok(r) => match r.outcome {
            Outcome::Fired { run_id, created } => {
                let lag = node.clock.now_ms() - window.end_ms;
                if created {
                    stats.windows_fired.fetch_add(1, Ordering::Relaxed);
                    stats.last_lag_ms.store(lag, Ordering::Relaxed);
                    stats.max_lag_ms.fetch_max(lag, Ordering::Relaxed);
                    stats.lag_sum_ms.fetch_add(lag, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::metrics::WINDOWS_FIRED).increment(1);
                    metrics::histogram!(crate::telemetry::metrics::FIRE_LAG_SECONDS)
                        .record(lag.max(0) as f64 / 1000.0);
                    debug!(dag_id = %dag_id, run_id = %run_id, window_end = window.end_ms, lag_ms = lag, "window fired");
                }
                true
            }
            Outcome::AlreadyFired { .. } => true,
            Outcome::StaleTerm { .. } => {
                info!(dag_id = %dag_id, term, "fire rejected: no longer leader of this term");
                false
            }
            o => {
                debug!(dag_id = %dag_id, outcome = ?o, "window not fired");
                false
            }
        },
        Err(e) => {
            warn!(dag_id = %dag_id, error = %e, "fire proposal failed; retried next tick");
            false
        }
    }
}

/// The `FireWindow` commands due at `now`, with what the scheduler remembers updated,
/// and the earliest time after `now` at which a DAG not proposing has a window due.
fn due_fires(
    node: &RaftNode,
    read: Option<Read>,
    in_flight: &HashSet<Vec<u8>>,
    now: Millis,
    term: u64,
    config: &SchedulerConfig,
    memory: &Mutex<Memory>,
) -> (Vec<DagFires>, Option<Millis>) {
    let mut fires = Vec::new();
    let mut memory = lock(memory);
    if memory.term != term {
        // Another leader may have moved cursors since: learn everything again.
        *memory = Memory {
            term,
            ..Memory::default()
        };
    }
    if let Some(read) = read {
        memory.learn(read);
    }
    for (k, known) in memory.dags.iter_mut() {
        if in_flight.contains(k) {
            // Its cursor is still moving: decided again once its chain has ended.
            continue;
        }
        let plan = &known.plan;
        if now < known.quiet_until {
            continue;
        }
        // The same key as the DAG's in `Dags`.
        let ckey = keys::dag(&plan.tenant, &plan.dag_id);
        let cursor = match node.db.get(Table::Cursors.name(), &ckey) {
            Ok(c) => c.and_then(|b| keys::from_ordered_i64(&b)),
            Err(e) => {
                warn!(error = %e, "scheduler cannot read a cursor");
                continue;
            }
        };
        // The cursor is also the DAG's fired-window watermark, kept across delete: a
        // re-created DAG starts from its anchor, and never at or below the watermark.
        let cursor = match (cursor, plan.schedule.next_after(plan.anchor - 1)) {
            (Some(c), Some(first)) if c < first => None,
            (c, _) => c,
        };
        let policy = Policy {
            catchup: plan.catchup,
            grace_ms: config.catchup_grace_ms as i64,
            max_catchup: config.max_catchup,
        };
        let due = due_windows(
            &plan.schedule,
            cursor,
            plan.anchor,
            plan.end_date_ms,
            now,
            policy,
        );
        if due.is_empty() {
            known.quiet_until = next_due_ms(&plan.schedule, cursor, plan.anchor, plan.end_date_ms)
                .unwrap_or(Millis::MAX);
            continue;
        }
        // Scheduled runs obey the tenant's run quotas too: past them the DAG's windows
        // are held back (and, without catchup, skipped once past the grace).
        // Apply enforces them; this check of the replica's counts spares a doomed write.
        let quota: Quota = (&node.config().limits.for_tenant(&plan.tenant)).into();
        let usage = node.sm.tenant_counts().usage(&plan.tenant, &plan.dag_id);
        if let Err(exceeded) =
            crate::quota::check_new_run(usage, &plan.tenant, &plan.dag_id, &quota)
        {
            // A window that already has its run (a backfill made it) creates nothing:
            // firing it only moves the cursor, which a quota never holds back.
            let first_has_run = due.first().is_some_and(|w| {
                let key = keys::window(&plan.tenant, &plan.dag_id, w);
                matches!(node.db.get(Table::Windows.name(), &key), Ok(Some(_)))
            });
            if !first_has_run {
                debug!(tenant = %plan.tenant, dag_id = %plan.dag_id, reason = %exceeded, "windows held back by a quota");
                continue;
            }
        }
        let windows = due
            .into_iter()
            .map(|window| {
                let mut req = system_request(Command::FireWindow {
                    tenant: plan.tenant.clone(),
                    dag_id: plan.dag_id.clone(),
                    window,
                    term,
                });
                req.quota = Some(quota);
                (window, req)
            })
            .collect();
        fires.push(DagFires {
            key: ckey,
            dag_id: plan.dag_id.clone(),
            windows,
        });
    }
    (fires, next_wake(&memory, now))
}

/// The stored DAGs written after change-log version `seen` (every stored DAG if
/// `None`, or if the log no longer reaches back to `seen`); `None` if none was.
fn read_changed(node: &RaftNode, seen: Option<u64>) -> Result<Option<Read>, DbError> {
    Ok(match node.sm.dags_since(seen) {
        DagsSince::Unchanged => None,
        DagsSince::All { version } => {
            let dags = node.db.scan_prefix(Table::Dags, b"", None, usize::MAX)?;
            Some(Read {
                version,
                whole: true,
                dags: dags.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            })
        }
        DagsSince::Keys { version, keys } => {
            let mut dags = Vec::with_capacity(keys.len());
            for k in keys {
                let v = node.db.get(Table::Dags.name(), &k)?;
                dags.push((k, v));
            }
            Some(Read {
                version,
                whole: false,
                dags,
            })
        }
    })
}

/// Stored DAGs, read after the change log said `version`.
struct Read {
    version: u64,
    /// Every stored DAG (one not here is no longer stored), or only those written.
    whole: bool,
    /// Each key with its stored value (`None`: no longer stored).
    dags: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Memory {
    /// The change-log version this memory was brought up to, if it is of `term`.
    fn seen_in(&self, term: u64) -> Option<u64> {
        self.seen.filter(|_| self.term == term)
    }

    /// Take in what was read: a DAG whose stored value changed is planned again (and
    /// looked at afresh); one no longer stored, or with nothing to fire, is forgotten.
    fn learn(&mut self, read: Read) {
        // A whole read rebuilds the map: what it lacks is gone.
        let mut before = if read.whole {
            std::mem::take(&mut self.dags)
        } else {
            HashMap::new()
        };
        for (k, v) in read.dags {
            let known = if read.whole {
                before.remove(&k)
            } else {
                self.dags.remove(&k)
            };
            let Some(v) = v else {
                continue;
            };
            let fp = fingerprint(&v);
            let known = match known {
                Some(known) if known.fingerprint == fp => Some(known),
                _ => serde_json::from_slice::<Dag>(&v)
                    .ok()
                    .as_ref()
                    .and_then(Plan::of)
                    .map(|plan| Known {
                        fingerprint: fp,
                        plan,
                        quiet_until: 0,
                    }),
            };
            if let Some(known) = known {
                self.dags.insert(k, known);
            }
        }
        self.seen = Some(read.version);
    }
}

/// The earliest `quiet_until` after `now` of a DAG with something to fire. DAGs at or
/// before `now` (proposing, or held back by a quota) wait for the tick: waking for them
/// would spin.
fn next_wake(memory: &Memory, now: Millis) -> Option<Millis> {
    memory
        .dags
        .values()
        .filter(|k| k.quiet_until > now && k.quiet_until < Millis::MAX)
        .map(|k| k.quiet_until)
        .min()
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

impl Handler<Leadership> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        let every = Duration::from_millis(self.config.tick_ms);
        let node = self.node.id;
        if msg != self.gate.leadership {
            // A wake belongs to the term whose pass computed it.
            if let Some((_, w)) = self.wake.take() {
                ctx.cancel_future(w);
            }
        }
        self.gate
            .switch(msg, every, ctx, Self::tick, "scheduler", node);
    }
}

/// Run a pass at this time (cluster clock), a DAG's next window.
#[derive(Message)]
#[rtype(result = "()")]
struct WakeAt(Millis);

impl Handler<WakeAt> for Scheduler {
    type Result = ();
    fn handle(&mut self, WakeAt(at): WakeAt, ctx: &mut Context<Self>) {
        if self.gate.leadership.serving {
            self.wake_at(at, ctx);
        }
    }
}

#[derive(Message)]
#[rtype(result = "Leadership")]
struct Query;

impl Handler<Query> for Scheduler {
    type Result = MessageResult<Query>;
    fn handle(&mut self, _: Query, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.gate.leadership)
    }
}

/// Cheap handle to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    addr: Addr<Scheduler>,
    pub stats: Arc<Stats>,
}

impl SchedulerHandle {
    pub(super) fn new(addr: Addr<Scheduler>, stats: Arc<Stats>) -> Self {
        SchedulerHandle { addr, stats }
    }

    /// Tell the actor whether this node is now the serving leader.
    pub fn set_leadership(&self, l: Leadership) {
        self.addr.do_send(l);
    }

    /// The leadership the actor last heard of (None if it has stopped).
    pub async fn leadership(&self) -> Option<Leadership> {
        self.addr.send(Query).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            tenant: "t".into(),
            dag_id: "d".into(),
            schedule: Schedule::parse("*/5 * * * * *", "UTC").expect("a valid cron"),
            anchor: 0,
            end_date_ms: None,
            catchup: false,
        }
    }

    #[test]
    fn the_next_wake_is_the_earliest_future_window_of_a_dag_with_a_plan() {
        let mut memory = Memory::default();
        for (i, quiet) in [
            5_000,
            2_500,
            // Due now or overdue (proposing, or held back by a quota): the tick's.
            1_000,
            0,
            // Never due again.
            Millis::MAX,
        ]
        .into_iter()
        .enumerate()
        {
            let known = Known {
                fingerprint: 0,
                plan: plan(),
                quiet_until: quiet,
            };
            memory.dags.insert(vec![i as u8], known);
        }
        assert_eq!(next_wake(&memory, 1_000), Some(2_500));
        assert_eq!(next_wake(&memory, 2_500), Some(5_000));
        assert_eq!(next_wake(&memory, 5_000), None);
    }

    /// A stored DAG: scheduled every five seconds, or paused.
    fn dag(id: &str, paused: bool) -> Vec<u8> {
        let mut spec = crate::state::machine::tests::spec(id);
        spec.schedule = Some("*/5 * * * * *".into());
        spec.paused = paused;
        let dag = Dag {
            tenant: "t".into(),
            version: 1,
            spec,
            created_ms: 0,
            updated_ms: 0,
            deleted: false,
            created_by: None,
            updated_by: None,
        };
        serde_json::to_vec(&dag).expect("a DAG encodes")
    }

    #[test]
    fn memory_learns_only_what_changed_and_keeps_only_dags_with_something_to_fire() {
        let read = |version, whole, dags: Vec<(&str, Option<Vec<u8>>)>| Read {
            version,
            whole,
            dags: dags
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
        };
        let mut memory = Memory::default();
        assert_eq!(memory.seen_in(0), None, "nothing learnt yet");
        memory.learn(read(
            7,
            true,
            vec![
                ("a", Some(dag("a", false))),
                ("b", Some(dag("b", false))),
                ("p", Some(dag("p", true))),
            ],
        ));
        assert_eq!(memory.seen_in(0), Some(7));
        assert_eq!(memory.seen_in(1), None, "another term");
        let mut keys: Vec<_> = memory.dags.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [b"a".to_vec(), b"b".to_vec()],
            "the paused DAG is not kept"
        );
        for k in memory.dags.values_mut() {
            k.quiet_until = 99;
        }
        // Only what was written: `a` written unchanged keeps what was known; `b` changed
        // is looked at afresh; `c` is new; the paused `p` unpaused now has a plan; a DAG
        // not read is left as it was.
        memory.learn(read(
            8,
            false,
            vec![
                ("a", Some(dag("a", false))),
                ("c", Some(dag("c", false))),
                ("p", Some(dag("p", false))),
            ],
        ));
        let quiet = |m: &Memory, k: &str| m.dags.get(k.as_bytes()).map(|k| k.quiet_until);
        assert_eq!(quiet(&memory, "a"), Some(99));
        assert_eq!(quiet(&memory, "b"), Some(99));
        assert_eq!(quiet(&memory, "c"), Some(0));
        assert_eq!(quiet(&memory, "p"), Some(0));
        // Deleted, and paused: forgotten.
        memory.learn(read(
            9,
            false,
            vec![("a", None), ("b", Some(dag("b", true)))],
        ));
        assert_eq!(quiet(&memory, "a"), None);
        assert_eq!(quiet(&memory, "b"), None);
        // A whole read: what it lacks is gone, what is unchanged keeps what was known.
        memory
            .dags
            .get_mut(b"c".as_slice())
            .expect("c is known")
            .quiet_until = 42;
        memory.learn(read(10, true, vec![("c", Some(dag("c", false)))]));
        assert_eq!(memory.dags.len(), 1);
        assert_eq!(quiet(&memory, "c"), Some(42));
        assert_eq!(memory.seen_in(0), Some(10));
    }
}
