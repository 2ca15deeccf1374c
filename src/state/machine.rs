//! The deterministic core of the state machine: how a committed [`Request`] changes the
//! replicated tables. It sees the tables only through [`Kv`], reads no clock, draws no
//! random numbers and does no I/O of its own; `raft::state_machine` runs it over RocksDB.
//!
//! Every scheduling decision is made here, at a position in the log, from replicated
//! facts only: which tasks are ready, which live node with free slots gets an attempt,
//! when a lease has expired, when a retry is due, when an SLA is missed. Actors propose
//! commands that say what happened (a window is due, an attempt ended, a node is alive,
//! time has passed) and never decide on their own.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::census::{DagView, RunView, TenantCounts, Usage};
use super::command::{
    AttemptRef, AttemptResult, Command, IdempotencyKey, Outcome, Quota, Request, Response,
};
use super::due::{DueIndex, Supervision};
use super::model::{
    ActiveEntry, Attempt, Dag, DagSpec, Millis, NodeInfo, Notification, Run, RunState, RunType,
    TaskInstance, TaskState, Window,
};
use super::progress;
use crate::raft::NodeId;

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
pub const PROTOCOL_VERSION: u32 = 6;

/// The replicated tables (one RocksDB column family each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `tenant \0 dag_id` → [`Dag`]
    Dags,
    /// `tenant \0 dag_id \0 version(be u64)` → [`DagSpec`]
    DagVersions,
    /// `run_id` → [`Run`]
    Runs,
    /// `tenant \0 dag_id \0 created \0 run_id` → empty (a DAG's runs in creation order)
    RunsByDag,
    /// `tenant \0 created \0 run_id` → empty (a tenant's runs in creation order)
    RunsByTenant,
    /// `tenant \0 dag_id \0 start \0 end` → run_id (one run per window)
    Windows,
    /// `tenant \0 dag_id \0 run_id` → [`ActiveEntry`] (runs not finished)
    ActiveRuns,
    /// `ended \0 run_id` → empty (finished runs by end time, for retention)
    FinishedRuns,
    /// `node(be u64) \0 run_id \0 task_id` → attempt (be u32): what each node must run
    Assignments,
    /// `node(be u64)` → [`NodeInfo`]
    Nodes,
    /// `tenant \0 dag_id` → last fired window end (be i64, ordered)
    Cursors,
    /// `run_id \0 event` → [`Notification`]
    Notifications,
    /// `tenant \0 key` → [`IdempotencyRecord`]
    Idempotency,
    /// `request_id` → [`RequestRecord`] (a retried write is answered, not re-applied)
    Requests,
    /// counter name → be u64
    Counters,
}

impl Table {
    pub const ALL: [Table; 15] = [
        Table::Dags,
        Table::DagVersions,
        Table::Runs,
        Table::RunsByDag,
        Table::RunsByTenant,
        Table::Windows,
        Table::ActiveRuns,
        Table::FinishedRuns,
        Table::Assignments,
        Table::Nodes,
        Table::Cursors,
        Table::Notifications,
        Table::Idempotency,
        Table::Requests,
        Table::Counters,
    ];

    /// The column family name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Dags => "dags",
            Table::DagVersions => "dag_versions",
            Table::Runs => "runs",
            Table::RunsByDag => "runs_by_dag",
            Table::RunsByTenant => "runs_by_tenant",
            Table::Windows => "windows",
            Table::ActiveRuns => "active_runs",
            Table::FinishedRuns => "finished_runs",
            Table::Assignments => "assignments",
            Table::Nodes => "nodes",
            Table::Cursors => "cursors",
            Table::Notifications => "notifications",
            Table::Idempotency => "idempotency",
            Table::Requests => "requests",
            Table::Counters => "counters",
        }
    }

    pub fn index(self) -> u8 {
        Table::ALL
            .iter()
            .position(|t| *t == self)
            .expect("every table is listed in Table::ALL") as u8
    }

    pub fn from_index(i: u8) -> Option<Table> {
        Table::ALL.get(i as usize).copied()
    }
}

/// Failure to read or decode replicated state: fatal for the node (openraft stops).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt value in table {table:?}: {source}")]
    Corrupt {
        table: Table,
        #[source]
        source: serde_json::Error,
    },
}

/// Key/value pairs, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Key/value access to the replicated tables, with read-your-writes inside one apply.
pub trait Kv {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>);
    fn delete(&mut self, table: Table, key: Vec<u8>);
    /// Every entry whose key starts with `prefix`, in key order, pending writes included.
    fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, KvError>;
    /// The keys under `prefix` that sort below `end`, in key order, pending writes
    /// included. This default reads the whole prefix; the state machine's store reads
    /// only the range.
    fn keys_below(&self, table: Table, prefix: &[u8], end: &[u8]) -> Result<Vec<Vec<u8>>, KvError> {
        Ok(self
            .scan_prefix(table, prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .take_while(|k| k.as_slice() < end)
            .collect())
    }
    /// What a supervise pass at `now` must look at ([`super::due`]), pending writes
    /// included. This default reads every active run; the state machine's store keeps the
    /// index as it writes and answers from it.
    fn supervision(&self, now: Millis) -> Result<Supervision, KvError> {
        let mut index = DueIndex::default();
        for (k, _) in self.scan_prefix(Table::ActiveRuns, b"")? {
            if let Some(bytes) = self.get(Table::Runs, keys::last_part(&k))? {
                index.run_change(None, RunView::decode(&bytes).as_ref());
            }
        }
        Ok(index.supervision(now))
    }
    /// What `tenant` holds against its quotas (and `dag_id`'s queued runs), pending
    /// writes included. This default reads the tenant's DAGs and unfinished runs; the
    /// state machine's store answers from counts it keeps as it writes.
    fn usage(&self, tenant: &str, dag_id: &str) -> Result<Usage, KvError> {
        let mut counts = TenantCounts::default();
        for (_, v) in self.scan_prefix(Table::Dags, &keys::prefix(&[tenant.as_bytes()]))? {
            counts.dag_change(None, DagView::decode(&v).as_ref());
        }
        for (k, _) in self.scan_prefix(Table::ActiveRuns, &keys::prefix(&[tenant.as_bytes()]))? {
            if let Some(bytes) = self.get(Table::Runs, keys::last_part(&k))? {
                counts.run_change(None, RunView::decode(&bytes).as_ref());
            }
        }
        Ok(counts.usage(tenant, dag_id))
    }
    /// Tenants with running runs (for the fair share of slots). This default reads every
    /// active run's entry; the state machine's store answers from its due index.
    fn working_tenants(&self) -> Result<std::collections::BTreeSet<String>, KvError> {
        let mut working = std::collections::BTreeSet::new();
        for (k, v) in self.scan_prefix(Table::ActiveRuns, b"")? {
            let e: ActiveEntry = decode(Table::ActiveRuns, &v)?;
            if e.state == RunState::Running {
                let tenant = k.split(|b| *b == 0).next().unwrap_or_default();
                working.insert(String::from_utf8_lossy(tenant).into_owned());
            }
        }
        Ok(working)
    }
}

/// A stored answer to an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub outcome: Outcome,
    pub created_ms: Millis,
}

/// A stored answer to a request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RequestRecord {
    pub outcome: Outcome,
    pub created_ms: Millis,
}

/// Key builders, shared with the read side.
pub mod keys {
    use super::Window;
    use crate::raft::NodeId;

    pub fn join(parts: &[&[u8]]) -> Vec<u8> {
        let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(p);
        }
        k
    }

    /// `parts` joined, with a trailing separator: the prefix of everything below them.
    pub fn prefix(parts: &[&[u8]]) -> Vec<u8> {
        let mut k = join(parts);
        k.push(0);
        k
    }

    pub fn dag(tenant: &str, dag_id: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes()])
    }

    pub fn dag_version(tenant: &str, dag_id: &str, version: u64) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes(), &version.to_be_bytes()])
    }

    pub fn window(tenant: &str, dag_id: &str, w: &Window) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            dag_id.as_bytes(),
            &ordered_i64(w.start_ms),
            &ordered_i64(w.end_ms),
        ])
    }

    pub fn run_by_dag(tenant: &str, dag_id: &str, created_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            dag_id.as_bytes(),
            &ordered_i64(created_ms),
            run_id.as_bytes(),
        ])
    }

    pub fn run_by_tenant(tenant: &str, created_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[
            tenant.as_bytes(),
            &ordered_i64(created_ms),
            run_id.as_bytes(),
        ])
    }

    pub fn active(tenant: &str, dag_id: &str, run_id: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), dag_id.as_bytes(), run_id.as_bytes()])
    }

    pub fn finished(ended_ms: i64, run_id: &str) -> Vec<u8> {
        join(&[&ordered_i64(ended_ms), run_id.as_bytes()])
    }

    pub fn assignment(node: NodeId, run_id: &str, task_id: &str) -> Vec<u8> {
        join(&[&node.to_be_bytes(), run_id.as_bytes(), task_id.as_bytes()])
    }

    pub fn node(node: NodeId) -> Vec<u8> {
        node.to_be_bytes().to_vec()
    }

    pub fn notification(run_id: &str, event: &str) -> Vec<u8> {
        join(&[run_id.as_bytes(), event.as_bytes()])
    }

    pub fn idempotency(tenant: &str, key: &str) -> Vec<u8> {
        join(&[tenant.as_bytes(), key.as_bytes()])
    }

    /// Big-endian with the sign bit flipped, so byte order is numeric order.
    pub fn ordered_i64(v: i64) -> [u8; 8] {
        ((v as u64) ^ (1 << 63)).to_be_bytes()
    }

    pub fn from_ordered_i64(b: &[u8]) -> Option<i64> {
        let arr: [u8; 8] = b.try_into().ok()?;
        Some((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
    }

    /// Split a key at its separators (ids never contain NUL; fixed-width parts might, so
    /// callers only split keys whose fixed-width parts come last or are handled apart).
    pub fn last_part(key: &[u8]) -> &[u8] {
        match key.iter().rposition(|b| *b == 0) {
            Some(i) => &key[i + 1..],
            None => key,
        }
    }
}

const RUN_SEQ: &[u8] = b"run_seq";

fn get_json<T: DeserializeOwned>(
    kv: &impl Kv,
    table: Table,
    key: &[u8],
) -> Result<Option<T>, KvError> {
    match kv.get(table, key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| KvError::Corrupt { table, source }),
    }
}

