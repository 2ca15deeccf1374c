//! Attempts in apply: which live node with free slots gets a ready task (with each
//! tenant's fair share), queued runs starting, attempts finishing, failing or losing
//! their lease, and the periodic supervise pass that catches up on time.

use super::*;

/// Live nodes with free slots, as the state machine knows them.
pub(super) struct NodePool {
    nodes: Vec<(NodeId, NodeInfo)>,
    /// Protocol ≥ 3: placements respect each tenant's share of the slots.
    fair_share_on: bool,
    /// Loaded at the first placement that could happen (a ready task and a free slot),
    /// so applies that place nothing never pay for counting.
    fair: Option<FairShare>,
}

/// Who holds the executor slots, and how many one tenant may hold while others wait.
pub(super) struct FairShare {
    /// Attempts assigned per tenant (on any node, live or not).
    running: std::collections::BTreeMap<String, u32>,
    /// `floor(live slots / tenants with running runs)`, at least 1.
    share: u32,
    /// Whether placements stop at the share (the supervise pass lifts it to fill).
    enforce: bool,
    /// Runs that had ready tasks left when their tenant reached its share.
    held: Vec<String>,
    /// Protocol ≥ 8: the live slots and the tenants with live DAGs or unfinished runs,
    /// for the cap a run carries (`Run::slot_share_percent`), which holds in the fill too.
    cap: Option<(u32, std::collections::BTreeSet<String>)>,
    /// Protocol ≥ 9: the cap bounds the tenants holding slots together while a present
    /// tenant holds none (its reserve).
    reserve: bool,
}

impl FairShare {
    /// Loaded while placing `run`'s tasks: `run` may differ from its stored version.
    fn load(kv: &impl Kv, live_slots: u32, run: &Run, ctx: Ctx) -> Result<FairShare, KvError> {
        let running = if ctx.protocol >= 8 {
            // Kept as runs are written: a lookup, not a decode of every running run. The
            // index knows `run` as stored; an attempt of it may have ended or expired
            // since (its assignment is already gone), so count its tasks as they are now.
            let mut running = kv.attempts_by_tenant()?;
            let stored = kv
                .get(Table::Runs, run.run_id.as_bytes())?
                .and_then(|b| RunView::decode(&b))
                .map_or(0, |v| running_tasks(v.tasks.values().map(|t| t.state)));
            let now = running_tasks(run.tasks.values().map(|t| t.state));
            let held = running.entry(run.tenant.clone()).or_insert(0);
            *held = (*held + now).saturating_sub(stored);
            running.retain(|_, n| *n > 0);
            // Every unit and property test checks that the counts are the assignments'.
            #[cfg(test)]
            assert_eq!(
                running,
                count_assignments(kv)?,
                "running tasks = assignments"
            );
            running
        } else {
            count_assignments(kv)?
        };
        let tenants = (kv.working_tenants()?.len() as u32).max(1);
        Ok(FairShare {
            running,
            share: (live_slots / tenants).max(1),
            enforce: true,
            held: Vec::new(),
            cap: if ctx.protocol >= 8 {
                Some((live_slots, kv.present_tenants()?))
            } else {
                None
            },
            reserve: ctx.protocol >= 9,
        })
    }

    /// Whether `tenant` may get no more slots now for a run carrying `share_percent`: it
    /// holds its fair share while that is enforced, or the run's cap while another tenant
    /// has a DAG or an unfinished run; or (protocol 9) it holds a slot already, a present
    /// tenant holds none, and all tenants together hold the cap: the rest is kept for
    /// the tenants holding none.
    fn holds_back(&self, tenant: &str, share_percent: Option<u32>) -> bool {
        let held = self.running.get(tenant).copied().unwrap_or(0);
        if self.enforce && held >= self.share {
            return true;
        }
        let (Some((live_slots, present)), Some(percent)) = (&self.cap, share_percent) else {
            return false;
        };
        if percent >= 100 || !present.iter().any(|t| t != tenant) {
            return false;
        }
        let cap = slot_cap(*live_slots, percent);
        if held >= cap {
            return true;
        }
        self.reserve
            && held > 0
            && self.running.values().sum::<u32>() >= cap
            && present
                .iter()
                .any(|t| t != tenant && self.running.get(t).is_none_or(|n| *n == 0))
    }
}

