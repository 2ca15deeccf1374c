//! Commands proposed through Raft and the outcomes applying them returns.
//!
//! A Raft log entry carries a [`Batch`] of [`Request`]s: the proposer puts every request
//! that queued up while the previous entry was being committed into one entry, so one
//! fsync serves many logical writes. Each request carries its own id (a retry after an
//! unknown outcome reuses it and is answered from the record instead of applying twice)
//! and the time its proposer stamped on it (the state machine never reads a clock).

use serde::{Deserialize, Serialize};

use super::model::{DagSpec, Millis, RunState, RunType, Window};
use crate::raft::NodeId;

/// The payload of one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch {
    pub requests: Vec<Request>,
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {} request(s)", self.requests.len())
    }
}

/// One logical write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per logical write; a retry of the same write reuses it.
    pub request_id: String,
    /// Wall-clock time at the proposer, the only clock the state machine sees.
    pub proposed_at_ms: Millis,
    /// The client's `X-Request-Id`, if it sent one.
    pub idempotency: Option<IdempotencyKey>,
    pub command: Command,
    /// The token subject of the caller (client commands only). From protocol 3 it is
    /// recorded on the DAG it changes and the run it triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The tenant's quotas, from the proposing node's configuration (client commands and
    /// fired windows). From protocol 5 apply enforces them, so concurrent writes cannot
    /// overshoot a quota between a check and the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// The caller held `orchestrator:shell` (client commands only). From protocol 11
    /// apply refuses a DAG with a shell task without it ([`Outcome::Forbidden`]) and
    /// records the grant on the version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shell_scope: bool,
}

/// The quotas apply enforces (from protocol 5): the ones a concurrent write could
/// overshoot if they were checked anywhere else. A limit of a task count or a schedule's
/// interval depends on the request alone and is checked by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Live DAGs of the tenant: creating one more is refused.
    pub max_dags: u64,
    /// Unfinished runs of the tenant: a new run beyond it is refused.
    pub max_active_runs: u64,
    /// Queued runs of one DAG: a new run beyond it is refused.
    pub max_queued_runs_per_dag: u64,
    /// Versions of one DAG kept: writing version `v` drops versions up to `v - kept`
    /// that no unfinished run uses.
    pub dag_versions_kept: u64,
    /// The share of the live executor slots (percent) the tenant's attempts may hold
    /// while another tenant has a DAG or an unfinished run (from protocol 8; absent:
    /// every slot). A run keeps the value it was created (or retried) with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_share_percent: Option<u32>,
}

/// A client idempotency key and a fingerprint of the request it was first used with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyKey {
    pub tenant: String,
    pub key: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Create or update a DAG. `expected_version` (0 = must not exist) guards updates.
    PutDag {
        tenant: String,
        spec: DagSpec,
        expected_version: Option<u64>,
    },
    /// Create a run for `(tenant, dag_id, window)` unless one exists.
    TriggerRun {
        tenant: String,
        dag_id: String,
        run_type: RunType,
        window: Window,
    },
    /// Pause or unpause a DAG's schedule.
    SetPaused {
        tenant: String,
        dag_id: String,
        paused: bool,
    },
    /// Stop scheduling a DAG and hide it; its runs stay readable.
    DeleteDag { tenant: String, dag_id: String },
    /// Cancel a run: unfinished tasks become `cancelled`, running attempts are killed.
    CancelRun { tenant: String, run_id: String },
    /// Re-run the failed and upstream-failed tasks of a finished run as new attempts.
    RetryRun { tenant: String, run_id: String },
    /// The scheduler fires a window. Applied only if `term` is the term of the entry
    /// carrying it (a deposed leader's stale proposal is rejected); deduplicated by
    /// `(tenant, dag_id, window)`; advances the DAG's replicated schedule cursor.
    FireWindow {
        tenant: String,
        dag_id: String,
        window: Window,
        term: u64,
    },
    /// An executor node is alive: its slot count, and the attempts it is running (their
    /// leases are extended by `lease_ms`).
    Heartbeat {
        node: NodeId,
        incarnation: String,
        slots: u32,
        running: Vec<AttemptRef>,
        lease_ms: u64,
    },
    /// An attempt ended. Fenced: only the current attempt of a running task counts.
    FinishAttempt {
        attempt: AttemptRef,
        node: NodeId,
        result: AttemptResult,
    },
    /// The leader's periodic pass (term-fenced): expire leases, due retries, SLA misses,
    /// start queued runs, assign ready tasks to live nodes.
    Supervise { term: u64 },
    /// Webhook notifications delivered (or given up on): forget them.
    AckNotifications { keys: Vec<String> },
    /// Drop finished runs that ended before `before_ms`, and idempotency and request
    /// records older than `records_before_ms`. From protocol 2 the cutoffs are taken from
    /// the cluster clock with the retentions in `keep` (the absolute cutoffs serve
    /// replicas still at protocol 1).
    Purge {
        term: u64,
        before_ms: Millis,
        records_before_ms: Millis,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep: Option<Retention>,
    },
    /// Raise the replicated protocol version (leader only, term-fenced), once every voter
    /// runs a binary that applies it. Never lowers it.
    RaiseProtocol { term: u64, version: u32 },
}

