//! Node configuration: one typed struct, layered defaults → TOML file → `ORCHESTRATOR_*`
//! environment → command-line flags, validated at start with messages that say what to
//! fix. Nested keys use `__` in the environment (`ORCHESTRATOR_RAFT__HEARTBEAT_MS`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {setting} {path}")]
    ReadSecret {
        setting: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no signing secret in {dir}: no node has started with this data dir (pass the \
         --data-dir or --config of the node the token is for, or set auth.hs256_secret_file)"
    )]
    NoSigningSecret { dir: PathBuf },
}

/// Another member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: NodeId,
    pub api_addr: String,
    pub peer_addr: String,
}

/// Raft timing and log retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats (openraft checks on a tick every third of
    /// this, so a heartbeat goes out up to a third late).
    pub heartbeat_ms: u64,
    /// A follower's randomized election timeout is drawn from `[min, max)` each time its
    /// timer starts. openraft 0.9 also gives the leader a lease of `max`: a follower that
    /// heard from the leader starts an election only `max + draw` after, and refuses
    /// votes for `max`. So a dead leader is replaced `max + min` to `2 × max` after its
    /// last heartbeat (0.9-1.2 s by default, plus up to a tick; etcd's default election
    /// timeout is 1 s). A leader stops acting as one when no quorum answered within `max`.
    /// The defaults were chosen from `scripts/bench` (docs/performance.md): no election
    /// under the full load workloads, and failover to the first acknowledged write in
    /// about 1.3 s.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept behind a snapshot for slightly lagging followers.
    pub logs_kept_after_snapshot: u64,
    pub rpc_connect_timeout_ms: u64,
    pub install_snapshot_timeout_ms: u64,
    pub snapshot_chunk_bytes: u64,
    /// A voter's clock further than this from this node's is logged as a warning. The
    /// cluster reads the voters' median clock either way (see `raft::clock`).
    pub max_clock_offset_ms: u64,
    /// The newest replicated protocol this node lets the cluster raise to (unset: the
    /// newest its binary applies). The cluster moves only to a protocol every voter
    /// offers, so setting it on one node holds the whole cluster at an older protocol:
    /// to stage an upgrade (keep the old behaviour until every node runs the new binary
    /// and has been checked, as CockroachDB's `cluster.preserve_downgrade_option`), or
    /// to test an older protocol on real processes.
    pub max_protocol: Option<u32>,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_after_logs: 5000,
            logs_kept_after_snapshot: 500,
            rpc_connect_timeout_ms: 500,
            install_snapshot_timeout_ms: 10_000,
            snapshot_chunk_bytes: 1 << 20,
            max_clock_offset_ms: 500,
            max_protocol: None,
        }
    }
}

/// Token verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The only algorithms accepted (e.g. ["RS256"]); a token naming another is refused.
    pub algorithms: Vec<String>,
    /// HS256 secret. When unset, a dev secret is generated and kept in the data dir.
    pub hs256_secret: Option<String>,
    /// A file holding the HS256 secret (instead of `hs256_secret`; surrounding
    /// whitespace is ignored).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM files with public keys.
    pub rs256_public_key: Option<PathBuf>,
    pub es256_public_key: Option<PathBuf>,
    /// A JWKS document on disk, or a URL fetched at start and again for unknown `kid`s.
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// Required `iss` claim when set (a token without it is refused).
    pub issuer: Option<String>,
    /// Required `aud` claim when set (a string or an array containing it).
    pub audience: Option<String>,
    /// Tenants whose admins are operators: cluster status, membership and snapshots
    /// belong to an `orchestrator:admin` token of one of these tenants only.
    pub operator_tenants: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithms: vec!["HS256".into()],
            hs256_secret: None,
            hs256_secret_file: None,
            rs256_public_key: None,
            es256_public_key: None,
            jwks_file: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            operator_tenants: vec!["ops".into()],
        }
    }
}

