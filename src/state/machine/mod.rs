//! The deterministic core of the state machine: how a committed [`Request`] changes the
//! replicated tables. It sees the tables only through [`Kv`], reads no clock, draws no
//! random numbers and does no I/O of its own; `raft::state_machine` runs it over RocksDB.
//!
//! Every scheduling decision is made here, at a position in the log, from replicated
//! facts only: which tasks are ready, which live node with free slots gets an attempt,
//! when a lease has expired, when a retry is due, when an SLA is missed. Actors propose
//! commands that say what happened (a window is due, an attempt ended, a node is alive,
//! time has passed) and never decide on their own.
//!
//! This file holds the entry point ([`apply_request`]), the apply context, idempotency and
//! the command dispatch; the rest by concern: `tables` (tables, keys, records, [`Kv`]),
//! `dags` (definitions and versions), `runs` (creating, saving, cancelling, retrying),
//! `placement` (attempts, fair share, leases, the supervise pass), `retention` (purge).

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::census::{DagView, RunView, TenantCounts, Usage};
use super::command::{
    AttemptRef, AttemptResult, Command, IdempotencyKey, Outcome, Quota, Request, Response,
};
use super::due::{DueIndex, Load, Supervision};
use super::model::{
    ActiveEntry, Attempt, Dag, DagSpec, Millis, NodeInfo, Notification, Run, RunState, RunType,
    ShellGrant, StoredVersion, TaskInstance, TaskState, Window,
};
use super::progress;
use crate::raft::NodeId;

mod dags;
mod placement;
mod retention;
mod runs;
mod tables;
#[cfg(test)]
pub mod tests;

use dags::*;
pub use dags::{put_decision, version_of_key, PutDecision};
pub use placement::DEFAULT_LEASE_MS;
use placement::*;
pub use retention::PURGE_CHUNK;
use retention::*;
pub use runs::counters;
use runs::*;
use tables::*;
pub use tables::{clock, keys, Entries, IdempotencyRecord, Kv, KvError, RequestRecord, Table};

/// A node not heard from for this long gets no new attempts.
pub const NODE_TTL_MS: Millis = 5_000;
/// Attempts lost to node failure are retried this many times beyond `retries`.
pub const MAX_LOST_RETRIES: u32 = 3;