/// How long purge keeps finished runs and request records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub runs_ms: u64,
    pub records_ms: u64,
}

/// Identifies one attempt of one task: the fencing token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttemptRef {
    pub run_id: String,
    pub task_id: String,
    pub attempt: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AttemptResult {
    Success {
        exit_code: Option<i32>,
    },
    Failed {
        exit_code: Option<i32>,
        error: String,
    },
    TimedOut {
        error: String,
    },
    /// The executing node lost it (restart, lease expiry).
    Lost {
        error: String,
    },
}

/// The result of applying one request. Business failures are values, not errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    DagPut {
        dag_id: String,
        version: u64,
        changed: bool,
    },
    RunTriggered {
        run_id: String,
        state: RunState,
        existed: bool,
    },
    NotFound {
        what: String,
    },
    /// The caller lacks a capability the command needs (protocol 11: a shell task
    /// without `orchestrator:shell`).
    Forbidden {
        message: String,
    },
    VersionConflict {
        expected: u64,
        current: u64,
    },
    /// The idempotency key was first used with a different request.
    IdempotencyKeyReused {
        key: String,
    },
    DagPaused {
        dag_id: String,
        version: u64,
        paused: bool,
    },
    DagDeleted {
        dag_id: String,
    },
    RunCancelled {
        run_id: String,
        state: RunState,
    },
    RunRetried {
        run_id: String,
        tasks: u32,
    },
    /// The request is valid but the object is not in a state that allows it.
    InvalidState {
        message: String,
    },
    Fired {
        run_id: String,
        created: bool,
    },
    /// A leader-only command from a term that is not the entry's: ignored.
    StaleTerm {
        command_term: u64,
        entry_term: u64,
    },
    AttemptFinished {
        run_id: String,
        task_id: String,
        task_state: super::model::TaskState,
    },
    /// A result for an attempt that is not the current one: rejected (fencing).
    StaleAttempt {
        current: u32,
    },
    Done,
    Supervised {
        assigned: u32,
        expired: u32,
    },
    Purged {
        runs: u32,
        records: u32,
        /// A chunk ran out before everything due was read (protocol ≥ 10): the leader
        /// purges again at its next pass.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// A window at or below the DAG's fired-window watermark whose run is gone (purged,
    /// or the DAG was deleted and re-created): it fired once and never fires again.
    AlreadyFired {
        watermark: Millis,
    },
    ProtocolRaised {
        version: u32,
    },
    /// A tenant quota refused the write (protocol 5); the message names the limit.
    QuotaExceeded {
        message: String,
    },
}

/// What a request's proposer gets back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub outcome: Outcome,
    /// True when this is the stored answer of an earlier identical request.
    pub replayed: bool,
}

/// The answer to a [`Batch`], one response per request, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BatchResponse {
    pub responses: Vec<Response>,
}