/// How many of these task states are `running`.
fn running_tasks(states: impl Iterator<Item = TaskState>) -> u32 {
    states.filter(|s| *s == TaskState::Running).count() as u32
}

/// Attempts assigned per tenant, counted from the assignments (before protocol 8).
fn count_assignments(kv: &impl Kv) -> Result<std::collections::BTreeMap<String, u32>, KvError> {
    let mut running = std::collections::BTreeMap::new();
    let mut tenant_of = std::collections::BTreeMap::<String, String>::new();
    for (k, _) in kv.scan_prefix(Table::Assignments, b"")? {
        // `node(8 bytes) \0 run_id \0 task_id`
        let Some(rest) = k.get(9..) else { continue };
        let Some(sep) = rest.iter().position(|b| *b == 0) else {
            continue;
        };
        let run_id = String::from_utf8_lossy(&rest[..sep]).into_owned();
        let tenant = match tenant_of.get(&run_id) {
            Some(t) => t.clone(),
            None => {
                let Some(run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
                    continue;
                };
                tenant_of.insert(run_id, run.tenant.clone());
                run.tenant
            }
        };
        *running.entry(tenant).or_insert(0u32) += 1;
    }
    Ok(running)
}

/// The attempts one tenant may hold under a `percent` share of `live_slots`: rounded
/// down, at least one.
fn slot_cap(live_slots: u32, percent: u32) -> u32 {
    (u64::from(live_slots) * u64::from(percent.min(100)) / 100).max(1) as u32
}

impl NodePool {
    fn load(kv: &impl Kv, ctx: Ctx) -> Result<NodePool, KvError> {
        let mut nodes = Vec::new();
        for (k, v) in kv.scan_prefix(Table::Nodes, b"")? {
            let Ok(arr) = <[u8; 8]>::try_from(k.as_slice()) else {
                continue;
            };
            let info: NodeInfo = decode(Table::Nodes, &v)?;
            if ctx.now.saturating_sub(info.last_seen_ms) <= NODE_TTL_MS {
                nodes.push((u64::from_be_bytes(arr), info));
            }
        }
        Ok(NodePool {
            nodes,
            fair_share_on: ctx.protocol >= 3,
            fair: None,
        })
    }

    /// The live node with the most free slots (lowest id on ties), preferring not `avoid`.
    fn pick(&self, avoid: Option<NodeId>) -> Option<NodeId> {
        let free = |i: &NodeInfo| i.slots.saturating_sub(i.running);
        let best = |skip: Option<NodeId>| {
            self.nodes
                .iter()
                .filter(|(id, i)| free(i) > 0 && Some(*id) != skip)
                .max_by(|a, b| free(&a.1).cmp(&free(&b.1)).then(b.0.cmp(&a.0)))
                .map(|(id, _)| *id)
        };
        best(avoid).or_else(|| best(None))
    }

    /// Use one of `node`'s slots; returns the lease its attempts get.
    fn take(&mut self, kv: &mut impl Kv, node: NodeId) -> u64 {
        match self.nodes.iter_mut().find(|(id, _)| *id == node) {
            Some((_, info)) => {
                info.running += 1;
                put_json(kv, Table::Nodes, keys::node(node), info);
                info.lease_ms
            }
            None => DEFAULT_LEASE_MS,
        }
    }
}

/// Drop an attempt's assignment and give its slot back.
pub(super) fn release(
    kv: &mut impl Kv,
    node: NodeId,
    run_id: &str,
    task_id: &str,
) -> Result<(), KvError> {
    let akey = keys::assignment(node, run_id, task_id);
    if kv.get(Table::Assignments, &akey)?.is_none() {
        return Ok(());
    }
    kv.delete(Table::Assignments, akey);
    let nkey = keys::node(node);
    if let Some(mut info) = get_json::<NodeInfo>(kv, Table::Nodes, &nkey)? {
        info.running = info.running.saturating_sub(1);
        put_json(kv, Table::Nodes, nkey, &info);
    }
    Ok(())
}