/// The newest replicated protocol this binary applies. A change to what apply does is
/// made conditional on a protocol version and takes effect only from the entry that
/// raises the cluster to it ([`Command::RaiseProtocol`]), which the leader proposes only
/// once every voter supports it: replicas on different binaries never apply one entry
/// differently. A state without a version is at version 1.
///
/// - 1: time is each request's stamp.
/// - 2: one monotone cluster clock (`now = max(previous, stamp)`); a lease can expire only
///   after a full lease of the current term's clock; purge cutoffs from the cluster
///   clock; the fired-window watermark survives delete and re-fires nothing at or below
///   it; a re-created DAG counts as created when it is re-created.
/// - 3: a fair share of executor slots: while several tenants have running runs, a
///   tenant holding `floor(live slots / those tenants)` attempts gets no more from the
///   immediate placements (a finished attempt's successor, a started run); the leader's
///   supervise pass first places every tenant's ready tasks up to that share, then fills
///   the slots left with anyone's (work-conserving).
/// - 4: a manual run triggered without a window (the API sends it as `start == end`) is a
///   new run every time, at the cluster time it is applied: two triggers in the same
///   millisecond no longer share a run. Its retries are deduplicated by request id and
///   `X-Request-Id`, not by window; a manual or backfill run with a window still is.
/// - 5: apply enforces the tenant quota a request carries ([`Request::quota`]): a DAG
///   beyond `max_dags`, or a new run beyond `max_active_runs` or
///   `max_queued_runs_per_dag`, is refused ([`Outcome::QuotaExceeded`]; a refused
///   window does not move the DAG's cursor), counted as of that request; writing a DAG
///   version drops the versions `dag_versions_kept` or more behind it that no unfinished
///   run executes.
/// - 6: a retried run (`RetryRun`) counts against the run quotas like a new run: a retry
///   beyond `max_active_runs` or `max_queued_runs_per_dag` is refused.
/// - 7: deleting a DAG drops its versions that no unfinished run executes (the last of
///   those runs to finish drops the rest), and its record keeps no tasks, webhook or
///   owner: a tenant that creates and deletes DAGs no longer grows the state without
///   bound. A finished run of a deleted DAG cannot be retried.
/// - 8: a cap on one tenant's share of the slots: a run keeps the `slot_share_percent`
///   of the quota it was created (or retried) with, and while another tenant has a live
///   DAG or an unfinished run, no placement (the supervise pass's fill included) gives
///   the run's tenant an attempt beyond `max(1, floor(live slots × percent / 100))` held.
///   The fair share is work-conserving and never takes a running attempt back, so
///   without a cap one tenant's long tasks could hold every slot until they end. A
///   finished attempt's apply (and a restarted node's heartbeat, for its lost attempts)
///   hands free slots at once to runs waiting for one (in the supervise pass's order,
///   within the share and the caps) instead of leaving them idle until the next pass;
///   and the fair share counts each tenant's running tasks from the due index instead
///   of decoding the run of every assignment.
/// - 9: the cap also bounds the tenants together: while a tenant with a live DAG or an
///   unfinished run holds no slot, a tenant that already holds one gets another only
///   while all tenants' attempts together stay below the run's cap of the slots. The
///   rest is a reserve that any tenant holding none may take a slot from, so several
///   tenants' long tasks can no longer fill every slot between them (each was within its
///   own cap) and leave a further tenant nothing until they end.
/// - 10: request and idempotency records are indexed by creation time, so the purge
///   reads only the records past the retention instead of decoding every record in one
///   apply; records from before the raise are found by the old full scan until a purge
///   has passed the raise's time (until then every purge still decodes every record, as
///   before). A purge reads and removes at most [`PURGE_CHUNK`] runs and index entries
///   of each kind and says when there is more (the leader purges again at its next
///   pass), so, once past that day, no single apply stalls every write behind a backlog.
/// - 11: a DAG with a shell task is refused in apply ([`Outcome::Forbidden`]) unless its
///   request says the caller held `orchestrator:shell`, and its version records that
///   grant ([`crate::state::model::ShellGrant`]; a pause or unpause carries it to the
///   new version). The raise records a grant on every stored version with a shell task
///   (the API alone checked those), so from then on every shell version the executor
///   runs has one, and the executor refuses one without.
/// - 12: the purge's scan for records from before protocol 10 ends as soon as it finds
///   none left, instead of going on until a purge's cutoff has passed the raise's time.
///   A cluster that raised straight from below 10 with no such record (every fresh
///   cluster) scanned every record once a minute for a day; now it scans once.
pub const PROTOCOL_VERSION: u32 = 12;

/// What apply knows about the entry it is applying.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    /// The cluster clock (protocol ≥ 2) or the request's stamp (protocol 1).
    now: Millis,
    entry_term: u64,
    protocol: u32,
    /// Cluster time of the first request applied in `entry_term` (protocol ≥ 2).
    term_started_ms: Millis,
    /// The tenant quota apply enforces (protocol ≥ 5, when the request carries one).
    quota: Option<Quota>,
    /// The caller held `orchestrator:shell` ([`Request::shell_scope`]).
    shell_scope: bool,
}

/// The replicated protocol version (1 when never raised).
pub fn protocol_version(kv: &impl Kv) -> Result<u32, KvError> {
    Ok(read_u64(kv, clock::PROTOCOL)?.map_or(1, |v| v as u32))
}