/// Task execution on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Attempts this node runs at once.
    pub slots: u32,
    /// How often the node tells the cluster it is alive and renews its leases.
    pub heartbeat_ms: u64,
    /// How long an attempt's lease lasts without renewal before it is declared lost.
    pub lease_ms: u64,
    /// The executor stops its own attempts this long before their lease can run out
    /// when its heartbeats stop committing (cut off, no quorum): they are dead before
    /// the leader may hand the task to another node. Covers the check interval, the
    /// kill, and a clock step on the leader within a term.
    /// Unset: a fifth of `lease_ms` (2 s with the default 10 s lease).
    pub fence_margin_ms: Option<u64>,
    /// Output kept per attempt (stdout and stderr together).
    pub log_cap_bytes: u64,
    /// Whether this node accepts and runs `shell` tasks at all (off by default). Even
    /// then only principals with the `orchestrator:shell` scope may define them.
    pub shell_enabled: bool,
    /// Run shell attempts as this unprivileged user (name or uid) when the node runs as
    /// root. The user must not be able to read the data dir.
    #[serde(deserialize_with = "user_name_or_id")]
    pub shell_user: Option<String>,
    /// Where shell attempts get their working dirs; must be outside the data dir.
    /// Default: `<data_dir>-work` beside the data dir.
    pub shell_work_dir: Option<PathBuf>,
    /// A shell task without a `timeout` is killed after this long.
    pub shell_default_timeout_ms: u64,
    /// rlimits applied to each shell attempt (0 = leave the node's limit).
    /// Processes (and threads) of the attempt: of its own PID namespace where it is
    /// isolated on Linux 6.14+ (its `pid_max`, this + 300: at least this many, at most
    /// 298 more), and of its own cgroup where the node's cgroup delegates `pids`
    /// (`pids.max`); only where neither holds it, of its user (RLIMIT_NPROC, which counts
    /// all of that user's processes and threads on the host, so it is meant for a
    /// dedicated `shell_user`). Unset: 1024 for an attempt run as a `shell_user`, none
    /// for one run as the node's own user.
    pub shell_max_processes: Option<u64>,
    /// Largest file an attempt may write (RLIMIT_FSIZE).
    pub shell_max_file_bytes: u64,
    /// Open files per process (RLIMIT_NOFILE).
    pub shell_max_open_files: u64,
    /// Address space per process (RLIMIT_AS); also the attempt's `memory.max` where it
    /// has a cgroup with the memory controller.
    pub shell_max_memory_bytes: u64,
    /// Run each shell attempt in a cgroup v2 of its own where the node can create one
    /// (under its own cgroup): every process the attempt starts dies with it, even one
    /// that left its process group; and with the controllers delegated,
    /// `shell_max_processes` and `shell_max_memory_bytes` hold for the whole attempt
    /// (`pids.max`, `memory.max`). Where it cannot, the node says so and uses process
    /// groups alone.
    pub shell_cgroups: bool,
    /// Run each shell attempt that runs as a `shell_user` in namespaces of its own: the
    /// node's filesystem read-only, one tmpfs of `shell_max_disk_bytes` for all it
    /// writes, a `/proc` of its own processes, and no network unless `shell_network`
    /// says so (see `executor::isolation`). Needs a root node with CAP_SYS_ADMIN on
    /// Linux 5.12 or later; a node that cannot isolate refuses to start until this is
    /// set to false.
    pub shell_isolation: bool,
    /// The network of isolated shell attempts: `none` (their own namespace with only
    /// its loopback: no node service, peer, metadata or outside address) or `host`
    /// (the node's network, beyond the egress policy). Per tenant:
    /// `tenants.<tenant>.shell_network`.
    pub shell_network: ShellNetwork,
    /// The scratch space of an isolated shell attempt (its working dir, `/tmp`,
    /// `/var/tmp` and `/dev/shm` together, a tmpfs); 0 means the 1 GiB default.
    pub shell_max_disk_bytes: u64,
    /// Directories an isolated shell attempt sees empty (a read-only tmpfs over each):
    /// the host's homes, mounts, logs and spools, whose world-readable files are no
    /// task's business. One that is missing, is a symlink, or holds the attempt's
    /// working dir is left as it is.
    pub shell_hidden_paths: Vec<PathBuf>,
    /// Networks (CIDR) every tenant's `http` tasks and webhooks may reach although the
    /// egress policy refuses them by default (loopback, private, link-local, CGNAT, ULA,
    /// multicast and the cluster's own addresses). Default: none. Prefer granting a
    /// network to the tenant that needs it (`tenants.<tenant>.http_allow`).
    pub http_allow: Vec<String>,
    /// Webhooks carry `X-Orchestrator-Signature: sha256=<hex HMAC-SHA256 of the body>`
    /// and `X-Orchestrator-Signature-Timed` (of `"<X-Orchestrator-Timestamp>.<body>"`)
    /// under this secret when set (unless their tenant has its own).
    pub webhook_secret: Option<String>,
    /// Per-tenant egress grants and webhook secrets.
    pub tenants: std::collections::BTreeMap<String, TenantExecutor>,
}

/// A user given by name or by number (`shell_user = "nobody"` or `shell_user = 65534`;
/// a number from the environment arrives as one).
fn user_name_or_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrId {
        Name(String),
        Id(u64),
    }
    Ok(Option::<NameOrId>::deserialize(d)?.map(|v| match v {
        NameOrId::Name(name) => name,
        NameOrId::Id(id) => id.to_string(),
    }))
}

/// One tenant's executor settings (`executor.tenants.<tenant>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TenantExecutor {
    /// Networks (CIDR) this tenant's `http` tasks and webhooks may reach, beyond
    /// `executor.http_allow`. No other tenant gets them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_allow: Vec<String>,
    /// This tenant's webhook signing secret, instead of `executor.webhook_secret`: a
    /// receiver that knows it can check that a webhook came from this cluster for this
    /// tenant, and cannot sign webhooks that another tenant's receivers would accept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Run this tenant's shell attempts as this user (name or uid) instead of
    /// `executor.shell_user`, so they cannot read or signal another tenant's. Held to the
    /// same rules: not root, not the node's user, no reach into the data dir or secrets.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "user_name_or_id"
    )]
    pub shell_user: Option<String>,
    /// This tenant's isolated shell attempts get this network instead of
    /// `executor.shell_network`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shell_network: Option<ShellNetwork>,
}

/// Which network an isolated shell attempt has (`executor.shell_network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShellNetwork {
    /// A network namespace of its own holding only its loopback.
    #[default]
    None,
    /// The node's network.
    Host,
}

impl ExecutorConfig {
    /// The self-fencing margin in milliseconds: as configured, or a fifth of the lease.
    pub fn fence_margin(&self) -> u64 {
        self.fence_margin_ms.unwrap_or(self.lease_ms / 5)
    }

    /// The secret `tenant`'s webhooks are signed with: its own, else the node-wide one.
    pub fn webhook_secret_for(&self, tenant: &str) -> Option<&str> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.webhook_secret.as_deref())
            .or(self.webhook_secret.as_deref())
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            slots: 8,
            heartbeat_ms: 1000,
            lease_ms: crate::state::machine::DEFAULT_LEASE_MS,
            fence_margin_ms: None,
            log_cap_bytes: 1 << 20,
            shell_enabled: false,
            shell_user: None,
            shell_work_dir: None,
            shell_default_timeout_ms: 3_600_000,
            shell_max_processes: None,
            shell_max_file_bytes: 1 << 30,
            shell_max_open_files: 1024,
            shell_max_memory_bytes: 4 << 30,
            shell_cgroups: true,
            shell_isolation: true,
            shell_network: ShellNetwork::None,
            shell_max_disk_bytes: crate::executor::isolation::DEFAULT_MAX_DISK_BYTES,
            shell_hidden_paths: crate::executor::isolation::DEFAULT_HIDDEN_PATHS
                .iter()
                .map(PathBuf::from)
                .collect(),
            http_allow: Vec::new(),
            webhook_secret: None,
            tenants: Default::default(),
        }
    }
}

