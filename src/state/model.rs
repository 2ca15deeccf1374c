//! The replicated domain model: DAG definitions and their versions, runs, task instances
//! and attempts. Plain data; every field is set by `state::machine` from committed
//! commands, never by a clock read of its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

/// Milliseconds since the Unix epoch, stamped by the proposer of a command.
pub type Millis = i64;

/// A validated DAG definition as the user submitted it (normalised: defaults filled in,
/// durations in milliseconds, dates as instants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DagSpec {
    pub dag_id: String,
    pub schedule: Option<String>,
    pub timezone: String,
    pub owner: Option<String>,
    pub catchup: bool,
    pub max_active_runs: u32,
    pub sla_ms: Option<u64>,
    pub paused: bool,
    pub start_date_ms: Option<Millis>,
    pub end_date_ms: Option<Millis>,
    pub webhook: Option<String>,
    pub tasks: Vec<TaskSpec>,
}

/// One task of a DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskSpec {
    pub task_id: String,
    pub kind: TaskKind,
    pub depends_on: Vec<String>,
    pub retries: u32,
    pub retry_delay_ms: u64,
    pub retry_exponential: bool,
    pub max_retry_delay_ms: u64,
    pub timeout_ms: Option<u64>,
}

/// What a task does when it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    Shell {
        command: String,
    },
    Http {
        method: String,
        url: String,
        headers: BTreeMap<String, String>,
        body: Option<String>,
        expect_status: Option<u16>,
    },
    Noop,
}

/// A DAG version as stored in `DagVersions`: the definition and, from protocol 11 for a
/// version with a shell task, the grant that lets the nodes run it. A version without a
/// grant is stored as the bare [`DagSpec`] (the same bytes as before protocol 11), so
/// readers that need only the definition read a `DagSpec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    #[serde(flatten)]
    pub spec: DagSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_grant: Option<ShellGrant>,
}

impl StoredVersion {
    /// Whether any task of the version runs a command.
    pub fn has_shell(spec: &DagSpec) -> bool {
        spec.tasks
            .iter()
            .any(|t| matches!(t.kind, TaskKind::Shell { .. }))
    }
}

/// Who was allowed to define a version's shell tasks. Apply records it from protocol 11
/// only when the writer held `orchestrator:shell`; the executor runs a shell task only
/// when its version has one (see `executor::sandbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellGrant {
    /// The writer's token subject; `None` for a version stored before protocol 11, when
    /// the API alone checked the scope (the raise to 11 records that on each of them).
    pub by: Option<String>,
}

/// A stored DAG: the current definition plus bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dag {
    pub tenant: String,
    pub version: u64,
    pub spec: DagSpec,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub deleted: bool,
    /// The token subject that created it (protocol 3; unset for older DAGs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The token subject of its latest change (protocol 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunType {
    Scheduled,
    Manual,
    Backfill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Done | RunState::Failed | RunState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Queued,
    Running,
    Retrying,
    Done,
    Failed,
    UpstreamFailed,
    Skipped,
    Cancelled,
}

/// A run's data interval `[start_ms, end_ms)`; a manual run without a window has
/// `start_ms == end_ms` (the trigger instant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Window {
    pub start_ms: Millis,
    pub end_ms: Millis,
}

/// One attempt of a task instance, fenced by `(run_id, task_id, attempt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub node: NodeId,
    pub state: TaskState,
    pub started_ms: Millis,
    pub ended_ms: Option<Millis>,
    pub lease_until_ms: Millis,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

/// A task inside a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInstance {
    pub state: TaskState,
    /// The current attempt number (0 before the first assignment). Only grows.
    pub attempt: u32,
    pub attempts: Vec<Attempt>,
    /// When a `retrying` task may be assigned again.
    pub next_try_ms: Option<Millis>,
    /// Attempts lost to node failure; they are retried without using `retries`, up to
    /// a small bound.
    #[serde(default)]
    pub lost: u32,
    /// Attempts before the last `RetryRun` (protocol 2): they do not use up `retries`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_base: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl TaskInstance {
    pub fn new() -> Self {
        TaskInstance {
            state: TaskState::Pending,
            attempt: 0,
            attempts: Vec::new(),
            next_try_ms: None,
            lost: 0,
            retry_base: 0,
        }
    }
}

impl Default for TaskInstance {
    fn default() -> Self {
        Self::new()
    }
}

/// A DAG run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: String,
    pub tenant: String,
    pub dag_id: String,
    pub dag_version: u64,
    pub run_type: RunType,
    pub window: Window,
    pub state: RunState,
    pub created_ms: Millis,
    pub started_ms: Option<Millis>,
    pub ended_ms: Option<Millis>,
    pub sla_deadline_ms: Option<Millis>,
    pub sla_missed: bool,
    pub tasks: BTreeMap<String, TaskInstance>,
    /// Counted in the finished-run counters (protocol 2: once per run, by its first
    /// outcome; a retried run is counted in `runs_retried` instead).
    #[serde(default, skip_serializing_if = "is_false")]
    pub counted: bool,
    /// The token subject that triggered it (manual and backfill runs, protocol 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    /// The share of the live executor slots (percent) its tenant's attempts may hold
    /// while another tenant has a DAG or an unfinished run (protocol 8: from the quota of
    /// the request that created or retried it; absent: every slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_share_percent: Option<u32>,
}

/// An executor node as the state machine knows it (from its heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub slots: u32,
    pub last_seen_ms: Millis,
    /// Attempts currently assigned to it.
    pub running: u32,
    /// Changes every time the node's executor starts: attempts of an older incarnation
    /// can never finish and are treated as lost.
    #[serde(default)]
    pub incarnation: String,
    /// The lease its attempts get (from its configuration, via heartbeats).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_lease_ms() -> u64 {
    15_000
}

/// A run that is not finished, as listed in the active-runs index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveEntry {
    pub state: RunState,
    pub window_start_ms: Millis,
    pub created_ms: Millis,
}

/// A webhook the leader still has to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub tenant: String,
    pub dag_id: String,
    pub run_id: String,
    /// `success`, `failure` or `sla_miss`.
    pub event: String,
    pub url: String,
    pub run_state: RunState,
    pub created_ms: Millis,
}
