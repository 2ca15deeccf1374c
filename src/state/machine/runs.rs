//! Runs in apply: creating one (deduplicated by window or request, within the tenant's
//! quotas), saving its state with its indexes and notifications, cancelling and retrying.

use super::*;

/// Whether a quota refuses a new run of `dag_id` (protocol ≥ 5). A run with a `window`
/// that already has its run creates nothing and is never refused.
pub(super) fn refuse_new_run(
    kv: &impl Kv,
    tenant: &str,
    dag_id: &str,
    window: Option<&Window>,
    ctx: Ctx,
) -> Result<Option<Outcome>, KvError> {
    let Some(q) = &ctx.quota else {
        return Ok(None);
    };
    if let Some(w) = window {
        if kv
            .get(Table::Windows, &keys::window(tenant, dag_id, w))?
            .is_some()
        {
            return Ok(None);
        }
    }
    let usage = kv.usage(tenant, dag_id)?;
    Ok(crate::quota::check_new_run(usage, tenant, dag_id, q)
        .err()
        .map(|e| Outcome::QuotaExceeded {
            message: e.to_string(),
        }))
}

/// The share of the slots a run created (or retried) by this request may hold for its
/// tenant (protocol ≥ 8, from the request's quota).
fn slot_share(ctx: Ctx) -> Option<u32> {
    ctx.quota
        .filter(|_| ctx.protocol >= 8)
        .and_then(|q| q.slot_share_percent)
}

/// Persist a run and keep its indexes true: active-runs while unfinished, finished-runs
/// and the webhook notification when it has just finished.
pub(super) fn save_run(
    kv: &mut impl Kv,
    run: &mut Run,
    before: Option<RunState>,
    ctx: Ctx,
) -> Result<(), KvError> {
    let akey = keys::active(&run.tenant, &run.dag_id, &run.run_id);
    if run.state.is_finished() {
        kv.delete(Table::ActiveRuns, akey);
        if before.is_some_and(|b| !b.is_finished()) {
            if ctx.protocol >= 2 {
                // Ended past its deadline between two supervise passes: still a miss.
                let ended = run.ended_ms.unwrap_or(ctx.now);
                if run.state != RunState::Cancelled {
                    mark_sla_missed(kv, run, ended)?;
                }
            }
            if ctx.protocol < 2 || !run.counted {
                run.counted = ctx.protocol >= 2;
                next_counter(
                    kv,
                    match run.state {
                        RunState::Done => counters::RUNS_DONE,
                        RunState::Cancelled => counters::RUNS_CANCELLED,
                        _ => counters::RUNS_FAILED,
                    },
                )?;
            }
            let ended = run.ended_ms.unwrap_or(run.created_ms);
            kv.put(
                Table::FinishedRuns,
                keys::finished(ended, &run.run_id),
                Vec::new(),
            );
            if run.state != RunState::Cancelled {
                let event = if run.state == RunState::Done {
                    "success"
                } else {
                    "failure"
                };
                notify(kv, run, event)?;
            }
            if ctx.protocol >= 7 && dag_deleted(kv, &run.tenant, &run.dag_id)? {
                // A deleted DAG's versions stay only while unfinished runs execute them:
                // the last of those to finish takes them along.
                drop_versions(kv, &run.tenant, &run.dag_id, None)?;
            }
        }
    } else {
        let entry = ActiveEntry {
            state: run.state,
            window_start_ms: run.window.start_ms,
            created_ms: run.created_ms,
        };
        put_json(kv, Table::ActiveRuns, akey, &entry);
    }
    put_json(kv, Table::Runs, run.run_id.as_bytes().to_vec(), run);
    Ok(())
}

/// Whether the DAG's record says it was deleted (only that field is decoded).
fn dag_deleted(kv: &impl Kv, tenant: &str, dag_id: &str) -> Result<bool, KvError> {
    #[derive(serde::Deserialize)]
    struct Deleted {
        deleted: bool,
    }
    Ok(
        get_json::<Deleted>(kv, Table::Dags, &keys::dag(tenant, dag_id))?
            .is_some_and(|d| d.deleted),
    )
}