/// Schedule firing and run supervision (leader only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How often the leader looks through every DAG for due windows (a new or edited
    /// DAG, a quota freed). A window the scheduler already knows of wakes it at its end.
    pub tick_ms: u64,
    /// Without `catchup`, windows older than this after an outage are skipped (the
    /// latest due window always fires).
    pub catchup_grace_ms: u64,
    /// With `catchup`, at most this many missed windows fire per DAG, newest kept.
    pub max_catchup: usize,
    /// How often the supervisor checks leases, retries, SLAs and queued runs.
    pub supervise_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            tick_ms: 200,
            catchup_grace_ms: 60_000,
            max_catchup: 100,
            supervise_ms: 250,
        }
    }
}

/// TLS for the API and peer listeners (plain HTTP when unset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain and private key served on both listeners.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA that signed the peers' certificates; peers are trusted only through it.
    /// Defaults to `cert_file`, which then must be a self-signed end-entity
    /// certificate (`CA:FALSE`; webpki refuses a CA certificate as a server's).
    pub ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// Per-tenant request rate limits, enforced across the cluster (see `rate_limit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per second per tenant.
    pub rps: u32,
    /// Requests a tenant may make in one second at most (at least `rps`).
    pub burst: u32,
    /// How often nodes exchange their counts.
    pub gossip_ms: u64,
    /// Per-tenant `rps` overrides.
    pub tenants: std::collections::BTreeMap<String, u32>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            rps: 10,
            burst: 10,
            gossip_ms: 50,
            tenants: Default::default(),
        }
    }
}

/// What a client may cost before it has authenticated (`src/admission.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Connections the API listener holds open at once; more are closed as they arrive.
    pub max_api_connections: u32,
    /// Connections one client address (an IPv4 address, an IPv6 /64) may hold open on
    /// the API listener. Behind a reverse proxy every client shares its address: raise it.
    pub max_connections_per_address: u32,
    /// Connections the peer listener holds open at once.
    pub max_peer_connections: u32,
    /// Connections one address may hold open on the peer listener (a peer pools a few per
    /// node; a host inside `peer_networks` that is no member cannot take them all).
    pub max_peer_connections_per_address: u32,
    /// Failed authentications (401) one client address may make per minute on average;
    /// past `auth_failure_burst` of them its requests answer `429 rate_limited` before
    /// their token is read, until the allowance refills.
    pub auth_failures_per_minute: u32,
    /// Failed authentications one address may make at once.
    pub auth_failure_burst: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_api_connections: 4096,
            max_connections_per_address: 128,
            max_peer_connections: 1024,
            max_peer_connections_per_address: 256,
            auth_failures_per_minute: 300,
            auth_failure_burst: 50,
        }
    }
}

/// Per-tenant quotas: what one tenant can cost the others. Every quota may be
/// overridden per tenant in `limits.tenants.<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live DAGs a tenant may have; creating one more is refused (400).
    pub max_dags_per_tenant: u64,
    /// The shortest interval between two fire times of a schedule; a schedule firing
    /// more often is refused (400). Default one minute.
    pub min_schedule_interval_ms: u64,
    /// Tasks in one DAG (400 beyond it; never more than 1000).
    pub max_tasks_per_dag: u64,
    /// Runs of one DAG waiting in `queued` (behind `max_active_runs`): a trigger beyond
    /// it is refused (429), and the scheduler holds the DAG's next windows back.
    pub max_queued_runs_per_dag: u64,
    /// Unfinished (queued or running) runs of one tenant across its DAGs: a trigger
    /// beyond it is refused (429), and the scheduler holds the tenant's windows back.
    pub max_active_runs_per_tenant: u64,
    /// Versions of one DAG kept: writing a new version drops the oldest ones beyond it,
    /// except those an unfinished run still executes (from protocol 5).
    pub max_dag_versions: u64,
    /// The longest `timeout` a task may declare (400 beyond it): how long one attempt
    /// can hold an executor slot.
    pub max_task_timeout_ms: u64,
    /// The share of the live executor slots (percent, 1-100) one tenant's attempts may
    /// hold while another tenant has a DAG or an unfinished run (from protocol 8): the
    /// rest stays free for the others, since an attempt is never taken back once it runs.
    /// From protocol 9 the tenants that hold slots also stop at it together while a
    /// tenant with a DAG or an unfinished run holds none. A tenant alone on the cluster
    /// may use every slot.
    pub max_slot_share_percent: u64,
    /// Per-tenant overrides of the quotas above.
    pub tenants: std::collections::BTreeMap<String, TenantLimits>,
}

/// One tenant's overrides (unset: the cluster-wide value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dags_per_tenant: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_schedule_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tasks_per_dag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_runs_per_dag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active_runs_per_tenant: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dag_versions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_task_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_slot_share_percent: Option<u64>,
}

/// The quotas that hold for one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub max_dags_per_tenant: u64,
    pub min_schedule_interval_ms: u64,
    pub max_tasks_per_dag: u64,
    pub max_queued_runs_per_dag: u64,
    pub max_active_runs_per_tenant: u64,
    pub max_dag_versions: u64,
    pub max_task_timeout_ms: u64,
    pub max_slot_share_percent: u64,
}

impl LimitsConfig {
    /// The quotas of `tenant`: its overrides, else the cluster-wide values.
    pub fn for_tenant(&self, tenant: &str) -> Quotas {
        let o = self.tenants.get(tenant).cloned().unwrap_or_default();
        Quotas {
            max_dags_per_tenant: o.max_dags_per_tenant.unwrap_or(self.max_dags_per_tenant),
            min_schedule_interval_ms: o
                .min_schedule_interval_ms
                .unwrap_or(self.min_schedule_interval_ms),
            max_tasks_per_dag: o.max_tasks_per_dag.unwrap_or(self.max_tasks_per_dag),
            max_queued_runs_per_dag: o
                .max_queued_runs_per_dag
                .unwrap_or(self.max_queued_runs_per_dag),
            max_active_runs_per_tenant: o
                .max_active_runs_per_tenant
                .unwrap_or(self.max_active_runs_per_tenant),
            max_dag_versions: o.max_dag_versions.unwrap_or(self.max_dag_versions),
            max_task_timeout_ms: o.max_task_timeout_ms.unwrap_or(self.max_task_timeout_ms),
            max_slot_share_percent: o
                .max_slot_share_percent
                .unwrap_or(self.max_slot_share_percent),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_dags_per_tenant: 1000,
            min_schedule_interval_ms: 60_000,
            max_tasks_per_dag: crate::dag::MAX_TASKS as u64,
            max_queued_runs_per_dag: 500,
            max_active_runs_per_tenant: 2000,
            max_dag_versions: 100,
            max_task_timeout_ms: 86_400_000,
            max_slot_share_percent: 75,
            tenants: Default::default(),
        }
    }
}

