//! The scheduler actor (leader only). While this node is the serving leader it ticks
//! every `scheduler.tick_ms`: for each live, unpaused DAG with a schedule it computes the
//! due windows from the DAG's replicated cursor ([`crate::schedule::due_windows`]) and
//! proposes `FireWindow` commands carrying its term. The state machine dedups windows and
//! rejects commands from a stale term, so a window fires at most once cluster-wide
//! whatever leaders come and go; the replicated cursor means a new leader resumes where
//! the old one stopped. Fire lag (commit time − window end) is measured.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, info, warn};

use super::{system_request, LeaderGate, Leadership, ProposerHandle};
use crate::config::SchedulerConfig;
use crate::raft::RaftNode;
use crate::schedule::{due_windows, Policy, Schedule};
use crate::state::machine::keys;
use crate::state::model::Dag;
use crate::state::{Command, Outcome, Table};

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
    busy: bool,
    stats: Arc<Stats>,
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
            stats,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || !self.gate.leadership.serving {
            return;
        }
        self.busy = true;
        let job = self.rt.spawn(fire_due(
            self.node.clone(),
            self.proposer.clone(),
            self.gate.leadership.term,
            self.config.clone(),
            self.stats.clone(),
        ));
        ctx.spawn(
            async move {
                if let Err(e) = job.await {
                    warn!(error = %e, "scheduler pass panicked");
                }
            }
            .into_actor(self)
            .map(|_, act, _| act.busy = false),
        );
    }
}

/// One pass: propose every due window of every scheduled DAG.
async fn fire_due(
    node: RaftNode,
    proposer: ProposerHandle,
    term: u64,
    config: SchedulerConfig,
    stats: Arc<Stats>,
) {
    // The voters' median clock: a leader whose own clock runs fast fires nothing early.
    if !node.clock_calibrated() {
        return;
    }
    let now = node.clock.now_ms();
    let dags = match node.db.scan_prefix(Table::Dags, b"", None, usize::MAX) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "scheduler cannot read dags");
            return;
        }
    };
    let mut proposals = Vec::new();
    for (_, v) in dags {
        let Ok(dag) = serde_json::from_slice::<Dag>(&v) else {
            continue;
        };
        if dag.deleted || dag.spec.paused {
            continue;
        }
        let Some(expr) = dag.spec.schedule.as_deref() else {
            continue;
        };
        let Ok(schedule) = Schedule::parse(expr, &dag.spec.timezone) else {
            continue;
        };
        let ckey = keys::dag(&dag.tenant, &dag.spec.dag_id);
        let cursor = match node.db.get(Table::Cursors.name(), &ckey) {
            Ok(c) => c.and_then(|b| keys::from_ordered_i64(&b)),
            Err(e) => {
                warn!(error = %e, "scheduler cannot read a cursor");
                continue;
            }
        };
        // From start_date if given (catchup may then backfill), else from creation; the
        // cursor is also the DAG's fired-window watermark, kept across delete: a
        // re-created DAG starts from its anchor, and never at or below the watermark.
        let anchor = dag.spec.start_date_ms.unwrap_or(dag.created_ms);
        let cursor = match (cursor, schedule.next_after(anchor - 1)) {
            (Some(c), Some(first)) if c < first => None,
            (c, _) => c,
        };
        let policy = Policy {
            catchup: dag.spec.catchup,
            grace_ms: config.catchup_grace_ms as i64,
            max_catchup: config.max_catchup,
        };
        let due = due_windows(&schedule, cursor, anchor, dag.spec.end_date_ms, now, policy);
        if due.is_empty() {
            continue;
        }
        // Scheduled runs obey the tenant's run quotas too: past them the DAG's windows
        // are held back (and, without catchup, skipped once past the grace).
        let quotas = node.config().limits.for_tenant(&dag.tenant);
        let quota = crate::quota::check_new_run(
            &node.sm.tenant_counts(),
            &dag.tenant,
            &dag.spec.dag_id,
            &quotas,
        );
        if let Err(exceeded) = quota {
            debug!(tenant = %dag.tenant, dag_id = %dag.spec.dag_id, reason = %exceeded, "windows held back by a quota");
            continue;
        }
        for window in due {
            let cmd = Command::FireWindow {
                tenant: dag.tenant.clone(),
                dag_id: dag.spec.dag_id.clone(),
                window,
                term,
            };
            let proposer = proposer.clone();
            let dag_id = dag.spec.dag_id.clone();
            proposals
                .push(async move { (dag_id, window, proposer.propose(system_request(cmd)).await) });
        }
    }
    for (dag_id, window, res) in futures::future::join_all(proposals).await {
        match res {
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
                }
                Outcome::StaleTerm { .. } => {
                    info!(dag_id = %dag_id, term, "fire rejected: no longer leader of this term")
                }
                o => debug!(dag_id = %dag_id, outcome = ?o, "window not fired"),
            },
            Err(e) => {
                warn!(dag_id = %dag_id, error = %e, "fire proposal failed; retried next tick")
            }
        }
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

impl Handler<Leadership> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: Leadership, ctx: &mut Context<Self>) {
        let every = Duration::from_millis(self.config.tick_ms);
        let node = self.node.id;
        self.gate
            .switch(msg, every, ctx, Self::tick, "scheduler", node);
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