/// The apply context of one request: under protocol 2 the cluster clock advances to the
/// request's stamp if that is later (never back), and a new term's start is recorded.
fn context(kv: &mut impl Kv, req: &Request, entry_term: u64) -> Result<Ctx, KvError> {
    let protocol = protocol_version(kv)?;
    if protocol < 2 {
        return Ok(Ctx {
            now: req.proposed_at_ms,
            entry_term,
            protocol,
            term_started_ms: Millis::MIN,
            quota: None,
            shell_scope: req.shell_scope,
        });
    }
    let previous = read_i64(kv, clock::CLUSTER_TIME)?;
    let now = previous.map_or(req.proposed_at_ms, |p| p.max(req.proposed_at_ms));
    if previous != Some(now) {
        kv.put(
            Table::Counters,
            clock::CLUSTER_TIME.to_vec(),
            keys::ordered_i64(now).to_vec(),
        );
    }
    let term = read_u64(kv, clock::TERM)?;
    let term_started_ms = if term.is_some_and(|t| t >= entry_term) {
        read_i64(kv, clock::TERM_STARTED)?.unwrap_or(now)
    } else {
        kv.put(
            Table::Counters,
            clock::TERM.to_vec(),
            entry_term.to_be_bytes().to_vec(),
        );
        kv.put(
            Table::Counters,
            clock::TERM_STARTED.to_vec(),
            keys::ordered_i64(now).to_vec(),
        );
        now
    };
    Ok(Ctx {
        now,
        entry_term,
        protocol,
        term_started_ms,
        quota: req.quota.filter(|_| protocol >= 5),
        shell_scope: req.shell_scope,
    })
}

/// Apply one committed request from an entry of term `entry_term`. Deterministic: the
/// same requests in the same order on the same state give the same writes and
/// responses on every node.
pub fn apply_request(
    kv: &mut impl Kv,
    req: &Request,
    entry_term: u64,
) -> Result<Response, KvError> {
    let ctx = context(kv, req, entry_term)?;
    let recorded = is_client_command(&req.command);
    if recorded {
        if let Some(rec) =
            get_json::<RequestRecord>(kv, Table::Requests, req.request_id.as_bytes())?
        {
            return Ok(Response {
                outcome: rec.outcome,
                replayed: true,
            });
        }
        if let Some(idem) = &req.idempotency {
            if let Some(replay) = check_idempotency(kv, idem)? {
                return Ok(replay);
            }
        }
    }
    // Who asked is recorded from protocol 3 on (replicas at 2 store what they always did).
    let subject = req.subject.as_deref().filter(|_| ctx.protocol >= 3);
    let outcome = apply_command(kv, &req.command, subject, ctx)?;
    if recorded {
        let rec = RequestRecord {
            outcome: outcome.clone(),
            created_ms: ctx.now,
        };
        put_json(
            kv,
            Table::Requests,
            req.request_id.as_bytes().to_vec(),
            &rec,
        );
        // From protocol 10 each record is indexed by its time: the purge reads only
        // what is due, not every record (a record is written once: a retry is answered
        // from it above).
        let indexed = ctx.protocol >= 10;
        if indexed {
            kv.put(
                Table::Requests,
                keys::record_by_time(ctx.now, req.request_id.as_bytes()),
                Vec::new(),
            );
        }
        // A quota refusal says "not now" (protocol 5): the client's key stays free, so a
        // retry with it once there is room is applied, not answered with the refusal.
        // Nor does a refusal of a capability (protocol 11): a caller that gets the scope
        // may retry with the same key.
        let keep_answer = !matches!(
            outcome,
            Outcome::QuotaExceeded { .. } | Outcome::Forbidden { .. }
        );
        if let Some(idem) = req.idempotency.as_ref().filter(|_| keep_answer) {
            let rec = IdempotencyRecord {
                fingerprint: idem.fingerprint.clone(),
                outcome: outcome.clone(),
                created_ms: ctx.now,
            };
            let key = keys::idempotency(&idem.tenant, &idem.key);
            if indexed {
                kv.put(
                    Table::Idempotency,
                    keys::record_by_time(ctx.now, &key),
                    Vec::new(),
                );
            }
            put_json(kv, Table::Idempotency, key, &rec);
        }
    }
    Ok(Response {
        outcome,
        replayed: false,
    })
}

/// Commands a client sent (their answers are kept for retries); the cluster's own
/// housekeeping commands are fenced or harmless to repeat and keep no record.
fn is_client_command(c: &Command) -> bool {
    matches!(
        c,
        Command::PutDag { .. }
            | Command::TriggerRun { .. }
            | Command::SetPaused { .. }
            | Command::DeleteDag { .. }
            | Command::CancelRun { .. }
            | Command::RetryRun { .. }
    )
}

