//! Health and cluster endpoints: `/healthz`, `/readyz`, cluster status, membership
//! changes and on-demand snapshots. Everything but the health probes belongs to operators
//! (admins of `auth.operator_tenants`): tenants see no node addresses.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::routes::{json_body, ApiState};
use tracing::info;

use crate::auth::Principal;
use crate::cidr;
use crate::raft::node::{MembershipOp, Status};
use crate::raft::Member;

/// The answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// The answer of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub node_id: u64,
    /// This node's Raft role (`leader`, `follower`, `candidate`, `learner`, `shutdown`).
    pub state: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: Option<u64>,
    pub committed_index: Option<u64>,
}

/// Process alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    summary = "Liveness",
    description = "The process answers HTTP. No token.",
    responses((status = 200, description = "Alive.", body = Health, example = json!({"status": "ok"}))),
)]
pub async fn healthz() -> Response {
    Json(Health { status: "ok" }).into_response()
}

/// Ready when this node is a member, knows a leader and has applied what it knows to be
/// committed; a leader also needs a quorum that answered within an election timeout.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    summary = "Readiness",
    description = "Ready when this node is a member of its cluster (on the disk it joined with), knows a \
leader and has applied what it knows to be committed (within half a second); a leader also needs a quorum \
that answered within an election timeout. No token.",
    responses(
        (status = 200, description = "Ready.", body = Readiness, example = json!({"ready": true, "node_id": 1,
            "state": "leader", "leader": 1, "term": 3, "applied_index": 120, "committed_index": 120})),
        (status = 503, description = "Not ready (same body, `ready: false`).", body = Readiness),
    ),
)]
pub async fn readyz(State(st): State<ApiState>) -> Response {
    let (s, ready) = readiness(&st).await;
    let body = Readiness {
        ready,
        node_id: s.node_id,
        state: s.state,
        leader: s.leader,
        term: s.term,
        applied_index: s.applied_index,
        committed_index: s.committed_index,
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The node's status and whether it is ready (`/readyz`, and the `node_ready` metric).
/// Ready: in a cluster, knowing a leader, caught up, and, as leader, heard from a
/// quorum within its lease. Everything comes from one status: a leader that stepped
/// down after it was taken must not pass as a leader (from it) that needs no quorum
/// (from a later read).
///
/// Caught up: applying as it should, a node trails what it knows to be committed by the
/// entries being applied (a follower under load, nearly always), so it is caught up if
/// it reaches that index within [`APPLY_GRACE`], not only if it happened to be idle at
/// the instant it was asked.
pub(crate) async fn readiness(st: &ApiState) -> (crate::raft::node::Status, bool) {
    let s = st.node.status().await;
    let behind = match (s.applied_index, s.committed_index) {
        (Some(applied), Some(committed)) if applied < committed => Some(committed),
        _ => None,
    };
    let Some(committed) = behind else {
        let ready = is_ready_by(st, &s, s.committed_index);
        return (s, ready);
    };
    // openraft's own figure, the one the status reports (it moves just after apply
    // returns).
    let reached = st
        .node
        .raft
        .wait(Some(APPLY_GRACE))
        .applied_index_at_least(Some(committed), "readiness")
        .await
        .is_ok();
    let s = st.node.status().await;
    let target = if reached {
        Some(committed)
    } else {
        s.committed_index
    };
    let ready = is_ready_by(st, &s, target);
    (s, ready)
}

/// Ready from `s`, the node caught up once it has applied `committed`.
fn is_ready_by(st: &ApiState, s: &crate::raft::node::Status, committed: Option<u64>) -> bool {
    let quorum =
        s.state != "leader" || st.node.quorum_acked_within_lease(s.millis_since_quorum_ack);
    s.initialized
        && s.leader.is_some()
        && caught_up(s.applied_index, committed)
        && quorum
        && own_member(s.node_id, &s.members, s.disk.as_deref())
}

/// Whether this node is a member of the membership it applied, on the disk that member
/// joined with. A removed node (it still names its last leader), or one whose disk the
/// cluster refuses (a wiped or restored copy, until it is re-added or given its identity),
/// serves nothing, however caught up it looks from what it holds.
fn own_member(
    node_id: crate::raft::NodeId,
    members: &std::collections::BTreeMap<crate::raft::NodeId, crate::raft::types::Member>,
    disk: Option<&str>,
) -> bool {
    members.get(&node_id).is_some_and(|m| {
        m.disk
            .as_deref()
            .is_none_or(|d| disk.is_none_or(|own| own == d))
    })
}

/// How long a readiness check waits for a node to apply what it knew to be committed.
/// A node that applies is there within milliseconds; one that is stuck or far behind is
/// not, and answers 503 (a probe's timeout is usually a second or more).
const APPLY_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a node has applied what it knows to be committed. One that has applied
/// nothing is not (a node being added, before its first entry: it answered ready with
/// an empty state while it did not know a committed index yet).
fn caught_up(applied: Option<u64>, committed: Option<u64>) -> bool {
    match (applied, committed) {
        (Some(_), None) => true,
        (Some(a), Some(c)) => a >= c,
        (None, _) => false,
    }
}

/// This node's executor.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutorSlots {
    /// Attempts running on this node.
    pub running: usize,
    pub slots: u32,
    /// Whether it takes work.
    pub ready: bool,
}

/// This node's scheduler (the leader's fires; others read 0 or their last term's).
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerStats {
    pub windows_fired: u64,
    pub last_fire_lag_ms: i64,
    pub max_fire_lag_ms: i64,
}

/// `GET /cluster/status`: the node's Raft view plus digest, executor and scheduler.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterStatus {
    #[serde(flatten)]
    pub raft: Status,
    /// A hash of the replicated state: equal on nodes that applied the same index.
    pub state_digest: String,
    /// Absent while the executor actor does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorSlots>,
    /// The replicated protocol version this replica has applied (1 when never raised).
    pub protocol: u64,
    pub scheduler: SchedulerStats,
}