/// How long history is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Finished runs (and their attempts and logs) older than this are purged.
    pub runs_ms: u64,
    /// `X-Request-Id` records are kept this long.
    pub idempotency_ms: u64,
    pub purge_every_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            runs_ms: 30 * 86_400_000,
            idempotency_ms: 86_400_000,
            purge_every_ms: 60_000,
        }
    }
}

/// How the node writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line, span fields (request_id, run_id, ...) included.
    Json,
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node_id: NodeId,
    pub api_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    /// Shared by all members; peer RPCs without it are refused. Generated for a
    /// single-node cluster when unset. Never give it on the command line (every local
    /// user reads argv): use `cluster_secret_file`, the config file or
    /// `ORCHESTRATOR_CLUSTER_SECRET`.
    pub cluster_secret: Option<String>,
    /// A file holding the cluster secret (instead of `cluster_secret`).
    pub cluster_secret_file: Option<PathBuf>,
    /// A local trial: accept the well-known placeholder secrets of the examples
    /// (`...change-me...`), and shell attempts that run as the node's own user (which can
    /// read its data dir). Never for a cluster anyone else can reach.
    pub dev_mode: bool,
    /// This node forms the cluster on first start (only one node may say so). A node with
    /// no peers always bootstraps its own single-node cluster.
    pub bootstrap: bool,
    pub peers: Vec<Peer>,
    /// Networks (CIDR) a member added through the API must have its addresses in.
    /// Default: loopback and the private ranges (10/8, 172.16/12, 192.168/16, fc00::/7).
    pub peer_networks: Vec<String>,
    /// How long a write or a current read waits for a leader before `503`.
    pub leader_wait_ms: u64,
    /// A connection (API or peer) that has not sent a request's headers this long after
    /// connecting, or after starting a request, is closed (slowloris).
    pub header_read_timeout_ms: u64,
    pub log_level: String,
    /// `pretty` (human-readable lines) or `json` (one object per line); every line
    /// carries the node id.
    pub log_format: LogFormat,
    pub raft: RaftConfig,
    pub auth: AuthConfig,
    pub executor: ExecutorConfig,
    pub scheduler: SchedulerConfig,
    pub retention: RetentionConfig,
    pub rate_limit: RateLimitConfig,
    pub admission: AdmissionConfig,
    pub limits: LimitsConfig,
    pub tls: TlsConfig,
    /// The file this configuration was read from, if any (not a setting: what the start
    /// banner tells `orchestrator token` to read).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            api_addr: "127.0.0.1:8080".into(),
            peer_addr: "127.0.0.1:9080".into(),
            data_dir: PathBuf::from("orchestrator-data"),
            cluster_secret: None,
            cluster_secret_file: None,
            dev_mode: false,
            bootstrap: false,
            peers: Vec::new(),
            peer_networks: [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fc00::/7",
            ]
            .map(String::from)
            .to_vec(),
            leader_wait_ms: 5000,
            header_read_timeout_ms: 10_000,
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
            raft: RaftConfig::default(),
            auth: AuthConfig::default(),
            executor: ExecutorConfig::default(),
            scheduler: SchedulerConfig::default(),
            retention: RetentionConfig::default(),
            rate_limit: RateLimitConfig::default(),
            admission: AdmissionConfig::default(),
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
            file: None,
        }
    }
}

/// The shortest cluster secret a node proves on the join probe (bytes), as for the
/// HS256 key: a node with a shorter one gives no proof and warns at start.
pub const MIN_CLUSTER_SECRET_LEN: usize = 32;

/// The shortest cluster secret a node starts with (bytes).
pub const MIN_CLUSTER_SECRET_BYTES_ACCEPTED: usize = 16;

/// `ORCHESTRATOR_*` variables that are not server config keys.
const CLIENT_ENV: [&str; 5] = ["CONFIG", "TOKEN", "API", "OUTPUT", "CA_FILE"];