/// Assign the run's ready tasks to live nodes with free slots. Returns how many.
pub(super) fn assign_ready(
    kv: &mut impl Kv,
    run: &mut Run,
    pool: &mut NodePool,
    ctx: Ctx,
) -> Result<u32, KvError> {
    if run.state != RunState::Running {
        return Ok(0);
    }
    let mut n = 0;
    for task_id in progress::ready_tasks(run, ctx.now) {
        if pool.fair_share_on && pool.fair.is_none() && pool.pick(None).is_some() {
            let live_slots = pool.nodes.iter().map(|(_, i)| i.slots).sum();
            pool.fair = Some(FairShare::load(kv, live_slots, run, ctx)?);
        }
        if let Some(fair) = pool.fair.as_mut() {
            if fair.holds_back(&run.tenant, run.slot_share_percent) {
                fair.held.push(run.run_id.clone());
                break;
            }
        }
        let Some(inst) = run.tasks.get_mut(&task_id) else {
            continue;
        };
        let avoid = inst.attempts.last().map(|a| a.node);
        let Some(node) = pool.pick(avoid) else { break };
        let lease_ms = pool.take(kv, node);
        if let Some(fair) = pool.fair.as_mut() {
            *fair.running.entry(run.tenant.clone()).or_insert(0) += 1;
        }
        inst.attempt += 1;
        inst.state = TaskState::Running;
        inst.next_try_ms = None;
        inst.attempts.push(Attempt {
            attempt: inst.attempt,
            node,
            state: TaskState::Running,
            started_ms: ctx.now,
            ended_ms: None,
            lease_until_ms: ctx.now.saturating_add(lease_ms as i64),
            exit_code: None,
            error: None,
        });
        kv.put(
            Table::Assignments,
            keys::assignment(node, &run.run_id, &task_id),
            inst.attempt.to_be_bytes().to_vec(),
        );
        n += 1;
    }
    Ok(n)
}

/// The lease an executor announces unless configured otherwise (and the lease of a node
/// that never said).
pub const DEFAULT_LEASE_MS: u64 = 10_000;

/// Start queued runs of a DAG (oldest window first) while fewer than
/// `max_active_runs` are running, and assign their first tasks.
pub(super) fn start_queued_runs(
    kv: &mut impl Kv,
    tenant: &str,
    dag_id: &str,
    max_active: u32,
    ctx: Ctx,
) -> Result<(), KvError> {
    let (load, mut queued) = kv.queued_runs(tenant, dag_id, max_active as usize)?;
    if queued.is_empty() || load.running >= max_active {
        return Ok(());
    }
    queued.truncate((max_active - load.running) as usize);
    let mut pool = NodePool::load(kv, ctx)?;
    for run_id in queued {
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        let before = run.state;
        run.state = RunState::Running;
        run.started_ms = Some(ctx.now);
        let spec = run_spec(kv, &run)?;
        progress::advance(&mut run, &spec, ctx.now);
        assign_ready(kv, &mut run, &mut pool, ctx)?;
        save_run(kv, &mut run, Some(before), ctx)?;
    }
    Ok(())
}

/// Record an attempt's failure (or loss) and decide: retry later, retry now, or fail.
pub(super) fn fail_attempt(
    inst: &mut TaskInstance,
    spec: &DagSpec,
    task_id: &str,
    result: &AttemptResult,
    now: Millis,
) {
    let (state, exit_code, error) = match result {
        AttemptResult::Success { exit_code } => (TaskState::Done, *exit_code, None),
        AttemptResult::Failed { exit_code, error } => {
            (TaskState::Failed, *exit_code, Some(error.clone()))
        }
        AttemptResult::TimedOut { error } => (TaskState::Failed, None, Some(error.clone())),
        AttemptResult::Lost { error } => (TaskState::Failed, None, Some(error.clone())),
    };
    let current = inst.attempt;
    if let Some(a) = inst.attempts.iter_mut().find(|a| a.attempt == current) {
        a.state = state;
        a.ended_ms = Some(now);
        a.exit_code = exit_code;
        a.error = error;
    }
    if state == TaskState::Done {
        inst.state = TaskState::Done;
        return;
    }
    let task = spec.tasks.iter().find(|t| t.task_id == task_id);
    let lost = matches!(result, AttemptResult::Lost { .. });
    if lost && inst.lost < MAX_LOST_RETRIES {
        inst.lost += 1;
        inst.state = TaskState::Retrying;
        inst.next_try_ms = Some(now);
        return;
    }
    let retries_used = current
        .saturating_sub(inst.retry_base)
        .saturating_sub(inst.lost);
    match task {
        Some(t) if retries_used <= t.retries => {
            inst.state = TaskState::Retrying;
            inst.next_try_ms =
                Some(now.saturating_add(progress::retry_delay_ms(t, retries_used) as i64));
        }
        _ => inst.state = TaskState::Failed,
    }
}

