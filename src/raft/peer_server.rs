//! The peer listener: Raft RPCs (`/raft/*`) and node-to-node calls (`/cluster/*`:
//! forwarded writes, read index, membership, status, clock). Served on the peer address only;
//! rate-limit gossip; every request must carry the cluster secret and this node's id
//! (checked before its body is read; the join probe `/cluster/hello` proves the secret
//! instead of asking for it), and a malformed body is answered with an error, never a
//! crash.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, warn};

use super::network::{HEADER_SECRET, HEADER_TARGET, HEADER_TARGET_DISK};
use super::node::{ForwardedWrites, LogRequest, MembershipOp, RaftNode};
use crate::rate_limit::{RateLimiter, Report};
use crate::state::Batch;

#[derive(Clone)]
struct PeerState {
    node: RaftNode,
    /// Where forwarded writes go: the node's proposer.
    forwarded: std::sync::Arc<dyn ForwardedWrites>,
    secret: std::sync::Arc<str>,
    limiter: std::sync::Arc<RateLimiter>,
    /// Refused callers are logged at most once per [`REFUSALS_LOGGED_EVERY`]: anyone who
    /// reaches the port could otherwise fill the disk with log lines.
    refusals: std::sync::Arc<Refusals>,
    /// Join probes answered, logged the same way.
    hellos: std::sync::Arc<Refusals>,
    /// Raft calls for another disk, logged the same way (apart: their steady stream must
    /// not hide a wrong secret's lines).
    disk_refusals: std::sync::Arc<Refusals>,
}

const REFUSALS_LOGGED_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Refused (or, for join probes, answered) peer calls since the last one logged. By
/// hand: a counter and a time, which no log-throttling crate makes simpler.
#[derive(Default)]
struct Refusals {
    since_logged: std::sync::atomic::AtomicU64,
    logged_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Refusals {
    /// Count a refusal; Some(refusals since the last line) when this one is to be logged.
    fn count(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let n = self.since_logged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut at = self.logged_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_some_and(|t| t.elapsed() < REFUSALS_LOGGED_EVERY) {
            return None;
        }
        *at = Some(std::time::Instant::now());
        self.since_logged.store(0, Ordering::Relaxed);
        Some(n)
    }
}

/// The peer router for `node`, accepting only calls that carry `secret`; forwarded
/// writes go to `forwarded`.
pub fn router(
    node: RaftNode,
    forwarded: std::sync::Arc<dyn ForwardedWrites>,
    secret: &str,
    limiter: std::sync::Arc<RateLimiter>,
) -> Router {
    let state = PeerState {
        node,
        forwarded,
        refusals: Default::default(),
        hellos: Default::default(),
        disk_refusals: Default::default(),
        secret: secret.into(),
        limiter,
    };
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/cluster/propose", post(propose))
        .route("/cluster/read-index", post(read_index))
        .route("/cluster/membership", post(membership))
        .route("/cluster/status", post(status))
        .route("/cluster/clock", post(clock))
        .route("/cluster/log", post(attempt_log))
        .route("/cluster/rate", post(rate_report))
        .layer(DefaultBodyLimit::max(256 << 20))
        // The caller is checked before any body is read: an unauthenticated request
        // costs its headers and nothing more.
        .route_layer(middleware::from_fn_with_state(state.clone(), gate))
        // The join probe needs no secret (its answer proves the secret instead).
        .route(
            "/cluster/hello",
            post(hello)
                .layer(DefaultBodyLimit::max(1024))
                .layer(middleware::from_fn_with_state(state.clone(), bounded_probe)),
        )
        .with_state(state)
}

fn reject(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": "peer_rejected", "message": message})),
    )
        .into_response()
}

