//! `/metrics` in the Prometheus text format, rendered by the process's recorder
//! ([`crate::telemetry::metrics`]). Histograms and event counters are recorded where the
//! events happen; this handler only sets the gauges that are read off current state:
//! this node's Raft view, its executor slots, the run/task census and the replicated
//! counters (a fixed number of reads: a scrape costs the same whatever the number of
//! runs). It also records each API request's latency ([`record_request`]).

use std::time::Instant;

use axum::extract::State;
use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge, histogram};

use super::routes::ApiState;
use crate::state::census::{self, RUN_STATES, TASK_STATES};
use crate::state::machine::counters;
use crate::state::model::RunState;
use crate::state::Table;
use crate::telemetry::metrics as m;

/// Count and time one answered request. `route` is the matched route template (or
/// `unmatched`); methods outside the standard set count as `other`.
pub(super) fn record_request(method: &Method, route: &str, status: u16, started: Instant) {
    let method = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let class = m::status_class(status);
    counter!(m::HTTP_RESPONSES, "class" => class).increment(1);
    histogram!(m::HTTP_DURATION, "method" => method, "route" => route.to_string(), "class" => class)
        .record(started.elapsed().as_secs_f64());
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "This node's metrics in the Prometheus text exposition format. No token.",
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "text/plain; version=0.0.4",
            example = "# HELP orchestrator_raft_term Current Raft term.\n# TYPE orchestrator_raft_term gauge\norchestrator_raft_term{node=\"1\"} 3\n"),
    ),
)]
pub async fn metrics(State(st): State<ApiState>) -> Response {
    let (s, ready) = super::cluster::readiness(&st).await;
    let opt = |v: Option<u64>| v.map_or(0.0, |x| x as f64);
    gauge!(m::RAFT_TERM).set(s.term as f64);
    gauge!(m::RAFT_IS_LEADER).set(if s.leader == Some(s.node_id) {
        1.0
    } else {
        0.0
    });
    gauge!(m::RAFT_CURRENT_LEADER).set(opt(s.leader));
    gauge!(m::RAFT_LAST_LOG_INDEX).set(opt(s.last_log_index));
    gauge!(m::RAFT_COMMITTED_INDEX).set(opt(s.committed_index));
    gauge!(m::RAFT_APPLIED_INDEX).set(opt(s.applied_index));
    gauge!(m::RAFT_SNAPSHOT_INDEX).set(opt(s.snapshot_index));
    gauge!(m::RAFT_LOG_SIZE).set(s.log_size_bytes as f64);
    gauge!(m::NODE_READY).set(if ready { 1.0 } else { 0.0 });
    // Leader only (empty elsewhere; members are few). A series not set again (this node
    // stopped leading, the member was removed) leaves the scrape after 30 s.
    for (follower, lag) in &s.replication_lag {
        gauge!(m::RAFT_REPLICATION_LAG, "follower" => follower.to_string()).set(opt(*lag));
    }
    if let Some((running, slots, _)) = st.actors.executor.slots().await {
        gauge!(m::EXECUTOR_RUNNING).set(running as f64);
        gauge!(m::EXECUTOR_SLOTS).set(f64::from(slots));
    }
    let c = st.node.sm.census();
    for state in RUN_STATES {
        gauge!(m::RUNS, "state" => census::run_state_name(state)).set(c.run(state) as f64);
    }
    gauge!(m::RUNS_ACTIVE).set((c.run(RunState::Queued) + c.run(RunState::Running)) as f64);
    for state in TASK_STATES {
        gauge!(m::TASKS, "state" => census::task_state_name(state)).set(c.task(state) as f64);
    }
    for name in counters::ALL {
        let v = st
            .node
            .db
            .get(Table::Counters.name(), name)
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let metric = format!(
            "{}{}_total",
            m::COUNTER_PREFIX,
            String::from_utf8_lossy(name)
        );
        counter!(metric).absolute(v);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}