/// An attempt's end as its node reports it; from protocol 8 the slot it freed goes to a
/// waiting run at once.
pub(super) fn finish_attempt(
    kv: &mut impl Kv,
    a: &AttemptRef,
    node: NodeId,
    result: &AttemptResult,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let outcome = end_attempt(kv, a, node, result, ctx)?;
    if ctx.protocol >= 8 && matches!(outcome, Outcome::AttemptFinished { .. }) {
        hand_on_free_slots(kv, ctx)?;
    }
    Ok(outcome)
}

/// Record an attempt's end, place its run's next tasks and start its DAG's queued runs.
pub(super) fn end_attempt(
    kv: &mut impl Kv,
    a: &AttemptRef,
    node: NodeId,
    result: &AttemptResult,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let Some(mut run) = get_json::<Run>(kv, Table::Runs, a.run_id.as_bytes())? else {
        return Ok(Outcome::StaleAttempt { current: 0 });
    };
    let Some(inst) = run.tasks.get(&a.task_id) else {
        return Ok(Outcome::StaleAttempt { current: 0 });
    };
    let on_node = inst
        .attempts
        .iter()
        .any(|x| x.attempt == a.attempt && x.node == node);
    if inst.attempt != a.attempt || inst.state != TaskState::Running || !on_node {
        return Ok(Outcome::StaleAttempt {
            current: inst.attempt,
        });
    }
    let spec = run_spec(kv, &run)?;
    let before = run.state;
    release(kv, node, &a.run_id, &a.task_id)?;
    let Some(inst) = run.tasks.get_mut(&a.task_id) else {
        unreachable!("task {} was found above", a.task_id)
    };
    fail_attempt(inst, &spec, &a.task_id, result, ctx.now);
    let task_state = inst.state;
    progress::advance(&mut run, &spec, ctx.now);
    let mut pool = NodePool::load(kv, ctx)?;
    assign_ready(kv, &mut run, &mut pool, ctx)?;
    save_run(kv, &mut run, Some(before), ctx)?;
    if run.state.is_finished() {
        start_queued_runs(kv, &run.tenant, &run.dag_id, spec.max_active_runs, ctx)?;
    }
    Ok(Outcome::AttemptFinished {
        run_id: a.run_id.clone(),
        task_id: a.task_id.clone(),
        task_state,
    })
}

/// Waiting runs a finished attempt's apply looks at, at most (a bound on its cost when
/// the runs first in line cannot take a slot, e.g. held at their tenant's share).
const HAND_ON_SCAN: usize = 32;

/// Protocol ≥ 8: slots free after an attempt's end go at once to runs waiting for one
/// (runs with ready tasks and nothing else due, in the supervise pass's order, within the
/// fair share and the caps), instead of staying idle until the next supervise pass (up
/// to `scheduler.supervise_ms` later). A run whose only ready task is a retry whose time
/// has come waits for the pass, as before.
pub(super) fn hand_on_free_slots(kv: &mut impl Kv, ctx: Ctx) -> Result<(), KvError> {
    let mut pool = NodePool::load(kv, ctx)?;
    if pool.pick(None).is_none() {
        return Ok(());
    }
    for run_id in kv.waiting_runs(HAND_ON_SCAN)? {
        if pool.pick(None).is_none() {
            break;
        }
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        let before = run.state;
        if assign_ready(kv, &mut run, &mut pool, ctx)? > 0 {
            save_run(kv, &mut run, Some(before), ctx)?;
        }
    }
    Ok(())
}