fn decode<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T, KvError> {
    serde_json::from_slice(bytes).map_err(|source| KvError::Corrupt { table, source })
}

fn put_json<T: Serialize>(kv: &mut impl Kv, table: Table, key: Vec<u8>, value: &T) {
    let bytes = serde_json::to_vec(value)
        .unwrap_or_else(|e| panic!("state values always serialise to JSON: {e}"));
    kv.put(table, key, bytes);
}

fn next_counter(kv: &mut impl Kv, name: &[u8]) -> Result<u64, KvError> {
    let current = match kv.get(Table::Counters, name)? {
        None => 0,
        Some(b) => {
            let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                KvError::Storage(format!(
                    "counter {} has {} bytes, expected 8",
                    String::from_utf8_lossy(name),
                    b.len()
                ))
            })?;
            u64::from_be_bytes(arr)
        }
    };
    let next = current + 1;
    kv.put(Table::Counters, name.to_vec(), next.to_be_bytes().to_vec());
    Ok(next)
}

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
}

/// The replicated protocol version (1 when never raised).
pub fn protocol_version(kv: &impl Kv) -> Result<u32, KvError> {
    Ok(read_u64(kv, clock::PROTOCOL)?.map_or(1, |v| v as u32))
}

fn read_u64(kv: &impl Kv, name: &[u8]) -> Result<Option<u64>, KvError> {
    kv.get(Table::Counters, name)?
        .map(|b| {
            <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    KvError::Storage(format!(
                        "counter {} holds {} bytes, expected 8",
                        String::from_utf8_lossy(name),
                        b.len()
                    ))
                })
        })
        .transpose()
}

fn read_i64(kv: &impl Kv, name: &[u8]) -> Result<Option<i64>, KvError> {
    Ok(kv
        .get(Table::Counters, name)?
        .and_then(|b| keys::from_ordered_i64(&b)))
}