/// `GET /cluster/status`: members, leader, term, indexes, lag, state digest, executor.
#[utoipa::path(
    get,
    path = "/cluster/status",
    tag = "cluster",
    operation_id = "cluster_status",
    summary = "Cluster status (operators)",
    description = "This node's view: members, leader, term, log indexes, per-member replication lag \
(on the leader), state digest, executor slots and scheduler fire lag. Operators only: an admin \
token of a tenant in `auth.operator_tenants`.",
    responses(
        (status = 200, description = "The status.", body = ClusterStatus),
        (status = 403, description = "Not an operator (an admin token of a tenant in `auth.operator_tenants`).", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:admin"]))
)]
pub async fn status(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
) -> Result<Response, ApiError> {
    p.require_operator(&st.node.config().auth.operator_tenants)?;
    let raft = st.node.status().await;
    let state_digest = st.node.db.state_digest()?;
    let executor = st
        .actors
        .executor
        .slots()
        .await
        .map(|(running, slots, ready)| ExecutorSlots {
            running,
            slots,
            ready,
        });
    // The replicated protocol version this replica has applied (1 when never raised).
    let protocol = st
        .node
        .db
        .get(
            crate::state::Table::Counters.name(),
            crate::state::machine::clock::PROTOCOL,
        )?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(1, u64::from_be_bytes);
    let stats = &st.actors.scheduler.stats;
    use std::sync::atomic::Ordering::Relaxed;
    let scheduler = SchedulerStats {
        windows_fired: stats.windows_fired.load(Relaxed),
        last_fire_lag_ms: stats.last_lag_ms.load(Relaxed),
        max_fire_lag_ms: stats.max_lag_ms.load(Relaxed),
    };
    Ok(Json(ClusterStatus {
        raft,
        state_digest,
        executor,
        protocol,
        scheduler,
    })
    .into_response())
}