/// The leader's periodic pass over every unfinished run.
/// One pass over the runs that are due ([`crate::state::due`]): expire leases, place ready
/// tasks and retries, mark missed SLAs, then start queued runs where a place is free.
/// Runs that are not due would come out of it unchanged, so it leaves them unread.
pub(super) fn supervise(kv: &mut impl Kv, ctx: Ctx) -> Result<Outcome, KvError> {
    let due = kv.supervision(ctx.now)?;
    let mut pool = NodePool::load(kv, ctx)?;
    let mut assigned = 0;
    let mut expired = 0;
    // DAGs with a run that stopped running in this pass.
    let mut freed = std::collections::BTreeSet::new();
    for run_id in due.runs {
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        if run.state != RunState::Running {
            // Still queued behind `max_active_runs` past its deadline: a miss too.
            if ctx.protocol >= 2 && mark_sla_missed(kv, &mut run, ctx.now)? {
                let state = run.state;
                save_run(kv, &mut run, Some(state), ctx)?;
            }
            continue;
        }
        let before = run.state;
        let spec = run_spec(kv, &run)?;
        let mut changed = false;
        // Expire leases: the node stopped renewing (dead, paused or cut off).
        let ids: Vec<String> = run.tasks.keys().cloned().collect();
        for task_id in ids {
            let Some(inst) = run.tasks.get(&task_id) else {
                continue;
            };
            if inst.state != TaskState::Running {
                continue;
            }
            let Some(att) = inst.attempts.iter().find(|x| x.attempt == inst.attempt) else {
                continue;
            };
            if att.lease_until_ms >= ctx.now {
                continue;
            }
            let node = att.node;
            if ctx.protocol >= 2 {
                // A new leader's clock may be ahead of its predecessor's: a lease expires
                // only after a full lease of this term's own clock, so a node that stopped
                // its attempts a margin before its lease ran out (executor self-fencing)
                // has done so before the task can go elsewhere.
                let lease_ms = get_json::<NodeInfo>(kv, Table::Nodes, &keys::node(node))?
                    .map_or(DEFAULT_LEASE_MS, |i| i.lease_ms);
                if ctx.now < ctx.term_started_ms.saturating_add(lease_ms as i64) {
                    continue;
                }
            }
            tracing::info!(run_id = %run_id, task_id = %task_id, attempt = att.attempt, node,
                           lease_until_ms = att.lease_until_ms, cluster_now_ms = ctx.now,
                           term = ctx.entry_term, term_started_ms = ctx.term_started_ms,
                           protocol = ctx.protocol, "lease expired");
            release(kv, node, &run_id, &task_id)?;
            let Some(inst) = run.tasks.get_mut(&task_id) else {
                continue;
            };
            let err = format!("lease expired: node {node} stopped renewing it");
            fail_attempt(
                inst,
                &spec,
                &task_id,
                &AttemptResult::Lost { error: err },
                ctx.now,
            );
            next_counter(kv, counters::ATTEMPTS_LOST)?;
            expired += 1;
            changed = true;
        }
        if mark_sla_missed(kv, &mut run, ctx.now)? {
            changed = true;
        }
        progress::advance(&mut run, &spec, ctx.now);
        let n = assign_ready(kv, &mut run, &mut pool, ctx)?;
        assigned += n;
        if run.state != before {
            freed.insert((run.tenant.clone(), run.dag_id.clone()));
        }
        if changed || n > 0 || run.state != before {
            save_run(kv, &mut run, Some(before), ctx)?;
        }
    }
    // Every tenant has had its share; the slots still free go to whoever has work.
    let held = match pool.fair.as_mut() {
        Some(fair) => {
            fair.enforce = false;
            std::mem::take(&mut fair.held)
        }
        None => Vec::new(),
    };
    let mut filled = std::collections::BTreeSet::new();
    for run_id in held {
        if !filled.insert(run_id.clone()) {
            continue;
        }
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        let before = run.state;
        let n = assign_ready(kv, &mut run, &mut pool, ctx)?;
        if n > 0 {
            assigned += n;
            save_run(kv, &mut run, Some(before), ctx)?;
        }
    }
    // A DAG has a free place if it had one when the pass began, or if one of its runs
    // stopped running in this pass (nothing else changes how many run during a pass).
    for ((tenant, dag_id), load) in due.queued_dags {
        let max = get_json::<Dag>(kv, Table::Dags, &keys::dag(&tenant, &dag_id))?
            .map_or(u32::MAX, |d| d.spec.max_active_runs);
        if load.running < max || freed.contains(&(tenant.clone(), dag_id.clone())) {
            start_queued_runs(kv, &tenant, &dag_id, max, ctx)?;
        }
    }
    Ok(Outcome::Supervised { assigned, expired })
}