/// Mark the run's SLA missed if its deadline is before `at` (once; counted and notified).
/// Returns whether it was marked now.
pub(super) fn mark_sla_missed(
    kv: &mut impl Kv,
    run: &mut Run,
    at: Millis,
) -> Result<bool, KvError> {
    match run.sla_deadline_ms {
        Some(deadline) if !run.sla_missed && deadline < at => {
            run.sla_missed = true;
            next_counter(kv, counters::SLA_MISSED)?;
            notify(kv, run, "sla_miss")?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Replicated counters exported as metrics (the same on every node).
pub mod counters {
    pub const SLA_MISSED: &[u8] = b"sla_missed";
    pub const RUNS_DONE: &[u8] = b"runs_done";
    pub const RUNS_FAILED: &[u8] = b"runs_failed";
    pub const RUNS_CANCELLED: &[u8] = b"runs_cancelled";
    pub const ATTEMPTS_LOST: &[u8] = b"attempts_lost";
    pub const RUNS_RETRIED: &[u8] = b"runs_retried";
    pub const ALL: [&[u8]; 6] = [
        SLA_MISSED,
        RUNS_DONE,
        RUNS_FAILED,
        RUNS_CANCELLED,
        ATTEMPTS_LOST,
        RUNS_RETRIED,
    ];
}

pub(super) fn notify(kv: &mut impl Kv, run: &Run, event: &str) -> Result<(), KvError> {
    let spec = run_spec(kv, run)?;
    if let Some(url) = spec.webhook {
        let n = Notification {
            tenant: run.tenant.clone(),
            dag_id: run.dag_id.clone(),
            run_id: run.run_id.clone(),
            event: event.to_string(),
            url,
            run_state: run.state,
            created_ms: run.ended_ms.unwrap_or(run.created_ms),
        };
        put_json(
            kv,
            Table::Notifications,
            keys::notification(&run.run_id, event),
            &n,
        );
    }
    Ok(())
}

/// Whether a new run is deduplicated by its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dedup {
    /// One run per `(dag, window)`: the window's record answers a second trigger.
    ByWindow,
    /// A new run every time (a manual run without a window, protocol ≥ 4).
    None,
}

pub(super) fn create_run(
    kv: &mut impl Kv,
    dag: &Dag,
    run_type: RunType,
    window: Window,
    dedup: Dedup,
    subject: Option<&str>,
    ctx: Ctx,
) -> Result<(String, RunState, bool), KvError> {
    let (tenant, dag_id) = (dag.tenant.as_str(), dag.spec.dag_id.as_str());
    let wkey = keys::window(tenant, dag_id, &window);
    if dedup == Dedup::ByWindow {
        if let Some(run_id) = kv.get(Table::Windows, &wkey)? {
            let run_id = String::from_utf8_lossy(&run_id).into_owned();
            let state = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())?
                .map_or(RunState::Queued, |r| r.state);
            return Ok((run_id, state, true));
        }
    }
    let seq = next_counter(kv, RUN_SEQ)?;
    let run_id = format!("run_{seq}");
    let sla_deadline_ms = dag.spec.sla_ms.map(|sla| {
        let base = match run_type {
            RunType::Scheduled => window.end_ms,
            RunType::Manual | RunType::Backfill => ctx.now,
        };
        base.saturating_add(sla as i64)
    });
    let mut run = Run {
        run_id: run_id.clone(),
        tenant: tenant.to_string(),
        dag_id: dag_id.to_string(),
        dag_version: dag.version,
        run_type,
        window,
        state: RunState::Queued,
        created_ms: ctx.now,
        started_ms: None,
        ended_ms: None,
        sla_deadline_ms,
        sla_missed: false,
        tasks: dag
            .spec
            .tasks
            .iter()
            .map(|t| (t.task_id.clone(), TaskInstance::new()))
            .collect(),
        counted: false,
        triggered_by: subject.map(str::to_string),
        slot_share_percent: slot_share(ctx),
    };
    if dedup == Dedup::ByWindow {
        kv.put(Table::Windows, wkey, run_id.as_bytes().to_vec());
    }
    kv.put(
        Table::RunsByDag,
        keys::run_by_dag(tenant, dag_id, ctx.now, &run_id),
        Vec::new(),
    );
    kv.put(
        Table::RunsByTenant,
        keys::run_by_tenant(tenant, ctx.now, &run_id),
        Vec::new(),
    );
    save_run(kv, &mut run, None, ctx)?;
    start_queued_runs(kv, tenant, dag_id, dag.spec.max_active_runs, ctx)?;
    // A new run answers with the state it was created in (the spec's `queued`); it may
    // already have moved on (a run without tasks is done at once).
    Ok((run_id, RunState::Queued, false))
}

pub(super) fn tenant_run(kv: &impl Kv, tenant: &str, run_id: &str) -> Result<Option<Run>, KvError> {
    Ok(get_json::<Run>(kv, Table::Runs, run_id.as_bytes())?.filter(|r| r.tenant == tenant))
}

pub(super) fn cancel_run(
    kv: &mut impl Kv,
    tenant: &str,
    run_id: &str,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let Some(mut run) = tenant_run(kv, tenant, run_id)? else {
        return Ok(Outcome::NotFound {
            what: format!("run '{run_id}'"),
        });
    };
    if run.state.is_finished() {
        return Ok(Outcome::RunCancelled {
            run_id: run_id.to_string(),
            state: run.state,
        });
    }
    let before = run.state;
    let ids: Vec<String> = run.tasks.keys().cloned().collect();
    for task_id in ids {
        let Some(inst) = run.tasks.get_mut(&task_id) else {
            continue;
        };
        if matches!(inst.state, TaskState::Running) {
            let current = inst.attempt;
            if let Some(att) = inst.attempts.iter_mut().find(|x| x.attempt == current) {
                att.state = TaskState::Cancelled;
                att.ended_ms = Some(ctx.now);
                att.error = Some("run cancelled".into());
                let node = att.node;
                release(kv, node, run_id, &task_id)?;
            }
        }
        let Some(inst) = run.tasks.get_mut(&task_id) else {
            continue;
        };
        if !matches!(
            inst.state,
            TaskState::Done | TaskState::Failed | TaskState::UpstreamFailed | TaskState::Skipped
        ) {
            inst.state = TaskState::Cancelled;
        }
    }
    run.state = RunState::Cancelled;
    run.ended_ms = Some(ctx.now);
    // Read before the save: the last run of a deleted DAG takes its version along.
    let spec = run_spec(kv, &run)?;
    save_run(kv, &mut run, Some(before), ctx)?;
    start_queued_runs(kv, tenant, &run.dag_id, spec.max_active_runs, ctx)?;
    Ok(Outcome::RunCancelled {
        run_id: run_id.to_string(),
        state: RunState::Cancelled,
    })
}

pub(super) fn retry_run(
    kv: &mut impl Kv,
    tenant: &str,
    run_id: &str,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let Some(mut run) = tenant_run(kv, tenant, run_id)? else {
        return Ok(Outcome::NotFound {
            what: format!("run '{run_id}'"),
        });
    };
    if !run.state.is_finished() {
        return Ok(Outcome::InvalidState {
            message: format!(
                "run '{run_id}' is {:?}; only a finished run can be retried",
                run.state
            )
            .to_lowercase(),
        });
    }
    if ctx.protocol >= 7 && dag_deleted(kv, &run.tenant, &run.dag_id)? {
        return Ok(Outcome::InvalidState {
            message: format!(
                "run '{run_id}' belongs to dag '{}', which was deleted; create the dag again \
                 and trigger a new run",
                run.dag_id
            ),
        });
    }
    // A finished run's version may have been dropped (`dag_versions_kept`): nothing to
    // run it with.
    let vkey = keys::dag_version(&run.tenant, &run.dag_id, run.dag_version);
    if kv.get(Table::DagVersions, &vkey)?.is_none() {
        return Ok(Outcome::InvalidState {
            message: format!(
                "run '{run_id}' ran version {} of dag '{}', which is no longer kept \
                 (limits.max_dag_versions); trigger a new run instead",
                run.dag_version, run.dag_id
            ),
        });
    }
    let mut n = 0;
    for inst in run.tasks.values_mut() {
        if matches!(
            inst.state,
            TaskState::Failed | TaskState::UpstreamFailed | TaskState::Cancelled
        ) {
            inst.state = TaskState::Pending;
            inst.next_try_ms = None;
            if ctx.protocol >= 2 {
                // A retried run gives each task its full `retries` again.
                inst.retry_base = inst.attempt;
                inst.lost = 0;
            }
            n += 1;
        }
    }
    if n == 0 {
        return Ok(Outcome::InvalidState {
            message: format!("run '{run_id}' has no failed tasks to retry"),
        });
    }
    // A retried run is queued again: from protocol 6 it counts against the run quotas
    // like a new one.
    if ctx.protocol >= 6 {
        if let Some(refused) = refuse_new_run(kv, tenant, &run.dag_id, None, ctx)? {
            return Ok(refused);
        }
    }
    kv.delete(
        Table::FinishedRuns,
        keys::finished(run.ended_ms.unwrap_or(run.created_ms), run_id),
    );
    kv.delete(Table::Notifications, keys::notification(run_id, "success"));
    kv.delete(Table::Notifications, keys::notification(run_id, "failure"));
    run.state = RunState::Queued;
    run.ended_ms = None;
    run.slot_share_percent = slot_share(ctx);
    if ctx.protocol >= 2 {
        next_counter(kv, counters::RUNS_RETRIED)?;
    }
    save_run(kv, &mut run, None, ctx)?;
    let spec = run_spec(kv, &run)?;
    start_queued_runs(kv, tenant, &run.dag_id, spec.max_active_runs, ctx)?;
    Ok(Outcome::RunRetried {
        run_id: run_id.to_string(),
        tasks: n,
    })
}