/// A node to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"node_id": 4, "api_addr": "10.0.0.4:8080", "peer_addr": "10.0.0.4:9090"}))]
pub struct MemberInput {
    /// A node id not in the cluster.
    #[schema(minimum = 1)]
    node_id: u64,
    /// The node's API address, `IP:port`, inside `peer_networks`.
    #[schema(examples("10.0.0.4:8080"))]
    api_addr: String,
    /// The node's peer (Raft) address, `IP:port`, inside `peer_networks`.
    #[schema(examples("10.0.0.4:9090"))]
    peer_addr: String,
}

/// The `{node_id}` of a member path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MemberPath {
    /// The member's node id.
    #[param(value_type = u64, minimum = 1)]
    pub node_id: String,
}

/// What a snapshot did.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotReport {
    /// The log index the snapshot covers.
    pub snapshot_index: Option<u64>,
    pub log_size_bytes_before: u64,
    pub log_size_bytes_after: u64,
}

/// `POST /cluster/members`: add a node as learner, let it catch up, make it a voter.
#[utoipa::path(
    post,
    path = "/cluster/members",
    tag = "cluster",
    operation_id = "add_member",
    summary = "Add a node (operators)",
    description = "Checks that the node answers on its peer address as `node_id`, proves it holds the \
cluster secret (without being sent it), advertises that peer address, belongs to no cluster \
and applies the cluster's protocol; adds it as a learner, waits (up to 45 s) until it has caught up, then makes \
it a voter. A node that does not catch up is removed again: it never becomes a voter the quorum would need. \
Adding a voter again at the same addresses changes nothing. Answers the cluster status after the change.",
    request_body(content = MemberInput),
    responses(
        (status = 200, description = "Added (or already a voter at these addresses); the cluster status after \
the change.", body = Status),
        (status = 400, description = "Malformed JSON, an unknown field, an address that is not `IP:port` or is \
outside `peer_networks`; or a change the cluster refuses: the node does not answer at `peer_addr` within 5 s, \
answers as another node, cannot prove it holds the cluster secret, advertises another peer address (or \
`0.0.0.0`/`::`), does not serve the join probe (not an orchestrator node, or an older binary), already \
belongs to a cluster, runs a binary older than the cluster's protocol, did not \
catch up, or `node_id` is a member at other addresses.", body = ErrorBody),
        (status = 403, description = "Not an operator.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:admin"]))
)]
pub async fn add_member(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    p.require_operator(&st.node.config().auth.operator_tenants)?;
    let m: MemberInput = serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid member: {e}")))?;
    let networks = cidr::parse_all(&st.node.config().peer_networks)
        .map_err(|e| ApiError::Internal(format!("peer_networks: {e}")))?;
    for (f, a) in [("api_addr", &m.api_addr), ("peer_addr", &m.peer_addr)] {
        let Ok(addr) = a.parse::<std::net::SocketAddr>() else {
            return Err(ApiError::InvalidRequest(format!(
                "{f}: '{a}' is not IP:port"
            )));
        };
        if !cidr::any_contains(&networks, addr.ip()) {
            return Err(ApiError::InvalidRequest(format!(
                "{f}: {} is outside the cluster's peer networks (peer_networks)",
                addr.ip()
            )));
        }
    }
    if m.node_id == 0 {
        return Err(ApiError::InvalidRequest("node_id must be 1 or more".into()));
    }
    info!(
        audit = "membership",
        action = "add",
        subject = %p.subject,
        tenant = %p.tenant,
        node_id = m.node_id,
        api_addr = %m.api_addr,
        peer_addr = %m.peer_addr,
        "membership change requested"
    );
    let op = MembershipOp::Add {
        node_id: m.node_id,
        member: Member {
            api_addr: m.api_addr,
            peer_addr: m.peer_addr,
            // Learned from the node itself (its join probe), never from the caller.
            disk: None,
        },
    };
    let status = st.node.change_membership_anywhere(op).await?;
    Ok(Json(status).into_response())
}