fn check_idempotency(kv: &impl Kv, idem: &IdempotencyKey) -> Result<Option<Response>, KvError> {
    let key = keys::idempotency(&idem.tenant, &idem.key);
    Ok(
        get_json::<IdempotencyRecord>(kv, Table::Idempotency, &key)?.map(|rec| {
            if rec.fingerprint == idem.fingerprint {
                Response {
                    outcome: rec.outcome,
                    replayed: true,
                }
            } else {
                Response {
                    outcome: Outcome::IdempotencyKeyReused {
                        key: idem.key.clone(),
                    },
                    replayed: false,
                }
            }
        }),
    )
}

fn fenced(term: u64, ctx: Ctx) -> Option<Outcome> {
    (term != ctx.entry_term).then_some(Outcome::StaleTerm {
        command_term: term,
        entry_term: ctx.entry_term,
    })
}

fn apply_command(
    kv: &mut impl Kv,
    cmd: &Command,
    subject: Option<&str>,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    match cmd {
        Command::PutDag {
            tenant,
            spec,
            expected_version,
        } => put_dag(kv, tenant, spec, *expected_version, subject, ctx),
        Command::TriggerRun {
            tenant,
            dag_id,
            run_type,
            window,
        } => {
            let dag = match live_dag(kv, tenant, dag_id)? {
                Some(d) => d,
                None => {
                    return Ok(Outcome::NotFound {
                        what: format!("dag '{dag_id}'"),
                    })
                }
            };
            let windowless = *run_type == RunType::Manual && window.start_ms == window.end_ms;
            let dedup = !(windowless && ctx.protocol >= 4);
            if let Some(refused) = refuse_new_run(kv, tenant, dag_id, dedup.then_some(window), ctx)?
            {
                return Ok(refused);
            }
            let (run_id, state, existed) = if !dedup {
                let now = Window {
                    start_ms: ctx.now,
                    end_ms: ctx.now,
                };
                create_run(kv, &dag, *run_type, now, Dedup::None, subject, ctx)?
            } else {
                create_run(kv, &dag, *run_type, *window, Dedup::ByWindow, subject, ctx)?
            };
            Ok(Outcome::RunTriggered {
                run_id,
                state,
                existed,
            })
        }
        Command::SetPaused {
            tenant,
            dag_id,
            paused,
        } => {
            let Some(mut dag) = live_dag(kv, tenant, dag_id)? else {
                return Ok(Outcome::NotFound {
                    what: format!("dag '{dag_id}'"),
                });
            };
            if dag.spec.paused != *paused {
                dag.spec.paused = *paused;
                dag.version += 1;
                dag.updated_ms = ctx.now;
                if subject.is_some() {
                    dag.updated_by = subject.map(str::to_string);
                }
                // The tasks are the previous version's: so is the grant to run them.
                let grant = if ctx.protocol >= 11 {
                    stored_version(kv, tenant, dag_id, dag.version - 1)?.and_then(|v| v.shell_grant)
                } else {
                    None
                };
                put_version(kv, tenant, dag_id, dag.version, &dag.spec, grant, ctx)?;
                put_json(kv, Table::Dags, keys::dag(tenant, dag_id), &dag);
            }
            Ok(Outcome::DagPaused {
                dag_id: dag_id.clone(),
                version: dag.version,
                paused: *paused,
            })
        }
        Command::DeleteDag { tenant, dag_id } => {
            let Some(mut dag) = live_dag(kv, tenant, dag_id)? else {
                return Ok(Outcome::NotFound {
                    what: format!("dag '{dag_id}'"),
                });
            };
            dag.deleted = true;
            dag.updated_ms = ctx.now;
            if subject.is_some() {
                dag.updated_by = subject.map(str::to_string);
            }
            if ctx.protocol >= 7 {
                // What a deleted DAG keeps is a small tombstone (its record, for the
                // version count and the creation rules; the fired-window watermark lives
                // in `Cursors`): not its tasks, nor versions no unfinished run executes.
                drop_versions(kv, tenant, dag_id, None)?;
                dag.spec.tasks.clear();
                dag.spec.webhook = None;
                dag.spec.owner = None;
            }
            put_json(kv, Table::Dags, keys::dag(tenant, dag_id), &dag);
            if ctx.protocol < 2 {
                kv.delete(Table::Cursors, keys::dag(tenant, dag_id));
            }
            Ok(Outcome::DagDeleted {
                dag_id: dag_id.clone(),
            })
        }
        Command::CancelRun { tenant, run_id } => cancel_run(kv, tenant, run_id, ctx),
        Command::RetryRun { tenant, run_id } => retry_run(kv, tenant, run_id, ctx),
        Command::FireWindow {
            tenant,
            dag_id,
            window,
            term,
        } => {
            if let Some(stale) = fenced(*term, ctx) {
                return Ok(stale);
            }
            let Some(dag) = live_dag(kv, tenant, dag_id)? else {
                return Ok(Outcome::NotFound {
                    what: format!("dag '{dag_id}'"),
                });
            };
            if dag.spec.paused {
                return Ok(Outcome::InvalidState {
                    message: format!("dag '{dag_id}' is paused"),
                });
            }
            let ckey = keys::dag(tenant, dag_id);
            let cursor = kv
                .get(Table::Cursors, &ckey)?
                .and_then(|b| keys::from_ordered_i64(&b));
            if let Some(watermark) = cursor.filter(|c| ctx.protocol >= 2 && window.end_ms <= *c) {
                // At or below the watermark: fired before. Its run may be kept (answer
                // with it) or purged, or the DAG deleted and re-created: fire nothing.
                let wkey = keys::window(tenant, dag_id, window);
                return Ok(match kv.get(Table::Windows, &wkey)? {
                    Some(run_id) => Outcome::Fired {
                        run_id: String::from_utf8_lossy(&run_id).into_owned(),
                        created: false,
                    },
                    None => Outcome::AlreadyFired { watermark },
                });
            }
            // Refused by a quota: the cursor stays, so the window fires once there is room.
            if let Some(refused) = refuse_new_run(kv, tenant, dag_id, Some(window), ctx)? {
                return Ok(refused);
            }
            if cursor.is_none_or(|c| window.end_ms > c) {
                kv.put(
                    Table::Cursors,
                    ckey,
                    keys::ordered_i64(window.end_ms).to_vec(),
                );
            }
            let (run_id, _, existed) = create_run(
                kv,
                &dag,
                RunType::Scheduled,
                *window,
                Dedup::ByWindow,
                None,
                ctx,
            )?;
            Ok(Outcome::Fired {
                run_id,
                created: !existed,
            })
        }
        Command::Heartbeat {
            node,
            incarnation,
            slots,
            running,
            lease_ms,
        } => heartbeat(kv, *node, incarnation, *slots, running, *lease_ms, ctx),
        Command::FinishAttempt {
            attempt,
            node,
            result,
        } => finish_attempt(kv, attempt, *node, result, ctx),
        Command::Supervise { term } => {
            if let Some(stale) = fenced(*term, ctx) {
                return Ok(stale);
            }
            supervise(kv, ctx)
        }
        Command::AckNotifications { keys: ks } => {
            for k in ks {
                kv.delete(Table::Notifications, k.as_bytes().to_vec());
            }
            Ok(Outcome::Done)
        }
        Command::Purge {
            term,
            before_ms,
            records_before_ms,
            keep,
        } => {
            if let Some(stale) = fenced(*term, ctx) {
                return Ok(stale);
            }
            match keep.filter(|_| ctx.protocol >= 2) {
                Some(k) => purge(
                    kv,
                    ctx.now.saturating_sub(k.runs_ms as i64),
                    ctx.now.saturating_sub(k.records_ms as i64),
                    ctx.protocol,
                ),
                None => purge(kv, *before_ms, *records_before_ms, ctx.protocol),
            }
        }
        Command::RaiseProtocol { term, version } => {
            if let Some(stale) = fenced(*term, ctx) {
                return Ok(stale);
            }
            if *version > PROTOCOL_VERSION {
                // Applying on would split this replica from the others: stop here (the
                // node exits and waits for its upgrade).
                return Err(KvError::Storage(format!(
                    "the cluster raised its protocol to version {version}, but this binary \
                     applies up to version {PROTOCOL_VERSION}: upgrade this node"
                )));
            }
            if *version > ctx.protocol {
                kv.put(
                    Table::Counters,
                    clock::PROTOCOL.to_vec(),
                    u64::from(*version).to_be_bytes().to_vec(),
                );
                if ctx.protocol < 10 && *version >= 10 {
                    // Records from before have no time index: the purge scans for them
                    // until they are all past the retention.
                    kv.put(
                        Table::Counters,
                        clock::RECORDS_INDEXED_FROM.to_vec(),
                        keys::ordered_i64(ctx.now).to_vec(),
                    );
                }
                if ctx.protocol < 11 && *version >= 11 {
                    grant_shell_versions_from_before(kv)?;
                }
            }
            Ok(Outcome::ProtocolRaised {
                version: (*version).max(ctx.protocol),
            })
        }
    }
}