impl Config {
    /// Layer defaults, an optional TOML file, `ORCHESTRATOR_*` variables from `env` and
    /// `overrides` (`key.path = value` pairs from flags), then validate.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<Config, Error> {
        let mut tree = toml::Value::try_from(Config::default())
            .map_err(|e| Error::Invalid(format!("defaults do not serialise: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let file_tree: toml::Value = toml::from_str(&text).map_err(|e| Error::Parse {
                path: path.to_path_buf(),
                message: toml_error_without_text(&text, &e),
            })?;
            merge(&mut tree, file_tree);
        }
        let mut env_pairs: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("ORCHESTRATOR_")?;
                // Not server settings: the config file's path, and the client
                // commands' own variables (which a shell may export for the CLI).
                if CLIENT_ENV.contains(&rest) {
                    return None;
                }
                Some((rest.to_ascii_lowercase().replace("__", "."), v))
            })
            .collect();
        env_pairs.sort();
        for (key, value) in env_pairs.iter().chain(overrides) {
            set_path(&mut tree, key, value)?;
        }
        let mut config: Config = tree
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(without_values(e.message())))?;
        config.file = file.map(|f| std::path::absolute(f).unwrap_or_else(|_| f.to_path_buf()));
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Fill `cluster_secret` and `auth.hs256_secret` from their `*_file` settings.
    fn read_secret_files(&mut self) -> Result<(), Error> {
        let pairs = [
            (
                "cluster_secret",
                &mut self.cluster_secret,
                &self.cluster_secret_file,
            ),
            (
                "auth.hs256_secret",
                &mut self.auth.hs256_secret,
                &self.auth.hs256_secret_file,
            ),
        ];
        for (name, value, file) in pairs {
            let Some(path) = file else { continue };
            if value.is_some() {
                return Err(Error::Invalid(format!(
                    "{name} and {name}_file are both set; keep one"
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|source| Error::ReadSecret {
                setting: format!("{name}_file"),
                path: path.clone(),
                source,
            })?;
            let secret = text.trim();
            if secret.is_empty() {
                return Err(Error::Invalid(format!(
                    "{name}_file {} is empty",
                    path.display()
                )));
            }
            *value = Some(secret.to_string());
        }
        Ok(())
    }

    /// Check everything that would otherwise fail later, with what to change.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.node_id == 0 {
            return bad("node_id must be 1 or more".into());
        }
        for (name, addr) in [("api_addr", &self.api_addr), ("peer_addr", &self.peer_addr)] {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "{name} '{addr}' is not an IP:port address (e.g. 127.0.0.1:8080)"
                ));
            }
        }
        if self.api_addr == self.peer_addr {
            return bad(
                "api_addr and peer_addr must differ: peer RPCs are not served on the API port"
                    .into(),
            );
        }
        let mut ids = vec![self.node_id];
        for p in &self.peers {
            if ids.contains(&p.id) {
                return bad(format!(
                    "node id {} appears twice (node_id and peers)",
                    p.id
                ));
            }
            ids.push(p.id);
            if p.peer_addr.parse::<SocketAddr>().is_err()
                || p.api_addr.parse::<SocketAddr>().is_err()
            {
                return bad(format!(
                    "peer {} needs IP:port api_addr and peer_addr",
                    p.id
                ));
            }
        }
        // Below 16 bytes a node refuses to start. A node waiting to be joined proves
        // the secret to whoever probes it (`/cluster/hello`), so one shorter than
        // MIN_CLUSTER_SECRET_LEN, which one answer would let a prober guess offline, gives
        // no proof (such a node joins through configured peers only) and the node warns
        // at start. Not refused: clusters set up with 16+ characters upgrade node by node.
        match self.cluster_secret.as_deref() {
            Some(s) => check_cluster_secret(s, "cluster_secret")?,
            None if !self.peers.is_empty() => {
                return bad(format!(
                    "cluster_secret ({MIN_CLUSTER_SECRET_LEN}+ random characters, the same on \
                     every node) is required when peers are configured"
                ))
            }
            _ => {}
        }
        if !self.dev_mode {
            let tenant_secrets = self.executor.tenants.iter().map(|(tenant, t)| {
                (
                    format!("executor.tenants.{tenant}.webhook_secret"),
                    &t.webhook_secret,
                )
            });
            for (name, value) in [
                ("cluster_secret".to_string(), &self.cluster_secret),
                ("auth.hs256_secret".to_string(), &self.auth.hs256_secret),
                (
                    "executor.webhook_secret".to_string(),
                    &self.executor.webhook_secret,
                ),
            ]
            .into_iter()
            .chain(tenant_secrets)
            {
                if value.as_deref().is_some_and(is_placeholder) {
                    return bad(format!(
                        "{name} is an example's placeholder, known to anyone who read it: set a \
                         random one (e.g. `head -c 32 /dev/urandom | xxd -p -c 64`), or for a \
                         local trial only set dev_mode = true (ORCHESTRATOR_DEV_MODE=true)"
                    ));
                }
            }
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            return bad(format!(
                "raft.election_timeout_min_ms ({}) must exceed twice raft.heartbeat_ms ({})",
                r.election_timeout_min_ms, r.heartbeat_ms
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(
                "raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into(),
            );
        }
        if let Some(p) = r.max_protocol {
            let newest = crate::state::machine::PROTOCOL_VERSION;
            if p == 0 || p > newest {
                return bad(format!(
                    "raft.max_protocol ({p}) must be between 1 and {newest}, the newest protocol \
                     this binary applies"
                ));
            }
        }
        if r.snapshot_after_logs == 0 || r.snapshot_chunk_bytes < 1024 {
            return bad(
                "raft.snapshot_after_logs must be > 0 and raft.snapshot_chunk_bytes >= 1024".into(),
            );
        }
        if let Err(e) = crate::cidr::parse_all(&self.peer_networks) {
            return bad(format!("peer_networks: {e}"));
        }
        if self.leader_wait_ms == 0 {
            return bad("leader_wait_ms must be > 0".into());
        }
        let a = &self.admission;
        if a.max_api_connections == 0
            || a.max_connections_per_address == 0
            || a.max_peer_connections == 0
            || a.max_peer_connections_per_address == 0
            || a.auth_failures_per_minute == 0
            || a.auth_failure_burst == 0
        {
            return bad("every admission.* limit must be > 0".into());
        }
        if self.header_read_timeout_ms == 0 {
            return bad("header_read_timeout_ms must be > 0".into());
        }
        let e = &self.executor;
        if e.slots == 0 || e.heartbeat_ms == 0 || e.lease_ms < e.heartbeat_ms * 3 {
            return bad(format!(
                "executor.slots must be > 0 and executor.lease_ms ({}) at least 3 x executor.heartbeat_ms ({})",
                e.lease_ms, e.heartbeat_ms
            ));
        }
        let margin = e.fence_margin();
        if margin == 0 || margin + 2 * e.heartbeat_ms > e.lease_ms {
            return bad(format!(
                "executor.fence_margin_ms ({margin}) must be > 0 and leave two heartbeats ({} ms \
                 each) within executor.lease_ms ({})",
                e.heartbeat_ms, e.lease_ms
            ));
        }
        if let Err(err) = crate::cidr::parse_all(&e.http_allow) {
            return bad(format!("executor.http_allow: {err}"));
        }
        for (tenant, t) in &e.tenants {
            if let Err(err) = crate::cidr::parse_all(&t.http_allow) {
                return bad(format!("executor.tenants.{tenant}.http_allow: {err}"));
            }
        }
        if e.shell_default_timeout_ms == 0 {
            return bad("executor.shell_default_timeout_ms must be > 0".into());
        }
        if let Some(w) = &e.shell_work_dir {
            if w.starts_with(&self.data_dir) {
                return bad(format!(
                    "executor.shell_work_dir {} must be outside data_dir {}: tasks must not reach the node's secrets",
                    w.display(),
                    self.data_dir.display()
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls.cert_file and tls.key_file go together".into());
        }
        for f in [&self.tls.cert_file, &self.tls.key_file, &self.tls.ca_file]
            .into_iter()
            .flatten()
        {
            if !f.is_file() {
                return bad(format!("TLS file {} does not exist", f.display()));
            }
        }
        let global = LimitsConfig {
            tenants: Default::default(),
            ..self.limits.clone()
        }
        .for_tenant("");
        let tenants = self
            .limits
            .tenants
            .keys()
            .map(|t| (format!("limits.tenants.{t}"), self.limits.for_tenant(t)));
        for (scope, q) in std::iter::once(("limits".to_string(), global)).chain(tenants) {
            if q.max_dags_per_tenant == 0
                || q.max_tasks_per_dag == 0
                || q.max_queued_runs_per_dag == 0
                || q.max_active_runs_per_tenant == 0
                || q.max_dag_versions == 0
                || q.max_task_timeout_ms == 0
            {
                return bad(format!(
                    "{scope}: max_dags_per_tenant, max_tasks_per_dag, max_queued_runs_per_dag, \
                     max_active_runs_per_tenant, max_dag_versions and max_task_timeout_ms must \
                     be > 0"
                ));
            }
            if !(1..=100).contains(&q.max_slot_share_percent) {
                return bad(format!(
                    "{scope}: max_slot_share_percent must be between 1 and 100, got {}",
                    q.max_slot_share_percent
                ));
            }
        }
        if self.rate_limit.rps == 0 || self.rate_limit.gossip_ms == 0 {
            return bad("rate_limit.rps and rate_limit.gossip_ms must be > 0".into());
        }
        if self.scheduler.tick_ms == 0
            || self.scheduler.supervise_ms == 0
            || self.scheduler.max_catchup == 0
        {
            return bad(
                "scheduler.tick_ms, scheduler.supervise_ms and scheduler.max_catchup must be > 0"
                    .into(),
            );
        }
        Ok(())
    }

    /// True when this node should form the cluster if it finds none.
    pub fn is_bootstrap(&self) -> bool {
        self.bootstrap || self.peers.is_empty()
    }

    pub fn leader_wait(&self) -> Duration {
        Duration::from_millis(self.leader_wait_ms)
    }

    /// Where shell attempts' working dirs go: outside the data dir.
    pub fn shell_work_dir(&self) -> PathBuf {
        if let Some(w) = &self.executor.shell_work_dir {
            return w.clone();
        }
        match self.data_dir.file_name() {
            Some(name) => self
                .data_dir
                .with_file_name(format!("{}-work", name.to_string_lossy())),
            // A data dir like `.` or `/` has no name to put a sibling beside.
            None => std::env::temp_dir().join(format!("orchestrator-work-{}", self.node_id)),
        }
    }

    /// The cluster secret, generating and keeping one in the data dir for a single node.
    pub fn resolve_cluster_secret(&mut self) -> Result<String, Error> {
        if let Some(s) = &self.cluster_secret {
            return Ok(s.clone());
        }
        let path = self.data_dir.join("cluster.secret");
        let s = read_or_create_secret(&path)?;
        // One generated here has 64 characters; one edited by hand is held to the floor.
        check_cluster_secret(&s, &path.display().to_string())?;
        self.cluster_secret = Some(s.clone());
        Ok(s)
    }

    /// The HS256 secret, generating and keeping a dev one in the data dir when unset.
    pub fn resolve_hs256_secret(&mut self) -> Result<String, Error> {
        if let Some(s) = &self.auth.hs256_secret {
            return Ok(s.clone());
        }
        let s = read_or_create_secret(&self.data_dir.join("dev-jwt.secret"))?;
        self.auth.hs256_secret = Some(s.clone());
        Ok(s)
    }

    /// The HS256 secret this configuration's node verifies tokens with, to mint one
    /// (`orchestrator token`). Unlike [`Self::resolve_hs256_secret`] it never creates
    /// one: a token signed with a secret no node holds is refused by every node.
    pub fn existing_hs256_secret(&self) -> Result<String, Error> {
        if let Some(s) = &self.auth.hs256_secret {
            return Ok(s.clone());
        }
        let path = self.data_dir.join("dev-jwt.secret");
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Ok(_) => Err(Error::NoSigningSecret {
                dir: self.data_dir.clone(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NoSigningSecret {
                dir: self.data_dir.clone(),
            }),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// The effective config as TOML with secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        // Read from a file: show where from, not a value that would clash with it.
        if c.cluster_secret_file.is_some() {
            c.cluster_secret = None;
        }
        if c.auth.hs256_secret_file.is_some() {
            c.auth.hs256_secret = None;
        }
        if c.cluster_secret.is_some() {
            c.cluster_secret = Some("<redacted>".into());
        }
        if c.auth.hs256_secret.is_some() {
            c.auth.hs256_secret = Some("<redacted>".into());
        }
        if c.executor.webhook_secret.is_some() {
            c.executor.webhook_secret = Some("<redacted>".into());
        }
        for t in c.executor.tenants.values_mut() {
            if t.webhook_secret.is_some() {
                t.webhook_secret = Some("<redacted>".into());
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

/// A secret an example ships with (`compose-cluster-secret-change-me` and the like):
/// anyone who read the example holds it.
pub fn is_placeholder(secret: &str) -> bool {
    let s = secret.to_ascii_lowercase();
    [
        "change-me",
        "changeme",
        "change_me",
        "replace-me",
        "placeholder",
    ]
    .iter()
    .any(|p| s.contains(p))
}

/// Create `dir` (and parents) if needed and make it private to the node's user (0700),
/// fixing a dir an older version left open.
pub fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Refuse a cluster secret (named `what` in the error) below
/// [`MIN_CLUSTER_SECRET_BYTES_ACCEPTED`].
fn check_cluster_secret(secret: &str, what: &str) -> Result<(), Error> {
    if secret.len() >= MIN_CLUSTER_SECRET_BYTES_ACCEPTED {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{what} holds a cluster secret of {} bytes; it needs at least \
         {MIN_CLUSTER_SECRET_BYTES_ACCEPTED} (better {MIN_CLUSTER_SECRET_LEN}+, random: \
         e.g. `head -c 32 /dev/urandom | xxd -p -c 64`), the same on every node",
        secret.len()
    )))
}

/// A secret kept in a file readable by the node's user only (0600; an existing file with
/// wider modes is narrowed), created with a random value when missing.
fn read_or_create_secret(path: &Path) -> Result<String, Error> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            return Ok(s.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(secret.as_bytes()).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(secret)
}

/// Where and what a TOML error is, without the line it quotes: the line may hold a
/// secret (`hs256_secret = "..."`), and the message goes to the node's log.
fn toml_error_without_text(text: &str, e: &toml::de::Error) -> String {
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else {
        return e.message().trim().to_string();
    };
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
    format!("line {line}, column {column}: {}", e.message().trim())
}

/// A settings error with every quoted value (serde quotes them in backticks, as in
/// "invalid type: integer `9182...`, expected a string") left out: the value may be a
/// secret written without quotes, and the message goes to the node's log. Field names
/// in the message stay (serde quotes those too, so a backticked word that is a known
/// setting name is kept).
fn without_values(message: &str) -> String {
    // A string value is quoted in double quotes ("invalid type: string \"...\""),
    // never a setting's name: every such quote goes.
    let mut unquoted = String::with_capacity(message.len());
    for (i, part) in message.split('"').enumerate() {
        unquoted.push_str(if i % 2 == 1 {
            "(value not shown)"
        } else {
            part
        });
    }
    let message = unquoted.as_str();
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        if inside {
            let name_like = part.starts_with(|c: char| c.is_ascii_lowercase())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            if name_like {
                out.push('`');
                out.push_str(part);
                out.push('`');
            } else {
                out.push_str("(value not shown)");
            }
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Parse a flag or environment value: `peers` takes `id=api_addr/peer_addr,...`;
/// numbers and booleans are typed; anything else is a string.
fn parse_scalar(key: &str, raw: &str) -> Result<toml::Value, Error> {
    if key == "peers" {
        let mut peers = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, addrs) = item.split_once('=').ok_or_else(|| {
                Error::Invalid(format!(
                    "peer '{item}' must look like 2=127.0.0.1:8082/127.0.0.1:9082"
                ))
            })?;
            let (api, peer) = addrs.split_once('/').ok_or_else(|| {
                Error::Invalid(format!("peer '{item}' must give api_addr/peer_addr"))
            })?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| Error::Invalid(format!("peer id '{id}' is not a number")))?;
            let mut t = toml::map::Map::new();
            t.insert("id".into(), toml::Value::Integer(id as i64));
            t.insert("api_addr".into(), toml::Value::String(api.trim().into()));
            t.insert("peer_addr".into(), toml::Value::String(peer.trim().into()));
            peers.push(toml::Value::Table(t));
        }
        return Ok(toml::Value::Array(peers));
    }
    if raw.starts_with('[') || raw.starts_with('{') {
        // A TOML inline array or table, e.g. '["RS256", "ES256"]'.
        let doc: toml::Table = toml::from_str(&format!("v = {raw}"))
            .map_err(|e| Error::Invalid(format!("{key}: '{raw}' is not a TOML value: {e}")))?;
        if let Some(v) = doc.get("v") {
            return Ok(v.clone());
        }
    }
    if let Ok(i) = raw.parse::<i64>() {
        return Ok(toml::Value::Integer(i));
    }
    if let Ok(b) = raw.parse::<bool>() {
        return Ok(toml::Value::Boolean(b));
    }
    Ok(toml::Value::String(raw.to_string()))
}

fn set_path(tree: &mut toml::Value, dotted: &str, raw: &str) -> Result<(), Error> {
    let value = parse_scalar(dotted, raw)?;
    let mut cur = tree;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| Error::Invalid(format!("'{dotted}' does not name a config key")))?;
        if i + 1 == parts.len() {
            table.insert((*part).to_string(), value);
            return Ok(());
        }
        cur = table
            .entry((*part).to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_does_not_parse_is_reported_by_place_without_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let secret = "do-not-print-0123456789abcdef0123456789";
        std::fs::write(
            &file,
            format!("node_id = 2\n[executor]\nwebhook_secret = \"{secret}\"\nwebhook_secret = \"{secret}\"\n"),
        )
        .unwrap();
        let e = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains(secret), "{e}");
        assert!(
            e.contains("line 4, column 1") && e.contains("duplicate key"),
            "{e}"
        );
    }

    #[test]
    fn a_token_is_signed_only_with_a_secret_a_node_holds() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("no-node-here");
        let mut c = Config {
            data_dir: data.clone(),
            ..Config::default()
        };
        let e = c.existing_hs256_secret().unwrap_err().to_string();
        assert!(
            e.contains("no signing secret") && e.contains("--data-dir"),
            "{e}"
        );
        assert!(!data.exists(), "nothing is created");
        // What a node creates at its start, the token command then reads.
        let made = c.resolve_hs256_secret().unwrap();
        c.auth.hs256_secret = None;
        assert_eq!(c.existing_hs256_secret().unwrap(), made);
    }

    #[test]
    fn a_setting_of_the_wrong_type_is_reported_without_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[auth]\nhs256_secret = 9182736455463728\n").unwrap();
        let e = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("9182736455463728"), "{e}");
        assert!(
            e.contains("invalid type") && e.contains("expected a string"),
            "{e}"
        );
        // A word that is a value, not a name, goes too; names stay.
        assert_eq!(
            without_values("unknown field `hs256_secrt`, expected one of `issuer`, `audience`"),
            "unknown field `hs256_secrt`, expected one of `issuer`, `audience`"
        );
        assert_eq!(
            without_values("invalid type: string `Sup3r-Secret!`, expected u64"),
            "invalid type: string (value not shown), expected u64"
        );
        assert_eq!(
            without_values("invalid type: floating point `1234.5678`, expected a string"),
            "invalid type: floating point (value not shown), expected a string"
        );
        // A secret under a key that takes no string (ORCHESTRATOR_AUTH=<secret>).
        let e = Config::load(
            None,
            vec![(
                "ORCHESTRATOR_AUTH".to_string(),
                "leak-me-0123456789".to_string(),
            )],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("leak-me"), "{e}");
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "node_id = 2\napi_addr = \"127.0.0.1:7000\"\n[raft]\nheartbeat_ms = 120\n",
        )
        .unwrap();
        let env = vec![
            (
                "ORCHESTRATOR_API_ADDR".to_string(),
                "127.0.0.1:7001".to_string(),
            ),
            (
                "ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MIN_MS".to_string(),
                "450".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let flags = vec![("api_addr".to_string(), "127.0.0.1:7002".to_string())];
        let c = Config::load(Some(&file), env, &flags).unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.api_addr, "127.0.0.1:7002");
        assert_eq!(c.raft.heartbeat_ms, 120);
        assert_eq!(c.raft.election_timeout_min_ms, 450);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "nodeid = 2\n").unwrap();
        let err = Config::load(Some(&file), vec![], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nodeid"), "{err}");
        let err = Config::load(None, vec![], &[("api_addr".into(), "nope".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_addr 'nope'"), "{err}");
    }

    #[test]
    fn a_missing_secret_file_is_named_as_the_setting_not_the_config_file() {
        let flags = [(
            "cluster_secret_file".to_string(),
            "/nonexistent/cluster.secret".to_string(),
        )];
        let err = Config::load(None, vec![], &flags).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot read cluster_secret_file /nonexistent/cluster.secret"
        );
    }

    #[test]
    fn client_variables_are_not_server_config() {
        let env = ["TOKEN", "API", "OUTPUT", "CONFIG"]
            .map(|k| (format!("ORCHESTRATOR_{k}"), "x".to_string()));
        let c = Config::load(None, env, &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn max_protocol_is_one_this_binary_applies() {
        let newest = crate::state::machine::PROTOCOL_VERSION;
        for bad in ["0".to_string(), (newest + 1).to_string()] {
            let flags = [("raft.max_protocol".to_string(), bad.clone())];
            let err = Config::load(None, vec![], &flags).unwrap_err().to_string();
            assert!(err.contains("raft.max_protocol"), "{bad}: {err}");
        }
        let flags = [("raft.max_protocol".to_string(), "1".to_string())];
        let c = Config::load(None, vec![], &flags).expect("protocol 1 is valid");
        assert_eq!(c.raft.max_protocol, Some(1));
    }

    #[test]
    fn fence_margin_follows_a_short_lease_unless_set() {
        let flags = [
            ("executor.lease_ms".to_string(), "2500".to_string()),
            ("executor.heartbeat_ms".to_string(), "300".to_string()),
        ];
        let c = Config::load(None, vec![], &flags).expect("a short lease alone is valid");
        assert_eq!(c.executor.fence_margin(), 500);
        assert_eq!(Config::default().executor.fence_margin(), 2000);
    }

    #[test]
    fn fence_margin_must_fit_in_the_lease() {
        let flags = [("executor.fence_margin_ms".to_string(), "9000".to_string())];
        let err = Config::load(None, vec![], &flags).unwrap_err().to_string();
        assert!(err.contains("fence_margin_ms"), "{err}");
    }

    #[test]
    fn secrets_and_the_data_dir_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        // An old world-readable secret is narrowed, a new one created private.
        std::fs::write(data.join("cluster.secret"), "an-old-cluster-secret").unwrap();
        std::fs::set_permissions(
            data.join("cluster.secret"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut c = Config {
            data_dir: data.clone(),
            ..Config::default()
        };
        private_dir(&data).unwrap();
        assert_eq!(c.resolve_cluster_secret().unwrap(), "an-old-cluster-secret");
        c.resolve_hs256_secret().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("cluster.secret")), 0o600);
        assert_eq!(mode(&data.join("dev-jwt.secret")), 0o600);
    }

    #[test]
    fn the_shell_work_dir_is_outside_the_data_dir() {
        let c = Config {
            data_dir: PathBuf::from("/srv/orch/data"),
            ..Config::default()
        };
        assert_eq!(c.shell_work_dir(), PathBuf::from("/srv/orch/data-work"));
        let flags = [
            ("data_dir".to_string(), "/srv/orch/data".to_string()),
            (
                "executor.shell_work_dir".to_string(),
                "/srv/orch/data/work".to_string(),
            ),
        ];
        let err = Config::load(None, vec![], &flags).unwrap_err().to_string();
        assert!(err.contains("outside data_dir"), "{err}");
    }

    #[test]
    fn peers_from_a_flag_need_a_secret() {
        let flags = vec![(
            "peers".to_string(),
            "2=127.0.0.1:8082/127.0.0.1:9082".to_string(),
        )];
        let err = Config::load(None, vec![], &flags).unwrap_err().to_string();
        assert!(err.contains("cluster_secret"), "{err}");
        let mut flags = flags;
        flags.push(("cluster_secret".into(), "0123456789abcdef0".into()));
        let c = Config::load(None, vec![], &flags).unwrap();
        assert_eq!(c.peers[0].peer_addr, "127.0.0.1:9082");
    }

    #[test]
    fn a_cluster_secret_under_16_bytes_is_refused_with_or_without_peers() {
        let short = vec![("cluster_secret".to_string(), "x".repeat(15))];
        let err = Config::load(None, vec![], &short).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        let mut with_peers = short.clone();
        with_peers.push((
            "peers".to_string(),
            "2=127.0.0.1:8082/127.0.0.1:9082".to_string(),
        ));
        let err = Config::load(None, vec![], &with_peers)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16"), "{err}");
        let enough = vec![("cluster_secret".to_string(), "x".repeat(16))];
        Config::load(None, vec![], &enough).unwrap();
        // The same floor for a secret kept in the data dir (edited there by hand).
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        std::fs::write(dir.path().join("cluster.secret"), "x".repeat(15)).unwrap();
        let err = c.resolve_cluster_secret().unwrap_err().to_string();
        assert!(
            err.contains("cluster.secret") && err.contains("at least 16"),
            "{err}"
        );
        std::fs::write(dir.path().join("cluster.secret"), "x".repeat(16)).unwrap();
        assert_eq!(c.resolve_cluster_secret().unwrap(), "x".repeat(16));
    }
}
