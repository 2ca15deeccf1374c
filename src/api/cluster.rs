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
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::routes::{json_body, ApiState};
use tracing::info;

use crate::auth::Principal;
use crate::cidr;
use crate::raft::node::MembershipOp;
use crate::raft::Member;

/// Process alive.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready when this node knows a leader and has applied what it knows to be committed; a
/// leader also needs a quorum that answered within an election timeout.
pub async fn readyz(State(st): State<ApiState>) -> Response {
    let s = st.node.status().await;
    let ready = is_ready(&st, &s);
    let body = json!({
        "ready": ready,
        "node_id": s.node_id,
        "state": s.state,
        "leader": s.leader,
        "term": s.term,
        "applied_index": s.applied_index,
        "committed_index": s.committed_index,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// What `/readyz` decides from the node's status (also exported as a metric).
pub(crate) fn is_ready(st: &ApiState, s: &crate::raft::node::Status) -> bool {
    let quorum = !st.node.leads_without_quorum();
    let caught_up = match (s.applied_index, s.committed_index) {
        (_, None) => true,
        (Some(a), Some(c)) => a >= c,
        (None, Some(_)) => false,
    };
    s.initialized && s.leader.is_some() && caught_up && quorum
}

/// `GET /cluster/status`: members, leader, term, indexes, lag, state digest, executor.
pub async fn status(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
) -> Result<Response, ApiError> {
    p.require_operator(&st.node.config().auth.operator_tenants)?;
    let s = st.node.status().await;
    let digest = st.node.db.state_digest()?;
    let mut v = serde_json::to_value(&s).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["state_digest"] = json!(digest);
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
    v["protocol"] = json!(protocol);
    if let Some((running, slots, ready)) = st.actors.executor.slots().await {
        v["executor"] = json!({"running": running, "slots": slots, "ready": ready});
    }
    let stats = &st.actors.scheduler.stats;
    use std::sync::atomic::Ordering::Relaxed;
    v["scheduler"] = json!({
        "windows_fired": stats.windows_fired.load(Relaxed),
        "last_fire_lag_ms": stats.last_lag_ms.load(Relaxed),
        "max_fire_lag_ms": stats.max_lag_ms.load(Relaxed),
    });
    Ok(Json(v).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberInput {
    node_id: u64,
    api_addr: String,
    peer_addr: String,
}

/// `POST /cluster/members`: add a node as learner, let it catch up, make it a voter.
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
        },
    };
    let status = st.node.change_membership_anywhere(op).await?;
    Ok(Json(status).into_response())
}

/// `DELETE /cluster/members/{node_id}`.
pub async fn remove_member(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(node_id): Path<String>,
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
    Ok(Json(json!({
        "snapshot_index": applied,
        "log_size_bytes_before": before,
        "log_size_bytes_after": st.node.db.log_size_bytes(),
    }))
    .into_response())
}