/// Admit only callers with the cluster secret and this node's id, before the body.
async fn gate(State(st): State<PeerState>, req: Request, next: Next) -> Response {
    match check_caller(&st, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => {
            // Not reading the body: the connection is closed rather than drained.
            let mut r = r;
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// The join probe is the one call anyone may send: it gets as long for its (at most
/// 1 KiB) body and answer as a connection gets for its headers. Without this bound a
/// body trickled a byte a minute held a connection for hours, and enough of them filled
/// the listener's connection cap. Not reading the rest, the connection is closed.
async fn bounded_probe(State(st): State<PeerState>, req: Request, next: Next) -> Response {
    let bound = std::time::Duration::from_millis(st.node.config().header_read_timeout_ms);
    match tokio::time::timeout(bound, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = reject(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the join probe did not arrive within {} ms",
                    bound.as_millis()
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Decode an admitted call's body.
fn admit<T: DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        reject(
            StatusCode::BAD_REQUEST,
            format!("malformed peer request: {e}"),
        )
    })
}

/// The cluster secret (compared in constant time) and this node's id as the target.
fn check_caller(st: &PeerState, headers: &HeaderMap) -> Result<(), Response> {
    let secret = headers.get(HEADER_SECRET).and_then(|v| v.to_str().ok());
    // Constant-time comparison: the secret must not leak through timing.
    let ok = secret.is_some_and(|s| {
        s.len() == st.secret.len()
            && s.bytes()
                .zip(st.secret.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        if let Some(refused) = st.refusals.count() {
            warn!(
                node = st.node.id,
                refused, "peer calls with a missing or wrong cluster secret (logged once per 10 s)"
            );
        }
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "wrong or missing cluster secret".into(),
        ));
    }
    let target = headers
        .get(HEADER_TARGET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if target != Some(st.node.id) {
        if let Some(refused) = st.refusals.count() {
            warn!(
                node = st.node.id,
                ?target,
                refused,
                "peer calls addressed to another node (logged once per 10 s)"
            );
        }
        return Err(reject(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this is node {}, not {:?}", st.node.id, target),
        ));
    }
    // Raft calls name the disk the cluster knows this node by: another one here (a wiped
    // or replaced data dir) must not vote, nor take a log it acknowledged once and lost.
    let disk = headers
        .get(HEADER_TARGET_DISK)
        .and_then(|v| v.to_str().ok());
    if let Some(expected) = disk.filter(|d| *d != st.node.disk) {
        if let Some(refused) = st.disk_refusals.count() {
            warn!(
                node = st.node.id,
                expected,
                disk = %st.node.disk,
                refused,
                "Raft calls for the disk this node held before: its data dir was wiped or \
                 replaced, so it takes no part until an operator removes node {} and adds \
                 it again (logged once per 10 s)",
                st.node.id
            );
        }
        return Err(reject(
            StatusCode::CONFLICT,
            format!(
                "node {} holds another disk than the one the cluster knows (its data dir was \
                 wiped or replaced): remove node {} and add it again",
                st.node.id, st.node.id
            ),
        ));
    }
    Ok(())
}

fn reply<T: Serialize>(v: T) -> Response {
    Json(v).into_response()
}

async fn append(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit(&body) {
        Ok(req) => reply(st.node.raft.append_entries(req).await),
        Err(r) => r,
    }
}

async fn vote(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit(&body) {
        Ok(req) => reply(st.node.raft.vote(req).await),
        Err(r) => r,
    }
}

async fn snapshot(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit(&body) {
        Ok(req) => reply(st.node.raft.install_snapshot(req).await),
        Err(r) => r,
    }
}

async fn propose(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<Batch>(&body) {
        Ok(batch) => reply(st.forwarded.propose_forwarded(batch).await),
        Err(r) => r,
    }
}

async fn read_index(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<()>(&body) {
        Ok(()) => reply(st.node.read_index().await),
        Err(r) => r,
    }
}

async fn membership(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<MembershipOp>(&body) {
        Ok(op) => reply(st.node.change_membership(op).await),
        Err(r) => r,
    }
}

async fn status(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<()>(&body) {
        Ok(()) => reply(st.node.status().await),
        Err(r) => r,
    }
}

/// The join probe ([`super::hello`]): who this node is, with a proof that it holds the
/// cluster secret, to a caller that need not hold it. Addressed to this node's id like
/// every peer call.
async fn hello(State(st): State<PeerState>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get(HEADER_TARGET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if target != Some(st.node.id) {
        return reject(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this is node {}, not {:?}", st.node.id, target),
        );
    }
    let req = match admit::<super::hello::HelloRequest>(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    if req.nonce.len() < 32 || req.nonce.len() > super::hello::MAX_NONCE_LEN {
        return reject(
            StatusCode::BAD_REQUEST,
            format!(
                "a nonce has 32 to {} characters",
                super::hello::MAX_NONCE_LEN
            ),
        );
    }
    // A node that belongs to a cluster cannot join another, so it proves nothing: only a
    // node waiting to be added answers with a proof, and a member's secret is never
    // exposed to offline guessing through this path. Anyone may send this, so a member
    // is recognised from its metrics, without a trip through Raft's core; metrics are
    // empty until the core first reports, so a node that looks uninitialized is asked
    // through the core too (cheap for a node waiting to join; no answer counts as
    // initialized).
    let initialized = {
        let m = st.node.raft.metrics().borrow().clone();
        m.last_log_index.is_some() || m.vote != openraft::Vote::default()
    } || tokio::time::timeout(
        std::time::Duration::from_secs(1),
        st.node.raft.is_initialized(),
    )
    .await
    .map_or(true, |r| r.unwrap_or(true));
    let peer_addr = st.node.self_member().peer_addr;
    if let Some(answered) = st.hellos.count() {
        info!(
            node = st.node.id,
            answered, initialized, "answered join probes (logged once per 10 s)"
        );
    }
    // A secret too short to withstand offline guessing is never proved: such a node
    // joins through configured peers only (it warned at start).
    let provable = st.secret.len() >= crate::config::MIN_CLUSTER_SECRET_LEN;
    let proof = if initialized || !provable {
        String::new()
    } else {
        super::hello::prove(&st.secret, &req.nonce, st.node.id, &peer_addr)
    };
    reply(super::hello::Hello {
        node_id: st.node.id,
        proof,
        peer_addr,
        initialized,
        protocol_supported: st.node.protocol_offered(),
        disk: Some(st.node.disk.clone()),
    })
}

/// This node's wall clock, read first thing: the clock sample ([`super::clock`]) wants
/// a reply that does nothing else.
async fn clock(State(_): State<PeerState>, body: Bytes) -> Response {
    let wall_ms = super::clock::wall_ms();
    match admit::<()>(&body) {
        Ok(()) => reply(super::clock::ClockReading { wall_ms }),
        Err(r) => r,
    }
}

async fn attempt_log(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<LogRequest>(&body) {
        Ok(r) => reply(st.node.local_attempt_log(&r.run_id, &r.task_id, r.attempt)),
        Err(r) => r,
    }
}

async fn rate_report(State(st): State<PeerState>, body: Bytes) -> Response {
    match admit::<Report>(&body) {
        Ok(r) => {
            st.limiter.merge(r);
            reply(())
        }
        Err(r) => r,
    }
}