/// Replicated clock records, kept in the counters table.
pub mod clock {
    /// The protocol version (be u64).
    pub const PROTOCOL: &[u8] = b"protocol";
    /// The cluster clock: the largest stamp applied so far (ordered i64 ms).
    pub const CLUSTER_TIME: &[u8] = b"cluster_time_ms";
    /// The term of the last applied request (be u64).
    pub const TERM: &[u8] = b"clock_term";
    /// Cluster time when that term's first request was applied (ordered i64 ms).
    pub const TERM_STARTED: &[u8] = b"clock_term_started_ms";
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
        // A quota refusal says "not now" (protocol 5): the client's key stays free, so a
        // retry with it once there is room is applied, not answered with the refusal.
        let keep_answer = !matches!(outcome, Outcome::QuotaExceeded { .. });
        if let Some(idem) = req.idempotency.as_ref().filter(|_| keep_answer) {
            let rec = IdempotencyRecord {
                fingerprint: idem.fingerprint.clone(),
                outcome: outcome.clone(),
                created_ms: ctx.now,
            };
            put_json(
                kv,
                Table::Idempotency,
                keys::idempotency(&idem.tenant, &idem.key),
                &rec,
            );
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
                put_version(kv, tenant, dag_id, dag.version, &dag.spec, ctx)?;
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
                ),
                None => purge(kv, *before_ms, *records_before_ms),
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
    if known.as_ref().is_some_and(|k| k.incarnation != incarnation) {
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
            finish_attempt(kv, &a, node, &err, ctx)?;
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
    for a in running {
        let Some(mut run) = get_json::<Run>(kv, Table::Runs, a.run_id.as_bytes())? else {
            continue;
        };
        let Some(inst) = run.tasks.get_mut(&a.task_id) else {
            continue;
        };
        if inst.attempt == a.attempt && inst.state == TaskState::Running {
            if let Some(att) = inst
                .attempts
                .iter_mut()
                .find(|x| x.attempt == a.attempt && x.node == node)
            {
                att.lease_until_ms = att
                    .lease_until_ms
                    .max(ctx.now.saturating_add(lease_ms as i64));
                save_run(kv, &mut run, None, ctx)?;
            }
        }
    }
    Ok(Outcome::Done)
}

fn live_dag(kv: &impl Kv, tenant: &str, dag_id: &str) -> Result<Option<Dag>, KvError> {
    Ok(get_json::<Dag>(kv, Table::Dags, &keys::dag(tenant, dag_id))?.filter(|d| !d.deleted))
}

fn put_dag(
    kv: &mut impl Kv,
    tenant: &str,
    spec: &DagSpec,
    expected_version: Option<u64>,
    subject: Option<&str>,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let now = ctx.now;
    let key = keys::dag(tenant, &spec.dag_id);
    let existing = get_json::<Dag>(kv, Table::Dags, &key)?;
    let current = existing.as_ref().map_or(0, |d| d.version);
    if let Some(expected) = expected_version {
        if expected != current {
            return Ok(Outcome::VersionConflict { expected, current });
        }
    }
    if let Some(d) = &existing {
        if !d.deleted && d.spec == *spec {
            return Ok(Outcome::DagPut {
                dag_id: spec.dag_id.clone(),
                version: d.version,
                changed: false,
            });
        }
    }
    if existing.as_ref().is_none_or(|d| d.deleted) {
        if let Some(q) = &ctx.quota {
            let usage = kv.usage(tenant, &spec.dag_id)?;
            if let Err(e) = crate::quota::check_new_dag(usage, tenant, q) {
                return Ok(Outcome::QuotaExceeded {
                    message: e.to_string(),
                });
            }
        }
    }
    let version = current + 1;
    let dag = Dag {
        tenant: tenant.to_string(),
        version,
        spec: spec.clone(),
        // A re-created DAG starts over from now (protocol 2): its schedule must not
        // reach back to the first incarnation's creation.
        created_ms: existing
            .as_ref()
            .filter(|d| !(d.deleted && ctx.protocol >= 2))
            .map_or(now, |d| d.created_ms),
        updated_ms: now,
        deleted: false,
        // Who created it: kept across updates; a re-created DAG starts over.
        created_by: match existing.as_ref().filter(|d| !d.deleted) {
            Some(d) => d.created_by.clone(),
            None => subject.map(str::to_string),
        },
        updated_by: subject.map(str::to_string),
    };
    put_json(kv, Table::Dags, key, &dag);
    put_version(kv, tenant, &spec.dag_id, version, spec, ctx)?;
    Ok(Outcome::DagPut {
        dag_id: spec.dag_id.clone(),
        version,
        changed: true,
    })
}

/// Whether a quota refuses a new run of `dag_id` (protocol ≥ 5). A run with a `window`
/// that already has its run creates nothing and is never refused.
fn refuse_new_run(
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

/// Store version `version` of a DAG. From protocol 5, with a quota, drop the versions
/// `dag_versions_kept` or more behind it, except those an unfinished run executes (they
/// go with a later write once their runs have finished).
fn put_version(
    kv: &mut impl Kv,
    tenant: &str,
    dag_id: &str,
    version: u64,
    spec: &DagSpec,
    ctx: Ctx,
) -> Result<(), KvError> {
    put_json(
        kv,
        Table::DagVersions,
        keys::dag_version(tenant, dag_id, version),
        spec,
    );
    let Some(q) = &ctx.quota else {
        return Ok(());
    };
    let Some(last_dropped) = version.checked_sub(q.dag_versions_kept.max(1)) else {
        return Ok(());
    };
    let prefix = keys::prefix(&[tenant.as_bytes(), dag_id.as_bytes()]);
    // Only the range to drop is read: the versions an unfinished run still holds, and
    // the one this write pushed out.
    let old = kv.keys_below(
        Table::DagVersions,
        &prefix,
        &keys::dag_version(tenant, dag_id, last_dropped.saturating_add(1)),
    )?;
    if old.is_empty() {
        return Ok(());
    }
    /// The one field of a stored run this needs (the rest is skipped, not built).
    #[derive(serde::Deserialize)]
    struct RunVersion {
        dag_version: u64,
    }
    let mut in_use = std::collections::BTreeSet::new();
    for (k, _) in kv.scan_prefix(Table::ActiveRuns, &prefix)? {
        if let Some(run) = get_json::<RunVersion>(kv, Table::Runs, keys::last_part(&k))? {
            in_use.insert(run.dag_version);
        }
    }
    for k in old {
        if version_of_key(&prefix, &k).is_some_and(|v| !in_use.contains(&v)) {
            kv.delete(Table::DagVersions, k);
        }
    }
    Ok(())
}

/// The version in a `DagVersions` key under `prefix` (the DAG's `tenant \0 dag_id \0`).
pub fn version_of_key(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The DAG definition a run executes (the version it started with).
fn run_spec(kv: &impl Kv, run: &Run) -> Result<DagSpec, KvError> {
    get_json::<DagSpec>(
        kv,
        Table::DagVersions,
        &keys::dag_version(&run.tenant, &run.dag_id, run.dag_version),
    )?
    .ok_or_else(|| {
        KvError::Storage(format!(
            "run {} refers to missing dag version {}",
            run.run_id, run.dag_version
        ))
    })
}

/// Persist a run and keep its indexes true: active-runs while unfinished, finished-runs
/// and the webhook notification when it has just finished.
fn save_run(
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

/// Mark the run's SLA missed if its deadline is before `at` (once; counted and notified).
/// Returns whether it was marked now.
fn mark_sla_missed(kv: &mut impl Kv, run: &mut Run, at: Millis) -> Result<bool, KvError> {
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

fn notify(kv: &mut impl Kv, run: &Run, event: &str) -> Result<(), KvError> {
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
enum Dedup {
    /// One run per `(dag, window)`: the window's record answers a second trigger.
    ByWindow,
    /// A new run every time (a manual run without a window, protocol ≥ 4).
    None,
}

fn create_run(
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

/// Live nodes with free slots, as the state machine knows them.
struct NodePool {
    nodes: Vec<(NodeId, NodeInfo)>,
    /// Protocol ≥ 3: placements respect each tenant's share of the slots.
    fair_share_on: bool,
    /// Loaded at the first placement that could happen (a ready task and a free slot),
    /// so applies that place nothing never pay for counting.
    fair: Option<FairShare>,
}

/// Who holds the executor slots, and how many one tenant may hold while others wait.
struct FairShare {
    /// Attempts assigned per tenant (on any node, live or not).
    running: std::collections::BTreeMap<String, u32>,
    /// `floor(live slots / tenants with running runs)`, at least 1.
    share: u32,
    /// Whether placements stop at the share (the supervise pass lifts it to fill).
    enforce: bool,
    /// Runs that had ready tasks left when their tenant reached its share.
    held: Vec<String>,
}

impl FairShare {
    fn load(kv: &impl Kv, live_slots: u32) -> Result<FairShare, KvError> {
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
        let tenants = (kv.working_tenants()?.len() as u32).max(1);
        Ok(FairShare {
            running,
            share: (live_slots / tenants).max(1),
            enforce: true,
            held: Vec::new(),
        })
    }

    fn at_share(&self, tenant: &str) -> bool {
        self.enforce && self.running.get(tenant).copied().unwrap_or(0) >= self.share
    }
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
fn release(kv: &mut impl Kv, node: NodeId, run_id: &str, task_id: &str) -> Result<(), KvError> {
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
fn assign_ready(
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
        let Some(inst) = run.tasks.get_mut(&task_id) else {
            continue;
        };
        if pool.fair_share_on && pool.fair.is_none() && pool.pick(None).is_some() {
            let live_slots = pool.nodes.iter().map(|(_, i)| i.slots).sum();
            pool.fair = Some(FairShare::load(kv, live_slots)?);
        }
        if let Some(fair) = pool.fair.as_mut() {
            if fair.at_share(&run.tenant) {
                fair.held.push(run.run_id.clone());
                break;
            }
        }
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
fn start_queued_runs(
    kv: &mut impl Kv,
    tenant: &str,
    dag_id: &str,
    max_active: u32,
    ctx: Ctx,
) -> Result<(), KvError> {
    let entries = kv.scan_prefix(
        Table::ActiveRuns,
        &keys::prefix(&[tenant.as_bytes(), dag_id.as_bytes()]),
    )?;
    let mut running = 0u32;
    let mut queued: Vec<(Millis, Millis, String)> = Vec::new();
    for (k, v) in entries {
        let e: ActiveEntry = decode(Table::ActiveRuns, &v)?;
        let run_id = String::from_utf8_lossy(keys::last_part(&k)).into_owned();
        match e.state {
            RunState::Running => running += 1,
            RunState::Queued => queued.push((e.window_start_ms, e.created_ms, run_id)),
            _ => {}
        }
    }
    if queued.is_empty() || running >= max_active {
        return Ok(());
    }
    queued.sort();
    let mut pool = NodePool::load(kv, ctx)?;
    for (_, _, run_id) in queued.into_iter().take((max_active - running) as usize) {
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
fn fail_attempt(
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

fn finish_attempt(
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

fn tenant_run(kv: &impl Kv, tenant: &str, run_id: &str) -> Result<Option<Run>, KvError> {
    Ok(get_json::<Run>(kv, Table::Runs, run_id.as_bytes())?.filter(|r| r.tenant == tenant))
}

fn cancel_run(kv: &mut impl Kv, tenant: &str, run_id: &str, ctx: Ctx) -> Result<Outcome, KvError> {
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
    save_run(kv, &mut run, Some(before), ctx)?;
    let spec = run_spec(kv, &run)?;
    start_queued_runs(kv, tenant, &run.dag_id, spec.max_active_runs, ctx)?;
    Ok(Outcome::RunCancelled {
        run_id: run_id.to_string(),
        state: RunState::Cancelled,
    })
}

fn retry_run(kv: &mut impl Kv, tenant: &str, run_id: &str, ctx: Ctx) -> Result<Outcome, KvError> {
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

/// The leader's periodic pass over every unfinished run.
/// One pass over the runs that are due ([`super::due`]): expire leases, place ready
/// tasks and retries, mark missed SLAs, then start queued runs where a place is free.
/// Runs that are not due would come out of it unchanged, so it leaves them unread.
fn supervise(kv: &mut impl Kv, ctx: Ctx) -> Result<Outcome, KvError> {
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

fn purge(
    kv: &mut impl Kv,
    before_ms: Millis,
    records_before_ms: Millis,
) -> Result<Outcome, KvError> {
    let mut runs = 0;
    for (k, _) in kv.scan_prefix(Table::FinishedRuns, b"")? {
        let Some(ended) = k.get(..8).and_then(keys::from_ordered_i64) else {
            continue;
        };
        if ended >= before_ms {
            break;
        }
        let run_id = String::from_utf8_lossy(&k[9.min(k.len())..]).into_owned();
        kv.delete(Table::FinishedRuns, k);
        let Some(run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        kv.delete(Table::Runs, run_id.as_bytes().to_vec());
        kv.delete(
            Table::Windows,
            keys::window(&run.tenant, &run.dag_id, &run.window),
        );
        kv.delete(
            Table::RunsByDag,
            keys::run_by_dag(&run.tenant, &run.dag_id, run.created_ms, &run_id),
        );
        kv.delete(
            Table::RunsByTenant,
            keys::run_by_tenant(&run.tenant, run.created_ms, &run_id),
        );
        for ev in ["success", "failure", "sla_miss"] {
            kv.delete(Table::Notifications, keys::notification(&run_id, ev));
        }
        runs += 1;
    }
    let mut records = 0;
    for (k, v) in kv.scan_prefix(Table::Requests, b"")? {
        let r: RequestRecord = decode(Table::Requests, &v)?;
        if r.created_ms < records_before_ms {
            kv.delete(Table::Requests, k);
            records += 1;
        }
    }
    for (k, v) in kv.scan_prefix(Table::Idempotency, b"")? {
        let r: IdempotencyRecord = decode(Table::Idempotency, &v)?;
        if r.created_ms < records_before_ms {
            kv.delete(Table::Idempotency, k);
            records += 1;
        }
    }
    Ok(Outcome::Purged { runs, records })
}

#[cfg(test)]
pub mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::command::{AttemptRef, Retention};
    use crate::state::model::{TaskKind, TaskSpec};

    /// An in-memory [`Kv`] for unit tests of the pure apply logic.
    #[derive(Default, Debug, PartialEq, Eq)]
    pub struct MemKv(pub BTreeMap<(Table, Vec<u8>), Vec<u8>>);

    impl Kv for MemKv {
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            Ok(self.0.get(&(table, key.to_vec())).cloned())
        }
        fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
            self.0.insert((table, key), value);
        }
        fn delete(&mut self, table: Table, key: Vec<u8>) {
            self.0.remove(&(table, key));
        }
        fn scan_prefix(
            &self,
            table: Table,
            prefix: &[u8],
        ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
            Ok(self
                .0
                .range((table, prefix.to_vec())..)
                .take_while(|((t, k), _)| *t == table && k.starts_with(prefix))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    pub fn spec(dag_id: &str) -> DagSpec {
        DagSpec {
            dag_id: dag_id.into(),
            schedule: Some("0 2 * * *".into()),
            timezone: "UTC".into(),
            owner: Some("team-data".into()),
            catchup: false,
            max_active_runs: 16,
            sla_ms: Some(60_000),
            paused: false,
            start_date_ms: None,
            end_date_ms: None,
            webhook: None,
            tasks: vec![TaskSpec {
                task_id: "extract".into(),
                kind: TaskKind::Noop,
                depends_on: vec![],
                retries: 0,
                retry_delay_ms: 1000,
                retry_exponential: false,
                max_retry_delay_ms: 60_000,
                timeout_ms: None,
            }],
        }
    }

    fn apply(kv: &mut MemKv, r: &Request) -> Result<Response, KvError> {
        apply_request(kv, r, 1)
    }

    pub fn req(id: &str, now: Millis, command: Command) -> Request {
        Request {
            request_id: id.into(),
            proposed_at_ms: now,
            idempotency: None,
            command,
            subject: None,
            quota: None,
        }
    }

    fn put(tenant: &str, dag: &str, expected: Option<u64>) -> Command {
        Command::PutDag {
            tenant: tenant.into(),
            spec: spec(dag),
            expected_version: expected,
        }
    }

    fn trigger(tenant: &str, dag: &str, start: i64, end: i64) -> Command {
        Command::TriggerRun {
            tenant: tenant.into(),
            dag_id: dag.into(),
            run_type: RunType::Backfill,
            window: Window {
                start_ms: start,
                end_ms: end,
            },
        }
    }

    #[test]
    fn same_window_returns_the_same_run() {
        let mut kv = MemKv::default();
        apply(&mut kv, &req("r1", 1, put("t", "d", None))).unwrap();
        let a = apply(&mut kv, &req("r2", 2, trigger("t", "d", 0, 10))).unwrap();
        let b = apply(&mut kv, &req("r3", 3, trigger("t", "d", 0, 10))).unwrap();
        let c = apply(&mut kv, &req("r4", 4, trigger("t", "d", 10, 20))).unwrap();
        let id = |r: &Response| match &r.outcome {
            Outcome::RunTriggered {
                run_id, existed, ..
            } => (run_id.clone(), *existed),
            o => panic!("unexpected {o:?}"),
        };
        assert_eq!(id(&a), ("run_1".to_string(), false));
        assert_eq!(id(&b), ("run_1".to_string(), true));
        assert_eq!(id(&c), ("run_2".to_string(), false));
    }

    #[test]
    fn a_retried_request_id_is_answered_not_reapplied() {
        let mut kv = MemKv::default();
        apply(&mut kv, &req("r1", 1, put("t", "d", None))).unwrap();
        let first = apply(&mut kv, &req("same", 2, trigger("t", "d", 0, 10))).unwrap();
        let mut changed = spec("d");
        changed.owner = Some("other".into());
        // Same id with another command: the stored answer wins, nothing is applied.
        let retry = apply(
            &mut kv,
            &req(
                "same",
                3,
                Command::PutDag {
                    tenant: "t".into(),
                    spec: changed,
                    expected_version: None,
                },
            ),
        )
        .unwrap();
        assert!(retry.replayed);
        assert_eq!(retry.outcome, first.outcome);
    }

    #[test]
    fn version_guard_and_unchanged_put() {
        let mut kv = MemKv::default();
        let v1 = apply(&mut kv, &req("a", 1, put("t", "d", Some(0)))).unwrap();
        assert!(matches!(
            v1.outcome,
            Outcome::DagPut {
                version: 1,
                changed: true,
                ..
            }
        ));
        let same = apply(&mut kv, &req("b", 2, put("t", "d", None))).unwrap();
        assert!(matches!(
            same.outcome,
            Outcome::DagPut {
                version: 1,
                changed: false,
                ..
            }
        ));
        let stale = apply(&mut kv, &req("c", 3, put("t", "d", Some(7)))).unwrap();
        assert_eq!(
            stale.outcome,
            Outcome::VersionConflict {
                expected: 7,
                current: 1
            }
        );
    }

    #[test]
    fn tenants_do_not_share_dags() {
        let mut kv = MemKv::default();
        apply(&mut kv, &req("a", 1, put("t1", "d", None))).unwrap();
        let r = apply(&mut kv, &req("b", 2, trigger("t2", "d", 0, 1))).unwrap();
        assert!(matches!(r.outcome, Outcome::NotFound { .. }));
    }

    #[test]
    fn idempotency_key_replays_or_rejects() {
        let mut kv = MemKv::default();
        apply(&mut kv, &req("a", 1, put("t", "d", None))).unwrap();
        let with_key = |id: &str, fp: &str, start: i64| Request {
            request_id: id.into(),
            proposed_at_ms: 5,
            idempotency: Some(IdempotencyKey {
                tenant: "t".into(),
                key: "k1".into(),
                fingerprint: fp.into(),
            }),
            command: trigger("t", "d", start, start + 1),
            subject: None,
            quota: None,
        };
        let first = apply(&mut kv, &with_key("x1", "f1", 0)).unwrap();
        let replay = apply(&mut kv, &with_key("x2", "f1", 0)).unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.outcome, first.outcome);
        let reused = apply(&mut kv, &with_key("x3", "f2", 100)).unwrap();
        assert!(matches!(
            reused.outcome,
            Outcome::IdempotencyKeyReused { .. }
        ));
    }

    #[test]
    fn from_protocol_4_manual_triggers_without_a_window_are_new_runs() {
        let manual = |window: Option<(i64, i64)>| Command::TriggerRun {
            tenant: "t".into(),
            dag_id: "d".into(),
            run_type: RunType::Manual,
            // The API sends a manual run without a window as [now, now] of its clock.
            window: window.map_or(
                Window {
                    start_ms: 7,
                    end_ms: 7,
                },
                |(s, e)| Window {
                    start_ms: s,
                    end_ms: e,
                },
            ),
        };
        let run_id = |r: Response| match r.outcome {
            Outcome::RunTriggered {
                run_id, existed, ..
            } => (run_id, existed),
            other => panic!("{other:?}"),
        };
        for protocol in [3, 4] {
            let mut kv = MemKv::default();
            let raise = Command::RaiseProtocol {
                term: 1,
                version: protocol,
            };
            apply(&mut kv, &req("raise", 0, raise)).unwrap();
            apply(&mut kv, &req("a", 1, put("t", "d", None))).unwrap();
            // Two triggers stamped in the same millisecond.
            let (first, _) = run_id(apply(&mut kv, &req("m1", 7, manual(None))).unwrap());
            let (second, existed) = run_id(apply(&mut kv, &req("m2", 7, manual(None))).unwrap());
            if protocol < 4 {
                assert_eq!(
                    (&first, existed),
                    (&second, true),
                    "protocol 3 shared the run"
                );
                continue;
            }
            assert_ne!(first, second, "two manual triggers, two runs");
            assert!(!existed);
            // A retry of the same request is still answered from its record.
            let (again, _) = run_id(apply(&mut kv, &req("m2", 8, manual(None))).unwrap());
            assert_eq!(again, second);
            // Each run's window is the cluster time it was applied at.
            assert_eq!(run(&kv, &second).window.start_ms, 7);
            // A manual run with a window is still one run per window.
            let (w1, _) = run_id(apply(&mut kv, &req("w1", 9, manual(Some((0, 10))))).unwrap());
            let (w2, existed) =
                run_id(apply(&mut kv, &req("w2", 9, manual(Some((0, 10))))).unwrap());
            assert_eq!((w1, existed), (w2, true));
        }
    }

    /// An empty state raised to `protocol`.
    fn at_protocol(protocol: u32) -> MemKv {
        let mut kv = MemKv::default();
        let raise = Command::RaiseProtocol {
            term: 1,
            version: protocol,
        };
        apply(&mut kv, &req("raise", 0, raise)).unwrap();
        kv
    }

    /// `r` carrying `quota`, as the API and the scheduler send it.
    fn with_quota(mut r: Request, quota: Quota) -> Request {
        r.quota = Some(quota);
        r
    }

    const QUOTA: Quota = Quota {
        max_dags: 2,
        max_active_runs: 100,
        max_queued_runs_per_dag: 2,
        dag_versions_kept: 2,
    };

    #[test]
    fn from_protocol_5_apply_holds_each_quota_counting_the_writes_before_it() {
        let windowless = || Command::TriggerRun {
            tenant: "t".into(),
            dag_id: "d".into(),
            run_type: RunType::Manual,
            window: Window {
                start_ms: 7,
                end_ms: 7,
            },
        };
        for protocol in [4, 5] {
            let mut kv = at_protocol(protocol);
            let mut one_at_a_time = spec("d");
            one_at_a_time.max_active_runs = 1;
            let put_d = Command::PutDag {
                tenant: "t".into(),
                spec: one_at_a_time,
                expected_version: None,
            };
            apply(&mut kv, &with_quota(req("p", 1, put_d), QUOTA)).unwrap();
            // One run starts, two queue, the fourth is one queued run too many.
            let outcomes: Vec<Outcome> = (0..4)
                .map(|i| {
                    let r = with_quota(req(&format!("m{i}"), 10 + i, windowless()), QUOTA);
                    apply(&mut kv, &r).unwrap().outcome
                })
                .collect();
            let refused = |o: &Outcome| matches!(o, Outcome::QuotaExceeded { .. });
            if protocol < 5 {
                assert!(!outcomes.iter().any(refused), "protocol 4 enforces nothing");
                continue;
            }
            assert!(!outcomes[..3].iter().any(refused), "{outcomes:?}");
            match &outcomes[3] {
                Outcome::QuotaExceeded { message } => {
                    assert!(message.contains("max_queued_runs_per_dag = 2"), "{message}")
                }
                o => panic!("the third queued run was let in: {o:?}"),
            }
            // The refused trigger's X-Request-Id stays free: the same key applies once
            // there is room (a refusal is "not now", not the key's answer).
            let mut keyed = with_quota(req("k1", 15, windowless()), QUOTA);
            keyed.idempotency = Some(IdempotencyKey {
                tenant: "t".into(),
                key: "retry-me".into(),
                fingerprint: "f".into(),
            });
            let o = apply(&mut kv, &keyed).unwrap();
            assert!(refused(&o.outcome), "{o:?}");
            let cancel = Command::CancelRun {
                tenant: "t".into(),
                run_id: "run_2".into(),
            };
            apply(&mut kv, &req("c0", 16, cancel)).unwrap();
            keyed.request_id = "k2".into();
            let o = apply(&mut kv, &keyed).unwrap();
            assert!(
                matches!(o.outcome, Outcome::RunTriggered { .. }) && !o.replayed,
                "the retry with the same key is applied: {o:?}"
            );
            // A refused window leaves the cursor where it was, and fires once there is room.
            let fire = Command::FireWindow {
                tenant: "t".into(),
                dag_id: "d".into(),
                window: Window {
                    start_ms: 0,
                    end_ms: 86_400_000,
                },
                term: 1,
            };
            let o = apply(&mut kv, &with_quota(req("f1", 20, fire.clone()), QUOTA)).unwrap();
            assert!(refused(&o.outcome), "{o:?}");
            assert_eq!(kv.get(Table::Cursors, &keys::dag("t", "d")).unwrap(), None);
            let cancel = Command::CancelRun {
                tenant: "t".into(),
                run_id: "run_3".into(),
            };
            apply(&mut kv, &req("c", 21, cancel)).unwrap();
            let o = apply(&mut kv, &with_quota(req("f2", 22, fire), QUOTA)).unwrap();
            assert!(
                matches!(o.outcome, Outcome::Fired { created: true, .. }),
                "{o:?}"
            );
            // DAGs: a third is refused; updating one of the two is not.
            let put = |dag: &str, owner: &str| {
                let mut s = spec(dag);
                s.owner = Some(owner.into());
                Command::PutDag {
                    tenant: "t".into(),
                    spec: s,
                    expected_version: None,
                }
            };
            let mut o = |id: &str, c| apply(&mut kv, &with_quota(req(id, 30, c), QUOTA)).unwrap();
            assert!(matches!(
                o("e", put("e", "a")).outcome,
                Outcome::DagPut { .. }
            ));
            match o("x", put("x", "a")).outcome {
                Outcome::QuotaExceeded { message } => {
                    assert!(message.contains("max_dags_per_tenant = 2"), "{message}")
                }
                other => panic!("a third DAG was let in: {other:?}"),
            }
            assert!(matches!(
                o("e2", put("e", "b")).outcome,
                Outcome::DagPut { .. }
            ));
            // Another tenant has its own count.
            let other = Command::PutDag {
                tenant: "u".into(),
                spec: spec("x"),
                expected_version: None,
            };
            assert!(matches!(o("u", other).outcome, Outcome::DagPut { .. }));
        }
    }

    #[test]
    fn from_protocol_5_old_versions_go_except_those_unfinished_runs_execute() {
        let versions = |kv: &MemKv| -> Vec<u64> {
            let prefix = keys::prefix(&[b"t", b"d"]);
            kv.scan_prefix(Table::DagVersions, &prefix)
                .unwrap()
                .iter()
                .filter_map(|(k, _)| version_of_key(&prefix, k))
                .collect()
        };
        for protocol in [4, 5] {
            let mut kv = at_protocol(protocol);
            let mut n = 0;
            let mut new_version = |kv: &mut MemKv| {
                n += 1;
                let mut s = spec("d");
                s.owner = Some(format!("owner-{n}"));
                let put = Command::PutDag {
                    tenant: "t".into(),
                    spec: s,
                    expected_version: None,
                };
                let o = apply(kv, &with_quota(req(&format!("v{n}"), n, put), QUOTA)).unwrap();
                assert!(matches!(o.outcome, Outcome::DagPut { .. }), "{o:?}");
            };
            new_version(&mut kv);
            // A run of version 1 is still running while versions 2, 3 and 4 are written.
            let o = apply(&mut kv, &req("run", 10, trigger("t", "d", 0, 10))).unwrap();
            assert!(matches!(o.outcome, Outcome::RunTriggered { .. }), "{o:?}");
            for _ in 0..3 {
                new_version(&mut kv);
            }
            if protocol < 5 {
                assert_eq!(versions(&kv), vec![1, 2, 3, 4], "protocol 4 keeps all");
                continue;
            }
            assert_eq!(versions(&kv), vec![1, 3, 4], "version 1 is in use");
            let cancel = Command::CancelRun {
                tenant: "t".into(),
                run_id: "run_1".into(),
            };
            apply(&mut kv, &req("c", 20, cancel)).unwrap();
            // Pausing writes a version too.
            let pause = Command::SetPaused {
                tenant: "t".into(),
                dag_id: "d".into(),
                paused: true,
            };
            apply(&mut kv, &with_quota(req("pause", 21, pause), QUOTA)).unwrap();
            assert_eq!(versions(&kv), vec![4, 5]);
            // The finished run's version is gone: a retry says so instead of failing apply.
            let retry = Command::RetryRun {
                tenant: "t".into(),
                run_id: "run_1".into(),
            };
            match apply(&mut kv, &req("retry", 22, retry)).unwrap().outcome {
                Outcome::InvalidState { message } => {
                    assert!(message.contains("max_dag_versions"), "{message}")
                }
                o => panic!("{o:?}"),
            }
        }
    }

    fn chain_spec(dag_id: &str, n: usize, retries: u32) -> DagSpec {
        let mut s = spec(dag_id);
        s.sla_ms = None;
        s.max_active_runs = 1;
        s.tasks = (0..n)
            .map(|i| TaskSpec {
                task_id: format!("t{i}"),
                kind: TaskKind::Noop,
                depends_on: if i == 0 {
                    vec![]
                } else {
                    vec![format!("t{}", i - 1)]
                },
                retries,
                retry_delay_ms: 100,
                retry_exponential: false,
                max_retry_delay_ms: 1000,
                timeout_ms: None,
            })
            .collect();
        s
    }

    fn heartbeat(node: u64, now: Millis) -> Request {
        req(
            &format!("hb{node}-{now}"),
            now,
            Command::Heartbeat {
                node,
                incarnation: "i1".into(),
                slots: 2,
                running: vec![],
                lease_ms: 1000,
            },
        )
    }

    fn run(kv: &MemKv, id: &str) -> Run {
        get_json::<Run>(kv, Table::Runs, id.as_bytes())
            .unwrap()
            .unwrap()
    }

    fn finish(
        kv: &mut MemKv,
        now: Millis,
        run_id: &str,
        task: &str,
        attempt: u32,
        node: u64,
        ok: bool,
    ) -> Outcome {
        let result = if ok {
            AttemptResult::Success { exit_code: Some(0) }
        } else {
            AttemptResult::Failed {
                exit_code: Some(1),
                error: "boom".into(),
            }
        };
        let cmd = Command::FinishAttempt {
            attempt: AttemptRef {
                run_id: run_id.into(),
                task_id: task.into(),
                attempt,
            },
            node,
            result,
        };
        apply(kv, &req(&format!("f{now}"), now, cmd))
            .unwrap()
            .outcome
    }

    fn setup_chain(n: usize, retries: u32) -> (MemKv, String) {
        let mut kv = MemKv::default();
        apply(&mut kv, &heartbeat(1, 0)).unwrap();
        let put = Command::PutDag {
            tenant: "t".into(),
            spec: chain_spec("c", n, retries),
            expected_version: None,
        };
        apply(&mut kv, &req("p", 0, put)).unwrap();
        let r = apply(&mut kv, &req("r", 1, trigger("t", "c", 0, 10))).unwrap();
        let Outcome::RunTriggered { run_id, .. } = r.outcome else {
            panic!("{r:?}")
        };
        (kv, run_id)
    }

    /// Ten independent tasks.
    fn wide_spec(dag_id: &str) -> DagSpec {
        let mut s = chain_spec(dag_id, 10, 0);
        for t in &mut s.tasks {
            t.depends_on.clear();
        }
        s
    }

    fn running_tasks(kv: &MemKv, id: &str) -> usize {
        run(kv, id)
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .count()
    }

    #[test]
    fn from_protocol_3_a_tenant_cannot_hold_every_slot_while_another_waits() {
        for protocol in [2, 3] {
            let mut kv = MemKv::default();
            let raise = Command::RaiseProtocol {
                term: 1,
                version: protocol,
            };
            apply(&mut kv, &req("raise", 0, raise)).unwrap();
            let hb = Command::Heartbeat {
                node: 1,
                incarnation: "i1".into(),
                slots: 4,
                running: vec![],
                lease_ms: 10_000,
            };
            apply(&mut kv, &req("hb", 0, hb)).unwrap();
            let mut runs = Vec::new();
            for tenant in ["a", "b"] {
                let put = Command::PutDag {
                    tenant: tenant.into(),
                    spec: wide_spec("w"),
                    expected_version: None,
                };
                apply(&mut kv, &req(&format!("p{tenant}"), 0, put)).unwrap();
                let r = apply(
                    &mut kv,
                    &req(&format!("t{tenant}"), 1, trigger(tenant, "w", 0, 10)),
                )
                .unwrap();
                let Outcome::RunTriggered { run_id, .. } = r.outcome else {
                    panic!("{r:?}")
                };
                runs.push(run_id);
            }
            let (a, b) = (&runs[0], &runs[1]);
            // Tenant a came first and took every slot.
            assert_eq!(running_tasks(&kv, a), 4, "protocol {protocol}");
            assert_eq!(running_tasks(&kv, b), 0, "protocol {protocol}");
            finish(&mut kv, 2, a, "t0", 1, 1, true);
            finish(&mut kv, 3, a, "t1", 1, 1, true);
            apply(&mut kv, &req("sup", 4, Command::Supervise { term: 1 })).unwrap();
            let (ra, rb) = (running_tasks(&kv, a), running_tasks(&kv, b));
            if protocol < 3 {
                // Before: a's freed slots went straight back to a; b starves.
                assert_eq!((ra, rb), (4, 0));
            } else {
                assert_eq!((ra, rb), (2, 2), "each tenant holds half of the 4 slots");
                // When b has nothing left to run, a gets the slots back (work-conserving).
                let cancel = Command::CancelRun {
                    tenant: "b".into(),
                    run_id: b.clone(),
                };
                apply(&mut kv, &req("cancel", 5, cancel)).unwrap();
                apply(&mut kv, &req("sup2", 6, Command::Supervise { term: 1 })).unwrap();
                assert_eq!(running_tasks(&kv, a), 4);
            }
        }
    }

    #[test]
    fn a_chain_runs_task_by_task_to_done() {
        let (mut kv, id) = setup_chain(3, 0);
        assert_eq!(run(&kv, &id).state, RunState::Running);
        for (i, now) in [(0, 2), (1, 3), (2, 4)] {
            let t = format!("t{i}");
            assert_eq!(
                run(&kv, &id).tasks[&t].state,
                TaskState::Running,
                "t{i} assigned"
            );
            let o = finish(&mut kv, now, &id, &t, 1, 1, true);
            assert!(
                matches!(
                    o,
                    Outcome::AttemptFinished {
                        task_state: TaskState::Done,
                        ..
                    }
                ),
                "{o:?}"
            );
        }
        let r = run(&kv, &id);
        assert_eq!(r.state, RunState::Done);
        assert!(kv.scan_prefix(Table::ActiveRuns, b"").unwrap().is_empty());
        assert!(kv.scan_prefix(Table::Assignments, b"").unwrap().is_empty());
        let info: NodeInfo = get_json(&kv, Table::Nodes, &keys::node(1))
            .unwrap()
            .unwrap();
        assert_eq!(info.running, 0, "slots given back");
    }

    #[test]
    fn stale_attempts_are_fenced_and_failures_retry_then_fail() {
        let (mut kv, id) = setup_chain(2, 1);
        // Wrong attempt number and wrong node are both rejected.
        assert!(matches!(
            finish(&mut kv, 2, &id, "t0", 2, 1, true),
            Outcome::StaleAttempt { current: 1 }
        ));
        assert!(matches!(
            finish(&mut kv, 2, &id, "t0", 1, 9, true),
            Outcome::StaleAttempt { .. }
        ));
        // Attempt 1 fails: retrying after the delay.
        finish(&mut kv, 3, &id, "t0", 1, 1, false);
        let r = run(&kv, &id);
        assert_eq!(r.tasks["t0"].state, TaskState::Retrying);
        assert_eq!(r.tasks["t0"].next_try_ms, Some(103));
        // A late report of attempt 1 is stale now.
        assert!(matches!(
            finish(&mut kv, 4, &id, "t0", 1, 1, true),
            Outcome::StaleAttempt { .. }
        ));
        // Supervise after the delay assigns attempt 2.
        apply(&mut kv, &heartbeat(1, 100)).unwrap();
        apply(&mut kv, &req("s", 104, Command::Supervise { term: 1 })).unwrap();
        assert_eq!(run(&kv, &id).tasks["t0"].attempt, 2);
        finish(&mut kv, 105, &id, "t0", 2, 1, false);
        let r = run(&kv, &id);
        assert_eq!(r.tasks["t0"].state, TaskState::Failed);
        assert_eq!(r.tasks["t1"].state, TaskState::UpstreamFailed);
        assert_eq!(r.state, RunState::Failed);
    }

    #[test]
    fn expired_leases_retry_elsewhere_and_stale_terms_are_ignored() {
        let (mut kv, id) = setup_chain(1, 0);
        apply(&mut kv, &heartbeat(2, 1)).unwrap();
        let stale = apply_request(
            &mut kv,
            &req("s0", 50_000, Command::Supervise { term: 1 }),
            2,
        )
        .unwrap();
        assert!(matches!(stale.outcome, Outcome::StaleTerm { .. }));
        // Node 1 stops heartbeating; node 2 keeps going; node 1's lease (1 s) expires.
        apply(&mut kv, &heartbeat(2, 16_000)).unwrap();
        apply(&mut kv, &req("s1", 16_001, Command::Supervise { term: 1 })).unwrap();
        let r = run(&kv, &id);
        let t = &r.tasks["t0"];
        assert_eq!(t.attempt, 2, "lost attempt retried as attempt 2");
        assert_eq!(t.attempts[0].node, 1);
        assert_eq!(t.attempts[1].node, 2, "on the live node");
        assert_eq!(t.state, TaskState::Running);
        assert!(matches!(
            finish(&mut kv, 16_002, &id, "t0", 1, 1, true),
            Outcome::StaleAttempt { current: 2 }
        ));
        finish(&mut kv, 16_003, &id, "t0", 2, 2, true);
        assert_eq!(run(&kv, &id).state, RunState::Done);
    }

    #[test]
    fn fire_window_dedups_and_advances_the_cursor() {
        let mut kv = MemKv::default();
        apply(&mut kv, &req("p", 0, put("t", "d", None))).unwrap();
        let fire = |id: &str, s: i64, e: i64| {
            req(
                id,
                5,
                Command::FireWindow {
                    tenant: "t".into(),
                    dag_id: "d".into(),
                    window: Window {
                        start_ms: s,
                        end_ms: e,
                    },
                    term: 1,
                },
            )
        };
        let a = apply(&mut kv, &fire("a", 0, 10)).unwrap().outcome;
        let b = apply(&mut kv, &fire("b", 0, 10)).unwrap().outcome;
        assert!(matches!(a, Outcome::Fired { created: true, .. }));
        assert!(matches!(b, Outcome::Fired { created: false, .. }));
        let c = kv
            .get(Table::Cursors, &keys::dag("t", "d"))
            .unwrap()
            .unwrap();
        assert_eq!(keys::from_ordered_i64(&c), Some(10));
    }

    #[test]
    fn max_active_runs_queues_in_window_order_and_cancel_frees_the_slot() {
        let (mut kv, first) = setup_chain(1, 0);
        let second = match apply(&mut kv, &req("r2", 2, trigger("t", "c", 20, 30)))
            .unwrap()
            .outcome
        {
            Outcome::RunTriggered { run_id, state, .. } => {
                assert_eq!(state, RunState::Queued);
                run_id
            }
            o => panic!("{o:?}"),
        };
        let cancel = Command::CancelRun {
            tenant: "t".into(),
            run_id: first.clone(),
        };
        apply(&mut kv, &req("c", 3, cancel)).unwrap();
        assert_eq!(run(&kv, &first).state, RunState::Cancelled);
        assert_eq!(
            run(&kv, &second).state,
            RunState::Running,
            "next queued run starts"
        );
        let retry = Command::RetryRun {
            tenant: "t".into(),
            run_id: first.clone(),
        };
        let o = apply(&mut kv, &req("rr", 4, retry)).unwrap().outcome;
        assert!(matches!(o, Outcome::RunRetried { tasks: 1, .. }), "{o:?}");
        assert_eq!(
            run(&kv, &first).state,
            RunState::Queued,
            "waits for the running one"
        );
    }

    #[test]
    fn a_restarted_node_loses_its_old_attempts() {
        let (mut kv, id) = setup_chain(1, 0);
        assert_eq!(run(&kv, &id).tasks["t0"].attempts[0].node, 1);
        let hb = Command::Heartbeat {
            node: 1,
            incarnation: "i2".into(),
            slots: 2,
            running: vec![],
            lease_ms: 1000,
        };
        apply(&mut kv, &req("hb-new", 5, hb)).unwrap();
        let t = &run(&kv, &id).tasks["t0"];
        assert_eq!(t.attempts[0].state, TaskState::Failed);
        assert_eq!(t.attempt, 2, "retried at once as attempt 2");
        assert_eq!(t.state, TaskState::Running);
    }

    #[test]
    fn supervise_marks_sla_misses_and_purge_drops_old_history() {
        let mut kv = MemKv::default();
        let mut sp = chain_spec("slow", 1, 0);
        sp.sla_ms = Some(1000);
        sp.webhook = Some("http://127.0.0.1:1/hook".into());
        apply(&mut kv, &heartbeat(1, 0)).unwrap();
        let put = Command::PutDag {
            tenant: "t".into(),
            spec: sp,
            expected_version: None,
        };
        apply(&mut kv, &req("p", 0, put)).unwrap();
        let id = match apply(&mut kv, &req("r", 10, trigger("t", "slow", 0, 5)))
            .unwrap()
            .outcome
        {
            Outcome::RunTriggered { run_id, .. } => run_id,
            o => panic!("{o:?}"),
        };
        assert_eq!(
            run(&kv, &id).sla_deadline_ms,
            Some(1010),
            "backfill: creation + sla"
        );
        apply(&mut kv, &heartbeat(1, 900)).unwrap();
        apply(&mut kv, &req("s1", 1000, Command::Supervise { term: 1 })).unwrap();
        assert!(!run(&kv, &id).sla_missed, "not yet");
        apply(&mut kv, &heartbeat(1, 1900)).unwrap();
        apply(&mut kv, &req("s2", 2000, Command::Supervise { term: 1 })).unwrap();
        assert!(run(&kv, &id).sla_missed);
        let counter = kv
            .get(Table::Counters, counters::SLA_MISSED)
            .unwrap()
            .unwrap();
        assert_eq!(u64::from_be_bytes(counter.try_into().unwrap()), 1);
        assert!(kv
            .get(Table::Notifications, &keys::notification(&id, "sla_miss"))
            .unwrap()
            .is_some());
        // The heartbeats above renewed nothing, so attempt 1's lease ran out at 2000 and
        // the task is on attempt 2 now: finish that one.
        let current = run(&kv, &id).tasks["t0"].attempt;
        assert_eq!(current, 2);
        finish(&mut kv, 2100, &id, "t0", current, 1, true);
        assert_eq!(run(&kv, &id).state, RunState::Done);
        // Purge before the end keeps it; purge after drops the run and its indexes.
        let purge = |before| Command::Purge {
            keep: None,
            term: 1,
            before_ms: before,
            records_before_ms: before,
        };
        let o = apply(&mut kv, &req("g1", 3000, purge(2000)))
            .unwrap()
            .outcome;
        assert!(matches!(o, Outcome::Purged { runs: 0, .. }), "{o:?}");
        let o = apply(&mut kv, &req("g2", 9000, purge(5000)))
            .unwrap()
            .outcome;
        assert!(matches!(o, Outcome::Purged { runs: 1, .. }), "{o:?}");
        assert!(kv.get(Table::Runs, id.as_bytes()).unwrap().is_none());
        for t in [
            Table::Windows,
            Table::RunsByDag,
            Table::RunsByTenant,
            Table::FinishedRuns,
            Table::Notifications,
            Table::Requests,
        ] {
            assert!(kv.scan_prefix(t, b"").unwrap().is_empty(), "{t:?} emptied");
        }
    }

    /// Raise the replicated protocol to 2 (term 1), as the leader does on a new cluster.
    fn v2(kv: &mut MemKv) {
        let r = apply(
            kv,
            &req(
                "raise",
                0,
                Command::RaiseProtocol {
                    term: 1,
                    version: 2,
                },
            ),
        )
        .unwrap();
        assert_eq!(r.outcome, Outcome::ProtocolRaised { version: 2 });
        assert_eq!(protocol_version(kv).unwrap(), 2);
    }

    fn fire(id: &str, now: Millis, dag: &str, s: i64, e: i64) -> Request {
        req(
            id,
            now,
            Command::FireWindow {
                tenant: "t".into(),
                dag_id: dag.into(),
                window: Window {
                    start_ms: s,
                    end_ms: e,
                },
                term: 1,
            },
        )
    }

    #[test]
    fn a_protocol_newer_than_the_binary_stops_apply_instead_of_diverging() {
        let mut kv = MemKv::default();
        let too_new = Command::RaiseProtocol {
            term: 1,
            version: PROTOCOL_VERSION + 1,
        };
        let err = apply(&mut kv, &req("x", 0, too_new)).unwrap_err();
        assert!(err.to_string().contains("upgrade this node"), "{err}");
        assert_eq!(protocol_version(&kv).unwrap(), 1, "nothing applied");
        // A stale term's raise changes nothing either.
        let stale = Command::RaiseProtocol {
            term: 0,
            version: 2,
        };
        let o = apply(&mut kv, &req("y", 0, stale)).unwrap().outcome;
        assert!(matches!(o, Outcome::StaleTerm { .. }), "{o:?}");
        assert_eq!(protocol_version(&kv).unwrap(), 1);
    }

    #[test]
    fn the_cluster_clock_never_goes_back_and_no_lease_is_born_expired() {
        for protocol in [1, 2] {
            let mut kv = MemKv::default();
            if protocol == 2 {
                v2(&mut kv);
            }
            apply(&mut kv, &heartbeat(1, 50_000)).unwrap();
            let put = Command::PutDag {
                tenant: "t".into(),
                spec: chain_spec("c", 1, 0),
                expected_version: None,
            };
            apply(&mut kv, &req("p", 50_000, put)).unwrap();
            // A request stamped by a node whose clock is 40 s behind.
            let o = apply(&mut kv, &req("r", 10_000, trigger("t", "c", 0, 10)))
                .unwrap()
                .outcome;
            let Outcome::RunTriggered { run_id, .. } = o else {
                panic!("{o:?}")
            };
            let r = run(&kv, &run_id);
            let lease_until = r.tasks["t0"].attempts[0].lease_until_ms;
            if protocol == 2 {
                assert_eq!(r.created_ms, 50_000, "cluster time, not the stale stamp");
                assert_eq!(lease_until, 51_000, "a full lease from cluster time");
            } else {
                assert!(
                    lease_until < 50_000,
                    "protocol 1: born expired ({lease_until})"
                );
            }
        }
    }

    #[test]
    fn a_new_term_with_a_clock_ahead_waits_a_full_lease_before_expiring() {
        for protocol in [1, 2] {
            let mut kv = MemKv::default();
            if protocol == 2 {
                v2(&mut kv);
            }
            apply(&mut kv, &heartbeat(1, 0)).unwrap();
            apply(&mut kv, &heartbeat(2, 0)).unwrap();
            let put = Command::PutDag {
                tenant: "t".into(),
                spec: chain_spec("c", 1, 0),
                expected_version: None,
            };
            apply(&mut kv, &req("p", 0, put)).unwrap();
            let o = apply(&mut kv, &req("r", 1, trigger("t", "c", 0, 10)))
                .unwrap()
                .outcome;
            let Outcome::RunTriggered { run_id, .. } = o else {
                panic!("{o:?}")
            };
            // Term 2's leader runs 60 s ahead: its first pass must not expire the lease
            // (node 1 may still be inside its self-fencing window).
            let s = |id: &str, now: Millis| req(id, now, Command::Supervise { term: 2 });
            apply_request(
                &mut kv,
                &req("hb2", 60_000, heartbeat(2, 60_000).command),
                2,
            )
            .unwrap();
            apply_request(&mut kv, &s("s1", 60_001), 2).unwrap();
            let attempt = run(&kv, &run_id).tasks["t0"].attempt;
            if protocol == 1 {
                assert_eq!(attempt, 2, "protocol 1 expires at once");
                continue;
            }
            assert_eq!(attempt, 1, "not expired within the new term's first lease");
            apply_request(
                &mut kv,
                &req("hb3", 61_000, heartbeat(2, 61_000).command),
                2,
            )
            .unwrap();
            apply_request(&mut kv, &s("s2", 61_002), 2).unwrap();
            let t = &run(&kv, &run_id).tasks["t0"];
            assert_eq!(t.attempt, 2, "expired after a full lease of term 2");
            assert_eq!(t.attempts[1].node, 2);
        }
    }

    #[test]
    fn a_fired_window_never_fires_again_after_purge_or_delete_and_recreate() {
        for protocol in [1, 2] {
            let mut kv = MemKv::default();
            if protocol == 2 {
                v2(&mut kv);
            }
            apply(&mut kv, &heartbeat(1, 0)).unwrap();
            let put = |id: &str, now| {
                req(
                    id,
                    now,
                    Command::PutDag {
                        tenant: "t".into(),
                        spec: chain_spec("c", 1, 0),
                        expected_version: None,
                    },
                )
            };
            apply(&mut kv, &put("p1", 0)).unwrap();
            let o = apply(&mut kv, &fire("f1", 1, "c", 0, 10)).unwrap().outcome;
            let Outcome::Fired {
                run_id,
                created: true,
            } = o
            else {
                panic!("{o:?}")
            };
            finish(&mut kv, 2, &run_id, "t0", 1, 1, true);
            let purge = Command::Purge {
                term: 1,
                before_ms: 1_000,
                records_before_ms: 0,
                keep: Some(Retention {
                    runs_ms: 100,
                    records_ms: 1_000_000,
                }),
            };
            let o = apply(&mut kv, &req("purge", 1_000, purge)).unwrap().outcome;
            assert!(matches!(o, Outcome::Purged { runs: 1, .. }), "{o:?}");
            let again = apply(&mut kv, &fire("f2", 1_001, "c", 0, 10))
                .unwrap()
                .outcome;
            if protocol == 1 {
                assert!(
                    matches!(again, Outcome::Fired { created: true, .. }),
                    "protocol 1 fires a purged window twice: {again:?}"
                );
                continue;
            }
            assert_eq!(again, Outcome::AlreadyFired { watermark: 10 });
            // Delete and re-create: the watermark holds, creation time is new.
            let del = Command::DeleteDag {
                tenant: "t".into(),
                dag_id: "c".into(),
            };
            apply(&mut kv, &req("del", 2_000, del)).unwrap();
            apply(&mut kv, &put("p2", 3_000)).unwrap();
            let dag: Dag = get_json(&kv, Table::Dags, &keys::dag("t", "c"))
                .unwrap()
                .unwrap();
            assert_eq!(dag.created_ms, 3_000, "re-created now, not at 0");
            let o = apply(&mut kv, &fire("f3", 3_001, "c", 0, 10))
                .unwrap()
                .outcome;
            assert_eq!(o, Outcome::AlreadyFired { watermark: 10 });
            let o = apply(&mut kv, &fire("f4", 3_002, "c", 10, 20))
                .unwrap()
                .outcome;
            assert!(matches!(o, Outcome::Fired { created: true, .. }), "{o:?}");
        }
    }

    #[test]
    fn purge_cutoffs_come_from_the_cluster_clock() {
        let mut kv = MemKv::default();
        v2(&mut kv);
        apply(&mut kv, &req("p", 100_000, put("t", "d", None))).unwrap();
        // A leader whose clock is far behind proposes absolute cutoffs from its clock;
        // protocol 2 uses the retentions against the cluster clock instead.
        let purge = Command::Purge {
            term: 1,
            before_ms: i64::MAX,
            records_before_ms: i64::MAX,
            keep: Some(Retention {
                runs_ms: 1_000,
                records_ms: 1_000,
            }),
        };
        let o = apply(&mut kv, &req("x", 50_000, purge)).unwrap().outcome;
        assert_eq!(
            o,
            Outcome::Purged {
                runs: 0,
                records: 0
            },
            "nothing early"
        );
        assert!(kv.get(Table::Requests, b"p").unwrap().is_some());
    }

    #[test]
    fn a_retried_run_gets_its_retries_again_and_is_counted_once() {
        let (mut kv, id) = setup_chain(1, 1);
        v2(&mut kv);
        let failed = |kv: &MemKv| read_u64(kv, counters::RUNS_FAILED).unwrap();
        finish(&mut kv, 2, &id, "t0", 1, 1, false);
        apply(&mut kv, &heartbeat(1, 200)).unwrap();
        apply(&mut kv, &req("s", 200, Command::Supervise { term: 1 })).unwrap();
        finish(&mut kv, 201, &id, "t0", 2, 1, false);
        assert_eq!(run(&kv, &id).state, RunState::Failed);
        assert_eq!(failed(&kv), Some(1));
        let retry = Command::RetryRun {
            tenant: "t".into(),
            run_id: id.clone(),
        };
        apply(&mut kv, &req("rr", 300, retry)).unwrap();
        // Attempt 3 fails: with its retries given back it is retried, not failed.
        finish(&mut kv, 301, &id, "t0", 3, 1, false);
        let t = &run(&kv, &id).tasks["t0"];
        assert_eq!(t.state, TaskState::Retrying, "full retries again");
        apply(&mut kv, &heartbeat(1, 500)).unwrap();
        apply(&mut kv, &req("s2", 500, Command::Supervise { term: 1 })).unwrap();
        finish(&mut kv, 501, &id, "t0", 4, 1, false);
        assert_eq!(run(&kv, &id).state, RunState::Failed);
        assert_eq!(failed(&kv), Some(1), "a retried run is not counted twice");
        assert_eq!(read_u64(&kv, counters::RUNS_RETRIED).unwrap(), Some(1));
    }

    #[test]
    fn sla_misses_while_queued_or_between_passes_are_marked() {
        for protocol in [1, 2] {
            let mut kv = MemKv::default();
            if protocol == 2 {
                v2(&mut kv);
            }
            let mut sp = chain_spec("q", 1, 0);
            sp.sla_ms = Some(1_000);
            sp.webhook = Some("http://127.0.0.1:1/hook".into());
            apply(&mut kv, &heartbeat(1, 0)).unwrap();
            let put = Command::PutDag {
                tenant: "t".into(),
                spec: sp,
                expected_version: None,
            };
            apply(&mut kv, &req("p", 0, put)).unwrap();
            let id = |o: Outcome| match o {
                Outcome::RunTriggered { run_id, .. } => run_id,
                o => panic!("{o:?}"),
            };
            let first = id(apply(&mut kv, &req("a", 1, trigger("t", "q", 0, 10)))
                .unwrap()
                .outcome);
            let queued = id(apply(&mut kv, &req("b", 1, trigger("t", "q", 10, 20)))
                .unwrap()
                .outcome);
            // The first run ends past its deadline (1,001) before any pass saw it late.
            finish(&mut kv, 1_005, &first, "t0", 1, 1, true);
            let r = run(&kv, &first);
            assert_eq!(r.state, RunState::Done);
            assert_eq!(r.sla_missed, protocol == 2, "ended late between passes");
            // Make the second run wait in the queue past its deadline: it started when
            // the first ended, so cancel it and queue a third behind a long first task.
            let _ = queued;
            let third = id(apply(&mut kv, &req("c", 1_100, trigger("t", "q", 20, 30)))
                .unwrap()
                .outcome);
            assert_eq!(
                run(&kv, &third).state,
                RunState::Queued,
                "behind max_active_runs"
            );
            apply(&mut kv, &heartbeat(1, 2_200)).unwrap();
            apply(&mut kv, &req("s", 2_200, Command::Supervise { term: 1 })).unwrap();
            let r = run(&kv, &third);
            assert_eq!(r.state, RunState::Queued);
            assert_eq!(r.sla_missed, protocol == 2, "queued past its deadline");
            let notified = kv
                .get(
                    Table::Notifications,
                    &keys::notification(&third, "sla_miss"),
                )
                .unwrap()
                .is_some();
            assert_eq!(notified, protocol == 2);
        }
    }

    /// What supervise read before the due index: every active run, and every DAG with
    /// active runs for starting queued ones. The index must change exactly what this did.
    #[derive(Default, Debug)]
    struct FullScanKv(MemKv);

    impl Kv for FullScanKv {
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            self.0.get(table, key)
        }
        fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
            self.0.put(table, key, value)
        }
        fn delete(&mut self, table: Table, key: Vec<u8>) {
            self.0.delete(table, key)
        }
        fn scan_prefix(&self, table: Table, prefix: &[u8]) -> Result<Entries, KvError> {
            self.0.scan_prefix(table, prefix)
        }
        fn supervision(&self, _now: Millis) -> Result<Supervision, KvError> {
            let mut sup = Supervision::default();
            let mut dags = std::collections::BTreeSet::new();
            for (k, _) in self.0.scan_prefix(Table::ActiveRuns, b"")? {
                let mut parts = k.split(|b| *b == 0).map(|p| String::from_utf8_lossy(p));
                let (Some(t), Some(d), Some(id)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                sup.runs.push(id.into_owned());
                dags.insert((t.into_owned(), d.into_owned()));
            }
            let always = crate::state::due::Load {
                queued: 1,
                running: 0,
            };
            sup.queued_dags = dags.into_iter().map(|k| (k, always)).collect();
            Ok(sup)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put {
            dag: u8,
            wide: bool,
            max_active: u32,
            sla: bool,
            retries: u32,
        },
        Trigger {
            dag: u8,
            window: i64,
        },
        Heartbeat {
            node: u64,
            renew: bool,
        },
        Finish {
            pick: usize,
            ok: bool,
        },
        Cancel {
            pick: usize,
        },
        Supervise,
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = (Op, i64)> {
        use proptest::prelude::*;
        let op = prop_oneof![
            (0u8..2, any::<bool>(), 1u32..3, any::<bool>(), 0u32..2).prop_map(
                |(dag, wide, max_active, sla, retries)| Op::Put {
                    dag,
                    wide,
                    max_active,
                    sla,
                    retries
                }
            ),
            (0u8..2, 0i64..8).prop_map(|(dag, window)| Op::Trigger { dag, window }),
            (1u64..3, any::<bool>()).prop_map(|(node, renew)| Op::Heartbeat { node, renew }),
            (any::<usize>(), any::<bool>()).prop_map(|(pick, ok)| Op::Finish { pick, ok }),
            any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            Just(Op::Supervise),
            Just(Op::Supervise),
        ];
        (op, 0i64..1500)
    }

    /// Turn an abstract op into a request against the current state of `kv`.
    fn concrete(kv: &MemKv, op: &Op, n: usize, now: Millis) -> Option<Request> {
        let assignments: Vec<(u64, AttemptRef)> = kv
            .scan_prefix(Table::Assignments, b"")
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| {
                let node = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
                let mut rest = k.get(9..)?.split(|b| *b == 0);
                let run_id = String::from_utf8_lossy(rest.next()?).into_owned();
                let task_id = String::from_utf8_lossy(rest.next()?).into_owned();
                let attempt = u32::from_be_bytes(v.as_slice().try_into().ok()?);
                Some((
                    node,
                    AttemptRef {
                        run_id,
                        task_id,
                        attempt,
                    },
                ))
            })
            .collect();
        let command = match op {
            Op::Put {
                dag,
                wide,
                max_active,
                sla,
                retries,
            } => {
                let mut spec = if *wide {
                    wide_spec(&format!("d{dag}"))
                } else {
                    chain_spec(&format!("d{dag}"), 3, *retries)
                };
                spec.tasks.truncate(3);
                spec.max_active_runs = *max_active;
                spec.sla_ms = sla.then_some(2_000);
                Command::PutDag {
                    tenant: "t".into(),
                    spec,
                    expected_version: None,
                }
            }
            Op::Trigger { dag, window } => {
                trigger("t", &format!("d{dag}"), window * 10, window * 10 + 10)
            }
            Op::Heartbeat { node, renew } => Command::Heartbeat {
                node: *node,
                incarnation: "i1".into(),
                slots: 2,
                running: assignments
                    .iter()
                    .filter(|(at, _)| *renew && at == node)
                    .map(|(_, a)| a.clone())
                    .collect(),
                lease_ms: 1_000,
            },
            Op::Finish { pick, ok } => {
                let (node, attempt) = assignments.get(pick % assignments.len().max(1))?.clone();
                let result = if *ok {
                    AttemptResult::Success { exit_code: Some(0) }
                } else {
                    AttemptResult::Failed {
                        exit_code: Some(1),
                        error: "boom".into(),
                    }
                };
                Command::FinishAttempt {
                    attempt,
                    node,
                    result,
                }
            }
            Op::Cancel { pick } => {
                let runs = kv.scan_prefix(Table::Runs, b"").unwrap();
                let (k, _) = runs.get(pick % runs.len().max(1))?;
                Command::CancelRun {
                    tenant: "t".into(),
                    run_id: String::from_utf8_lossy(k).into_owned(),
                }
            }
            Op::Supervise => Command::Supervise { term: 1 },
        };
        Some(req(&format!("op{n}"), now, command))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 200, failure_persistence: None, ..Default::default()
        })]

        /// Leases that expire, retries that come due, SLAs that pass, slots that free up,
        /// queues behind `max_active_runs`: a supervise pass that reads only the due runs
        /// leaves the same state and answers the same as one that reads every run.
        #[test]
        fn supervising_due_runs_equals_supervising_all(
            ops in proptest::collection::vec(arb_op(), 1..80),
            fair in proptest::bool::ANY,
        ) {
            let mut due = MemKv::default();
            let mut all = FullScanKv::default();
            if fair {
                let raise = Command::RaiseProtocol { term: 1, version: PROTOCOL_VERSION };
                apply(&mut due, &req("raise", 0, raise.clone())).unwrap();
                apply_request(&mut all, &req("raise", 0, raise), 1).unwrap();
            }
            let mut now = 1;
            for (n, (op, dt)) in ops.iter().enumerate() {
                now += dt;
                let Some(r) = concrete(&due, op, n, now) else { continue };
                let a = apply(&mut due, &r).unwrap();
                let b = apply_request(&mut all, &r, 1).unwrap();
                proptest::prop_assert_eq!(&a, &b, "op {} {:?}", n, op);
                proptest::prop_assert!(due == all.0, "state differs after op {} {:?}", n, op);
            }
        }
    }
}