/// `DELETE /cluster/members/{node_id}`.
#[utoipa::path(
    delete,
    path = "/cluster/members/{node_id}",
    tag = "cluster",
    operation_id = "remove_member",
    summary = "Remove a node (operators)",
    description = "Removes the node from the voters and from the cluster. Answers the cluster status after the change.",
    params(MemberPath),
    responses(
        (status = 200, description = "Removed; the cluster status after the change.", body = Status),
        (status = 400, description = "`node_id` is not a number, not a member, or the last voter.", body = ErrorBody),
        (status = 403, description = "Not an operator.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:admin"]))
)]
pub async fn remove_member(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(MemberPath { node_id }): Path<MemberPath>,
) -> Result<Response, ApiError> {
    p.require_operator(&st.node.config().auth.operator_tenants)?;
    let node_id: u64 = node_id
        .parse()
        .map_err(|_| ApiError::InvalidRequest(format!("node id '{node_id}' is not a number")))?;
    info!(
        audit = "membership",
        action = "remove",
        subject = %p.subject,
        tenant = %p.tenant,
        node_id,
        "membership change requested"
    );
    let status = st
        .node
        .change_membership_anywhere(MembershipOp::Remove { node_id })
        .await?;
    Ok(Json(status).into_response())
}

/// `POST /cluster/snapshot`: build a snapshot on this node now (the log behind it is
/// then purged) and report the log size before and after.
#[utoipa::path(
    post,
    path = "/cluster/snapshot",
    tag = "cluster",
    operation_id = "snapshot",
    summary = "Snapshot this node (operators)",
    description = "Builds a snapshot on this node now, purges the log behind it and reports the log size \
before and after. Takes no body (one sent is ignored).",
    responses(
        (status = 200, description = "Done.", body = SnapshotReport),
        (status = 403, description = "Not an operator.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:admin"]))
)]
pub async fn snapshot(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    _body: Bytes,
) -> Result<Response, ApiError> {
    p.require_operator(&st.node.config().auth.operator_tenants)?;
    info!(audit = "snapshot", subject = %p.subject, tenant = %p.tenant, "snapshot requested");
    let before = st.node.db.log_size_bytes();
    st.node
        .raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| ApiError::DependencyDown(e.to_string()))?;
    let applied = st.node.status().await.applied_index;
    st.node
        .raft
        .wait(Some(std::time::Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.map(|s| s.index) >= applied,
            "snapshot covering the applied index",
        )
        .await
        .map_err(|e| ApiError::DependencyDown(format!("snapshot did not complete: {e}")))?;
    st.node.db.compact_log();
    Ok(Json(SnapshotReport {
        snapshot_index: applied,
        log_size_bytes_before: before,
        log_size_bytes_after: st.node.db.log_size_bytes(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::{caught_up, own_member};
    use crate::raft::types::Member;

    #[test]
    fn a_removed_node_or_one_on_a_refused_disk_is_not_its_own_member() {
        let member = |disk: Option<&str>| Member {
            api_addr: "a".into(),
            peer_addr: "p".into(),
            disk: disk.map(String::from),
        };
        let members = [(1, member(Some("d1"))), (2, member(None))].into();
        assert!(own_member(1, &members, Some("d1")));
        assert!(
            !own_member(1, &members, Some("other")),
            "a wiped or copied disk"
        );
        assert!(
            own_member(2, &members, Some("d2")),
            "joined before disks: unchecked"
        );
        assert!(!own_member(3, &members, Some("d3")), "removed");
    }

    #[test]
    fn a_node_that_applied_nothing_is_not_caught_up() {
        assert!(!caught_up(None, None));
        assert!(!caught_up(None, Some(3)));
        assert!(!caught_up(Some(2), Some(3)));
        assert!(caught_up(Some(3), Some(3)));
        assert!(caught_up(Some(0), None));
    }
}