fn heartbeat(
    kv: &mut impl Kv,
    node: NodeId,
    incarnation: &str,
    slots: u32,
    running: &[AttemptRef],
    lease_ms: u64,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let nkey = keys::node(node);
    let known = get_json::<NodeInfo>(kv, Table::Nodes, &nkey)?;
    let restarted = known.as_ref().is_some_and(|k| k.incarnation != incarnation);
    if restarted {
        // The node restarted: whatever it was running died with it.
        let lost: Vec<(String, String)> = kv
            .scan_prefix(Table::Assignments, &keys::prefix(&[&node.to_be_bytes()]))?
            .into_iter()
            .filter_map(|(k, _)| {
                let rest = k.get(9..)?;
                let sep = rest.iter().position(|b| *b == 0)?;
                Some((
                    String::from_utf8_lossy(&rest[..sep]).into_owned(),
                    String::from_utf8_lossy(&rest[sep + 1..]).into_owned(),
                ))
            })
            .collect();
        for (run_id, task_id) in lost {
            let Some(run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
                continue;
            };
            let Some(attempt) = run.tasks.get(&task_id).map(|t| t.attempt) else {
                continue;
            };
            let a = AttemptRef {
                run_id,
                task_id,
                attempt,
            };
            let err = AttemptResult::Lost {
                error: format!("node {node} restarted while running it"),
            };
            end_attempt(kv, &a, node, &err, ctx)?;
            next_counter(kv, counters::ATTEMPTS_LOST)?;
        }
    }
    let mut info = get_json::<NodeInfo>(kv, Table::Nodes, &nkey)?.unwrap_or(NodeInfo {
        slots,
        last_seen_ms: ctx.now,
        running: 0,
        incarnation: incarnation.to_string(),
        lease_ms,
    });
    info.slots = slots;
    info.lease_ms = lease_ms;
    info.incarnation = incarnation.to_string();
    info.last_seen_ms = info.last_seen_ms.max(ctx.now);
    put_json(kv, Table::Nodes, nkey, &info);
    // Each run is read and written once however many of its attempts the node renews
    // (the same state as renewing them one by one: a renewal only raises a lease).
    let mut by_run: std::collections::BTreeMap<&str, Vec<&AttemptRef>> = Default::default();
    for a in running {
        by_run.entry(a.run_id.as_str()).or_default().push(a);
    }
    for (run_id, attempts) in by_run {
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        let mut renewed = false;
        for a in attempts {
            let Some(inst) = run.tasks.get_mut(&a.task_id) else {
                continue;
            };
            if inst.attempt != a.attempt || inst.state != TaskState::Running {
                continue;
            }
            if let Some(att) = inst
                .attempts
                .iter_mut()
                .find(|x| x.attempt == a.attempt && x.node == node)
            {
                att.lease_until_ms = att
                    .lease_until_ms
                    .max(ctx.now.saturating_add(lease_ms as i64));
                renewed = true;
            }
        }
        if renewed {
            save_run(kv, &mut run, None, ctx)?;
        }
    }
    if restarted && ctx.protocol >= 8 {
        // The slots its lost attempts held, handed on once the node's new record (its
        // slots, its lease) is written.
        hand_on_free_slots(kv, ctx)?;
    }
    Ok(Outcome::Done)
}
